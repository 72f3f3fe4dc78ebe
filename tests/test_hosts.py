"""Two hosts against one Redis: each job's media stages run where its frames are.

Two simulated hosts on this machine, on Redis database 15: each has its own WORKER_HOST and
spool directory, one worker on `gpu,enhance` (its generation worker) and one media worker;
host A also runs the bridge. Node names differ by construction (`gpu@host-a`, `gpu@host-b`).
Host A's generation worker hangs on `held-on-a-` jobs (WAN_TEST_FAULT), so a test can kill
it mid-job; that test comes last, as it leaves host A without its generation worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from tests.conftest import JOB_TIMEOUT_S, PLATFORM_QUEUE, host_stacks, new_job, push
from worker.jobs.records import FINAL_STATUSES, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import ROOT, LocalStack, wait_until
from worker.settings import Settings

HOSTS = ("host-a", "host-b")
JOBS = 12
#: Host A's generation hangs at step 1 on jobs with this id prefix, until it is killed.
HELD = "held-on-a-"
#: How soon host B's generation worker hands out a message its dead taker never acked, s.
VISIBILITY_TIMEOUT_S = 10


def host_env(stack_env: dict[str, str], host: str, spool: Path) -> dict[str, str]:
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/15"
    return stack_env | {
        "REDIS_URL": db,
        "PLATFORM_REDIS_URL": db,
        "WORKER_HOST": host,
        "SPOOL_DIR": str(spool),
    }


@pytest.fixture(scope="module")
def envs(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    envs = {
        host: host_env(stack_env, host, tmp_path_factory.mktemp(f"spool-{host}")) for host in HOSTS
    }
    envs["host-a"]["WAN_TEST_FAULT"] = f"{HELD}:hang@step1"
    return envs


@pytest.fixture(scope="module")
def client(envs: dict[str, dict[str, str]]) -> redis.Redis:
    return redis.Redis.from_url(envs["host-a"]["REDIS_URL"])


@pytest.fixture(scope="module")
def two_hosts(
    envs: dict[str, dict[str, str]],
    client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, LocalStack]]:
    client.flushdb()
    try:
        with host_stacks(envs, tmp_path_factory, bridge_on="host-a") as stacks:
            yield stacks
    finally:
        client.flushdb()


def final_statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    statuses = [callback.body["status"] for callback in platform.callbacks_for(job_id)]
    return [status for status in statuses if status in FINAL_STATUSES]


def test_worker_host_must_be_a_safe_queue_name_part() -> None:
    for safe in ("gpu-box-1.example", "GPU_2", "x" * 64):  # Linux allows 64 characters
        assert Settings(_env_file=None, worker_host=safe).worker_host == safe
    for unsafe in ("", "two words", "a:b", "-leading-dash", "x" * 65, "host/1"):
        with pytest.raises(ValidationError, match="WORKER_HOST"):
            Settings(_env_file=None, worker_host=unsafe)


def test_a_second_host_with_the_same_worker_host_is_refused_at_start(
    two_hosts: dict[str, LocalStack],
    envs: dict[str, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Given host A runs, and another machine (its own spool) is set up with WORKER_HOST=host-a
    other = envs["host-a"] | {"SPOOL_DIR": str(tmp_path_factory.mktemp("spool-other"))}
    duplicate = LocalStack(other, log_dir=tmp_path_factory.mktemp("logs-dup"), names=("cpu",))

    # When its media worker starts
    try:
        with pytest.raises(RuntimeError, match="cpu exited with 78"):
            duplicate.start()
    finally:
        duplicate.stop()

    # Then it says why and names the setting, and host A's media worker runs on
    log = duplicate.log("cpu")
    assert "another live worker is named cpu@host-a" in log
    assert "WORKER_HOST=host-a is already used by another host" in log
    assert two_hosts["host-a"].processes["cpu"].poll() is None


def test_twelve_jobs_on_two_hosts_each_have_their_media_stages_where_they_were_generated(
    two_hosts: dict[str, LocalStack],
    envs: dict[str, dict[str, str]],
    client: redis.Redis,
    platform: LocalPlatform,
) -> None:
    # Given two hosts with a generation and a media worker each
    jobs = [new_job("video_fast" if i % 2 else "image_fast") for i in range(JOBS)]

    # When twelve jobs arrive at once
    for job in jobs:
        push(client, job)

    # Then every job completes, with one final callback
    for job in jobs:
        wait_until(
            lambda job=job: final_statuses(platform, job["id"]),
            timeout_s=JOB_TIMEOUT_S * 2,
            what=f"the final callback of {job['id']}",
            interval_s=0.2,
        )
    assert {job["id"]: final_statuses(platform, job["id"]) for job in jobs} == {
        job["id"]: ["completed"] for job in jobs
    }
    # And each job's encode, thumbnail and upload ran on the host that generated it
    records = JobRecords(client, ttl_s=3600)
    generated_on = {}
    for job in jobs:
        record = records.get(job["id"])
        host = record.host("generate")
        assert host in HOSTS, record.fields
        assert [record.host(s) for s in ("encode", "thumbnail", "upload")] == [host] * 3
        generated_on[job["id"]] = host
    # And both hosts generated some
    assert set(generated_on.values()) == set(HOSTS), generated_on

    # And `jobs show` says which host ran each stage
    job_id = jobs[0]["id"]
    shown = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "jobs", "show", job_id, "--json"],
        cwd=ROOT, env=envs["host-a"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    hosts = json.loads(shown.stdout)["hosts"]
    media = {stage: hosts[stage] for stage in ("encode", "thumbnail", "upload")}
    assert media == dict.fromkeys(media, generated_on[job_id])


def test_a_generation_redelivered_to_another_host_has_its_media_stages_there(
    two_hosts: dict[str, LocalStack], client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a job in the middle of its generation on host A (host B's generation worker down)
    a, b = two_hosts["host-a"], two_hosts["host-b"]
    b.kill("gpu+enhance")
    job = new_job("video_fast", id=f"{HELD}{uuid.uuid4()}")
    client.rpush(PLATFORM_QUEUE, queue_body(job))
    records = JobRecords(client, ttl_s=3600)
    wait_until(
        lambda: (records.get(job["id"]).value("progress") or {}).get("step", 0) >= 1,
        timeout_s=JOB_TIMEOUT_S,
        what=f"a denoising step of {job['id']} on host A",
    )
    assert records.get(job["id"]).host("generate") == "host-a"

    # When host A's generation worker dies whole, and host B's comes back (its broker hands
    # unacknowledged messages out again after a short visibility timeout)
    a.kill("gpu+enhance")
    b.restart("gpu+enhance", env={"BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)})

    # Then the job completes once, generated again on B, with its media stages on B
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S + VISIBILITY_TIMEOUT_S)
    assert final.body["status"] == "completed"
    assert final_statuses(platform, job["id"]) == ["completed"]
    record = records.get(job["id"])
    hosts = [record.host(stage) for stage in ("generate", "encode", "thumbnail", "upload")]
    assert hosts == ["host-b"] * 4
    assert record.fields["deliveries:generate"] == "2"
