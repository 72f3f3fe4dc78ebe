"""`make demo`: text-to-video, an enhanced text-to-image, a start-frame video, an
image-to-image job and a 10-second video (made window by window) end to end on this
machine, then a table and the API's /health. While the jobs run it prints each one's page
(`/ui/jobs/{id}?token=...`) and the fleet page.

Everything runs as in production (the same worker commands, the bridge, RPUSH onto the
platform list in both body shapes, signed callbacks, reference download through the SSRF
guard) with local stand-ins where the platform would be: files go to the `local` storage
backend under OUTPUT_DIR, the callbacks to a local endpoint, and the reference image comes
from a small HTTP server on 127.0.0.1, which REFERENCE_ALLOWED_HOSTS allows.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image
from redis.client import PubSub
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from worker.local.image_server import ImageServer, Route
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, ROOT, LocalStack, RedisServer, free_port, redis_answers
from worker.observe.progress import channel
from worker.settings import get_settings

#: Scratch space of the demo: the tiny model, a private Redis, the process logs.
DEMO_DIR = ROOT / ".demo"
#: How long the demo waits for one job's final callback, seconds.
JOB_TIMEOUT_S = 1_800
#: How long the closing /health waits for every worker to answer, seconds.
HEALTH_WAIT_S = 30
#: On a CPU the tiny model's VAE needs about a second per 480x832 frame: shorten the video.
CPU_VIDEO_CONFIG = {"frame_num": 33, "num_inference_steps": 4}
#: VACE also encodes its control video: on a CPU the reference video is smaller still.
CPU_REFERENCE_CONFIG = {"frame_num": 9, "num_inference_steps": 4, "resolution": "320x320"}
#: The long video keeps its 10 s (161 frames, 3 windows of 81); on a CPU it is small.
LONG_SECONDS = 10
CPU_LONG_CONFIG = {"num_inference_steps": 2, "resolution": "256x256"}

#: Piped output gets a wide table: rich would otherwise fold the paths at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=240)


def reference_png() -> bytes:
    """A 640x400 picture (colour bands under a sky gradient), like a user's upload."""
    y, x = np.mgrid[0:400, 0:640]
    rgb = np.stack([x * 255 // 639, 80 + y * 150 // 399, (x // 160) * 60 + 40], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def demo_jobs(*, short: bool, reference_url: str) -> list[tuple[dict[str, Any], str]]:
    """One job of each kind, with the body shape it is pushed in."""
    video = {
        "id": str(uuid.uuid4()),
        "type": "video_fast",
        "prompt": "a red fox running through fresh snow at dawn, cinematic",
        "negative_prompt": "blurry, low quality",
        "user_id": "demo-user",
        "config": {"seed": 42, **(CPU_VIDEO_CONFIG if short else {})},
    }
    image = {
        "id": str(uuid.uuid4()),
        "type": "image7b_fast_enhanced",  # Qwen rewrites the prompt first
        "prompt": "a lighthouse on a cliff under a starry sky",
        "user_id": "demo-user",
        "config": {"seed": 7},
    }
    start_frame = {
        "id": str(uuid.uuid4()),
        "type": "video_fast",
        "prompt": "the camera slowly pans across the landscape",
        "user_id": "demo-user",
        "config": {"seed": 5, **(CPU_REFERENCE_CONFIG if short else {})},
        "metadata": {"start_reference_url": reference_url, "reference_mode": "start"},
    }
    image_to_image = {
        "id": str(uuid.uuid4()),
        "type": "image_fast",
        "prompt": "the same scene as a watercolour painting",
        "user_id": "demo-user",
        "config": {"seed": 9, "image": reference_url, "denoise_strength": 0.6},
    }
    long_video = {
        "id": str(uuid.uuid4()),
        "type": "video_fast",
        "prompt": "a paper boat drifts down a winding forest stream, the camera follows it",
        "user_id": "demo-user",
        "config": {
            "seed": 11,
            "duration_seconds": LONG_SECONDS,
            **(CPU_LONG_CONFIG if short else {}),
        },  # fmt: skip
    }
    return [
        (video, "object"),
        (image, "array"),
        (start_frame, "object"),
        (image_to_image, "object"),
        (long_video, "object"),
    ]


def needs_vace(job: dict[str, Any]) -> bool:
    """The start-frame job, and the long video (its windows after the first are VACE's)."""
    return "start_reference_url" in job.get("metadata", {}) or "duration_seconds" in job["config"]


def show_progress(watcher: PubSub, jobs: list[dict[str, Any]]) -> dict[str, float]:
    """A live bar per job, fed by the same progress events as GET /jobs/{id}/events.

    Returns when every job reached its final status: when each did (time.monotonic()).
    """
    finished_at: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[detail]}"), console=console,
    ) as bars:  # fmt: skip
        bar = {job["id"]: bars.add_task(job["type"], total=100, detail="queued") for job in jobs}
        waiting = set(bar)
        deadline = time.monotonic() + JOB_TIMEOUT_S * len(jobs)
        while waiting and time.monotonic() < deadline:
            message = watcher.get_message(timeout=1.0)
            if message is None:
                continue
            event = json.loads(message["data"])
            if event["job_id"] not in waiting:  # a finished job's last bookkeeping
                continue
            detail = event.get("stage") or ""
            if event["event"] == "step":
                detail = (
                    f"step {event['step']}/{event['total_steps']}, ETA {event['eta_seconds']:.0f} s"
                )
                if event.get("windows", 1) > 1:
                    detail = f"window {event['window']}/{event['windows']}, {detail}"
            if event.get("percent") is not None:
                bars.update(bar[event["job_id"]], completed=event["percent"])
            bars.update(bar[event["job_id"]], detail=detail)
            if event["event"] == "final":  # the table below says how it ended
                bars.update(bar[event["job_id"]], detail="finished")
                waiting.discard(event["job_id"])
                finished_at[event["job_id"]] = time.monotonic()
    return finished_at


