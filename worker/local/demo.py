"""`make demo`: a video job and an image job end to end on this machine, then a table.

Everything runs as in production (the same worker commands, the bridge, RPUSH onto the
platform list in both body shapes, signed callbacks) with local stand-ins where the
platform would be: files go to the `local` storage backend under OUTPUT_DIR and the
callbacks to a local endpoint.
"""

from __future__ import annotations

import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import ROOT, WORKERS_AND_BRIDGE, LocalStack, RedisServer, redis_answers
from worker.settings import get_settings

#: Scratch space of the demo: the tiny model, a private Redis, the process logs.
DEMO_DIR = ROOT / ".demo"
#: How long the demo waits for one job's final callback, seconds.
JOB_TIMEOUT_S = 1_800
#: On a CPU the tiny model's VAE needs about a second per 480x832 frame: shorten the video.
CPU_VIDEO_CONFIG = {"frame_num": 33, "num_inference_steps": 4}

#: Piped output gets a wide table: rich would otherwise fold the paths at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)


def demo_jobs(*, short: bool) -> list[tuple[dict[str, Any], str]]:
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
        "type": "image_fast",
        "prompt": "a lighthouse on a cliff under a starry sky",
        "user_id": "demo-user",
        "config": {"seed": 7},
    }
    return [(video, "object"), (image, "array")]


def run_demo(*, full: bool = False) -> int:
    """Run the demo; the exit status is 0 only if every job completed."""
    settings = get_settings()
    env: dict[str, str] = {"HF_HUB_OFFLINE": "1"}
    with ExitStack() as cleanup:
        model_path = settings.wan_model_path
        if model_path is None:
            from worker.local.tiny_models import NOISE_WARNING, make_tiny_wan

            model_path = DEMO_DIR / "tiny-wan"
            if not (model_path / "model_index.json").exists():
                make_tiny_wan(model_path)
            console.print(f"[bold yellow]WAN_MODEL_PATH is unset:[/] {NOISE_WARNING}")
        env["WAN_MODEL_PATH"] = str(model_path)

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
        }
        console.print("starting the generation, enhancement and media workers and the bridge")
        stack = LocalStack(
            env,
            log_dir=DEMO_DIR / "logs" / time.strftime("%Y%m%d-%H%M%S"),
            names=WORKERS_AND_BRIDGE,
        )
        cleanup.callback(stack.stop)
        stack.start()

        from worker.generation import resolve_device

        short = not full and resolve_device(settings).type == "cpu"
        jobs = demo_jobs(short=short)
        if short:
            console.print(f"on a CPU: the video job is shortened to {CPU_VIDEO_CONFIG}")
        client = redis.Redis.from_url(redis_url)
        pushed_at = {}
        for job, shape in jobs:
            client.rpush(queue, queue_body(job, shape=shape))
            pushed_at[job["id"]] = time.monotonic()
            console.print(f"RPUSH {queue}: {job['type']} job {job['id']} ({shape} shape)")

        table = Table(title="demo jobs")
        for column in ("job", "type", "status", "seconds", "output file", "thumbnail"):
            table.add_column(column, overflow="fold")
        all_completed = True
        for job, _ in jobs:
            body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
            seconds = time.monotonic() - pushed_at[job["id"]]
            output = thumbnail = body.get("error_message") or ""
            if body["status"] == "completed":
                asset = body["assets"][0]
                root = settings.output_dir / "workspace-temp"
                output, thumbnail = str(root / asset["url"]), str(root / asset["thumbnail_url"])
            all_completed &= body["status"] == "completed"
            table.add_row(
                job["id"][:8], job["type"], body["status"], f"{seconds:.1f}", output, thumbnail
            )
        console.print(table)
        console.print(f"process logs: {stack.log_dir}")
        if settings.wan_model_path is None:
            console.print(
                "[yellow]reminder: these files are noise from the tiny random-weight model[/]"
            )
    return 0 if all_completed else 1
