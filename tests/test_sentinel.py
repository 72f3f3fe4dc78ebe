"""Redis Sentinel: the whole stack on a master, a replica and three sentinels, through a
failover the sentinels make themselves.

Real processes on loopback ports this module picks: Debian's redis-server as the data nodes
and as three `--sentinel` processes (worker/local/sentinel.py), with a password on the data
nodes and another on the sentinels; the workers, bridge and API of the session's stack
reach Redis only through REDIS_SENTINELS. A failover here is a SIGKILL of the master and
the sentinels' own promotion of the replica, which every test waits for by asking them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.conftest import (
    JOB_TIMEOUT_S,
    REDIS_PASSWORD,
    REDIS_SENTINEL_PASSWORD,
    api_url,
    auth,
    module_env,
    new_job,
    secret_leaks,
    settled,
)
from worker import connections
from worker.local.platform import LocalPlatform, queue_body
from worker.local.sentinel import SentinelSet
from worker.local.stack import FULL_STACK, LocalStack, free_port, wait_until
from worker.records import REDIS_OUTAGE_RETRY, JobRecords

pytestmark = pytest.mark.runs_long

QUEUE = "sentinel_queue"
PASSWORDS = [REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD]
#: Jobs whose id starts with this pause after their first denoising step: the master dies
#: while they generate.
SLOW = "slow-"


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    nodes = SentinelSet(
        tmp_path_factory.mktemp("sentinel"),
        password=REDIS_PASSWORD,
        sentinel_password=REDIS_SENTINEL_PASSWORD,
    ).start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], sentinels: SentinelSet, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "sentinel-stack",
        # Under REDIS_SENTINELS only REDIS_URL's database counts: its host is nobody's.
        redis_url="redis://unused.invalid:6379/0",
        queue=QUEUE,
        settings={
            "REDIS_SENTINELS": sentinels.addresses,
            "REDIS_PASSWORD": REDIS_PASSWORD,
            "REDIS_SENTINEL_PASSWORD": REDIS_SENTINEL_PASSWORD,
            "API_PORT": str(free_port()),
            "WAN_TEST_FAULT": f"{SLOW}:pause1@step1",
        },
    )


@pytest.fixture(scope="module")
def stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    logs = tmp_path_factory.mktemp("sentinel-logs")
    with LocalStack(env, log_dir=logs, names=FULL_STACK) as local:
        yield local


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> redis.Redis:
    """The stack's Redis as its processes reach it: the master the sentinels name now."""
    target = connections.records_target(stack.settings())
    return connections.client(target, retry=REDIS_OUTAGE_RETRY)


@pytest.fixture(scope="module")
def records(client: redis.Redis) -> JobRecords:
    return JobRecords(client, ttl_s=600)


def final_statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    final = ("completed", "failed", "cancelled")
    return [c.body["status"] for c in platform.callbacks_for(job_id) if c.body["status"] in final]


def health(env: dict[str, str]) -> dict:
    return httpx.get(f"{api_url(env)}/health", timeout=10).json()


def test_an_image_and_a_video_job_complete_through_the_sentinels(
    stack: LocalStack,
    env: dict[str, str],
    sentinels: SentinelSet,
    platform: LocalPlatform,
    client: redis.Redis,
) -> None:
    # Given the stack on a Sentinel set; When an image and a video job are pushed
    jobs = [new_job("image_fast"), new_job("video_fast")]
    for job in jobs:
        client.rpush(QUEUE, queue_body(job))

    # Then both complete, and /health names the master the sentinels chose
    for job in jobs:
        assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
            "completed"
        )
    wait_until(lambda: health(env)["status"] == "ok", timeout_s=30, what="/health ok")
    answer = health(env)
    assert answer["redis_role"] == "master"
    assert answer["redis_master"] == f"127.0.0.1:{sentinels.master.port}"
    # And the jobs are on the replica too
    replica = sentinels.node_client(sentinels.nodes[1])
    assert all(replica.exists(f"wan:job:{job['id']}") for job in jobs)


def test_no_redis_password_in_any_log_debug_env_or_config(
    stack: LocalStack, env: dict[str, str]
) -> None:
    # Given the stack ran jobs on password-protected nodes and sentinels
    debug_env = httpx.get(f"{api_url(env)}/debug/env", headers=auth(), timeout=10).text
    config = subprocess.run(
        [sys.executable, "-m", "worker", "config"],
        env={**stack.env, "LOG_FORMAT": "text"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    logs = {name: stack.log(name) for name in stack.names}

    # Then no part of either password shows anywhere, and the settings say they are set
    assert secret_leaks({"/debug/env": debug_env, "config": config, **logs}, PASSWORDS) == []
    assert '"REDIS_PASSWORD":"set"' in debug_env.replace(" ", "")
    assert '"REDIS_SENTINEL_PASSWORD":"set"' in debug_env.replace(" ", "")
