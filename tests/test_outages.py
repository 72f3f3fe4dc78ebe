"""Outages of the machinery under running jobs: Redis, the media worker, the bridge.

The module runs its own stack on a private redis-server with an append-only file (AOF,
`appendfsync everysec`, as docker-compose.yml runs it), so Redis itself can be killed and
restarted on its port with its data. BROKER_VISIBILITY_TIMEOUT_S is short: the message of a
worker killed whole comes back within a test. Assertions read what the platform got, the
job records, the spool and the logs.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, api_url, module_env, new_job, settled
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, LocalStack, RedisServer, free_port, wait_until
from worker.records import JobRecords

QUEUE = "outage_queue"
#: Seconds before Redis hands out again the message of a worker killed whole; well above
#: any stage of these tiny jobs, so no healthy task is handed out twice.
VISIBILITY_TIMEOUT_S = 20
#: The Celery workers of the module's stack.
WORKERS = ("gpu", "enhance", "cpu")
#: How long Redis stays away in the restart tests: well within what a record write or a
#: send waits for it (worker/records.py REDIS_OUTAGE_RETRY, celeryconfig's publish retry).
OUTAGE_S = 3
#: The generation of a job with this id prefix pauses at its first step for PAUSE_S.
PAUSED = "paused-"
PAUSE_S = 3
#: The claim lease of a bridge that dies between claiming a job and sending it: short, so
#: the bridge that kept the job's item takes it over within a test.
DEAD_CLAIM_LEASE_S = 5
#: An orphan is older than SPOOL_ORPHAN_AGE_S (6 h by default).
SEVEN_HOURS_S = 7 * 3600


@pytest.fixture(scope="module")
def outage_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("outage-redis"), aof=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str],
    outage_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "outages",
        redis_url=outage_redis.url,
        queue=QUEUE,
        settings={
            "API_PORT": str(free_port()),  # the session stack's API may hold stack_env's port
            "BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            # A duplicate delivery (the restarted bridge's second chain) waits as long as the
            # lease of the run it found: short, so the test does not wait a minute for it.
            "STAGE_LEASE_S": "10",
            "SPOOL_SWEEP_INTERVAL_S": "1",
            "WAN_TEST_FAULT": f"{PAUSED}:pause{PAUSE_S}@step1",
        },
    )


@pytest.fixture(scope="module")
def outage_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("outage-logs"), names=FULL_STACK) as local:
        yield local


def health_status(env: dict[str, str]) -> int:
    return httpx.get(f"{api_url(env)}/health", timeout=10).status_code


def final_statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    final = ("completed", "failed", "cancelled")
    return [c.body["status"] for c in platform.callbacks_for(job_id) if c.body["status"] in final]


def denoising(records: JobRecords, job_id: str) -> bool:
    progress = records.get(job_id).value("progress")
    return progress is not None and (progress.get("step") or 0) >= 1


# A bridge that dies between sending a chain and marking it cannot tell, once restarted,
# whether it sent it: it sends it again, and the job record's skip of duplicate deliveries
# (stage leases) keeps the job from running twice.
@pytest.mark.parametrize("point", ["bridge_taken", "bridge_sent"])
def test_a_bridge_killed_around_sending_a_chain_runs_the_job_once_after_its_restart(
    outage_stack: LocalStack,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
    point: str,
) -> None:
    # Given a bridge that dies (SIGKILL) at `point` for jobs whose id starts with "crash-"
    job = new_job("image_fast", id=f"crash-{uuid.uuid4()}")
    outage_stack.kill("bridge")
    outage_stack.restart("bridge", env={"WAN_TEST_FAULT": f"crash-:crash@{point}"})

    # When such a job is pushed, the bridge dies holding it; then it is restarted without
    # the fault
    client.rpush(QUEUE, queue_body(job))
    wait_until(lambda: outage_stack.processes["bridge"].poll() is not None,
               timeout_s=JOB_TIMEOUT_S, what="the bridge's crash")  # fmt: skip
    outage_stack.restart("bridge", env={"WAN_TEST_FAULT": ""})

    # Then the job runs once: one final callback, generation started once
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert records.get(job["id"]).fields["attempts:generate"] == "1"


def test_a_job_whose_bridge_died_between_claim_and_send_is_sent_by_another_bridge_once(
    outage_stack: LocalStack,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given this host's bridge dies (SIGKILL) after claiming a job, before sending it
    job = new_job("image_fast", id=f"claimed-{uuid.uuid4()}")
    outage_stack.kill("bridge")
    outage_stack.restart("bridge", env={"WAN_TEST_FAULT": "claimed-:crash@bridge_taken",
                                        "CLAIM_LEASE_S": str(DEAD_CLAIM_LEASE_S)})  # fmt: skip
    client.rpush(QUEUE, queue_body(job))
    wait_until(lambda: outage_stack.processes["bridge"].poll() is not None,
               timeout_s=JOB_TIMEOUT_S, what="the bridge's crash")  # fmt: skip
    dead_owner = records.claim_owner(job["id"])

    # When the platform sends the job again and another host's bridge takes it
    outage_stack.restart("bridge", env={"WORKER_HOST": "other-host", "WAN_TEST_FAULT": ""})
    client.rpush(QUEUE, queue_body(job))

    # Then that bridge keeps it until the dead bridge's claim has run out, then sends it:
    # the job completes, once
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    assert records.claim_owner(job["id"]) not in (None, dead_owner)
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert records.get(job["id"]).fields["attempts:generate"] == "1"

    # And when the dead bridge's host starts its bridge again, the item it held comes back
    # from its processing list and starts nothing: the job was dispatched
    processing = f"{QUEUE}:processing:{socket.gethostname()}"
    assert client.llen(processing) == 1
    outage_stack.kill("bridge")
    outage_stack.restart("bridge", env={"WAN_TEST_FAULT": ""})
    wait_until(lambda: client.llen(processing) == 0 and settled(client, QUEUE),
               timeout_s=JOB_TIMEOUT_S, what="the held item dealt with")  # fmt: skip
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert records.get(job["id"]).fields["attempts:generate"] == "1"


def test_a_malformed_fault_rule_refuses_to_start_the_bridge(
    env: dict[str, str],
) -> None:
    # Given a typo in WAN_TEST_FAULT; When the bridge starts; Then it exits naming the rule
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "worker", "bridge"],
        env={**os.environ, **env, "WAN_TEST_FAULT": "crash-:crsh@bridge_taken"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "bridge not started" in result.stderr
    assert "'crash-:crsh@bridge_taken'" in result.stderr


def test_the_spool_sweep_removes_only_old_directories_of_jobs_not_running(
    outage_stack: LocalStack, env: dict[str, str], records: JobRecords
) -> None:
    # Given a fresh directory, an old one of a job still running, and an old orphan
    spool_dir = Path(env["SPOOL_DIR"])
    fresh, running, orphan = (spool_dir / f"{kind}-{uuid.uuid4()}" for kind in
                              ("fresh", "running", "orphan"))  # fmt: skip
    records.write(running.name, status="processing")
    long_ago = time.time() - SEVEN_HOURS_S
    for path in (fresh, running, orphan):
        path.mkdir(parents=True)
        (path / "frames.npy").write_bytes(b"\0" * 64)
    for path in (running, orphan):
        os.utime(path, (long_ago, long_ago))

    # When the media worker's sweep (every SPOOL_SWEEP_INTERVAL_S = 1 s) has run over them
    wait_until(lambda: not orphan.exists(), timeout_s=60, what="the orphan swept")

    # Then only the orphan went, and the media worker's log says so (the line is written
    # just after the removal, so it may lag the directory's disappearance by a moment)
    assert fresh.is_dir() and running.is_dir()
    line = f"job={orphan.name} orphan spool directory removed"
    wait_until(lambda: line in outage_stack.log("cpu"), timeout_s=10, what="the sweep's log line")


def test_a_stage_that_meets_a_redis_restart_in_its_bookkeeping_waits_for_redis(
    outage_stack: LocalStack,
    outage_redis: RedisServer,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given a generation paused at its first step, whose next Redis call (the cancel check
    # and progress of the steps after the pause) is certain to come while Redis is away
    job = new_job("video_fast", id=f"{PAUSED}{uuid.uuid4()}")
    job["config"]["num_inference_steps"] = 4
    client.rpush(QUEUE, queue_body(job))
    wait_until(lambda: denoising(records, job["id"]), timeout_s=JOB_TIMEOUT_S,
               what="denoising", interval_s=0.01)  # fmt: skip

    # When Redis is killed during the pause and is back only two seconds after it ended
    outage_redis.kill()
    time.sleep(PAUSE_S + 2)
    outage_redis.start()

    # Then the stage waited for Redis instead of failing: the job completes with one final
    # callback, its generation delivered once
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    assert final.body["status"] == "completed", final.body.get("error_message")
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert records.get(job["id"]).fields["deliveries:generate"] == "1"
    assert f"job={job['id']} stage generate failed" not in outage_stack.log("gpu")


def test_redis_killed_and_restarted_with_its_aof_loses_no_job(
    outage_stack: LocalStack,
    outage_redis: RedisServer,
    env: dict[str, str],
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given one job generating, two dispatched behind it in Celery's queues, and two still
    # on the platform list (the bridge is paused while they are pushed)
    running = new_job("video_fast")
    running["config"]["num_inference_steps"] = 8
    client.rpush(QUEUE, queue_body(running))
    wait_until(lambda: denoising(records, running["id"]), timeout_s=JOB_TIMEOUT_S,
               what="denoising", interval_s=0.01)  # fmt: skip
    dispatched = [new_job("image_fast") for _ in range(2)]
    client.rpush(QUEUE, *(queue_body(job) for job in dispatched))
    wait_until(lambda: all(records.is_dispatched(job["id"]) for job in dispatched),
               timeout_s=JOB_TIMEOUT_S, what="dispatch")  # fmt: skip
    outage_stack.kill("bridge", signal.SIGSTOP)
    listed = [new_job("image_fast") for _ in range(2)]
    client.rpush(QUEUE, *(queue_body(job) for job in listed))
    jobs = [running, *dispatched, *listed]
    assert health_status(env) == 200

    # When Redis is killed (-9) while all of that is in flight, and restarted on its port
    # a few seconds later (the bridge meets the outage in its wait on the platform list or
    # in a record write, which waits for Redis)
    logged = {name: len(outage_stack.log(name)) for name in WORKERS}
    outage_redis.kill()
    outage_stack.kill("bridge", signal.SIGCONT)
    down = health_status(env)
    time.sleep(OUTAGE_S)
    outage_redis.start()
    restart_workers_taken_down_by_the_outage(outage_stack, logged)

    # Then /health said 503 while it was down and says 200 again; every job completes with
    # exactly one final callback, and nothing is left waiting or unacknowledged
    assert down == 503
    wait_until(lambda: health_status(env) == 200, timeout_s=60, what="health 200",
               interval_s=0.5)  # fmt: skip
    for job in jobs:
        assert (
            platform.wait_for_final(job["id"], timeout_s=2 * JOB_TIMEOUT_S).body["status"]
            == "completed"
        ), job["id"]
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs} == {
        job["id"]: ["completed"] for job in jobs
    }


def restart_workers_taken_down_by_the_outage(stack: LocalStack, logged: dict[str, int]) -> None:
    """What docker-compose's `restart: unless-stopped` does for a worker that the outage
    took down: kombu's Redis transport, closing the lost connection of a worker that holds
    an unacknowledged message, fails ('Unrecoverable error: AttributeError ... hostname')
    and the worker shuts down (README, "Redis restarts"). `logged`: each log's length
    before the outage. A worker that died any other way fails the test."""
    for name in WORKERS:
        if "Unrecoverable error" in stack.log(name)[logged[name] :]:
            # It finishes its running task first (its Redis writes wait for Redis), as a
            # supervisor sees it: killing it there could send a callback twice
            wait_until(lambda: stack.processes[name].poll() is not None,  # noqa: B023
                       timeout_s=90, what=f"{name} shutting down")  # fmt: skip
            stack.restart(name)
        assert stack.processes[name].poll() is None, f"{name} died otherwise"


def test_the_media_worker_killed_mid_upload_completes_the_job_after_its_restart(
    outage_stack: LocalStack,
    platform: LocalPlatform,
    client: redis.Redis,
) -> None:
    # Given a job whose upload request has reached storage and is kept waiting there
    job = new_job("image_fast")
    released = platform.hold_uploads()
    try:
        client.rpush(QUEUE, queue_body(job))
        platform.wait_for_held_upload(timeout_s=JOB_TIMEOUT_S)

        # When the whole media worker is killed (-9) in the middle of that upload
        outage_stack.kill("cpu")
    finally:
        released.set()
    # ... and started again once Redis would hand its unacknowledged message out again
    wait_until(lambda: unacked_for_longer_than(client, VISIBILITY_TIMEOUT_S),
               timeout_s=3 * VISIBILITY_TIMEOUT_S, what="visibility timeout")  # fmt: skip
    outage_stack.restart("cpu")

    # Then the upload runs again and the job completes with one final callback
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert platform.upload_at("workspace-temp", f"user-1/{job['id']}/0.png") is not None


def unacked_for_longer_than(client: redis.Redis, seconds: float) -> bool:
    """Every unacknowledged message was delivered more than `seconds` ago (and one is)."""
    scores = [score for _, score in client.zrange("unacked_index", 0, -1, withscores=True)]
    return bool(scores) and max(scores) < time.time() - seconds
