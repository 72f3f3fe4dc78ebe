"""Benchmark recovery and load with the tiny model on this machine; prints tables.

    make bench        (or: .venv/bin/python -m bench.faults)

Runs the real stack (private redis-server, the three Celery workers, the bridge, the tiny
random-weight WAN model, local storage, callbacks to a local endpoint):
- `kill -9` of the generation pool child in the middle of denoising, to the job's
  generation running again (its next `generate` start in the job record), over a few runs;
- a burst of 200 of the cheapest jobs pushed at once: throughput, and the queue wait of
  each job (RPUSH to its first `generate` start), p50 and p95; and how many jobs a sweep
  sent again meanwhile (none should be: a waiting job's message is on its queue);
- jobs whose enhance message a dying consumer swallowed (taken off the queue as kombu's
  BRPOP takes it, and dropped) with LOST_JOB_TIMEOUT_S at 10 s: seconds from the swallow to
  the job's enhance starting again, p50;
- one sweep pass (lost jobs, swallowed messages, leftovers, the lanes' prune) beside 100,000
  finished records, against reading every record as the lost-job sweep did before;
- Redis killed (-9) for 5 s and for 60 s while the media worker holds a job's upload, then
  restarted with its append-only file (a stack of its own, uploads through the local
  platform's storage so they can be held): seconds until each worker consumes again.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from bench import TinyStack, tiny_stack
from tasks.chain import SENDER
from worker.flow.lanes import WaitingJobs, priority_lists, queue_depth
from worker.flow.reconcile import QueuedJobReconciler
from worker.jobs.model import parse_job
from worker.jobs.records import JobRecords
from worker.local.many_records import add_finished, finished_record, sweep_pass
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until
from worker.settings import Settings

QUEUE = "wan_queue"
KILLS = 3
BURST = 200
JOB_TIMEOUT_S = 900
#: The cheapest job: one 256x256 image, one step, no classifier-free guidance.
TINY_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}
#: The stack's LOST_JOB_TIMEOUT_S: a swallowed job's restart takes seconds, not minutes.
LOST_JOB_TIMEOUT_S = 10
SWALLOWS = 5
#: Finished records beside one sweep pass.
SWEPT_RECORDS = 100_000
#: Long enough to be caught in the middle of denoising.
KILLED_CONFIG = TINY_CONFIG | {"num_inference_steps": 40}
#: Redis outages after which the workers' resume is timed, seconds.
OUTAGES_S = (5, 60)
#: The Celery workers of the stack, which nothing restarts here.
CELERY_WORKERS = ("gpu", "enhance", "cpu")


def job(config: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "image_fast", "prompt": "a red fox in snow",
            "user_id": "bench", "config": config}  # fmt: skip


def kill_to_rerun_s(
    stack: LocalStack, client: redis.Redis, records: JobRecords, platform: LocalPlatform
) -> float:
    """One job killed (-9 of the pool child) once denoising runs; seconds to its next start."""
    killed = job(KILLED_CONFIG)
    client.rpush(QUEUE, queue_body(killed))

    def denoising() -> bool:
        progress = records.get(killed["id"]).value("progress")
        return progress is not None and (progress.get("step") or 0) >= 1

    wait_until(denoising, timeout_s=JOB_TIMEOUT_S, what="denoising", interval_s=0.01)
    [child] = stack.pids("gpu")[1:]
    killed_at = time.time()
    os.kill(child, signal.SIGKILL)

    def started_again() -> bool:
        return float(records.get(killed["id"]).fields["started:generate"]) > killed_at

    wait_until(started_again, timeout_s=JOB_TIMEOUT_S, what="generation again", interval_s=0.01)
    rerun_s = float(records.get(killed["id"]).fields["started:generate"]) - killed_at
    body = platform.wait_for_final(killed["id"], timeout_s=JOB_TIMEOUT_S).body
    if body["status"] != "completed":
        raise RuntimeError(f"killed job did not complete: {body['error_message']}")
    return rerun_s


def burst(
    client: redis.Redis, records: JobRecords, platform: LocalPlatform
) -> tuple[float, list[float]]:
    """(jobs per second from the push to the last final callback, queue waits in seconds)."""
    jobs = [job(TINY_CONFIG) for _ in range(BURST)]
    pushed_at = time.time()
    client.rpush(QUEUE, *(queue_body(j) for j in jobs))
    for j in jobs:
        platform.wait_for_final(j["id"], timeout_s=JOB_TIMEOUT_S)
    elapsed_s = time.time() - pushed_at
    waits = [records.get(j["id"]).first_started("generate") - pushed_at for j in jobs]
    return BURST / elapsed_s, waits


def outage_to_resume_s(tiny: TinyStack, outage_s: float) -> tuple[float, float, str]:
    """Redis killed (-9) for `outage_s` while the media worker holds a job's upload (a pool
    slot free, so its BRPOP pending: how kombu used to take a worker down, tasks/kombu_fix.py),
    then restarted with its data. Seconds from Redis answering again to the media worker
    starting the held job's final callback, and to a job pushed at that moment starting to
    generate (the bridge and the generation worker back); and the held job's final status."""
    platform, records = tiny.platform, tiny.records
    held, pushed = job(TINY_CONFIG), job(TINY_CONFIG)
    released = platform.hold_uploads()
    try:
        records.redis.rpush(QUEUE, queue_body(held))
        platform.wait_for_held_upload(timeout_s=JOB_TIMEOUT_S)
        tiny.redis_server.kill()
        time.sleep(outage_s)  # the outage itself, not a wait for an event
        tiny.redis_server.start()  # returns once Redis answers
        back_at = time.time()
    finally:
        released.set()
    records.redis.rpush(QUEUE, queue_body(pushed))
    held_status = platform.wait_for_final(held["id"], timeout_s=JOB_TIMEOUT_S).body["status"]
    body = platform.wait_for_final(pushed["id"], timeout_s=JOB_TIMEOUT_S).body
    if body["status"] != "completed":
        raise RuntimeError(f"a job pushed after the outage failed: {body['error_message']}")
    exited = [name for name in CELERY_WORKERS if tiny.stack.processes[name].poll() is not None]
    if exited:
        raise RuntimeError(f"workers exited in the Redis outage: {exited}")
    callback_at = records.get(held["id"]).first_started("callback")
    generate_at = records.get(pushed["id"]).first_started("generate")
    return callback_at - back_at, generate_at - back_at, held_status