def health_once_all_answer(url: str, *, headers: dict[str, str]) -> dict[str, Any]:
    """GET `url` (/health or /health/details) until the API's background survey has seen a
    worker on every queue (a worker of a loaded machine can miss one), or HEALTH_WAIT_S
    passed: the last answer."""
    deadline = time.monotonic() + HEALTH_WAIT_S
    while True:
        health = httpx.get(url, headers=headers, timeout=10).json()
        if health["status"] == "ok" or time.monotonic() > deadline:
            return health


def prompt_note(metadata: dict[str, Any]) -> str:
    """What happened to the prompt: as given, or Qwen's rewrite, or why not."""
    if "enhanced_prompt" in metadata:
        return f"enhanced: {metadata['enhanced_prompt'][:60]}..."
    if "enhancement_fallback_reason" in metadata:
        return f"as given ({metadata['enhancement_fallback_reason']})"
    return "as given"


def tiny_model(
    name: str, make: Callable[[Path], Path], variable: str = "", warning: str = ""
) -> Path:
    """A tiny random-weight model under .demo/, built on first use; says what it is."""
    path = DEMO_DIR / name
    if not path.is_dir():  # built aside and renamed: an interrupted build is never reused
        partial = DEMO_DIR / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        make(partial).rename(path)
    if variable:
        console.print(f"[bold yellow]{variable} is unset:[/] {warning}")
    return path


