"""Benchmark progress reporting; prints a table.

    .venv/bin/python -m bench.progress      (also run by `make bench`)

- The cost of one denoising step's report, as the generation task makes it (pub/sub
  message, throttled record write, Celery's PROGRESS state and task event), with no
  subscriber and with 10 SSE-like subscribers listening.
- SSE delivery latency: from a step's report to a client of `GET /jobs/{id}/events` on
  the real HTTP API (p50, p95).
On a real GPU a denoising step of Wan 1.3B takes about a second; the report's cost is the
number to hold against that.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.table import Table

from worker.jobs.records import JobRecords
from worker.local.stack import LocalStack, RedisServer, free_port
from worker.observe.progress import Progress, channel

STEPS = 200
SUBSCRIBERS = 10


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[round(0.95 * (len(ordered) - 1))] * 1000


def step_cost_s(records: JobRecords, job_id: str) -> list[float]:
    """Seconds per `Progress.step`, reporting through a real Celery task's state and events."""
    from tasks.generate import generate

    generate.push_request(id=f"{job_id}:generate", hostname="bench@local")
    try:
        progress = Progress(records, job_id, task=generate)
        costs = []
        for step in range(1, STEPS + 1):
            started = time.perf_counter()
            progress.step("generate", step, STEPS)
            costs.append(time.perf_counter() - started)
        return costs
    finally:
        generate.pop_request()


def with_subscribers(records: JobRecords, job_id: str) -> list[float]:
    listeners = []
    for _ in range(SUBSCRIBERS):
        pubsub = records.redis.pubsub()
        pubsub.subscribe(channel(job_id))
        listeners.append(pubsub)
    try:
        return step_cost_s(records, job_id)
    finally:
        for pubsub in listeners:
            pubsub.close()


def sse_latency_s(redis_url: str, records: JobRecords, workdir: Path) -> list[float]:
    """Seconds from a step's report to its arrival at an SSE client of the real API."""
    key, port, job_id = uuid.uuid4().hex, free_port(), f"bench-{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": redis_url, "WAN_WORKER_API_KEY": key, "API_HOST": "127.0.0.1",
           "API_PORT": str(port), "LOG_FORMAT": "text"}  # fmt: skip
    api = LocalStack(env, log_dir=workdir / "logs", names=("api",)).start()
    latencies: list[float] = []
    ready = threading.Event()

    def listen() -> None:
        url = f"http://127.0.0.1:{port}/jobs/{job_id}/events"
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream("GET", url, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line.removeprefix("data:"))
                if event["event"] == "snapshot":
                    ready.set()
                elif event["event"] == "step":
                    latencies.append(time.time() - event["at"])
                elif event["event"] == "final":
                    return

    records.write(job_id, status="queued")  # a job nowhere answers 404
    try:
        client = threading.Thread(target=listen, daemon=True)
        client.start()
        ready.wait(timeout=30)
        progress = Progress(records, job_id)
        for step in range(1, STEPS + 1):
            progress.step("generate", step, STEPS)
            time.sleep(0.005)
        progress.final("completed")
        client.join(timeout=30)
    finally:
        api.stop()
    return latencies


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-progress-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            from tasks import app

            app.conf.update(broker_url=server.url, result_backend=server.url)
            records = JobRecords(redis.Redis.from_url(server.url), ttl_s=600)
            alone = step_cost_s(records, "bench-alone")
            watched = with_subscribers(records, "bench-watched")
            latency = sse_latency_s(server.url, records, Path(tmp))
        finally:
            server.stop()
    table = Table(title=f"progress reporting, {STEPS} steps each")
    for column in ("measure", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    rows = [
        ("one step's report, no subscriber", alone),
        (f"one step's report, {SUBSCRIBERS} subscribers", watched),
        ("step report -> SSE client (real API)", latency),
    ]
    for measure, samples in rows:
        p50, p95 = percentiles_ms(samples)
        table.add_row(measure, f"{p50:.2f}", f"{p95:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
