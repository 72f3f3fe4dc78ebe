"""Benchmark prompt enhancement with the tiny Qwen model; prints a table.

    .venv/bin/python -m bench.enhance      (also run by `make bench`)

Two views of the same work:
- in this process, the plain `Enhancer` on the tiny model and a private Redis: latency of
  a fresh enhancement (p50, p95), of a cache hit, and how far past a short deadline
  transformers' `max_time` lets a generation run (the overshoot, p95);
- through the real stack (`POST /enhance` on the HTTP API, the enhance queue, the
  enhancement worker): latency of a fresh request and of a cached one.
The tiny model writes one fixed sentence of ~30 tokens; Qwen2.5-7B on a GPU writes ~200
tokens at its own speed: these numbers measure the machinery, not the model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis
import torch
from rich.console import Console
from rich.table import Table

from enhancement import Enhancer
from enhancement.cache import EnhancementCache
from enhancement.model import QwenModel, Sampling
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, RedisServer, free_port
from worker.local.tiny_qwen import make_tiny_qwen

RUNS = 20
#: A deadline well inside the tiny model's generation time, so every run reaches it.
SHORT_DEADLINE_S = 0.05
SAMPLING = Sampling(
    temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=320
)


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 of seconds, in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def in_process(qwen_path: Path, redis_url: str) -> list[tuple[str, tuple[float, float]]]:
    model = QwenModel(qwen_path, device=torch.device("cpu"), dtype=torch.float32)
    cache = EnhancementCache(redis.Redis.from_url(redis_url), ttl_s=600)
    enhancer = Enhancer(model, cache=cache, sampling=SAMPLING, deadline_s=60)
    model.complete("warm up", sampling=SAMPLING, deadline_s=60)  # the load is not measured
    prompts = [f"a fox in the snow, take {i} {uuid.uuid4().hex[:6]}" for i in range(RUNS)]

    def enhance(prompt: str) -> None:
        enhancer.enhance(prompt, content="video", quality="fast")

    fresh = [timed(lambda p=p: enhance(p)) for p in prompts]
    hits = [timed(lambda p=p: enhance(p)) for p in prompts]
    overshoot = [
        model.complete("x", sampling=SAMPLING, deadline_s=SHORT_DEADLINE_S).seconds
        - SHORT_DEADLINE_S
        for _ in range(RUNS)
    ]
    return [
        ("in process: fresh enhancement", percentiles_ms(fresh)),
        ("in process: cache hit", percentiles_ms(hits)),
        (f"in process: overshoot past a {SHORT_DEADLINE_S * 1000:.0f} ms deadline",
         percentiles_ms(overshoot)),
    ]  # fmt: skip


def through_the_api(
    qwen_path: Path, redis_url: str, workdir: Path
) -> list[tuple[str, tuple[float, float]]]:
    key = uuid.uuid4().hex
    port = free_port()
    env = {
        "REDIS_URL": redis_url, "QWEN_MODEL_PATH": str(qwen_path), "DEVICE": "cpu",
        "WAN_WORKER_API_KEY": key,
        "API_HOST": "127.0.0.1", "API_PORT": str(port), "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    with ExitStack() as cleanup:
        env |= cleanup.enter_context(LocalPlatform()).worker_env()
        stack = LocalStack(env, log_dir=workdir / "logs", names=("enhance", "api")).start()
        cleanup.callback(stack.stop)
        url, headers = f"http://127.0.0.1:{port}/enhance", {"Authorization": f"Bearer {key}"}

        def post(prompt: str) -> None:
            httpx.post(url, json={"prompt": prompt}, headers=headers, timeout=120)

        post("warm up: the worker loads Qwen here")
        prompts = [f"a heron at dawn, take {i} {uuid.uuid4().hex[:6]}" for i in range(RUNS)]
        fresh = [timed(lambda p=p: post(p)) for p in prompts]
        hits = [timed(lambda p=p: post(p)) for p in prompts]
    return [
        ("POST /enhance: fresh enhancement", percentiles_ms(fresh)),
        ("POST /enhance: cache hit", percentiles_ms(hits)),
    ]


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-enhance-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis").start()
        try:
            qwen_path = make_tiny_qwen(workdir / "tiny-qwen")
            rows = in_process(qwen_path, server.url)
            rows += through_the_api(qwen_path, server.url, workdir)
        finally:
            server.stop()
    table = Table(title=f"prompt enhancement, tiny Qwen on CPU, {RUNS} runs each")
    for column in ("measure", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    for measure, (p50, p95) in rows:
        table.add_row(measure, f"{p50:.1f}", f"{p95:.1f}")
    console.print(table)
    console.print(
        "[yellow]The tiny Qwen writes one fixed sentence: these times measure the machinery "
        "(queue, cache, deadline), not Qwen2.5-7B.[/]"
    )


if __name__ == "__main__":
    main()