def run_demo(*, full: bool = False) -> int:
    """Run the demo; the exit status is 0 only if every job completed."""
    settings = get_settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo's own calls are no news
    env: dict[str, str] = {"HF_HUB_OFFLINE": "1"}
    with ExitStack() as cleanup:
        from worker.local import tiny_models, tiny_qwen

        env["WAN_MODEL_PATH"] = str(
            settings.wan_model_path
            or tiny_model("tiny-wan", tiny_models.make_tiny_wan, "WAN_MODEL_PATH",
                          tiny_models.NOISE_WARNING)
        )  # fmt: skip
        # A tiny VACE goes with the tiny WAN only: real T2V weights need real VACE weights.
        vace_path = settings.wan_vace_model_path
        if vace_path is None and settings.wan_model_path is None:
            vace_path = tiny_model("tiny-vace", tiny_models.make_tiny_vace)
        if vace_path is None:
            console.print(
                "[yellow]WAN_VACE_MODEL_PATH is unset: the reference-frame job and the long "
                "video are skipped[/]"
            )
        else:
            env["WAN_VACE_MODEL_PATH"] = str(vace_path)
        env["QWEN_MODEL_PATH"] = str(
            settings.qwen_model_path
            or tiny_model("tiny-qwen", tiny_qwen.make_tiny_qwen, "QWEN_MODEL_PATH",
                          tiny_qwen.NOISE_WARNING)
        )  # fmt: skip
        images = cleanup.enter_context(ImageServer("127.0.0.1"))
        reference_url = images.add("/reference.png", Route(reference_png(), "image/png"))

        redis_url = settings.redis_url
        if redis_answers(redis_url):
            console.print(f"using the Redis at REDIS_URL={redis_url}")
        else:
            server = RedisServer(DEMO_DIR / "redis").start()
            cleanup.callback(server.stop)
            redis_url = server.url
            console.print(f"no Redis at {settings.redis_url}: started a private one at {redis_url}")

        platform = cleanup.enter_context(LocalPlatform())
        # A queue of its own, so the demo never takes or leaves jobs on a real platform list.
        queue = f"wan_queue_demo_{uuid.uuid4().hex[:8]}"
        env |= {
            "REDIS_URL": redis_url,
            "PLATFORM_REDIS_URL": redis_url,
            "PLATFORM_QUEUE": queue,
            "STORAGE_BACKEND": "local",
            "OUTPUT_DIR": str(settings.output_dir.resolve()),
            "SPOOL_DIR": str(settings.spool_dir.resolve()),
            **platform.worker_env(),
            "REFERENCE_ALLOWED_HOSTS": "127.0.0.1",
            "WAN_WORKER_API_KEY": (
                settings.wan_worker_api_key.get_secret_value()
                if settings.wan_worker_api_key
                else secrets.token_hex(16)
            ),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(free_port()),
        }
        console.print("starting the workers, the bridge and the HTTP API")
        log_dir = DEMO_DIR / "logs" / time.strftime("%Y%m%d-%H%M%S")
        stack = LocalStack(env, log_dir=log_dir, names=FULL_STACK)
        cleanup.callback(stack.stop)
        stack.start()

        from worker.devices import resolve_device

        short = not full and resolve_device(settings).type == "cpu"
        jobs = demo_jobs(short=short, reference_url=reference_url)
        if vace_path is None:  # image to image needs no VACE; the start-frame job does
            jobs = [job for job in jobs if not needs_vace(job[0])]
        if short:
            console.print(
                f"on a CPU: the video job is shortened to {CPU_VIDEO_CONFIG}, "
                f"the start-frame job to {CPU_REFERENCE_CONFIG}, the {LONG_SECONDS} s video "
                f"made at {CPU_LONG_CONFIG}"
            )
        client = redis.Redis.from_url(redis_url)
        watcher = client.pubsub(ignore_subscribe_messages=True)
        watcher.subscribe(*(channel(job["id"]) for job, _ in jobs))  # before the first push
        pushed_at = {}
        api = f"http://127.0.0.1:{env['API_PORT']}"
        bearer = {"Authorization": f"Bearer {env['WAN_WORKER_API_KEY']}"}
        for job, shape in jobs:
            client.rpush(queue, queue_body(job, shape=shape))
            pushed_at[job["id"]] = time.monotonic()
            console.print(f"RPUSH {queue}: {job['type']} job {job['id']} ({shape} shape)")
            page = httpx.post(f"{api}/jobs/{job['id']}/watch-token", headers=bearer, timeout=10)
            console.print(f"  watch it live (while the demo runs): {api}{page.json()['page_url']}",
                          soft_wrap=True)  # fmt: skip
        console.print(f"the fleet: {api}/ui/ (any user name, WAN_WORKER_API_KEY as the password)")

        finished_at = show_progress(watcher, [job for job, _ in jobs])
        table = Table(title="demo jobs")
        columns = ("job", "type", "task", "frames", "prompt", "status", "seconds", "output file",
                   "thumbnail")  # fmt: skip
        for column in columns:
            table.add_column(column, overflow="fold")
        all_completed = True
        for job, _ in jobs:
            body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
            seconds = finished_at.get(job["id"], time.monotonic()) - pushed_at[job["id"]]
            output = thumbnail = body.get("error_message") or ""
            metadata = body.get("metadata", {})
            task = f"{metadata.get('wan_task', '')} {metadata.get('reference_mode', '')}"
            frames = str(metadata.get("frame_num", ""))
            if "continuation" in metadata:
                frames += f" in {metadata['continuation']['windows']} windows"
            if body["status"] == "completed":
                asset = body["assets"][0]
                root = settings.output_dir / "workspace-temp"
                output, thumbnail = str(root / asset["url"]), str(root / asset["thumbnail_url"])
            all_completed &= body["status"] == "completed"
            table.add_row(
                job["id"][:8],
                job["type"],
                task,
                frames,
                prompt_note(metadata),
                body["status"],
                f"{seconds:.1f}",
                output,
                thumbnail,
            )
        console.print(table)
        health = health_once_all_answer(
            f"http://127.0.0.1:{env['API_PORT']}/health/details",
            headers={"Authorization": f"Bearer {env['WAN_WORKER_API_KEY']}"},
        )
        console.print(
            f"GET /health: {health['status']}, workers {', '.join(health['workers'])}, "
            f"models {sorted({m for w in health['workers'].values() for m in w['models']})}"
        )
        console.print(f"process logs: {stack.log_dir}")
        if settings.wan_model_path is None:
            console.print(
                "[yellow]reminder: these files are noise from the tiny random-weight model[/]"
            )
        if settings.qwen_model_path is None:
            console.print("[yellow]reminder: the tiny Qwen writes one fixed sentence[/]")
    return 0 if all_completed else 1
