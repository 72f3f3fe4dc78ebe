"""Benchmark the HTTP API under a burst of health checks; prints a table.

    .venv/bin/python -m bench.api      (also run by `make bench`)

`GET /health` needs no key, so anyone can send many at once. The platform's
registration probe needs an answer within 5 s, and `POST /jobs` must keep its own pace.
Measured on the real API (`python -m worker api`) with the workers of the tiny stack:
`POST /jobs` alone, then while bursts of HEALTH_BURST concurrent `/health` requests are
in flight; the jobs are image jobs of one step, which the workers run meanwhile.
"""

from __future__ import annotations

import selectors
import socket
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

from bench import tiny_stack
from bench.lanes import percentile
from worker.local.stack import LocalStack, free_port

QUEUE = "wan_queue"
#: Concurrent `/health` requests in one burst: five times the API's 40 threads.
HEALTH_BURST = 200
#: Bursts per measurement, and `POST /jobs` sent one after another during each.
ROUNDS, POSTS_PER_ROUND = 10, 10


@dataclass
class Timings:
    """Seconds of each `POST /jobs` and each `/health` answer, and the `/health` codes."""

    posts_s: list[float] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)
    health_codes: list[int] = field(default_factory=list)


def job_body() -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "image_fast", "prompt": "a red fox in the snow",
            "user_id": "bench", "config": {"resolution": "256x256", "num_inference_steps": 1,
                                           "guidance_scale": 1.0}}  # fmt: skip


class HealthBurst:
    """`size` concurrent `GET /health` on plain sockets, all sent on entry and read by a
    thread: nearly free for the sender, so the seconds measured are the API's own. An
    answer not in within `deadline_s` counts as status 0."""

    def __init__(self, api: str, size: int, timings: Timings, *, deadline_s: float) -> None:
        parts = urlsplit(api)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.size = size
        self.timings = timings
        self.deadline_s = deadline_s
        self.selector = selectors.DefaultSelector()
        self.reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> HealthBurst:
        host = self.address[0]
        request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        self.started = time.perf_counter()
        for _ in range(self.size):
            sock = socket.create_connection(self.address, timeout=self.deadline_s)
            sock.sendall(request.encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, [])
        self.reader.start()
        return self

    def _read(self) -> None:
        """The status and seconds of each answer, as the API closes its connection."""
        ends_at = self.started + self.deadline_s
        while self.selector.get_map() and time.perf_counter() < ends_at:
            for key, _ in self.selector.select(timeout=ends_at - time.perf_counter()):
                if chunk := key.fileobj.recv(65536):
                    key.data.append(chunk)
                else:
                    self._done(key, _status(b"".join(key.data)))
        for key in list(self.selector.get_map().values()):
            self._done(key, 0)

    def _done(self, key: selectors.SelectorKey, status: int) -> None:
        self.timings.health_s.append(time.perf_counter() - self.started)
        self.timings.health_codes.append(status)
        self.selector.unregister(key.fileobj)
        key.fileobj.close()

    def __exit__(self, *_: object) -> None:
        self.reader.join()
        self.selector.close()


def _status(response: bytes) -> int:
    """The status code of a raw HTTP response; 0 when there is none."""
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def posts_during_health_burst(
    api: str, key: str, *, posts: int, burst: int = HEALTH_BURST, deadline_s: float = 30
) -> Timings:
    """Send `burst` concurrent `/health` requests and, while they are in flight, `posts`
    jobs one after another; every job must be accepted (202) within `deadline_s`."""
    timings = Timings()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api, headers=headers, timeout=deadline_s) as client:
        client.post("/jobs", json=job_body()).raise_for_status()  # a warm connection
        with HealthBurst(api, burst, timings, deadline_s=deadline_s):
            for _ in range(posts):
                started = time.perf_counter()
                response = client.post("/jobs", json=job_body())
                timings.posts_s.append(time.perf_counter() - started)
                if response.status_code != 202:
                    raise RuntimeError(f"POST /jobs answered {response.status_code}")
    return timings


def measure(api: str, key: str, *, burst: int) -> Timings:
    total = Timings()
    for _ in range(ROUNDS):
        one = posts_during_health_burst(api, key, posts=POSTS_PER_ROUND, burst=burst)
        total.posts_s += one.posts_s
        total.health_s += one.health_s
        total.health_codes += one.health_codes
    return total


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, Path(tmp), queue=QUEUE)
        key, port = uuid.uuid4().hex, free_port()
        env = {"REDIS_URL": tiny.redis_url, "PLATFORM_QUEUE": QUEUE, "WAN_WORKER_API_KEY": key,
               "API_HOST": "127.0.0.1", "API_PORT": str(port), "LOG_FORMAT": "text",
               **tiny.platform.worker_env()}  # fmt: skip
        api = LocalStack(env, log_dir=Path(tmp) / "api-logs", names=("api",))
        cleanup.callback(api.stop)
        api.start()
        url = f"http://127.0.0.1:{port}"
        console.print(f"POST /jobs alone, then during bursts of {HEALTH_BURST} /health ...")
        alone = measure(url, key, burst=0)
        rows = [("alone", alone), (f"{HEALTH_BURST} /health at once",
                                   measure(url, key, burst=HEALTH_BURST))]  # fmt: skip

    table = Table(title="POST /jobs on the real API, tiny stack on CPU", min_width=90)
    for column in ("while", "posts", "p50 ms", "p99 ms", "/health p99 ms", "/health not 200"):
        table.add_column(column, justify="left" if column == "while" else "right")
    for what, timings in rows:
        health_p99 = f"{percentile(timings.health_s, 99) * 1000:.0f}" if timings.health_s else "-"
        table.add_row(
            what,
            str(len(timings.posts_s)),
            f"{percentile(timings.posts_s, 50) * 1000:.0f}",
            f"{percentile(timings.posts_s, 99) * 1000:.0f}",
            health_p99,
            str(sum(code != 200 for code in timings.health_codes)),
        )
    console.print(table)


if __name__ == "__main__":
    main()
