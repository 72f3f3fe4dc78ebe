"""Benchmark progress reporting; prints a table.

    .venv/bin/python -m bench.progress      (also run by `make bench`)

- The cost of one denoising step's report, as the generation task makes it (pub/sub
  message, throttled record write, Celery's PROGRESS state and task event), with no
  subscriber and with 10 SSE-like subscribers listening.
- SSE delivery latency: from a step's report to a client of `GET /jobs/{id}/events` on
  the real HTTP API (p50, p95).
- Live previews: a denoising step of the tiny model here, against what a preview costs the
  denoising loop at that step (one latent frame copied, handed to the preview thread); what
  the thread then spends on one preview of WAN's real 480x832 latent frame (map to RGB,
  scale to 256 px, WEBP, Redis); and the latency from a step to its `preview` event at an SSE
  client of the real API.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import torch
from rich.console import Console
from rich.table import Table

from worker.jobs.records import JobRecords
from worker.local.stack import LocalStack, RedisServer, free_port
from worker.observe.progress import Progress, channel

STEPS = 200
SUBSCRIBERS = 10
#: WAN 2.1's latents for 480x832 and 81 frames: 16 channels, 21 frames, 1/8 of the pixels.
REAL_LATENTS = (1, 16, 21, 104, 60)
#: The tiny model's generation whose steps carry a preview each.
TINY_JOB = {"resolution": "256x256", "frame_num": 9, "num_inference_steps": 30}
#: Steps of the preview latency run, and the pause between them, seconds.
PREVIEW_STEPS, PREVIEW_STEP_S = 60, 0.05


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


@contextmanager
def api_events(
    redis_url: str, workdir: Path, job_id: str, on_event: Callable[[dict], bool]
) -> Iterator[None]:
    """The real API, and a client of `GET /jobs/{job_id}/events` in a thread of its own,
    connected (its snapshot in) when the block starts. `on_event` is handed every later
    event; True ends the stream. The job must be in Redis already (else 404)."""
    key, port = uuid.uuid4().hex, free_port()
    env = {"REDIS_URL": redis_url, "WAN_WORKER_API_KEY": key, "API_HOST": "127.0.0.1",
           "API_PORT": str(port), "LOG_FORMAT": "text"}  # fmt: skip
    api = LocalStack(env, log_dir=workdir / f"logs-{job_id}", names=("api",)).start()
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
                elif on_event(event):
                    return

    try:
        client = threading.Thread(target=listen, daemon=True)
        client.start()
        ready.wait(timeout=30)
        yield
        client.join(timeout=30)
    finally:
        api.stop()


def sse_latency_s(redis_url: str, records: JobRecords, workdir: Path) -> list[float]:
    """Seconds from a step's report to its arrival at an SSE client of the real API."""
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []

    def on_event(event: dict) -> bool:
        if event["event"] == "step":
            latencies.append(time.time() - event["at"])
        return event["event"] == "final"

    records.write(job_id, status="queued")  # a job nowhere answers 404
    with api_events(redis_url, workdir, job_id, on_event):
        progress = Progress(records, job_id)
        for step in range(1, STEPS + 1):
            progress.step("generate", step, STEPS)
            time.sleep(0.005)
        progress.final("completed")
    return latencies


def preview_on_loop_s(workdir: Path, records: JobRecords) -> tuple[list[float], list[float]]:
    """(seconds per denoising step, seconds of that step's preview on the loop), the tiny
    model on this CPU with a preview due at every step."""
    from worker.generation import Pipelines, generate
    from worker.generation.previews import Previewer
    from worker.jobs.model import parse_job
    from worker.local.tiny_models import make_tiny_wan
    from worker.settings import Settings

    model = make_tiny_wan(workdir / "tiny-wan")
    pipelines = Pipelines(Settings(_env_file=None, wan_model_path=model, device="cpu"))
    job = parse_job({"id": "bench-preview", "type": "video_fast", "prompt": "a red fox",
                     "user_id": "bench", "config": TINY_JOB})  # fmt: skip
    previewer = Previewer(records.redis, job.id, every_s=1e-9, max_px=256)
    steps, costs = [], []
    last = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        nonlocal last
        started = time.perf_counter()
        previewer.step(done, total)
        costs.append(time.perf_counter() - started)
        steps.append(started - last)
        last = time.perf_counter()

    generate(pipelines, job, seed=1, references={}, on_step=on_step)
    return steps[1:], costs[1:]  # the first step pays for warm-up


