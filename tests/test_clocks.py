"""One clock for every stamp another host reads: a host whose clock is ten minutes off.

Each test runs the writing side in a process under libfaketime (Debian's `faketime`, which
`make test` installs), its clock shifted by `SKEW`, against a real redis-server that keeps
the true time; the reading side (this process, or the sweep's own arithmetic) keeps the true
clock too. Durations, lost-job decisions and promotion must come out as if no clock were off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, module_env, new_job
from tests.test_load import TINY_CONFIG
from worker.flow.lanes import WaitingJobs
from worker.flow.lost_jobs import lost_stage
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import ROOT, LocalStack, RedisServer
from worker.settings import Settings

#: How far a skewed host's clock is off, as libfaketime reads it: ten minutes slow.
SKEW = "-10m"
#: Where Debian's libfaketime lives (`apt-get install faketime`).
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def skewed(env: dict[str, str], skew: str = SKEW) -> dict[str, str]:
    """`env` for a process whose wall clock is `skew` off (its monotonic clock is left
    alone: only the stamps it writes are at stake)."""
    if not LIBFAKETIME.exists():
        raise RuntimeError(f"{LIBFAKETIME} is missing: `make test` installs Debian's faketime")
    return env | {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@pytest.fixture(scope="module")
def clock_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("clock-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def client(clock_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(clock_redis.url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def records(client: redis.Redis) -> JobRecords:
    return JobRecords(client, ttl_s=600)


def on_skewed_host(redis_url: str, code: str, *, skew: str = SKEW) -> None:
    """Run `code` in a Python process on a clock `skew` off, with `client`, `records` and
    `settings` of the test's Redis at hand, and check that it really was skewed."""
    prelude = textwrap.dedent(f"""
        import time, redis
        from worker.jobs.records import JobRecords
        from worker.settings import Settings
        client = redis.Redis.from_url({redis_url!r})
        records = JobRecords(client, ttl_s=600)
        settings = Settings()
        assert abs(time.time() - records.now()) > 500, "the clock is not skewed"
    """)
    subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT, env=skewed(dict(os.environ), skew), check=True, timeout=60,
    )  # fmt: skip


def test_a_stage_timed_on_a_skewed_host_lasts_what_it_lasted(
    client: redis.Redis, records: JobRecords, clock_redis: RedisServer
) -> None:
    # Given a stage started and finished by a host whose clock is ten minutes slow
    on_skewed_host(clock_redis.url, """
        records.begin_stage("job-1", "generate", lease_s=30, max_deliveries=3)
        records.stage_finished("job-1", "generate")
    """)  # fmt: skip

    # Then its seconds are the moments between, not minus ten minutes
    seconds = records.get("job-1").stage_seconds()["generate"]
    assert 0 <= seconds < 30, seconds


def test_frames_of_a_host_ten_minutes_fast_that_died_are_found_lost_in_time(
    client: redis.Redis, records: JobRecords, clock_redis: RedisServer
) -> None:
    # Given a generation finished by a host whose clock is ten minutes fast, and whose media
    # worker was last seen 400 s ago: the host died with the frames on its spool
    records.write("job-2", status="processing", stage="generate")
    records.update("job-2", generation={"host": "host-a"})
    on_skewed_host(clock_redis.url, """
        records.begin_stage("job-2", "generate", lease_s=30, max_deliveries=3)
        records.stage_finished("job-2", "generate")
    """, skew="+10m")  # fmt: skip
    now = records.now()

    # When the lost-job sweep looks at it 301 s later, with a timeout of 300 s
    lost = lost_stage(
        records.get("job-2"), now=now + 301, timeout_s=300, lease_s=30,
        media_hosts={"host-a": now - 400},
    )  # fmt: skip

    # Then encode has waited 301 s on a dead host: the job runs again from generate now, not
    # ten minutes later
    assert lost is not None and lost.restart == "generate", lost


def test_a_job_waiting_sent_by_a_skewed_host_is_not_promoted_before_its_time(
    client: redis.Redis, clock_redis: RedisServer
) -> None:
    # Given an image job entered into its lane by a host whose clock is ten minutes slow
    job = new_job("image_fast", id=f"skewed-{uuid.uuid4()}")
    on_skewed_host(clock_redis.url, f"""
        import json
        from worker.jobs.model import parse_job
        from worker.flow.lanes import WaitingJobs
        WaitingJobs(client, settings).enter(parse_job(json.loads({json.dumps(job)!r})))
    """)  # fmt: skip

    # Then it has waited a moment: not overdue for a promotion after 300 s, and the
    # autoscaler's oldest wait says so
    lanes = WaitingJobs(client, Settings())
    assert lanes.overdue(300) == []
    assert lanes.state()["image"].oldest_wait_s < 30


# --- A whole stack on a skewed host ------------------------------------------------------

QUEUE = "clock_queue"


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], clock_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env, tmp_path_factory, "clocks", redis_url=clock_redis.url, queue=QUEUE,
        settings={"LOST_JOB_TIMEOUT_S": "30", "STAGE_LEASE_S": "6"},
    )  # fmt: skip


def test_a_job_run_by_a_host_ten_minutes_slow_reports_true_timings_and_runs_once(
    env: dict[str, str], client: redis.Redis, records: JobRecords, platform: LocalPlatform,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    # Given the workers and the bridge of one host whose clock is ten minutes slow
    names = ("gpu+enhance", "cpu", "bridge")
    with LocalStack(skewed(env), log_dir=tmp_path_factory.mktemp("clock-logs"), names=names):
        # When the platform sends a video job
        job = new_job("video_fast")
        job["config"] |= TINY_CONFIG
        client.rpush(QUEUE, queue_body(job))
        final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    # Then it completes once, with the true seconds of each stage, and no sweep took it for
    # lost
    assert final.body["status"] == "completed"
    metadata = final.body["metadata"]
    assert 0 < metadata["generation_time"] < JOB_TIMEOUT_S
    assert all(0 <= s < JOB_TIMEOUT_S for s in metadata["stage_seconds"].values()), metadata
    fields = records.get(job["id"]).fields
    assert not [f for f in fields if f.startswith("lost:")], fields
    assert fields.get("retries", "0") == "0"
    assert [c.body["status"] for c in platform.callbacks_for(job["id"])].count("completed") == 1
