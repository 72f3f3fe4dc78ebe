"""A job whose message a dying consumer swallowed runs again; a job that only waits, never.

First the reconciler's decision and resend against a real Redis, with jobs sent by the
dispatch code onto a database no worker consumes: a message is swallowed there as kombu's
BRPOP takes it, and a job has "waited" once its moves are set back in time. Then a stack on
a private redis-server, LOST_JOB_TIMEOUT_S shortened to seconds and Redis's visibility
timeout left at an hour: a job's generate message is taken off its queue and dropped while
no generation worker runs, other jobs wait behind it for twice the timeout, and then the
generation worker starts.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tasks.chain import SENDER, build_chain
from tests.conftest import JOB_TIMEOUT_S, celery_broker, module_env, new_job, sent_job_ids
from worker.flow.dispatch import submit
from worker.flow.lanes import priority_lists
from worker.flow.reconcile import UNACKED_KEY, QueuedJobReconciler, waiting_stage
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.model import Job, parse_job
from worker.jobs.records import ACTIVE_KEY, FINAL_STATUSES, STAGES, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until

QUEUE = "reconcile_queue"
#: The unit tests' timeout (production's default), and the stack's.
TIMEOUT_S = 300
STACK_TIMEOUT_S = 6
STAGE_LEASE_S = 2
#: Far longer than the module: a job sent again within a test was sent by the reconciler.
VISIBILITY_TIMEOUT_S = 3600
TINY_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}
#: Fields of a record that say when something happened to the job (Redis time).
TIME_MARKS = ("started:", "finished:", "handed_back:", "lost:")


@pytest.fixture(scope="module")
def reconcile_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("reconcile-redis")).start()
    yield server
    server.stop()


def tiny_job() -> dict[str, Any]:
    job = new_job("image_fast", id=f"rc-{uuid.uuid4()}")
    job["config"] |= TINY_CONFIG
    return job


# --- The decision and the resend, against Redis ---------------------------------------------


@pytest.fixture
def broker(reconcile_redis: RedisServer) -> Iterator[redis.Redis]:
    with celery_broker(reconcile_redis.db_url(1)) as client:
        yield client


@pytest.fixture
def records(broker: redis.Redis) -> JobRecords:
    return JobRecords(broker, ttl_s=600)


def reconciler(records: JobRecords, *, max_deliveries: int = 3) -> QueuedJobReconciler:
    """A sweeper for whom two passes in a row are far enough apart to confirm a miss."""
    return QueuedJobReconciler(records, sender=SENDER, timeout_s=TIMEOUT_S, lease_s=60,
                               max_deliveries=max_deliveries, confirm_s=0)  # fmt: skip


def sent(records: JobRecords) -> Job:
    """A job sent as the bridge sends it: claimed, its record, its lane, its chain."""
    body = tiny_job()
    job = parse_job(body)
    assert records.claim(job.id) == "claimed"
    submit(records, job, payload=json.dumps(body), sender=SENDER)
    return job


def waited(records: JobRecords, job_id: str, seconds: float) -> None:
    """Set everything that happened to the job `seconds` back: it has waited that long."""
    key, fields = records.key(job_id), records.get(job_id).fields
    records.redis.zincrby(ACTIVE_KEY, -seconds, job_id)
    for name, at in fields.items():
        if name.startswith(TIME_MARKS):
            records.redis.hset(key, name, f"{float(at) - seconds:.6f}")


def swallow(client: redis.Redis, queue: str) -> dict[str, Any]:
    """Take the next message off a queue as kombu's BRPOP does (its priority lists, first
    first); the caller drops it, as a consumer that dies then does."""
    taken = client.brpop(priority_lists(queue), timeout=1)
    assert taken is not None, f"no message on {queue}"
    return json.loads(taken[1])


def task_ids(client: redis.Redis, queue: str) -> list[str]:
    raws = [m for name in priority_lists(queue) for m in client.lrange(name, 0, -1)]
    return [json.loads(raw)["headers"]["id"] for raw in raws]


def finish(records: JobRecords, job_id: str, *stages: str) -> None:
    """Run these stages as a worker's bookkeeping does: begin, finish (no work)."""
    for stage in stages:
        assert records.begin_stage(job_id, stage, lease_s=60, max_deliveries=3).outcome == "run"
        records.stage_finished(job_id, stage)


