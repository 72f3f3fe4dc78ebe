"""A lost host's job runs again elsewhere within LOST_JOB_TIMEOUT_S; a healthy long one never.

First the lost-job sweep's decision and its atomic resend, against a real Redis. Then two
simulated hosts on a private redis-server, each with a generation and a media worker (the
bridge on host B), LOST_JOB_TIMEOUT_S shortened to seconds and Redis's visibility timeout
left at an hour, so only the sweep can rescue a job within a test. Jobs are the cheapest
there are (one 256x256 image, one step); WAN_TEST_FAULT makes generations slow, stuck,
out of memory or (host A only) hang, refuses a failed callback's publish, and makes a media
worker hold a final callback a moment before posting it.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, host_stacks, new_job
from worker.flow.lost_jobs import LostJob, lost_stage
from worker.jobs.records import FINAL_STATUSES, JobRecord, JobRecords, stage_task_id
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until
from worker.settings import get_settings

QUEUE = "lost_host_queue"
HOSTS = ("host-a", "host-b")
LOST_JOB_TIMEOUT_S = 6
STAGE_LEASE_S = 2
#: Far longer than the module: a job rescued within a test was rescued by the sweep.
VISIBILITY_TIMEOUT_S = 3600
#: A healthy generation pauses this long at its step, longer than LOST_JOB_TIMEOUT_S.
PAUSE_S = 9
#: generate's soft limit: above a paused job's pause (the model is loaded at start, WARMUP);
#: the hard one is 2 s later.
GENERATE_SOFT_LIMIT_S = 18
HARD_LIMIT_GRACE_S = 2
#: Host A's generation hangs at its step on jobs with this id prefix, until it is killed.
HELD = "held-on-a-"
#: A media worker holds the final callback of these jobs for FINAL_HELD_S before posting it:
#: long enough to be killed in the middle of it.
FINAL_HELD = "final-held-"
FINAL_HELD_S = 5
#: The generation of these jobs pauses at its step for CUT_OFF_PAUSE_S: long enough to be
#: cut off (SIGSTOP) in the middle of it.
CUT_OFF = "cut-off-"
CUT_OFF_PAUSE_S = 6
#: These jobs' generation runs out of memory (they fail), and the broker refuses their
#: failed callback's first publish.
REFUSED = "refused-"
TINY_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}


def tiny_job(prefix: str) -> dict[str, Any]:
    job = new_job("image_fast", id=f"{prefix}{uuid.uuid4()}")
    job["config"] |= TINY_CONFIG
    return job


@pytest.fixture(scope="module")
def lost_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("lost-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lost_redis: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(lost_redis.url)


@pytest.fixture
def records(client: redis.Redis) -> JobRecords:
    return JobRecords(client, ttl_s=600)


# --- The sweep's decision and resend, on records written as the stages write them ---


def started(records: JobRecords, stage: str, *, lease_s: float = 60) -> str:
    """A job whose `stage` is running now, in this process, on this WORKER_HOST."""
    job_id = f"unit-{uuid.uuid4()}"
    records.write(job_id, status="processing")
    assert records.begin_stage(job_id, stage, lease_s=lease_s, max_deliveries=3).outcome == "run"
    return job_id


def decide(
    records: JobRecords, job_id: str, *, after_s: float, hosts: dict[str, float] | None = None
) -> LostJob | None:
    return lost_stage(records.get(job_id), now=records.now() + after_s, timeout_s=300,
                      lease_s=60, media_hosts=hosts or {})  # fmt: skip


def test_a_stage_is_lost_once_its_lease_has_not_been_renewed_for_the_timeout(
    records: JobRecords,
) -> None:
    here = get_settings().worker_host
    for stage, restart in [("generate", "generate"), ("encode", "generate"),
                           ("callback", "callback"), ("enhance", "enhance")]:  # fmt: skip
        job_id = started(records, stage)
        # A live lease, and one expired but renewed less than the timeout ago: not lost
        assert decide(records, job_id, after_s=0) is None
        assert decide(records, job_id, after_s=299) is None
        # No renewal for the timeout: lost, and sent again from where its inputs are
        lost = decide(records, job_id, after_s=301)
        assert lost is not None
        assert (lost.stage, lost.restart, lost.host) == (stage, restart, here)
        assert lost.owner == records.get(job_id).fields[f"lease:{stage}"]
        # A renewal puts it off again
        records.renew_stage(job_id, stage, lease_s=60)
        assert decide(records, job_id, after_s=299) is None


def test_a_finished_or_not_started_job_is_never_lost(records: JobRecords) -> None:
    job_id = started(records, "generate")
    for status in FINAL_STATUSES:
        records.write(job_id, status=status)
        assert decide(records, job_id, after_s=10_000) is None
    queued = f"unit-{uuid.uuid4()}"
    records.write(queued, status="queued", stage="")
    assert decide(records, queued, after_s=10_000) is None


def test_media_stages_waiting_on_a_host_without_a_live_media_worker_are_lost(
    records: JobRecords,
) -> None:
    # Given a job generated on host-x, its encode waiting on `cpu.host-x`
    job_id = started(records, "generate")
    records.update(job_id, generation={"host": "host-x"})
    records.stage_finished(job_id, "generate")
    now = records.now()

    # A host whose media worker was seen within the timeout: not lost
    assert decide(records, job_id, after_s=301, hosts={"host-x": now + 100}) is None
    # One silent for the timeout, or never seen: lost at encode, sent again from generate
    for hosts in ({"host-x": now}, {}):
        lost = decide(records, job_id, after_s=301, hosts=hosts)
        assert lost is not None
        assert (lost.stage, lost.restart, lost.owner) == ("encode", "generate", "cpu.host-x")
    # But not before the job itself has waited that long
    assert decide(records, job_id, after_s=100) is None


def resend(records: JobRecords, record: JobRecord, stage: str = "generate") -> tuple[str, int]:
    return records.resend_lost(record, stage=stage, restart="generate",
                               forget=[f"lease:{stage}", f"finished:{stage}"],
                               max_deliveries=3)  # fmt: skip


def test_a_resend_happens_once_counts_a_delivery_and_supersedes_the_old_messages(
    records: JobRecords,
) -> None:
    # Given a lost generation, read by two sweepers at once
    job_id = started(records, "generate")
    record = records.get(job_id)

    # When both resend it
    outcomes = [resend(records, record), resend(records, record)]

    # Then one did, counting a second delivery, as run 1
    assert outcomes == [("resent", 2), ("gone", 0)]
    fields = records.get(job_id).fields
    assert (fields["retries"], fields["deliveries:generate"], fields["status"]) == (
        "1", "2", "processing",
    )  # fmt: skip
    assert "lease:generate" not in fields and "lost:generate" in fields
    # And the old run's message is skipped, the new run's runs (its delivery already counted)
    old = records.begin_stage(job_id, "generate", lease_s=60, max_deliveries=3, run=0)
    assert old.outcome == "superseded"
    new = records.begin_stage(job_id, "generate", lease_s=60, max_deliveries=3, run=1)
    assert (new.outcome, new.deliveries) == ("run", 2)


def test_a_resend_claimed_but_never_sent_is_sent_again_after_the_timeout(
    records: JobRecords,
) -> None:
    # Given a lost generation whose resend was claimed on the record, and whose sweeper
    # then died (or lost Redis) before it sent the chain and noted it sent
    job_id = started(records, "generate")
    assert resend(records, records.get(job_id)) == ("resent", 2)

    # Then it is not lost while a send may still be on its way
    assert decide(records, job_id, after_s=299) is None
    # But once the claim is LOST_JOB_TIMEOUT_S old, it is sent again from the same stage,
    # as a new run (the first run's messages, had any gone out, are superseded)
    lost = decide(records, job_id, after_s=301)
    assert lost is not None
    assert (lost.stage, lost.restart, lost.owner) == ("generate", "generate", "an unsent resend")
    assert resend(records, records.get(job_id)) == ("resent", 3)
    assert records.get(job_id).fields["retries"] == "2"
    # And a resend whose chain went out is never sent again for its wait in the queue
    records.resend_sent(job_id)
    assert decide(records, job_id, after_s=10_000) is None


def test_a_resend_past_max_deliveries_fails_the_job_instead(records: JobRecords) -> None:
    job_id = started(records, "generate")
    records.write(job_id, **{"deliveries:generate": "3"})
    assert resend(records, records.get(job_id)) == ("too_many", 4)
    assert records.get(job_id).status == "failed"


def test_task_ids_name_their_run(records: JobRecords) -> None:
    from worker.jobs.records import final_callback_task_id, run_of_task

    for run in (0, 1, 12):
        assert run_of_task(stage_task_id("a:b", "encode", run), "a:b", "encode") == run
        assert run_of_task(stage_task_id("a:b", "callback", run), "a:b", "callback") == run
        for status in FINAL_STATUSES:  # a final callback belongs to the run it reports
            task_id = final_callback_task_id("a:b", status, run)
            assert run_of_task(task_id, "a:b", "callback") == run
    assert final_callback_task_id("a:b", "failed") == "a:b:callback:failed"
    assert run_of_task("a:b:callback:by-hand", "a:b", "callback") is None


# --- Two hosts with real workers ---


@pytest.fixture(scope="module")
def envs(
    stack_env: dict[str, str], lost_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    common = stack_env | {
        "REDIS_URL": lost_redis.url,
        "PLATFORM_QUEUE": QUEUE,
        "LOST_JOB_TIMEOUT_S": str(LOST_JOB_TIMEOUT_S),
        "STAGE_LEASE_S": str(STAGE_LEASE_S),
        "BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "GENERATE_SOFT_LIMIT_S": str(GENERATE_SOFT_LIMIT_S),
        "HARD_LIMIT_GRACE_S": str(HARD_LIMIT_GRACE_S),
        "WAN_TEST_FAULT": f"long-:pause{PAUSE_S}@step1;stuck-:stuck@step1;"
        f"{REFUSED}:oom@step1;{REFUSED}:refuse@callback_publish;"
        f"{FINAL_HELD}:pause{FINAL_HELD_S}@callback_post;{CUT_OFF}:pause{CUT_OFF_PAUSE_S}@step1",
        # The model loads before a worker reports up, not inside the first job's generate:
        # on a loaded machine a load could push the paused job past its soft limit.
        "WARMUP": "1",
    }
    envs = {}
    for host in HOSTS:
        root = tmp_path_factory.mktemp(host)
        envs[host] = common | {"WORKER_HOST": host, "SPOOL_DIR": str(root / "spool"),
                               "OUTPUT_DIR": str(root / "outputs")}  # fmt: skip
    envs["host-a"]["WAN_TEST_FAULT"] += f";{HELD}:hang@step1"
    return envs


@pytest.fixture(scope="module")
def hosts(
    envs: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LocalStack]]:
    with host_stacks(envs, tmp_path_factory, bridge_on="host-b") as stacks:
        yield stacks


def final_statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    return [c.body["status"] for c in platform.callbacks_for(job_id)
            if c.body["status"] in FINAL_STATUSES]  # fmt: skip


def logs(stacks: dict[str, LocalStack], name: str) -> str:
    return "".join(stack.log(name) for stack in stacks.values())


def lost_lines(stacks: dict[str, LocalStack], job_id: str) -> list[str]:
    return [line for line in logs(stacks, "cpu").splitlines() if f"job={job_id} lost" in line]


def test_a_generation_longer_than_the_timeout_on_a_healthy_host_runs_once(
    hosts: dict[str, LocalStack],
    client: redis.Redis,
    records: JobRecords,
    platform: LocalPlatform,
) -> None:
    # Given a job whose generation takes longer than LOST_JOB_TIMEOUT_S (and its lease)
    job = tiny_job("long-")

    # When it runs on a healthy host, both hosts sweeping for lost jobs
    client.rpush(QUEUE, queue_body(job))
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    # Then it completes once: one final callback, one start of generate, no resend
    assert final.body["status"] == "completed"
    record = records.get(job["id"])
    assert record.stage_seconds()["generate"] > LOST_JOB_TIMEOUT_S + STAGE_LEASE_S
    assert final_statuses(platform, job["id"]) == ["completed"]
    fields = record.fields
    assert (fields["attempts:generate"], fields["deliveries:generate"]) == ("1", "1")
    assert "retries" not in fields
    assert logs(hosts, "gpu+enhance").count(f"job={job['id']} stage generate started") == 1
    assert lost_lines(hosts, job["id"]) == []


def test_a_stage_killed_at_its_hard_time_limit_fails_the_job_naming_stage_and_limit(
    hosts: dict[str, LocalStack],
    client: redis.Redis,
    records: JobRecords,
    platform: LocalPlatform,
) -> None:
    # Given a generation that takes no notice of its soft time limit
    job = tiny_job("stuck-")

    # When its pool child is killed at the hard limit
    client.rpush(QUEUE, queue_body(job))
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    # Then the job fails once, and the callback names the stage, the limit and the settings
    assert final.body["status"] == "failed"
    hard_s = GENERATE_SOFT_LIMIT_S + HARD_LIMIT_GRACE_S
    message = final.body["error_message"]
    assert f"generate was killed at its hard time limit of {hard_s} s" in message
    assert "GENERATE_SOFT_LIMIT_S + HARD_LIMIT_GRACE_S" in message
    # And no sweep runs it again once its lease has been dead for the timeout
    time.sleep(LOST_JOB_TIMEOUT_S + 2)
    assert final_statuses(platform, job["id"]) == ["failed"]
    assert records.get(job["id"]).fields["deliveries:generate"] == "1"
    assert lost_lines(hosts, job["id"]) == []


def test_a_failed_callback_the_broker_refused_is_delivered_by_the_sweep_once(
    hosts: dict[str, LocalStack], client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a job that fails (out of memory), and a broker that refuses to take its failed
    # callback from the generation worker
    job = tiny_job(REFUSED)

    # When it runs
    client.rpush(QUEUE, queue_body(job))

    # Then the record kept the callback due, and a sweep sent it: the platform hears once
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S + LOST_JOB_TIMEOUT_S)
    assert final.body["metadata"]["error_type"] == "OutOfGpuMemory"
    assert final_statuses(platform, job["id"]) == ["failed"]
    refused = f"job={job['id']} failed callback not handed to the broker: OperationalError"
    assert logs(hosts, "gpu+enhance").count(refused) == 1
    (line,) = [line for line in logs(hosts, "cpu").splitlines()
               if f"job={job['id']} final callback failed never handed" in line]  # fmt: skip
    assert f"LOST_JOB_TIMEOUT_S={LOST_JOB_TIMEOUT_S}" in line


def test_a_final_callback_whose_media_worker_died_whole_goes_out_within_the_timeout_once(
    hosts: dict[str, LocalStack],
    client: redis.Redis,
    records: JobRecords,
    platform: LocalPlatform,
) -> None:
    # Given a job the bridge refuses, whose failed callback a media worker holds, not yet
    # posted
    job = new_job("video_fast", id=f"{FINAL_HELD}{uuid.uuid4()}") | {"config": {"frame_num": 5000}}
    client.rpush(QUEUE, queue_body(job))
    wait_until(
        lambda: records.get(job["id"]).host("callback") is not None,
        timeout_s=JOB_TIMEOUT_S,
        what=f"a media worker holding the failed callback of {job['id']}",
    )
    held_on = records.get(job["id"]).host("callback")
    other = next(host for host in HOSTS if host != held_on)

    # When that media worker is killed whole (its pool child too) before it posts
    killed_at = records.now()
    hosts[held_on].kill("cpu")

    # Then the other host's media worker sends the callback again about the timeout after
    # the kill (a sweep interval or a few on a loaded machine), not Redis's visibility
    # timeout (an hour here), and the platform hears it once
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    assert final.body["status"] == "failed" and "frame_num" in final.body["error_message"]
    assert final_statuses(platform, job["id"]) == ["failed"]
    record = records.get(job["id"])
    resent_after_s = float(record.fields["lost:callback"]) - killed_at
    assert LOST_JOB_TIMEOUT_S - STAGE_LEASE_S < resent_after_s < LOST_JOB_TIMEOUT_S + 10
    assert (record.host("callback"), record.fields["deliveries:callback"]) == (other, "2")
    (line,) = [line for line in logs(hosts, "cpu").splitlines()
               if f"job={job['id']} final callback failed lost" in line]  # fmt: skip
    assert f"on host {held_on}" in line and f"LOST_JOB_TIMEOUT_S={LOST_JOB_TIMEOUT_S}" in line
    hosts[held_on].restart("cpu")  # for the tests after this one


def test_a_run_cut_off_past_the_timeout_and_back_writes_nothing_and_the_job_completes_once(
    hosts: dict[str, LocalStack],
    client: redis.Redis,
    records: JobRecords,
    platform: LocalPlatform,
) -> None:
    # Given a job in the middle of its generation
    job = tiny_job(CUT_OFF)
    client.rpush(QUEUE, queue_body(job))
    wait_until(
        lambda: (records.get(job["id"]).value("progress") or {}).get("step") == 1,
        timeout_s=JOB_TIMEOUT_S,
        what=f"the generation of {job['id']} at its step",
    )
    cut_off = records.get(job["id"]).host("generate")
    other = next(host for host in HOSTS if host != cut_off)

    # When that generation worker is cut off (stopped: it renews no lease and writes
    # nothing) past LOST_JOB_TIMEOUT_S
    hosts[cut_off].kill("gpu+enhance", signal.SIGSTOP)
    try:
        # Then the job is sent again as run 1 and completes on the other host
        final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
        assert final.body["status"] == "completed"

        def done() -> bool:  # the last write of the job: the callback stage's end
            progress = records.get(job["id"]).value("progress") or {}
            return (progress.get("event"), progress.get("stage")) == ("stage_finished", "callback")

        wait_until(done, timeout_s=JOB_TIMEOUT_S, what="the callback stage's end")
        completed = records.get(job["id"]).fields
    finally:
        # When the cut-off worker comes back, its old run going on from where it stopped
        hosts[cut_off].kill("gpu+enhance", signal.SIGCONT)

    # Then the old run stops (at its next write, or at its time limit when it was stopped
    # for longer) having written nothing into the new run's record and sent no callback
    stopped = f"job {job['id']} stage generate (run 0) no longer owns the job"

    def old_run_done() -> bool:  # it stopped, or (had it gone on) wrote or reported
        wrote = records.get(job["id"]).fields != completed
        reported = len(final_statuses(platform, job["id"])) > 1
        return stopped in hosts[cut_off].log("gpu+enhance") or wrote or reported

    wait_until(old_run_done, timeout_s=JOB_TIMEOUT_S, what="the old run stopped")
    assert records.get(job["id"]).fields == completed
    assert final_statuses(platform, job["id"]) == ["completed"]
    # And the job completed once, as run 1, on the other host
    assert completed["retries"] == "1" and "error" not in completed
    hosts_run = [records.get(job["id"]).host(s) for s in ("generate", "encode", "upload")]
    assert hosts_run == [other] * 3


def test_a_lost_hosts_job_completes_on_another_host_within_the_timeout(
    hosts: dict[str, LocalStack],
    client: redis.Redis,
    records: JobRecords,
    platform: LocalPlatform,
) -> None:
    # Given a job in the middle of its generation on host A (host B's generation worker down)
    a, b = hosts["host-a"], hosts["host-b"]
    b.kill("gpu+enhance")
    # kombu's Redis transport takes a message with BRPOP and only then notes it unacked: a
    # BRPOP of the killed worker that Redis still serves in the moment before it sees the
    # connection closed would swallow the job (a window the sweep cannot see: no stage began)
    time.sleep(1)
    job = tiny_job(HELD)
    client.rpush(QUEUE, queue_body(job))
    wait_until(
        lambda: records.get(job["id"]).host("generate") == "host-a",
        timeout_s=JOB_TIMEOUT_S,
        what=f"the generation of {job['id']} on host A",
    )

    # When host A is lost whole (its generation and media workers, and their children, die
    # and do not come back), and host B's generation worker is up again
    lost_at = time.time()
    a.kill("gpu+enhance")
    a.kill("cpu")
    b.restart("gpu+enhance")

    # Then the job completes once, generated again on B, with its media stages on B
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    assert final.body["status"] == "completed"
    assert final_statuses(platform, job["id"]) == ["completed"]
    record = records.get(job["id"])
    hosts_run = [record.host(s) for s in ("generate", "encode", "thumbnail", "upload")]
    assert hosts_run == ["host-b"] * 4
    # And it was sent again by the sweep about the timeout after the kill (a sweep interval
    # or a few on a loaded machine), as a second delivery of generate, not by Redis's
    # visibility timeout (an hour here)
    resent_after_s = float(record.fields["lost:generate"]) - lost_at
    assert LOST_JOB_TIMEOUT_S - STAGE_LEASE_S < resent_after_s < LOST_JOB_TIMEOUT_S + 10
    assert (record.fields["deliveries:generate"], record.fields["retries"]) == ("2", "1")
    (line,) = lost_lines(hosts, job["id"])
    assert "lost at stage generate" in line and "on host host-a" in line
    assert f"LOST_JOB_TIMEOUT_S={LOST_JOB_TIMEOUT_S}" in line and "sent again from generate" in line
