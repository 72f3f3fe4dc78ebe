"""Benchmarks: each module prints a table (`make bench` runs them all).

The stack's modules are imported where a stack is made: `bench.gpu` runs on a GPU host that
carries only the generation's packages (bench/device.sh).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.jobs.records import JobRecords
    from worker.local.platform import LocalPlatform
    from worker.local.stack import LocalStack, RedisServer


@dataclass(frozen=True)
class TinyStack:
    redis_url: str
    platform: LocalPlatform
    stack: LocalStack
    records: JobRecords
    #: The private redis-server, for a benchmark that kills and restarts it.
    redis_server: RedisServer


def tiny_stack(
    cleanup: ExitStack,
    workdir: Path,
    *,
    queue: str,
    aof: bool = False,
    settings: dict[str, str] | None = None,
) -> TinyStack:
    """A private Redis, LocalPlatform and the workers with the bridge on the tiny random WAN,
    all stopped by `cleanup`; the jobs' platform list is `queue`. `aof`: Redis keeps an
    append-only file, so a restart after a kill finds its data; `settings` go on top of the
    workers' environment."""
    import redis

    from worker.jobs.records import JobRecords
    from worker.local.platform import LocalPlatform
    from worker.local.stack import RedisServer

    server = RedisServer(workdir / "redis", aof=aof).start()
    cleanup.callback(server.stop)
    platform = cleanup.enter_context(LocalPlatform())
    env = tiny_env(workdir, platform, queue=queue, settings={"REDIS_URL": server.url,
                                                              **(settings or {})})  # fmt: skip
    stack = start_stack(cleanup, workdir, env)
    records = JobRecords(redis.Redis.from_url(server.url), ttl_s=3600)
    return TinyStack(server.url, platform, stack, records, server)


def tiny_env(
    workdir: Path, platform: LocalPlatform, *, queue: str, settings: dict[str, str]
) -> dict[str, str]:
    """The workers' environment on the tiny random WAN, local storage and `platform`'s
    callbacks, with `settings` (Redis's among them) on top."""
    from worker.local.tiny_models import make_tiny_wan

    return {
        "PLATFORM_QUEUE": queue,
        "WAN_MODEL_PATH": str(make_tiny_wan(workdir / "tiny-wan")),
        "DEVICE": "cpu",
        "STORAGE_BACKEND": "local",
        "OUTPUT_DIR": str(workdir / "outputs"),
        "SPOOL_DIR": str(workdir / "spool"),
        **platform.worker_env(),
        "HF_HUB_OFFLINE": "1",
        **settings,
    }


def start_stack(cleanup: ExitStack, workdir: Path, env: dict[str, str]) -> LocalStack:
    """The workers and the bridge with `env`, started, and stopped by `cleanup`."""
    from worker.local.stack import WORKERS_AND_BRIDGE, LocalStack

    stack = LocalStack(env, log_dir=workdir / "logs", names=WORKERS_AND_BRIDGE)
    cleanup.callback(stack.stop)
    return stack.start()