def outage_rows(console: Console, workdir: Path) -> list[tuple[str, str]]:
    """The table's rows for OUTAGES_S, on a stack of their own: Redis with an append-only
    file, uploads through the local platform's storage (which can hold them)."""
    with ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, workdir / "outages", queue=QUEUE, aof=True,
                          settings={"STORAGE_BACKEND": "supabase"})  # fmt: skip
        warm = job(TINY_CONFIG)
        tiny.records.redis.rpush(QUEUE, queue_body(warm))
        tiny.platform.wait_for_final(warm["id"], timeout_s=JOB_TIMEOUT_S)
        rows = []
        for outage_s in OUTAGES_S:
            console.print(f"Redis down for {outage_s} s under a held upload ...")
            media_s, generation_s, held_status = outage_to_resume_s(tiny, outage_s)
            rows += [
                (f"Redis down {outage_s} s (no worker exits) -> media worker consuming "
                 "again: held job's final callback starts", f"{media_s:.2f} s"),
                ("... -> a job pushed on its return starts generating",
                 f"{generation_s:.2f} s"),
                ("... the held job's final status", held_status),
            ]  # fmt: skip
    return rows


def swallowed_to_restart_s(
    stack: LocalStack, client: redis.Redis, records: JobRecords
) -> list[float]:
    """Jobs whose enhance message was swallowed while the enhance worker was down; seconds
    from each swallow to the job's enhance starting again (its resent run)."""
    stack.kill("enhance")
    swallowed_at = {}
    for _ in range(SWALLOWS):
        swallowed = job(TINY_CONFIG)
        client.rpush(QUEUE, queue_body(swallowed))
        wait_until(lambda: queue_depth(client, "enhance") > 0, timeout_s=JOB_TIMEOUT_S,
                   what="the enhance message")  # fmt: skip
        client.brpop(priority_lists("enhance"), timeout=5)  # a dying consumer's take
        swallowed_at[swallowed["id"]] = records.now()
    stack.restart("enhance")

    def restarted() -> bool:
        fields = [records.get(job_id).fields for job_id in swallowed_at]
        return all(f.get("retries") == "1" and "started:enhance" in f for f in fields)

    wait_until(restarted, timeout_s=JOB_TIMEOUT_S, what="the swallowed jobs' restarts")
    return [float(records.get(job_id).fields["started:enhance"]) - at
            for job_id, at in swallowed_at.items()]  # fmt: skip


