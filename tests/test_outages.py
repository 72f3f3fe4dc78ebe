"""Outages of the machinery under running jobs: Redis, the media worker, the bridge.

The module runs its own stack on a private redis-server with an append-only file (AOF,
`appendfsync everysec`, as docker-compose.yml runs it), so Redis itself can be killed and
restarted on its port with its data. BROKER_VISIBILITY_TIMEOUT_S is short: the message of a
worker killed whole comes back within a test. Assertions read what the platform got, the
job records, the spool and the logs.
"""

from __future__ import annotations

import json
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
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis

from tasks.kombu_fix import close_channels_past_a_lost_brpop
from tests.conftest import JOB_TIMEOUT_S, api_url, module_env, new_job, settled
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, LocalStack, RedisServer, free_port, wait_until

QUEUE = "outage_queue"
#: Seconds before Redis hands out again the message of a worker killed whole; well above
#: any stage of these tiny jobs, so no healthy task is handed out twice.
VISIBILITY_TIMEOUT_S = 20
#: The Celery workers of the module's stack.
WORKERS = ("gpu", "enhance", "cpu")
#: How long Redis stays away in the restart tests: well within what a record write or a
#: send waits for it (worker/jobs/records.py REDIS_OUTAGE_RETRY, celeryconfig's publish retry).
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
    logged = {name: len(outage_stack.log(name)) for name in WORKERS}
    outage_redis.kill()
    time.sleep(PAUSE_S + 2)
    outage_redis.start()

    # Then the stage waited for Redis instead of failing: the job completes with one final
    # callback, its generation delivered once, and no worker exited
    wait_for_finals_with_every_worker_up(outage_stack, platform, [job], logged)
    final = platform.wait_for_final(job["id"])
    assert final.body["status"] == "completed", final.body.get("error_message")
    assert final_statuses(platform, job["id"]) == ["completed"]
    assert records.get(job["id"]).fields["deliveries:generate"] == "1"
    assert f"job={job['id']} stage generate failed" not in outage_stack.log("gpu")
    assert_every_worker_up(outage_stack, logged)


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

    # Then /health said 503 while it was down and says 200 again; every job completes with
    # exactly one final callback, nothing is left waiting or unacknowledged, and no worker
    # exited (nothing restarts one here)
    assert down == 503
    wait_until(lambda: health_status(env) == 200, timeout_s=60, what="health 200",
               interval_s=0.5)  # fmt: skip
    wait_for_finals_with_every_worker_up(outage_stack, platform, jobs, logged)
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs} == {
        job["id"]: ["completed"] for job in jobs
    }
    assert_every_worker_up(outage_stack, logged)


def test_redis_killed_while_the_generation_and_media_workers_hold_a_message_takes_no_worker_down(
    outage_stack: LocalStack,
    outage_redis: RedisServer,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given the media worker in the middle of one job's upload (kept waiting at storage;
    # its other pool slot leaves a BRPOP pending) and the generation worker paused in
    # another job's denoising: each holds an unacknowledged message
    uploading = new_job("image_fast")
    generating = new_job("video_fast", id=f"{PAUSED}{uuid.uuid4()}")
    jobs = [uploading, generating]
    released = platform.hold_uploads()
    try:
        client.rpush(QUEUE, queue_body(uploading))
        platform.wait_for_held_upload(timeout_s=JOB_TIMEOUT_S)
        client.rpush(QUEUE, queue_body(generating))
        wait_until(lambda: denoising(records, generating["id"]), timeout_s=JOB_TIMEOUT_S,
                   what="denoising", interval_s=0.01)  # fmt: skip
        assert {"wan.upload", "wan.generate"} <= unacked_task_names(client)

        # When Redis is killed (-9) and restarted on its port a few seconds later
        logged = {name: len(outage_stack.log(name)) for name in WORKERS}
        outage_redis.kill()
        time.sleep(OUTAGE_S)
        outage_redis.start()
    finally:
        released.set()

    # Then no worker exits: each reconnects and goes on, and every job completes with one
    # final callback, its held messages acknowledged or delivered again, none left behind
    wait_for_finals_with_every_worker_up(outage_stack, platform, jobs, logged)
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs} == {
        job["id"]: ["completed"] for job in jobs
    }
    assert_every_worker_up(outage_stack, logged)


