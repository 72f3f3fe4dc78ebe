"""Benchmark recovery and load with the tiny model on this machine; prints tables.

    make bench        (or: .venv/bin/python -m bench.faults)

Runs the real stack (private redis-server, the three Celery workers, the bridge, the tiny
random-weight WAN model, local storage, callbacks to a local endpoint):
- `kill -9` of the generation pool child in the middle of denoising, to the job's
  generation running again (its next `generate` start in the job record), over a few runs;
- a burst of 200 of the cheapest jobs pushed at once: throughput, and the queue wait of
  each job (RPUSH to its first `generate` start), p50 and p95.
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

from bench import tiny_stack
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, wait_until
from worker.records import JobRecords

QUEUE = "wan_queue"
KILLS = 3
BURST = 200
JOB_TIMEOUT_S = 900
#: The cheapest job: one 256x256 image, one step, no classifier-free guidance.
TINY_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}
#: Long enough to be caught in the middle of denoising.
KILLED_CONFIG = TINY_CONFIG | {"num_inference_steps": 40}


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


def main() -> None:
    console = Console(width=110)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-faults-"))
    with ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, workdir, queue=QUEUE)
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
    ]  # fmt: skip
    for measure, value in rows:
        table.add_row(measure, value)
    console.print(table)
    console.print(
        "[yellow]The tiny model's output is noise: generation seconds say nothing of real WAN.[/]"
    )


if __name__ == "__main__":
    main()