def test_a_queued_job_whose_message_was_swallowed_runs_again_as_a_new_run(
    records: JobRecords, broker: redis.Redis
) -> None:
    # Given a sent job whose enhance message a dying consumer took, LOST_JOB_TIMEOUT_S ago
    job = sent(records)
    assert swallow(broker, "enhance")["headers"]["id"] == f"{job.id}:enhance"
    waited(records, job.id, TIMEOUT_S + 1)
    sweeper = reconciler(records)

    # When the sweeper finds its message missing on two passes
    assert sweeper.sweep() == []
    [lost] = sweeper.sweep()

    # Then the job is sent again from enhance as run 1, counted as its second delivery
    assert (lost.job_id, lost.stage, lost.restart) == (job.id, "enhance", "enhance")
    fields = records.get(job.id).fields
    assert (fields["retries"], fields["deliveries:enhance"]) == ("1", "2")
    assert "lost:enhance" in fields and "resend_pending" not in fields
    assert task_ids(broker, "enhance") == [f"{job.id}:enhance:retry1"]
    # And never again while its new message waits, however long
    waited(records, job.id, 10 * TIMEOUT_S)
    assert sweeper.sweep() == [] and sweeper.sweep() == []


def test_jobs_waiting_hours_behind_a_deep_queue_are_never_sent_again(
    records: JobRecords, broker: redis.Redis
) -> None:
    # Given jobs waiting three hours: for generate behind a deep gpu queue, and for enhance
    enhanced = []
    for _ in range(20):
        enhanced.append(job := sent(records))
        swallow(broker, "enhance")  # a live worker's take: it runs enhance and sends generate
        finish(records, job.id, "enhance")
        build_chain(job.id, from_stage="generate", priority=5).apply_async()
    queued = [sent(records) for _ in range(20)]
    for job in (*queued, *enhanced):
        waited(records, job.id, 3 * 3600)

    # Then no pass sends any of them again
    sweeper = reconciler(records)
    assert [sweeper.sweep() for _ in range(3)] == [[], [], []]
    assert all("retries" not in records.get(job.id).fields for job in (*queued, *enhanced))
    assert len(task_ids(broker, "enhance")) == len(task_ids(broker, "gpu")) == 20


def test_a_message_held_by_a_worker_or_missing_on_one_pass_only_is_not_swallowed(
    records: JobRecords, broker: redis.Redis
) -> None:
    # Given a job that has waited past the timeout
    job = sent(records)
    waited(records, job.id, TIMEOUT_S + 1)
    sweeper = reconciler(records)

    # When a worker holds its message, noted unacknowledged as kombu's QoS does
    message = swallow(broker, "enhance")
    broker.hset(UNACKED_KEY, "tag-1", json.dumps([message, "enhance", "enhance"]))
    broker.zadd("unacked_index", {"tag-1": time.time()})
    # Then it is not missing
    assert [sweeper.sweep() for _ in range(3)] == [[], [], []]

    # When it is in no place on one pass (in a worker's hand between BRPOP and the note, or
    # between the unacked hash and the queue) and back on the queue by the next
    broker.hdel(UNACKED_KEY, "tag-1")
    assert sweeper.sweep() == []
    broker.lpush("enhance", json.dumps(message))
    assert sweeper.sweep() == []
    # Then a later miss starts afresh: sent again only once missing on two passes in a row
    swallow(broker, "enhance")
    assert sweeper.sweep() == []
    assert [lost.job_id for lost in sweeper.sweep()] == [job.id]