def unacked_task_names(client: redis.Redis) -> set[str]:
    """The Celery task names of the messages in Redis's unacknowledged set."""
    entries = [json.loads(raw) for raw in client.hvals("unacked")]
    return {message["headers"]["task"] for message, _exchange, _routing_key in entries}


def assert_every_worker_up(stack: LocalStack, logged: dict[str, int]) -> None:
    """No Celery worker exited or started shutting down since each log had `logged[name]`
    characters: kombu's 'Unrecoverable error' ends in a warm shutdown that waits for the
    running task, so the log says so before the process is gone."""
    for name in WORKERS:
        since = stack.log(name)[logged[name] :]
        going_down = [line[:300] for line in since.splitlines() if "Unrecoverable error" in line]
        assert not going_down, f"{name} is going down: {going_down}"
        assert stack.processes[name].poll() is None, f"{name} exited:\n{since[-2000:]}"


def wait_for_finals_with_every_worker_up(
    stack: LocalStack, platform: LocalPlatform, jobs: list[dict], logged: dict[str, int]
) -> None:
    """Wait for every job's final callback; a worker that goes down fails at once instead
    of after the timeout (its queue would wait for it for ever)."""

    def finals_with_every_worker_up() -> bool:
        assert_every_worker_up(stack, logged)
        return all(final_statuses(platform, job["id"]) for job in jobs)

    wait_until(finals_with_every_worker_up, timeout_s=2 * JOB_TIMEOUT_S,
               what="every job's final callback", interval_s=0.2)  # fmt: skip


def test_a_consumer_whose_brpop_redis_drops_closes_and_acks_its_message_once_redis_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given kombu fixed as a worker start fixes it (undone after the test), and a consumer
    # on a real Redis holding one unacknowledged message with its next BRPOP pending, beside
    # a control channel with a fanout queue (a Celery worker's pidbox)
    monkeypatch.setattr(kombu_redis.Channel, "close", kombu_redis.Channel.close)
    close_channels_past_a_lost_brpop()
    server = RedisServer(tmp_path, aof=True).start()
    try:
        connection = Connection(server.url)
        held = consumer_holding_a_message_with_a_brpop_pending(connection)

        # When Redis is killed and the connection is closed as Celery's consumer closes it
        # on the connection error (celery/worker/consumer/consumer.py,
        # on_connection_error_after_connected): `collect`, then `close` ignoring
        # connection errors
        server.kill()
        connection.collect()
        ignore_errors(connection, connection.close)  # kombu unfixed: AttributeError 'hostname'

        # Then the message waited in Redis's unacked set, and its ack, once Redis is back,
        # goes through
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.hlen("unacked") == 1
        held.ack()
        assert client.hlen("unacked") == 0
    finally:
        server.stop()


def consumer_holding_a_message_with_a_brpop_pending(connection: Connection) -> Message:
    """Consume one message without acking it, with room for more (prefetch 2), until the
    channel's next BRPOP is out; a control channel with a fanout queue opened after it."""
    queue = Queue("outage", Exchange("outage"), routing_key="outage")
    channel = connection.default_channel
    Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key="outage",
                              declare=[queue])  # fmt: skip
    received: list[Message] = []
    consumer = Consumer(channel, [queue], callbacks=[lambda _, message: received.append(message)])
    consumer.qos(prefetch_count=2)
    consumer.consume()
    pidbox = Queue("node.pidbox", Exchange("pidbox", type="fanout"), auto_delete=True)
    Consumer(connection.channel(), [pidbox], no_ack=True).consume()

    def holding_with_brpop_pending() -> bool:
        try:
            connection.drain_events(timeout=0.1)
        except TimeoutError:
            pass
        return bool(received) and bool(channel._in_poll)

    wait_until(holding_with_brpop_pending, timeout_s=10, what="a message held, BRPOP pending")
    return received[0]


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
