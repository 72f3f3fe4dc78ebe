"""Workers that die or are stopped: no job lost, none run twice, none looping.

Unit tests decide stage starts against the real Redis (database 11). The rest runs a stack
of its own on database 10 with a short BROKER_VISIBILITY_TIMEOUT_S (a message of a worker
killed whole comes back within seconds), a short STAGE_LEASE_S, MAX_DELIVERIES=3 and
test faults keyed by job id prefix: `poison-` jobs kill their pool child at denoising
step 1, `held-...` jobs hang there until their worker is killed or stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, module_env, new_job, point_celery_at
from tests.test_job_control import cli
from worker.flow.lanes import queue_depth
from worker.jobs.records import JobRecord, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import ROOT, LocalStack, RedisServer, wait_until

QUEUE = "recovery_queue"
VISIBILITY_TIMEOUT_S = 15
LEASE_S = 6
MAX_DELIVERIES = 3
GRACE_S = 3
#: Fault rules by job id prefix; a test that holds a job drops its own rule when it
#: restarts the worker, so the job can finish.
FAULTS = {
    "poison-": "crash@step1",
    "held-killed-": "hang@step1",
    "held-stopped-": "hang@step1",
}
#: A stage's record fields that say who runs it and how often it was delivered.
LEASE_FIELDS = ("lease", "lease_until", "lease_pidns")


def fault_rules(*, without: str = "") -> str:
    return ";".join(f"{prefix}:{rule}" for prefix, rule in FAULTS.items() if prefix != without)


# --- Stage starts, decided by the record (real Redis, another real process as the owner) ---


@pytest.fixture
def records(redis_server: RedisServer) -> Iterator[JobRecords]:
    client = redis.Redis.from_url(redis_server.db_url(11))
    client.flushdb()
    yield JobRecords(client, ttl_s=600)
    client.flushdb()


def start(records: JobRecords, job_id: str, *, lease_s: float = 60) -> tuple[str, int]:
    run = records.begin_stage(job_id, "generate", lease_s=lease_s, max_deliveries=MAX_DELIVERIES)
    return run.outcome, run.deliveries


def other_process_starts(
    records: JobRecords, job_id: str, *, lease_s: float = 60, stay_s: float = 0
) -> subprocess.Popen:
    """Another process on this host takes the stage, then stays alive for `stay_s` (until
    killed) or exits at once without releasing it (as a killed worker would)."""
    url = records.redis.get_connection_kwargs()
    code = (
        "import sys, time, redis; from worker.jobs.records import JobRecords; "
        f"r = JobRecords(redis.Redis(port={url['port']}, db={url['db']}), ttl_s=600); "
        f"print(r.begin_stage({job_id!r}, 'generate', lease_s={lease_s}, max_deliveries=3)"
        f".outcome, flush=True); time.sleep({stay_s})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "run"
    return process


def test_a_stage_runs_once_and_is_skipped_after_it_finished(records: JobRecords) -> None:
    # Given a stage started and given back by a Celery retry (its lease released)
    assert start(records, "job-1") == ("run", 1)
    assert records.release_stage("job-1", "generate")
    # When it starts again, then finishes
    assert start(records, "job-1") == ("run", 1)  # a retry is no delivery
    records.stage_finished("job-1", "generate")
    # Then any later delivery is told it is done, and nothing in the record changes
    before = records.get("job-1").fields
    assert start(records, "job-1") == ("done", 0)
    assert records.get("job-1").fields == before
    assert before["attempts:generate"] == "2" and before["deliveries:generate"] == "1"
    assert not any(f"{name}:generate" in before for name in LEASE_FIELDS)


def test_a_live_run_makes_a_duplicate_wait_and_its_death_lets_the_next_one_take_over_at_once(
    records: JobRecords,
) -> None:
    # Given another live process on this host runs the stage
    other = other_process_starts(records, "job-2", stay_s=600)
    try:
        # Then a duplicate delivery is told to wait for the rest of the lease, uncounted
        run = records.begin_stage("job-2", "generate", lease_s=60, max_deliveries=MAX_DELIVERIES)
        assert (run.outcome, run.deliveries) == ("busy", 1)
        assert 50 < run.lease_left_s <= 60
    finally:
        # When that process dies (a killed pool child), long before its lease runs out
        other.kill()
        other.wait()
    # Then the next start takes the stage over at once, counted as a second delivery
    assert start(records, "job-2") == ("run", 2)
    assert records.get("job-2").fields["lease:generate"].endswith(":" + str(os.getpid()))


def test_an_expired_lease_is_taken_over_even_if_its_owner_still_lives(records: JobRecords) -> None:
    # Given another process holds a lease of 1 s and stays alive without renewing it
    other = other_process_starts(records, "job-3", lease_s=1, stay_s=600)
    try:
        # When the lease runs out (its owner hung, or lives on a host that went away)
        wait_until(lambda: start(records, "job-3")[0] != "busy", timeout_s=30, what="expiry")
        # Then this process holds the stage, and that counted as a delivery
        fields = records.get("job-3").fields
        assert fields["deliveries:generate"] == "2"
        assert fields["lease:generate"].endswith(f":{os.getpid()}")
        # And the hung owner can no longer renew it
        assert records.release_stage("job-3", "generate")
    finally:
        other.kill()
        other.wait()


def test_a_stage_whose_worker_died_max_deliveries_times_is_refused(records: JobRecords) -> None:
    # Given three processes died holding the stage
    for _ in range(MAX_DELIVERIES):
        other_process_starts(records, "job-4").wait()
    # When it is delivered a fourth time, then it is refused and holds no lease
    assert start(records, "job-4") == ("too_many", MAX_DELIVERIES + 1)
    fields = records.get("job-4").fields
    assert fields["deliveries:generate"] == str(MAX_DELIVERIES + 1)
    assert "lease:generate" not in fields


def test_a_job_handed_back_at_shutdown_is_not_counted_as_a_delivery(records: JobRecords) -> None:
    # Given a stage run by a process that is stopped: its worker releases the lease for it
    other = other_process_starts(records, "job-5", stay_s=600)
    owner = records.get("job-5").fields["lease:generate"]
    assert records.release_stage("job-5", "generate", owner=owner, note="handed_back")
    other.kill()
    other.wait()
    # When the job comes back, then it runs as the same delivery, and the hand-back is noted
    assert start(records, "job-5") == ("run", 1)
    assert "handed_back:generate" in records.get("job-5").fields


# --- Through real workers ---


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    db = redis_server.db_url(10)
    return module_env(
        stack_env,
        tmp_path_factory,
        "recovery",
        redis_url=db,
        queue=QUEUE,
        settings={
            "PLATFORM_REDIS_URL": db,
            "BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "STAGE_LEASE_S": str(LEASE_S),
            "MAX_DELIVERIES": str(MAX_DELIVERIES),
            "SHUTDOWN_GRACE_S": str(GRACE_S),
            "WAN_TEST_FAULT": fault_rules(),
        },
    )


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def stack(
    env: dict[str, str], client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("recovery-logs")) as local:
        yield local


def record(client: redis.Redis, job_id: str) -> JobRecord:
    return JobRecords(client, ttl_s=600).get(job_id)


def job(prefix: str = "", **config: Any) -> dict[str, Any]:
    created = new_job("video_fast", id=f"{prefix}{uuid.uuid4()}")
    created["config"] |= config
    return created


def wait_for_step(client: redis.Redis, job_id: str) -> None:
    wait_until(
        lambda: (record(client, job_id).value("progress") or {}).get("step", 0) >= 1,
        timeout_s=JOB_TIMEOUT_S,
        what=f"a denoising step of {job_id}",
    )


def statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    return [callback.body["status"] for callback in platform.callbacks_for(job_id)]


def test_a_generation_worker_killed_whole_mid_denoise_runs_the_job_again_after_restart(
    stack: LocalStack, env: dict[str, str], client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a job in the middle of its denoising loop
    held = job("held-killed-")
    client.rpush(QUEUE, queue_body(held))
    wait_for_step(client, held["id"])
    loads_before = stack.log("gpu").count("WAN pipeline loaded")
    # (the on-call engineer sees which process runs it)
    [child] = stack.pids("gpu")[1:]
    [lease] = json.loads(cli(env, "show", held["id"], "--json").stdout)["leases"]
    assert (lease["stage"], lease["owner"]) == ("generate", f"{socket.gethostname()}:{child}")
    assert f"{socket.gethostname()}:{child}" in cli(env, "show", held["id"]).stdout

    # When the whole generation worker is killed (pool and main process) and started again
    stack.kill("gpu")
    offset = len(stack.log("gpu"))
    stack.restart("gpu", env={"WAN_TEST_FAULT": fault_rules(without="held-killed-")})

    # Then its message comes back after the visibility timeout and the job completes once
    body = platform.wait_for_final(held["id"], timeout_s=JOB_TIMEOUT_S + VISIBILITY_TIMEOUT_S)
    assert body.body["status"] == "completed"
    assert statuses(platform, held["id"]) == ["processing", "processing", "completed"]
    done = record(client, held["id"])
    assert done.fields["deliveries:generate"] == "2"
    assert done.fields["attempts:generate"] == "2"
    # And the model was loaded again, only by the new worker's child
    assert loads_before == 1
    assert stack.log("gpu")[offset:].count("WAN pipeline loaded") == 1


def test_a_poison_job_fails_after_max_deliveries_is_dead_lettered_and_the_next_job_runs(
    stack: LocalStack, env: dict[str, str], client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a job that kills its generation child every time, and a job right behind it
    poison, behind = job("poison-"), job()
    client.rpush(QUEUE, queue_body(poison), queue_body(behind))

    # Then the poison job fails once it would be delivered a fourth time, saying why
    failed = platform.wait_for_final(poison["id"], timeout_s=3 * JOB_TIMEOUT_S).body
    assert failed["status"] == "failed"
    assert failed["metadata"]["error_stage"] == "generate"
    assert failed["metadata"]["error_type"] == "TooManyDeliveries"
    assert failed["error_message"] == (
        "generate was delivered 4 times (MAX_DELIVERIES=3): its worker died each time"
    )
    assert statuses(platform, poison["id"]).count("failed") == 1
    # And the on-call engineer finds it among the dead letters
    dead = cli(env, "dead", "--json")
    assert dead.returncode == 0, dead.stderr
    [entry] = [row for row in json.loads(dead.stdout) if row["job_id"] == poison["id"]]
    assert entry["status"] == "failed" and "delivered 4 times" in entry["error"]
    shown = json.loads(cli(env, "show", poison["id"], "--json").stdout)
    assert shown["deliveries"]["generate"] == MAX_DELIVERIES + 1
    # And the job behind it completes
    assert platform.wait_for_final(behind["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    assert statuses(platform, poison["id"]).count("failed") == 1


def test_a_duplicate_delivery_of_a_running_or_finished_job_is_skipped(
    stack: LocalStack, env: dict[str, str], client: redis.Redis, platform: LocalPlatform
) -> None:
    from tasks.chain import build_chain, stage_task_id

    def send_chain_again(run: int = 0) -> None:
        point_celery_at(env["REDIS_URL"])  # the stack's broker, as a second sender would
        build_chain(dup["id"], run=run).apply_async()

    def skipped_callbacks(run: int = 0) -> int:
        task_id = stage_task_id(dup["id"], "callback", run)
        return sum(
            "stage callback finished before: delivery skipped" in line
            and f'"task_id": "{task_id}"' in line
            for line in stack.log("cpu").splitlines()
        )

    # Given a job whose generation is running
    dup = job(num_inference_steps=6)
    client.rpush(QUEUE, queue_body(dup))
    wait_for_step(client, dup["id"])

    # When its chain is sent a second time, with the same task ids (a bridge that died
    # between sending and marking it)
    send_chain_again()
    # Then the job completes once; the duplicate skips every stage, to the last
    assert platform.wait_for_final(dup["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    wait_until(lambda: skipped_callbacks() >= 1, timeout_s=JOB_TIMEOUT_S, what="duplicate done")

    # When it is sent once more after it completed (told apart by its task ids), then
    # nothing runs again
    send_chain_again(run=7)
    wait_until(lambda: skipped_callbacks(7) == 1, timeout_s=JOB_TIMEOUT_S, what="second skip")
    done = record(client, dup["id"])
    assert done.fields["attempts:generate"] == "1"
    assert done.fields["deliveries:generate"] == "1"
    assert stack.log("gpu").count(f"job={dup['id']} stage generate started") == 1
    assert statuses(platform, dup["id"]) == ["processing", "completed"]


def test_sigterm_hands_a_running_job_back_after_the_grace_and_it_completes_after_restart(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a job that will not finish within SHUTDOWN_GRACE_S
    held = job("held-stopped-")
    client.rpush(QUEUE, queue_body(held))
    wait_for_step(client, held["id"])

    # When the generation worker gets SIGTERM (docker stop, RunPod's pod stop: the main
    # process only)
    worker = stack.processes["gpu"]
    worker.send_signal(signal.SIGTERM)

    # Then it exits after the grace, with the job's message back on the queue, its lease
    # released and the hand-back noted
    worker.wait(timeout=GRACE_S + 60)
    handed_back = record(client, held["id"]).fields
    assert "handed_back:generate" in handed_back and "lease:generate" not in handed_back
    assert queue_depth(client, "gpu") == 1
    assert "handed back to the queue" in stack.log("gpu")

    # And a restarted worker completes it, as the same delivery
    stack.restart("gpu", env={"WAN_TEST_FAULT": fault_rules(without="held-stopped-")})
    assert platform.wait_for_final(held["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
    done = record(client, held["id"]).fields
    assert done["deliveries:generate"] == "1" and done["attempts:generate"] == "2"
    assert statuses(platform, held["id"]) == ["processing", "processing", "completed"]