@pytest.mark.parametrize(
    ("done", "waits_for", "restart"),
    [
        ((), "enhance", "enhance"),
        (("enhance",), "generate", "generate"),
        (("enhance", "generate"), "encode", "generate"),  # the frames: made again
        (("enhance", "generate", "encode", "thumbnail", "upload"), "callback", "callback"),
    ],
)
def test_a_stage_sent_and_never_started_runs_again_from_where_its_inputs_are(
    records: JobRecords,
    broker: redis.Redis,
    done: tuple[str, ...],
    waits_for: str,
    restart: str,
) -> None:
    # Given a job whose stages `done` ran, and whose next stage's message was swallowed
    job = sent(records)
    swallow(broker, "enhance")
    finish(records, job.id, *done)
    waited(records, job.id, TIMEOUT_S + 1)
    assert waiting_stage(records.get(job.id)) == waits_for

    # Then it is sent again from the stage whose inputs are still there
    sweeper = reconciler(records)
    assert sweeper.sweep() == []
    [lost] = sweeper.sweep()
    assert (lost.stage, lost.restart) == (waits_for, restart)
    fields = records.get(job.id).fields
    assert (fields["retries"], fields["retried_from"]) == ("1", restart)
    assert f"finished:{restart}" not in fields


def test_a_job_swallowed_past_max_deliveries_fails_once_and_is_dead_lettered(
    records: JobRecords, broker: redis.Redis
) -> None:
    # Given a job whose enhance was delivered MAX_DELIVERIES times, and swallowed again
    job = sent(records)
    records.write(job.id, **{"deliveries:enhance": "3"})
    swallow(broker, "enhance")
    waited(records, job.id, TIMEOUT_S + 1)

    # When the sweeper finds it
    sweeper = reconciler(records)
    assert sweeper.sweep() == []
    assert len(sweeper.sweep()) == 1

    # Then the job fails, goes to the dead letters, and its one failed callback is sent
    record = records.get(job.id)
    assert record.status == "failed" and record.fields["error_type"] == "TooManyDeliveries"
    assert [job_id for job_id, _ in DeadLetters(broker).list()] == [job.id]
    assert task_ids(broker, "cpu") == [f"{job.id}:callback:failed"]
    assert task_ids(broker, "enhance") == []
    assert sweeper.sweep() == [] and sweeper.sweep() == []


def test_only_a_job_waiting_for_a_stage_to_start_can_be_swallowed(records: JobRecords) -> None:
    job = sent(records)
    # Running: the lost-job sweep's, by its lease
    records.begin_stage(job.id, "enhance", lease_s=60, max_deliveries=3)
    assert waiting_stage(records.get(job.id)) is None
    # Let go of without finishing (a Celery retry, a hand-back): its own stage again
    records.release_stage(job.id, "enhance")
    assert waiting_stage(records.get(job.id)) == "enhance"
    # A resend claimed and not yet sent: the lost-job sweep's
    records.write(job.id, resend_pending="1", stage="", retried_from="generate")
    assert waiting_stage(records.get(job.id)) is None
    records.redis.hdel(records.key(job.id), "resend_pending")
    assert waiting_stage(records.get(job.id)) == "generate"
    # Over
    for status in FINAL_STATUSES:
        records.write(job.id, status=status)
        assert waiting_stage(records.get(job.id)) is None


def test_a_message_of_an_older_run_does_not_count(records: JobRecords, broker: redis.Redis) -> None:
    # Given a job sent again as run 1 (an operator's retry) while run 0's message still waits
    job = sent(records)
    records.write(job.id, retries="1", retried_from="enhance")
    waited(records, job.id, TIMEOUT_S + 1)
    assert task_ids(broker, "enhance") == [f"{job.id}:enhance"]

    # Then run 1 is missing: the old message would be skipped as superseded
    sweeper = reconciler(records)
    assert sweeper.sweep() == []
    [lost] = sweeper.sweep()
    assert records.get(lost.job_id).fields["retries"] == "2"
    assert sorted(task_ids(broker, "enhance")) == [f"{job.id}:enhance", f"{job.id}:enhance:retry2"]