def sweep_pass_s(workdir: Path) -> tuple[float, float, float]:
    """On a private Redis with 100,000 finished records, 50 generating and 20 waiting jobs:
    (seconds to build the records, one sweep pass (median of 5), reading every record)."""
    server = RedisServer(workdir / "sweep-redis").start()
    try:
        records = JobRecords(redis.Redis.from_url(server.url), ttl_s=3600)
        built_at = time.monotonic()
        add_finished(records, finished_record(records), SWEPT_RECORDS)
        build_s = time.monotonic() - built_at
        settings = Settings()
        for n in range(70):
            active = parse_job(job(TINY_CONFIG))
            records.claim(active.id)
            records.create(active, payload="{}")
            if n < 50:
                records.begin_stage(active.id, "generate", lease_s=60, max_deliveries=3)
            else:
                WaitingJobs(records.redis, settings).enter(active)
        reconciler = QueuedJobReconciler(records, sender=SENDER,
                                         timeout_s=settings.lost_job_timeout_s,
                                         lease_s=settings.stage_lease_s,
                                         max_deliveries=settings.max_deliveries)  # fmt: skip
        passes = []
        for _ in range(5):
            started = time.monotonic()
            sweep_pass(records, reconciler, settings)
            passes.append(time.monotonic() - started)
        started = time.monotonic()
        sum(1 for _ in records.newest())
        every_record_s = time.monotonic() - started
    finally:
        server.stop()
    return build_s, statistics.median(passes), every_record_s


def main() -> None:
    console = Console(width=110)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-faults-"))
    with ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, workdir, queue=QUEUE,
                          settings={"LOST_JOB_TIMEOUT_S": str(LOST_JOB_TIMEOUT_S),
                                    "STAGE_LEASE_S": "2"})  # fmt: skip
        stack, platform, records = tiny.stack, tiny.platform, tiny.records
        client = records.redis

        console.print("warming up: one job loads the model ...")
        warm = job(TINY_CONFIG)
        client.rpush(QUEUE, queue_body(warm))
        platform.wait_for_final(warm["id"], timeout_s=JOB_TIMEOUT_S)
        reruns = []
        for i in range(1, KILLS + 1):
            console.print(f"kill {i}: -9 of the generation pool child mid-denoising ...")
            reruns.append(kill_to_rerun_s(stack, client, records, platform))
        console.print(f"burst: {BURST} jobs pushed at once ...")
        throughput, waits = burst(client, records, platform)
        resent = sum("retries" in record.fields for record in records.newest())
        console.print(f"swallowed messages: {SWALLOWS} enhance messages taken and dropped ...")
        restarts = swallowed_to_restart_s(stack, client, records)
    console.print(f"sweep: one pass beside {SWEPT_RECORDS:,} finished records ...")
    build_s, pass_s, every_record_s = sweep_pass_s(workdir)
    outages = outage_rows(console, workdir)

    table = Table(title=f"faults and load, tiny model on CPU ({os.cpu_count()} cores)")
    for column in ("measure", "value"):
        table.add_column(column)
    rows = [
        (f"kill -9 of the pool child -> generate running again, median of {KILLS}",
         f"{statistics.median(reruns):.2f} s"),
        ("... each run", ", ".join(f"{s:.2f}" for s in reruns) + " s"),
        (f"burst of {BURST} jobs (256x256 image, 1 step): throughput",
         f"{throughput:.2f} jobs/s"),
        ("... queue wait (RPUSH -> generate start), p50", f"{statistics.median(waits):.1f} s"),
        ("... queue wait, p95", f"{statistics.quantiles(waits, n=20)[18]:.1f} s"),
        (f"jobs of the kills and the burst sent again by a sweep (LOST_JOB_TIMEOUT_S="
         f"{LOST_JOB_TIMEOUT_S})", str(resent)),
        (f"swallowed message -> the job running again (LOST_JOB_TIMEOUT_S={LOST_JOB_TIMEOUT_S}"
         f"), p50 of {SWALLOWS}", f"{statistics.median(restarts):.1f} s"),
        ("... each", ", ".join(f"{s:.1f}" for s in sorted(restarts)) + " s"),
        (f"sweep pass beside {SWEPT_RECORDS:,} finished records, 50 running, 20 waiting "
         "(median of 5)", f"{pass_s * 1000:.0f} ms"),
        ("... reading every record instead (the lost-job sweep before its active index)",
         f"{every_record_s:.1f} s"),
        (f"... building the {SWEPT_RECORDS:,} records", f"{build_s:.1f} s"),
        *outages,
    ]  # fmt: skip
    for measure, value in rows:
        table.add_row(measure, value)
    console.print(table)
    console.print(
        "[yellow]The tiny model's output is noise: generation seconds say nothing of real WAN.[/]"
    )


if __name__ == "__main__":
    main()
