"""Benchmark Redis Sentinel failovers under jobs with the tiny model on this machine; prints
a table.

    .venv/bin/python -m bench.failover

Runs the real stack (the three Celery workers and the bridge on the tiny random-weight WAN,
local storage, callbacks to a local endpoint) on a master, a replica and three sentinels
(worker/local/sentinel.py; a master is thought down after 1 s). First a round of jobs with
no failover, for the replica waits; then FAILOVERS rounds, each: JOBS jobs pushed, the
master SIGKILLed once one of them generates, the sentinels' own promotion of the replica,
every job's final callback, and the old master restarted until it is the new one's replica.
Measured:
- seconds from the master's death to the promotion every sentinel agrees on, and to the
  first stage completed on the new master (a `finished:<stage>` stamp later than the
  death), p50 and max over the failovers;
- jobs lost (no final callback within JOB_TIMEOUT_S: must be 0), jobs a sweep sent again
  (a message the master took with it: RECOVERY's settings bring it back within a round),
  and duplicate final callbacks;
- the replica waits (`WAIT 1`, REDIS_WAIT_REPLICA_MS): how many a job makes (the master's
  command stats over the round with no failover), the seconds of one with its replica
  up (p50 of WAIT_SAMPLES), and so their cost per job.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from bench import start_stack, tiny_env
from worker import connections
from worker.jobs.records import FINAL_STATUSES, REDIS_OUTAGE_RETRY, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.sentinel import SentinelSet
from worker.local.stack import wait_until

QUEUE = "wan_queue"
FAILOVERS = 5
JOBS = 6
JOB_TIMEOUT_S = 180
#: What a failover may drop comes back this soon (README, "Redis Sentinel"): a message lost
#: with the master is sent again by the swallowed-message sweep after LOST_JOB_TIMEOUT_S, an
#: acknowledgement's message comes back after the visibility timeout and is skipped.
RECOVERY = {"LOST_JOB_TIMEOUT_S": "20", "STAGE_LEASE_S": "10",
            "BROKER_VISIBILITY_TIMEOUT_S": "60"}  # fmt: skip
#: Jobs whose id starts with this pause after their first step: one generates at the kill.
SLOW = "slow-"
WAIT_SAMPLES = 200
#: A small job: one 256x256 image, two steps.
CONFIG = {"resolution": "256x256", "num_inference_steps": 2, "frame_num": 1}


def job(slow: bool = False) -> dict:
    return {
        "id": f"{SLOW if slow else ''}{uuid.uuid4()}",
        "type": "image_fast",
        "prompt": "a red fox runs in the snow",
        "user_id": "bench",
        "config": CONFIG,
    }


def push_round(client: redis.Redis) -> list[str]:
    jobs = [job(slow=i == 0) for i in range(JOBS)]
    for item in jobs:
        client.rpush(QUEUE, queue_body(item))
    return [item["id"] for item in jobs]


def finals(platform: LocalPlatform, job_id: str) -> int:
    return sum(c.body.get("status") in FINAL_STATUSES for c in platform.callbacks_for(job_id))


def wait_for_finals(platform: LocalPlatform, job_ids: list[str]) -> int:
    """Wait for each job's final callback; how many never came (lost)."""
    lost = 0
    for job_id in job_ids:
        try:
            platform.wait_for_final(job_id, timeout_s=JOB_TIMEOUT_S)
        except AssertionError:  # LocalPlatform's word for "not within the timeout"
            lost += 1
    return lost


def sent_again(records: JobRecords, job_ids: list[str]) -> int:
    """How many of the jobs a sweep sent again (a new run: `retries` counted up)."""
    return sum(records.get(job_id).fields.get("retries", "0") != "0" for job_id in job_ids)


def first_stage_after(records: JobRecords, job_ids: list[str], at: float) -> float | None:
    """The earliest `finished:<stage>` stamp (Redis time) later than `at`, if any."""
    stamps = [
        float(value)
        for job_id in job_ids
        for name, value in records.get(job_id).fields.items()
        if name.startswith("finished:") and float(value) > at
    ]
    return min(stamps, default=None)