# --- A stack: the message swallowed, the jobs that only wait ---------------------------------


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str],
    reconcile_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "reconcile",
        redis_url=reconcile_redis.url,
        queue=QUEUE,
        settings={
            "LOST_JOB_TIMEOUT_S": str(STACK_TIMEOUT_S),
            "STAGE_LEASE_S": str(STAGE_LEASE_S),
            "BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        },
    )


def since_sent(records: JobRecords, job_id: str) -> float:
    """Seconds since the job's generate message was sent (its enhance finished)."""
    return records.now() - float(records.get(job_id).fields["finished:enhance"])


def test_a_swallowed_generate_message_runs_again_and_jobs_that_wait_long_run_once(
    env: dict[str, str], platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client = redis.Redis.from_url(env["REDIS_URL"])
    records = JobRecords(client, ttl_s=600)
    logs = tmp_path_factory.mktemp("reconcile-logs")
    swallowed, waiting = tiny_job(), [tiny_job() for _ in range(3)]
    gpu = LocalStack(env, log_dir=logs, names=("gpu",))  # started once the jobs waited
    with LocalStack(env, log_dir=logs, names=("enhance", "cpu", "bridge")) as stack:
        # Given no generation worker: every job waits for its generation on the gpu queue
        client.rpush(QUEUE, queue_body(swallowed))
        wait_until(lambda: swallowed["id"] in sent_job_ids(client, "gpu"),
                   timeout_s=JOB_TIMEOUT_S, what="the generate message")  # fmt: skip

        # When a dying consumer's BRPOP takes the generate message, and it is gone with it
        taken_at = records.now()
        assert swallow(client, "gpu")["headers"]["id"] == f"{swallowed['id']}:generate"
        client.rpush(QUEUE, *(queue_body(job) for job in waiting))
        wait_until(lambda: len(sent_job_ids(client, "gpu")) == len(waiting),
                   timeout_s=JOB_TIMEOUT_S, what="the waiting jobs' generate messages")  # fmt: skip

        # Then the media worker's sweep sends the job again about LOST_JOB_TIMEOUT_S later
        wait_until(lambda: "lost:generate" in records.get(swallowed["id"]).fields,
                   timeout_s=STACK_TIMEOUT_S + 30, what="the resend")  # fmt: skip
        resent_after_s = float(records.get(swallowed["id"]).fields["lost:generate"]) - taken_at
        assert STACK_TIMEOUT_S - 3 < resent_after_s < STACK_TIMEOUT_S + 10
        # And the jobs behind it wait twice the timeout without being sent again
        wait_until(
            lambda: min(since_sent(records, job["id"]) for job in waiting) > 2 * STACK_TIMEOUT_S,
            timeout_s=JOB_TIMEOUT_S,
            what="a wait of twice LOST_JOB_TIMEOUT_S",
        )
        assert all("retries" not in records.get(job["id"]).fields for job in waiting)

        # When a generation worker starts, every job completes once
        with gpu:
            finals = {job["id"]: platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
                      for job in (swallowed, *waiting)}  # fmt: skip
        cpu_log = stack.log("cpu")
    assert {job_id: final.body["status"] for job_id, final in finals.items()} == dict.fromkeys(
        finals, "completed"
    )
    for job_id in finals:
        statuses = [c.body["status"] for c in platform.callbacks_for(job_id)]
        assert [s for s in statuses if s in FINAL_STATUSES] == ["completed"]
    fields = records.get(swallowed["id"]).fields
    assert (fields["retries"], fields["deliveries:generate"]) == ("1", "2")
    for job in waiting:
        fields = records.get(job["id"]).fields
        assert "retries" not in fields and fields["deliveries:generate"] == "1"
    lost_lines = [line for line in cpu_log.splitlines() if " lost at stage " in line]
    assert len(lost_lines) == 1 and f"job={swallowed['id']}" in lost_lines[0]
    assert "on no queue, held by no worker" in lost_lines[0]
    assert all(stage in STAGES for stage in records.get(swallowed["id"]).stage_seconds())
