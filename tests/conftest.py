"""Shared fixtures: a private Redis, the tiny WAN model, the local platform and the stack.

Everything is real: redis-server on a free port, Celery workers as subprocesses, the
tiny model loaded with `from_pretrained`, supabase-py and httpx talking HTTP.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import socket
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.flow.lanes import priority_lists, queue_depth
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, ROOT, LocalStack, RedisServer, free_port


def _test_secret(name: str) -> str:
    """Random per test run, so a leak of any part of it can be found in the logs.

    Kept in the environment: pytest imports this file as `conftest` and the tests import it
    as `tests.conftest`, and both must agree.
    """
    return os.environ.setdefault(f"WAN_TEST_{name}", secrets.token_hex(16))


#: One torch thread in every process the tests start (and in this one, before torch is
#: imported): the two xdist workers already keep both cores busy, and torch's second thread
#: spins for the core the other worker holds. Measured on the tiny model under that load: a
#: generation took 0.29 s of CPU with two threads, 0.11 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SERVICE_KEY = _test_secret("SERVICE_KEY")
CALLBACK_SECRET = _test_secret("CALLBACK_SECRET")
API_KEY = _test_secret("API_KEY")
CALLBACK_BEARER = _test_secret("CALLBACK_BEARER")
#: The Sentinel stack's passwords (tests/test_sentinel.py): its data nodes', its sentinels'.
REDIS_PASSWORD = _test_secret("REDIS_PASSWORD")
REDIS_SENTINEL_PASSWORD = _test_secret("REDIS_SENTINEL_PASSWORD")
#: Every secret the tests hand to the processes they start: none may appear in a log.
ALL_SECRETS = [SERVICE_KEY, CALLBACK_SECRET, API_KEY, CALLBACK_BEARER, REDIS_PASSWORD,
               REDIS_SENTINEL_PASSWORD]  # fmt: skip
PLATFORM_QUEUE = "wan_queue"
#: Long enough for a job on a loaded 2-core machine, short enough to fail a hung test.
JOB_TIMEOUT_S = 120
#: Jobs whose id starts with this pause in the session stack's generation (after denoising
#: steps 1 and 2, `PACED_RULES`): a test reads a job mid-denoise however fast the machine.
PACED = "paced-"


def pauses(prefix: str, seconds: float, steps: Iterable[int]) -> str:
    """WAN_TEST_FAULT rules: jobs whose id starts with `prefix` pause `seconds` after each
    of these denoising steps, so a test sees what happens between steps on any machine."""
    return ";".join(f"{prefix}:pause{seconds}@step{step}" for step in steps)


#: Where browser tests keep their screenshots after the run (ignored by git).
ARTIFACTS = ROOT / ".artifacts"
#: Debian's headless Chromium, as the browser tests launch it (Playwright cannot fetch one).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

#: After step 1, past the record's throttle (its `progress` then shows step 2); after step 2,
#: long enough for a test to open a stream and read the record while the job generates.
PACED_RULES = f"{pauses(PACED, 0.6, [1])};{pauses(PACED, 3, [2])}"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish() -> None:
    """Collect garbage now, before pytest's end-of-session reports: a Celery AsyncResult's
    `__del__` unsubscribes through a test Redis that has stopped, and run by the collector in
    the middle of an import it hit a CPython 3.11 error ("AST constructor recursion depth
    mismatch") that failed a whole run (about 1 in 6 runs of two modules)."""
    gc.collect()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked `runs_long` first, the rest in their order. `make test` hands modules
    to its workers in this order (`--dist loadfile --no-loadscope-reorder`): the long
    ones start at once and the short ones fill in behind, instead of a long module starting
    last and running alone while the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("runs_long") is None)


def secret_leaks(texts: dict[str, str], secrets_: list[str], *, window: int = 12) -> list[str]:
    """Where any `window` characters in a row of any secret appear: '<source>: <fragment>'."""
    fragments = {s[i : i + window] for s in secrets_ for i in range(len(s) - window + 1)}
    return [
        f"{source}: {fragment}"
        for source, text in texts.items()
        for fragment in fragments
        if fragment in text
    ]


