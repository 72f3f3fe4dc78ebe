"""Benchmark image batches under a steady stream of compatible image jobs; prints a table.

    make bench        (or: .venv/bin/python -m bench.batch [--jobs N] [--interval S])

Runs the real stack (the three Celery workers and the bridge, local storage, callbacks to a
local endpoint) with the generation worker restarted at IMAGE_BATCH_MAX 1, 2, 4 and 8. Per
setting, `--jobs` images of as many users (same size, steps and guidance: one call can take
them) are pushed onto the platform list one every `--interval` seconds (by default a
quarter of a lone image's generate stage, so images wait and batches can form). Measured:
- images per minute, from the first push to the last `completed` callback;
- each image's latency, from its RPUSH to its `completed` callback, p50 and p95;
- the GPU's idle gap between batches: from a batch's last `finished:generate` to the next
  one's first `started:generate` (a lone job is its own batch), p50 and max.
Every stamp is on Redis's clock (the job records'), the push's too.

On a CPU with the tiny random-weight WAN the numbers are for the machinery only (a CPU
gains nothing from batching: the table shows the cost of claiming and bookkeeping). On a
CUDA host, with DEVICE=cuda and WAN_MODEL_PATH (real weights) in the environment, the same
stream and table say what batching buys. `bench/gpu.py` times the pipeline calls alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import TinyStack, tiny_stack
from bench.lanes import percentile
from worker.local.platform import queue_body
from worker.local.stack import wait_until

QUEUE = "wan_queue"
JOB_TIMEOUT_S = 900
BATCH_MAXES = (1, 2, 4, 8)
JOBS = 12
#: Taken from the environment where set: DEVICE=cuda and WAN_MODEL_PATH to real weights run
#: the same stream on a GPU host.
REAL = ("DEVICE", "WAN_MODEL_PATH")
#: One image per job, two steps: every job of the stream fits the same call.
#: The record's stamp of the platform's acceptance of the `completed` callback (Redis time).
COMPLETED = "callback_sent:completed"
CONFIG = {"resolution": "256x256", "num_inference_steps": 2, "guidance_scale": 1.0}


@dataclass(frozen=True)
class Round:
    batch_max: int
    images_per_min: float
    latencies_s: list[float]
    batch_sizes: list[int]
    gaps_s: list[float]


def image(n: int) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "image_fast", "user_id": f"user-{n}",
            "prompt": f"a red fox number {n} runs in the snow", "config": CONFIG}  # fmt: skip


def stream(tiny: TinyStack, jobs: list[dict[str, Any]], interval_s: float) -> dict[str, float]:
    """Push the jobs one every `interval_s`; when each was pushed (Redis time), once all
    have completed and their records say when."""
    client, pushed_at = tiny.records.redis, {}
    for n, queued in enumerate(jobs):
        if n:
            time.sleep(interval_s)  # the stream's pace, not a wait for an event
        pushed_at[queued["id"]] = tiny.records.now()
        client.rpush(QUEUE, queue_body(queued))
    for done in jobs:
        body = tiny.platform.wait_for_final(done["id"], timeout_s=JOB_TIMEOUT_S).body
        if body["status"] != "completed":
            raise RuntimeError(f"bench job failed: {body.get('error_message')}")
        wait_until(lambda job_id=done["id"]: COMPLETED in tiny.records.get(job_id).fields,
                   timeout_s=30, what="the completed callback's stamp")  # fmt: skip
    return pushed_at


def generate_s(tiny: TinyStack, job_id: str) -> float:
    fields = tiny.records.get(job_id).fields
    return float(fields["finished:generate"]) - float(fields["started:generate"])


def measure(tiny: TinyStack, batch_max: int, jobs: int, interval_s: float) -> Round:
    images = [image(n) for n in range(jobs)]
    pushed_at = stream(tiny, images, interval_s)
    spans: dict[str, list[float]] = {}  # batch: its members' generate stamps
    completed_at = {}
    for job in images:
        record = tiny.records.get(job["id"])
        batch = ((record.value("generation") or {}).get("metadata") or {}).get("batch_id")
        spans.setdefault(batch or job["id"], []).extend(
            float(record.fields[f"{edge}:generate"]) for edge in ("started", "finished")
        )
        completed_at[job["id"]] = float(record.fields[COMPLETED])
    runs = sorted((min(stamps), max(stamps), len(stamps) // 2) for stamps in spans.values())
    elapsed_s = max(completed_at.values()) - min(pushed_at.values())
    return Round(
        batch_max,
        images_per_min=60 * jobs / elapsed_s,
        latencies_s=[completed_at[job_id] - pushed_at[job_id] for job_id in completed_at],
        batch_sizes=[size for _, _, size in runs],
        gaps_s=[max(0.0, later[0] - run[1]) for run, later in pairwise(runs)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=JOBS, help="images per setting")
    parser.add_argument(
        "--interval", type=float, help="seconds between pushes (default: a lone generate / 4)"
    )
    args = parser.parse_args()
    console = Console(width=110)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as cleanup:
        real = {name: os.environ[name] for name in REAL if name in os.environ}
        tiny = tiny_stack(cleanup, Path(tmp), queue=QUEUE, settings=real)
        interval_s = args.interval
        for batch_max in BATCH_MAXES:
            tiny.stack.kill("gpu")
            tiny.stack.restart("gpu", env={"IMAGE_BATCH_MAX": str(batch_max)})
            stream(tiny, [image(-1)], 0)  # loads the model
            warm = image(-1)
            stream(tiny, [warm], 0)  # a lone image on the loaded model
            if interval_s is None:
                interval_s = generate_s(tiny, warm["id"]) / 4
            console.print(f"IMAGE_BATCH_MAX={batch_max}: {args.jobs} images, "
                          f"one every {interval_s:.2f} s ...")  # fmt: skip
            rounds.append(measure(tiny, batch_max, args.jobs, interval_s))
    what = (f"{real['WAN_MODEL_PATH']} on {real['DEVICE']}" if len(real) == len(REAL)
            else "tiny model on CPU: machinery only")  # fmt: skip
    console.print(table(rounds, interval_s or 0, what))


def table(rounds: list[Round], interval_s: float, what: str) -> Table:
    result = Table(title=f"Image batches under a stream (one image every {interval_s:.2f} s), "
                   f"{what}", min_width=60)  # fmt: skip
    for column in ("IMAGE_BATCH_MAX", "images", "img/min", "p50 s", "p95 s", "batches",
                   "mean size", "gap p50 ms", "gap max ms"):  # fmt: skip
        result.add_column(column, justify="right")
    result.caption = "latency: RPUSH to completed callback; gap: GPU idle between batches"
    for run in rounds:
        gaps_ms = [1000 * gap for gap in run.gaps_s] or [0.0]
        result.add_row(str(run.batch_max), str(len(run.latencies_s)),
                       f"{run.images_per_min:.1f}", f"{statistics.median(run.latencies_s):.2f}",
                       f"{percentile(run.latencies_s, 95):.2f}",
                       str(len(run.batch_sizes)), f"{statistics.mean(run.batch_sizes):.1f}",
                       f"{statistics.median(gaps_ms):.0f}", f"{max(gaps_ms):.0f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
