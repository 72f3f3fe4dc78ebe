"""Redis Sentinel: the whole stack on a master, a replica and three sentinels, through a
failover the sentinels make themselves.

Real processes on loopback ports this module picks: Debian's redis-server as the data nodes
and as three `--sentinel` processes (worker/local/sentinel.py), with a password on the data
nodes and another on the sentinels; the workers, bridge and API of the session's stack
reach Redis only through REDIS_SENTINELS. A failover here is a SIGKILL of the master and
the sentinels' own promotion of the replica, which every test waits for by asking them.
"""

from __future__ import annotations

import socket
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
from worker.jobs.records import REDIS_OUTAGE_RETRY, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.sentinel import SentinelSet
from worker.local.stack import FULL_STACK, LocalStack, free_port, wait_until

pytestmark = pytest.mark.runs_long

QUEUE = "sentinel_queue"
PASSWORDS = [REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD]
#: Jobs whose id starts with this pause after their first denoising step: the master dies
#: while they generate.
SLOW = "slow-"
#: Jobs whose id starts with this are held by the bridge (a paused dispatch) when it dies.
HELD = "held-"


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
            # What a failover may drop comes back within a test (README, "Redis Sentinel"):
            # a message the master took with it (a next stage's, sent in its last
            # milliseconds, or one a BRPOP took off it as it died) is sent again by the
            # swallowed-message sweep; an acknowledgement's message comes back after the
            # visibility timeout and is skipped.
            "LOST_JOB_TIMEOUT_S": "20",
            "STAGE_LEASE_S": "10",
            "BROKER_VISIBILITY_TIMEOUT_S": "60",
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
    replica = sentinels.node_client(sentinels.replicas()[0])
    assert all(replica.exists(f"wan:job:{job['id']}") for job in jobs)


def generating(records: JobRecords, job_id: str) -> bool:
    return "lease:generate" in records.get(job_id).fields


def test_twenty_jobs_complete_once_each_through_a_failover_under_load(
    stack: LocalStack,
    env: dict[str, str],
    sentinels: SentinelSet,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given 20 jobs pushed (images and videos), the first two slow to generate, one of them
    # generating
    pids = {name: process.pid for name, process in stack.processes.items()}
    jobs = [new_job("video_fast" if i % 4 == 0 else "image_fast",
                    id=f"{SLOW if i < 2 else ''}{uuid.uuid4()}") for i in range(20)]  # fmt: skip
    for job in jobs:
        client.rpush(QUEUE, queue_body(job))
    wait_until(lambda: any(generating(records, job["id"]) for job in jobs),
               timeout_s=JOB_TIMEOUT_S, what="a generation")  # fmt: skip

    # When the master dies (SIGKILL) and the sentinels promote the replica
    old = sentinels.kill_master()
    new = sentinels.wait_for_promotion()
    assert new is not old

    # Then every job completes, each with exactly one final callback
    for job in jobs:
        final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"]
        assert final == "completed", records.get(job["id"]).fields

    # And when the old master comes back, the sentinels make it a replica of the new one
    # while jobs keep flowing
    sentinels.restart(old)
    more = [new_job("image_fast") for _ in range(2)]
    for job in more:
        client.rpush(QUEUE, queue_body(job))
    sentinels.wait_for_replica(old)
    for job in more:
        assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
            "completed"
        )
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs + more} == {
        job["id"]: ["completed"] for job in jobs + more
    }
    # And no process of the stack exited or was replaced
    assert {name: p.pid for name, p in stack.processes.items() if p.poll() is None} == pids


def metric(env: dict[str, str], name: str) -> float:
    """A sample of /metrics without labels (0 while it has none)."""
    for line in httpx.get(f"{api_url(env)}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def test_health_says_degraded_during_a_failover_then_ok_with_the_new_master(
    stack: LocalStack, env: dict[str, str], sentinels: SentinelSet
) -> None:
    # Given a healthy stack, its /health watched from a thread
    wait_until(lambda: health(env)["status"] == "ok", timeout_s=60, what="/health ok")
    failovers = metric(env, "wan_redis_failovers_total")
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            response = httpx.get(f"{api_url(env)}/health", timeout=10)
            answers.append((response.status_code, response.json()))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    # When the master dies and the sentinels promote the replica
    old = sentinels.kill_master()
    new = sentinels.wait_for_promotion()

    # Then /health says `degraded` (no master that answers) and then `ok` on the new master,
    # never `unavailable` while the sentinels answer
    def ok_on_the_new_master() -> bool:
        last = answers[-1][1] if answers else {}
        return last.get("status") == "ok" and last.get("redis_master") == f"127.0.0.1:{new.port}"

    wait_until(ok_on_the_new_master, timeout_s=60, what="/health ok again")
    stop.set()
    watcher.join(timeout=30)
    degraded = [a for code, a in answers if a["status"] == "degraded" and not a["redis"]]
    assert degraded and all(code == 200 for code, _ in answers)
    assert answers[-1][1]["redis_role"] == "master"
    # And /metrics counts the failover once
    wait_until(lambda: metric(env, "wan_redis_failovers_total") == failovers + 1,
               timeout_s=60, what="the failover counted")  # fmt: skip

    # And the old master, restarted, becomes the new one's replica
    sentinels.restart(old)
    sentinels.wait_for_replica(old)


def test_the_bridge_killed_with_the_master_loses_no_job_it_had_taken(
    stack: LocalStack,
    sentinels: SentinelSet,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given a bridge that holds a job it took off the platform list (paused before sending
    # it), the take on the replica too, and more jobs waiting on the list
    stack.kill("bridge")
    stack.restart("bridge", env={"WAN_TEST_FAULT": f"{HELD}:pause60@bridge_taken"})
    jobs = [new_job("image_fast", id=f"{HELD}{uuid.uuid4()}") for _ in range(3)]
    for job in jobs:
        client.rpush(QUEUE, queue_body(job))
    processing = f"{QUEUE}:processing:{socket.gethostname()}"
    replica = sentinels.node_client(sentinels.replicas()[0])
    wait_until(lambda: replica.llen(processing) == 1 and replica.llen(QUEUE) == 2,
               timeout_s=JOB_TIMEOUT_S, what="the bridge's take on the replica")  # fmt: skip

    # When the master and the bridge die at once (SIGKILL), the sentinels promote the replica
    # and the bridge is started again
    old = sentinels.kill_master()
    stack.kill("bridge")
    sentinels.wait_for_promotion()
    stack.restart("bridge", env={"WAN_TEST_FAULT": ""})

    # Then every job completes, once, and nothing is left in the bridge's hands
    for job in jobs:
        final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"]
        assert final == "completed", records.get(job["id"]).fields
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert client.llen(processing) == 0
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs} == {
        job["id"]: ["completed"] for job in jobs
    }
    sentinels.restart(old)
    sentinels.wait_for_replica(old)


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