class _Recorder(logging.Handler):
    """Every log record of this process, formatted with its arguments."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no log line of any process the tests started holds a secret."""
    recorder = _Recorder()
    logging.getLogger().addHandler(recorder)
    yield
    logging.getLogger().removeHandler(recorder)
    texts = {"this process": "\n".join(recorder.lines)}
    for path in tmp_path_factory.getbasetemp().rglob("*.log"):
        texts[str(path)] = path.read_text(errors="replace")
    leaks = secret_leaks(texts, ALL_SECRETS)
    assert not leaks, f"secrets in logs: {leaks[:5]}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.local.tiny_models import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="session")
def tiny_wan_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA for the tiny WAN in diffusers' Wan format: a stand-in distilled LoRA."""
    from worker.local.tiny_models import make_tiny_wan_lora

    return make_tiny_wan_lora(tmp_path_factory.mktemp("models") / "tiny-wan-lora")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.local.tiny_qwen import make_tiny_qwen

    return make_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="session")
def tiny_vace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.local.tiny_models import make_tiny_vace

    return make_tiny_vace(tmp_path_factory.mktemp("models") / "tiny-vace")


@pytest.fixture(scope="session")
def platform() -> Iterator[LocalPlatform]:
    with LocalPlatform(service_key=SERVICE_KEY, callback_secret=CALLBACK_SECRET) as server:
        yield server


@pytest.fixture(scope="session")
def platform_with_bearer() -> Iterator[LocalPlatform]:
    """A platform whose callback endpoint on another origin takes CALLBACK_BEARER."""
    with LocalPlatform(
        service_key=SERVICE_KEY, callback_secret=CALLBACK_SECRET, callback_bearer=CALLBACK_BEARER
    ) as server:
        yield server