def failover(
    sentinels: SentinelSet, records: JobRecords, client: redis.Redis, platform: LocalPlatform
) -> dict[str, float]:
    """One round: jobs, the master killed while one generates, its replica promoted."""
    job_ids = push_round(client)
    wait_until(lambda: "lease:generate" in records.get(job_ids[0]).fields,
               timeout_s=JOB_TIMEOUT_S, what="a generation")  # fmt: skip
    killed_at = time.time()
    old = sentinels.kill_master()
    sentinels.wait_for_promotion()
    promoted_s = time.time() - killed_at
    first_at = 0.0

    def stage_done() -> bool:
        nonlocal first_at
        first_at = first_stage_after(records, job_ids, killed_at) or 0.0
        return first_at > 0

    wait_until(stage_done, timeout_s=JOB_TIMEOUT_S, what="a stage on the new master")
    lost = wait_for_finals(platform, job_ids)
    sentinels.restart(old)
    sentinels.wait_for_replica(old)
    return {
        "promoted_s": promoted_s,
        "first_stage_s": first_at - killed_at,
        "lost": lost,
        "sent_again": sent_again(records, job_ids),
        "duplicates": sum(max(0, finals(platform, job_id) - 1) for job_id in job_ids),
    }


def replica_wait_cost(sentinels: SentinelSet, client: redis.Redis, platform: LocalPlatform,
                      records: JobRecords, timeout_ms: int) -> tuple[float, float]:  # fmt: skip
    """WAITs per job over a round with no failover, and the seconds of one (p50)."""
    master = sentinels.node_client(sentinels.master)
    master.config_resetstat()
    job_ids = push_round(client)
    wait_for_finals(platform, job_ids)
    calls = int(master.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    wait = connections.ReplicaWait(timeout_ms)
    key = records.key(job_ids[0])
    seconds = []
    for _ in range(WAIT_SAMPLES):
        started = time.perf_counter()
        wait.confirm(client, key, {"job_type": "image_fast"}, ttl_s=records.ttl_s)
        seconds.append(time.perf_counter() - started)
    return calls / len(job_ids), statistics.median(seconds)


def main() -> None:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    with ExitStack() as cleanup:
        sentinels = SentinelSet(workdir / "sentinel").start()
        cleanup.callback(sentinels.stop)
        platform = cleanup.enter_context(LocalPlatform())
        on_sentinels = {
            # Under REDIS_SENTINELS only REDIS_URL's database counts.
            "REDIS_URL": "redis://sentinel-set/0",
            "REDIS_SENTINELS": sentinels.addresses,
            "WAN_TEST_FAULT": f"{SLOW}:pause1@step1",
            **RECOVERY,
        }
        stack = start_stack(cleanup, workdir, tiny_env(workdir, platform, queue=QUEUE,
                                                       settings=on_sentinels))  # fmt: skip
        settings = stack.settings()
        client = connections.client(connections.records_target(settings), retry=REDIS_OUTAGE_RETRY)
        records = JobRecords(client, ttl_s=3600)

        waits_per_job, wait_s = replica_wait_cost(
            sentinels, client, platform, records, settings.redis_wait_replica_ms
        )
        rounds = [failover(sentinels, records, client, platform) for _ in range(FAILOVERS)]

    def p50_max(name: str) -> str:
        values = [r[name] for r in rounds]
        return f"{statistics.median(values):.1f} s (max {max(values):.1f} s)"

    table = Table(title=f"Redis Sentinel failovers under jobs ({FAILOVERS} failovers, "
                        f"{JOBS} tiny jobs each, down after 1 s)")  # fmt: skip
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("master's death to promotion, p50", p50_max("promoted_s"))
    table.add_row("master's death to first stage done on the new master, p50",
                  p50_max("first_stage_s"))  # fmt: skip
    table.add_row("... each failover", ", ".join(f"{r['first_stage_s']:.1f}" for r in rounds))
    table.add_row("jobs lost (must be 0)", str(sum(int(r["lost"]) for r in rounds)))
    table.add_row("jobs a sweep sent again (a message lost with the master)",
                  str(sum(int(r["sent_again"]) for r in rounds)))  # fmt: skip
    table.add_row("duplicate final callbacks", str(sum(int(r["duplicates"]) for r in rounds)))
    table.add_row("replica waits per job", f"{waits_per_job:.1f}")
    table.add_row("one replica wait, p50", f"{wait_s * 1000:.2f} ms")
    table.add_row("replica waits' cost per job", f"{waits_per_job * wait_s * 1000:.1f} ms")
    console.print(table)
    if sum(r["lost"] for r in rounds):
        console.print(f"jobs were lost: the processes' logs are in {workdir / 'logs'}")
    else:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