def preview_in_thread_s(records: JobRecords) -> list[float]:
    """Seconds of one preview in the thread: WAN's real latent frame to a stored WEBP."""
    from worker.generation.previews import encode_webp, middle_frame, preview_image
    from worker.observe import preview_store

    latents = torch.randn(REAL_LATENTS)
    costs = []
    for step in range(1, STEPS + 1):
        started = time.perf_counter()
        webp = encode_webp(preview_image(middle_frame(latents), max_px=256))
        preview_store.store(records.redis, "bench-thread", webp, step=step, total_steps=STEPS)
        costs.append(time.perf_counter() - started)
    return costs


def preview_latency_s(redis_url: str, records: JobRecords, workdir: Path) -> list[float]:
    """Seconds from a step's end (its preview handed over) to the `preview` event at an SSE
    client of the real API, for WAN's real latent frame."""
    from types import SimpleNamespace

    from worker.generation import previews

    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    ended_at: dict[int, float] = {}
    latencies: list[float] = []

    def on_event(event: dict) -> bool:
        if event["event"] != "preview":
            return False
        latencies.append(time.time() - ended_at[event["step"]])
        return event["step"] == PREVIEW_STEPS

    records.write(job_id, status="processing")  # a job nowhere answers 404
    pipeline = SimpleNamespace(scheduler=None)  # no scheduler: the latents are the picture
    previewer = previews.Previewer(records.redis, job_id, every_s=1e-9, max_px=256)
    with api_events(redis_url, workdir, job_id, on_event):
        for step in range(1, PREVIEW_STEPS + 1):
            previews.hand(pipeline, torch.randn(REAL_LATENTS))
            ended_at[step] = time.time()
            previewer.step(step, PREVIEW_STEPS)
            time.sleep(PREVIEW_STEP_S)
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
            step_s, on_loop = preview_on_loop_s(Path(tmp), records)
            in_thread = preview_in_thread_s(records)
            preview_latency = preview_latency_s(server.url, records, Path(tmp))
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
    previews = Table(title="live previews (CPU, this machine)")
    for column in ("measure", "samples", "p50 ms", "p95 ms"):
        previews.add_column(column, justify="left" if column == "measure" else "right")
    config = TINY_JOB
    for measure, samples in [
        (f"denoising step, tiny model {config['resolution']}x{config['frame_num']}", step_s),
        ("preview on the loop, per step (copy, hand-over)", on_loop),
        ("one preview in its thread, 480x832 latent (RGB, WEBP, Redis)", in_thread),
        ("step -> preview event at an SSE client (real API)", preview_latency),
    ]:
        p50, p95 = percentiles_ms(samples)
        previews.add_row(measure, str(len(samples)), f"{p50:.2f}", f"{p95:.2f}")
    Console().print(previews)
    loop_p95 = percentiles_ms(on_loop)[1]
    Console().print(
        f"On the loop a preview costs {loop_p95:.2f} ms at p95 here, "
        f"{100 * loop_p95 / percentiles_ms(step_s)[0]:.1f} % of a tiny-model step. On a GPU "
        "(an estimate, not measured here): the loop queues a copy of one 400 KB latent frame "
        "and a CUDA event and goes on, tens of microseconds of CPU and a copy the GPU does "
        "in microseconds, while a Wan 1.3B step at 480x832x81 runs two passes of the "
        "transformer over 32,760 tokens, a second or more: well under 1 %. The thread's work "
        "(the RGB map, WEBP, Redis) runs beside the loop, once per PREVIEW_EVERY_S."
    )


if __name__ == "__main__":
    main()