@pytest.fixture(scope="session")
def stack_env(
    redis_server: RedisServer, tiny_wan: Path, tiny_qwen: Path, platform: LocalPlatform,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    root = tmp_path_factory.mktemp("stack")
    return {
        "REDIS_URL": redis_server.url,
        "PLATFORM_QUEUE": PLATFORM_QUEUE,
        "WAN_MODEL_PATH": str(tiny_wan),
        "QWEN_MODEL_PATH": str(tiny_qwen),
        "WAN_WORKER_API_KEY": API_KEY,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(free_port()),
        "DEVICE": "cpu",
        "STORAGE_BACKEND": "supabase",
        **platform.worker_env(),
        "SPOOL_DIR": str(root / "spool"),
        "OUTPUT_DIR": str(root / "outputs"),
        "HF_HUB_OFFLINE": "1",
        "WAN_TEST_FAULT": PACED_RULES,
    }


@pytest.fixture(scope="session")
def stack(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    local = LocalStack(stack_env, log_dir=tmp_path_factory.mktemp("logs"), names=FULL_STACK)
    try:
        yield local.start()
    finally:
        local.stop()


def module_env(
    stack_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    redis_url: str,
    queue: str,
    settings: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a module's own stack: the session's, on a Redis database and a
    platform list of the module's own, with a spool and outputs of its own (under a temp
    directory `name`), and the module's `settings` on top.

    A module's fixture `env` returns it; the fixtures `client` and `records` below serve it.
    """
    root = tmp_path_factory.mktemp(name)
    return stack_env | {
        "REDIS_URL": redis_url,
        "PLATFORM_QUEUE": queue,
        "SPOOL_DIR": str(root / "spool"),
        "OUTPUT_DIR": str(root / "outputs"),
        **(settings or {}),
    }


@contextmanager
def host_stacks(
    envs: dict[str, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
    *,
    bridge_on: str,
) -> Iterator[dict[str, LocalStack]]:
    """Simulated hosts on this machine, one per environment (its own WORKER_HOST and spool):
    each a generation worker on `gpu,enhance` and a media worker, the bridge on `bridge_on`.
    They boot at once, and all stop however the block ends."""
    stacks = {
        host: LocalStack(
            env,
            log_dir=tmp_path_factory.mktemp(f"logs-{host}"),
            names=("gpu+enhance", "cpu", "bridge") if host == bridge_on else ("gpu+enhance", "cpu"),
        )
        for host, env in envs.items()
    }
    try:
        with ThreadPoolExecutor(len(stacks)) as pool:
            list(pool.map(LocalStack.start, stacks.values()))
        yield stacks
    finally:
        for stack in stacks.values():
            stack.stop()


@pytest.fixture
def client(env: dict[str, str]) -> redis.Redis:
    """The Redis of the module's own stack (its fixture `env`, from `module_env`)."""
    return redis.Redis.from_url(env["REDIS_URL"])


@pytest.fixture
def records(client: redis.Redis) -> JobRecords:
    """The job records of the module's own stack."""
    return JobRecords(client, ttl_s=600)


@pytest.fixture
def platform_list(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def point_celery_at(url: str) -> None:
    """Send this process's Celery tasks to `url` (broker and result backend)."""
    from tasks import app

    app.conf.update(broker_url=url, result_backend=url)
    # Producers an earlier test opened still point at the old broker: drop them, as
    # Celery does in a forked child. The result backend, and its subscription to task
    # results, is kept across a conf change too: drop it, or a module that runs after a
    # module whose Redis stopped fails its first send ("Retry limit exceeded while trying to
    # reconnect to the Celery result store").
    app._after_fork()
    app._backend_cache = None
    vars(app._local).pop("backend", None)


@contextmanager
def celery_broker(url: str) -> Iterator[redis.Redis]:
    """Point this process's Celery app at `url`, a database no worker consumes, emptied
    around."""
    point_celery_at(url)
    client = redis.Redis.from_url(url)
    client.flushdb(asynchronous=True)  # gone at once; freed behind (a test's 100,000 keys)
    yield client
    client.flushdb(asynchronous=True)


@pytest.fixture
def idle_broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with celery_broker(redis_server.db_url(1)) as client:
        yield client


#: Celery's queues in a stack on this machine: DESIGN.md's three and the media worker's own
#: `cpu.<WORKER_HOST>` (the hostname, unless a test sets WORKER_HOST).
CELERY_QUEUES = ("enhance", "gpu", "cpu", f"cpu.{socket.gethostname()}")


def settled(client: redis.Redis, platform_queue: str) -> bool:
    """Nothing waits anywhere: not on the platform list, in a Celery queue, or unacked."""
    waiting = [client.llen(platform_queue), *(queue_depth(client, q) for q in CELERY_QUEUES)]
    return not any(waiting) and client.hlen("unacked") == 0


def sent_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Job ids of the task messages waiting on a Celery queue, in the order of takes."""
    raws = [m for name in priority_lists(queue) for m in reversed(client.lrange(name, 0, -1))]
    messages = [json.loads(m) for m in raws]
    return [m["headers"]["id"].split(":")[0] for m in messages]


def new_job(job_type: str = "video_fast", **fields: Any) -> dict[str, Any]:
    """A small, fast job in the newer names; fields override or add top-level keys."""
    frames = 9 if job_type.startswith("video") else 1
    job = {
        "id": str(uuid.uuid4()),
        "type": job_type,
        "prompt": "a red fox runs in the snow",
        "user_id": "user-1",
        "config": {
            "resolution": "256x256",
            "frame_num": frames,
            "num_inference_steps": 2,
            "seed": 7,
        },
    }
    return job | fields


def push(client: redis.Redis, job: dict[str, Any] | str, *, shape: str = "object") -> None:
    """Append a job exactly as the platform's queue-job function does (RPUSH)."""
    if isinstance(job, str):
        client.rpush(PLATFORM_QUEUE, job)
    else:
        client.rpush(PLATFORM_QUEUE, queue_body(job, shape=shape))


def api_url(env: dict[str, str]) -> str:
    """Where the HTTP API of a stack started with `env` listens."""
    return f"http://127.0.0.1:{env['API_PORT']}"


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
