"""Benchmark the order of generations: waits behind a backlog, with lanes and fair share
on and off; prints a table.

    make bench        (or: .venv/bin/python -m bench.lanes)

Runs the real stack on the tiny random-weight WAN model (CPU). A job's wait is from its
RPUSH onto the platform list to the start of its generation (the job record):
- images pushed behind a backlog of videos, with PRIORITY_LANES on and off;
- a light user's jobs pushed behind a heavy user's burst of images, with FAIR_SHARE on
  and off.
The settings are the bridge's (it picks each job's priority when it sends it).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import TinyStack, tiny_stack
from worker.local.platform import queue_body

QUEUE = "wan_queue"
JOB_TIMEOUT_S = 900
VIDEOS, IMAGES = 4, 6
HEAVY_JOBS, LIGHT_USERS = 8, 4
#: Videos long enough that a backlog of them is one, even for the tiny model.
VIDEO_CONFIG = {"resolution": "256x256", "frame_num": 33, "num_inference_steps": 4}
IMAGE_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}


def job(job_type: str, user_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": job_type, "prompt": "a red fox runs in the snow",
            "user_id": user_id, "config": config}  # fmt: skip


def waits_s(tiny: TinyStack, jobs: list[dict[str, Any]], measured: int) -> list[float]:
    """Push the jobs in order; the waits of the last `measured` of them, once all are done."""
    client = tiny.records.redis
    pushed_at = {}
    for queued in jobs:
        pushed_at[queued["id"]] = time.time()
        client.rpush(QUEUE, queue_body(queued))
    for done in jobs:
        body = tiny.platform.wait_for_final(done["id"], timeout_s=JOB_TIMEOUT_S).body
        if body["status"] != "completed":
            raise RuntimeError(f"bench job failed: {body.get('error_message')}")
    return [
        float(tiny.records.get(j["id"]).fields["started:generate"]) - pushed_at[j["id"]]
        for j in jobs[-measured:]
    ]


def with_bridge(tiny: TinyStack, **settings: str) -> None:
    """Restart the bridge with these settings."""
    tiny.stack.kill("bridge")
    tiny.stack.restart("bridge", env=settings)


def main() -> None:
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, Path(tmp), queue=QUEUE)
        waits_s(tiny, [job("image_fast", "warmup", IMAGE_CONFIG)], 1)  # loads the model
        for lanes in ("true", "false"):
            console.print(f"{IMAGES} images behind {VIDEOS} videos, PRIORITY_LANES={lanes} ...")
            with_bridge(tiny, PRIORITY_LANES=lanes)
            backlog = [job("video_fast", f"video-{n}", VIDEO_CONFIG) for n in range(VIDEOS)]
            images = [job("image_fast", f"image-{n}", IMAGE_CONFIG) for n in range(IMAGES)]
            rows.append((f"image behind {VIDEOS} videos", f"PRIORITY_LANES={lanes}",
                         waits_s(tiny, backlog + images, IMAGES)))  # fmt: skip
        for fair in ("true", "false"):
            console.print(f"{LIGHT_USERS} light users behind a burst of {HEAVY_JOBS}, "
                          f"FAIR_SHARE={fair} ...")  # fmt: skip
            with_bridge(tiny, FAIR_SHARE=fair)
            burst = [job("image_fast", "heavy", IMAGE_CONFIG) for _ in range(HEAVY_JOBS)]
            light = [job("image_fast", f"light-{n}", IMAGE_CONFIG) for n in range(LIGHT_USERS)]
            waits = waits_s(tiny, burst + light, LIGHT_USERS)
            rows.append((f"light user's image behind {HEAVY_JOBS}", f"FAIR_SHARE={fair}", waits))

    table = Table(title="wait from RPUSH to generation start, tiny model on CPU", min_width=60)
    for column in ("jobs", "setting", "n", "p50 s", "p95 s"):
        table.add_column(column, justify="left" if column in ("jobs", "setting") else "right")
    for what, setting, waits in rows:
        table.add_row(what, setting, str(len(waits)), f"{statistics.median(waits):.2f}",
                      f"{percentile(waits, 95):.2f}")  # fmt: skip
    console.print(table)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile: a value that was measured."""
    ranked = sorted(values)
    return ranked[max(0, min(len(ranked) - 1, round(p / 100 * len(ranked)) - 1))]


if __name__ == "__main__":
    main()
