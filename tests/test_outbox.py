"""The outbox of final callbacks and the fence of stage runs, on a real Redis.

Every writer of a final status writes its callback's intent with it and then sends it; the
sweep sends what is unsent or lost, once; a stage run that no longer owns its job writes
nothing. Callbacks go to a Celery database no worker consumes (`idle_broker`), where the
messages are read back; the stack tests are in tests/test_lost_host.py and
tests/test_faults.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import Ignore

from tasks.chain import SENDER
from tests.conftest import new_job
from worker.errors import RunSuperseded
from worker.flow import job_control, outbox
from worker.flow.lost_jobs import LostJob, LostJobSweep
from worker.jobs import fencing
from worker.jobs.fencing import Fence
from worker.jobs.model import parse_job
from worker.jobs.records import ACTIVE_KEY, JobRecords, get_records, lease_owner, stage_task_id
from worker.local.stack import wait_until
from worker.settings import get_settings

TIMEOUT_S = 300
LEASE_S = 60


@pytest.fixture
def records(idle_broker: redis.Redis) -> JobRecords:
    return JobRecords(idle_broker, ttl_s=600)


def queued_job(records: JobRecords) -> str:
    job = parse_job(new_job("image_fast", id=f"outbox-{uuid.uuid4()}"))
    records.create(job, payload=job.model_dump_json())
    return job.id


def final_callbacks_sent(client: redis.Redis) -> list[str]:
    """Task ids of the final callback messages waiting on the media queue."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange("cpu", 0, -1))]


def active(client: redis.Redis, job_id: str) -> bool:
    return client.zscore(ACTIVE_KEY, job_id) is not None


def fail(records: JobRecords, job_id: str) -> str:
    records.fail(job_id, stage="generate", error=RuntimeError("the GPU caught fire"))
    job_control.send_final_callback(job_id, "failed", sender=SENDER, records=records)
    return "failed"


def cancel_queued(records: JobRecords, job_id: str) -> str:
    assert job_control.cancel(records, job_id, sender=SENDER).status == "cancelled"
    return "cancelled"


def out_of_deliveries(records: JobRecords, job_id: str) -> str:
    records.write(job_id, status="processing")
    start = records.begin_stage(job_id, "generate", lease_s=LEASE_S, max_deliveries=3)
    assert start.outcome == "run"
    records.write(job_id, **{"deliveries:generate": "3"})
    record = records.get(job_id)
    lost = LostJob(job_id, "generate", "generate", record.fields["lease:generate"], "", 301.0)
    sweep = LostJobSweep(
        records, sender=SENDER, timeout_s=TIMEOUT_S, lease_s=LEASE_S, max_deliveries=3
    )
    assert sweep.resend(record, lost)
    return "failed"


def retried_undelivered(records: JobRecords, job_id: str) -> str:
    records.write(job_id, status="delivery_failed", error="boom", error_stage="generate")
    assert job_control.retry(records, job_id, sender=SENDER).status == "failed"
    return "failed"


@pytest.mark.parametrize("end", [fail, cancel_queued, out_of_deliveries, retried_undelivered])
def test_every_final_status_is_written_with_its_callback_due_then_sent_once(
    idle_broker: redis.Redis, records: JobRecords, end: Callable[[JobRecords, str], str]
) -> None:
    # Given a job; when it ends (and its writer sends the callback)
    job_id = queued_job(records)
    status = end(records, job_id)

    # Then its final callback is on the media queue, once, as a message of the job's run
    run = int(records.get(job_id).fields.get("retries", "0"))
    task_id = f"{job_id}:callback:{status}" + (f":retry{run}" if run else "")
    assert final_callbacks_sent(idle_broker) == [task_id]
    # And the record says the job ended, its intent cleared once sent; the job stays active
    # (where the sweep looks) until the callback is delivered
    fields = records.get(job_id).fields
    assert fields["status"] == status and "callback_pending" not in fields
    assert active(idle_broker, job_id)
    # And sending again finds nothing due
    assert not job_control.send_final_callback(job_id, status, sender=SENDER, records=records)
    assert len(final_callbacks_sent(idle_broker)) == 1


def sweep(
    records: JobRecords, *, timeout_s: float = TIMEOUT_S, lease_s: float = LEASE_S
) -> list[str]:
    return outbox.FinalCallbackSweep(
        records, sender=SENDER, timeout_s=timeout_s, lease_s=lease_s
    ).sweep()


def test_a_callback_the_broker_refused_is_sent_by_the_sweep_once_its_intent_is_old(
    idle_broker: redis.Redis, records: JobRecords, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a failed job whose callback's publish the broker refused
    from worker import faults

    job_id = queued_job(records)
    monkeypatch.setenv(faults.ENV, f"{job_id}:refuse@callback_publish")
    faults.rules.cache_clear()
    records.fail(job_id, stage="generate", error=RuntimeError("the GPU caught fire"))
    assert not job_control.send_final_callback(job_id, "failed", sender=SENDER, records=records)
    monkeypatch.delenv(faults.ENV)
    faults.rules.cache_clear()
    assert final_callbacks_sent(idle_broker) == []
    assert records.get(job_id).fields["callback_pending"] == "failed"

    # Then a sweep leaves it while a sender may still be on its way
    assert sweep(records) == []
    record = records.get(job_id)
    at = records.now()
    assert outbox.outstanding(record, now=at + 299, timeout_s=300, lease_s=60) == "waiting"
    assert outbox.outstanding(record, now=at + 301, timeout_s=300, lease_s=60) == "unsent"
    # But once the intent is LOST_JOB_TIMEOUT_S old, a sweep sends it; a second sweeper that
    # read the record at the same time sends nothing, and a later sweep finds nothing due
    assert sweep(records, timeout_s=0) == [job_id]
    late = outbox.FinalCallbackSweep(records, sender=SENDER, timeout_s=0, lease_s=60)
    assert not late.resend(record, lost=False, now=at)
    assert sweep(records, timeout_s=0) == []
    assert final_callbacks_sent(idle_broker) == [f"{job_id}:callback:failed"]
    assert "callback_pending" not in records.get(job_id).fields


def test_a_final_callback_whose_worker_died_whole_is_sent_again_counting_a_delivery(
    idle_broker: redis.Redis, records: JobRecords
) -> None:
    # Given a failed job whose callback a worker started, then died (its lease not renewed)
    job_id = queued_job(records)
    fail(records, job_id)
    lease_s = 0.2
    start = records.begin_stage(job_id, "callback", lease_s=lease_s, max_deliveries=3, run=0)
    assert (start.outcome, start.deliveries) == ("run", 1)
    dead = records.get(job_id)
    assert sweep(records, timeout_s=1, lease_s=lease_s) == []

    # Then it is lost once the lease has not been renewed for the timeout
    at = records.now()
    assert outbox.outstanding(dead, now=at, timeout_s=1, lease_s=lease_s) == "waiting"
    wait_until(lambda: sweep(records, timeout_s=1, lease_s=lease_s) == [job_id], timeout_s=10,
               what="the lost callback sent again")  # fmt: skip

    # And sent again once, as a second delivery of the callback, its dead lease dropped
    assert final_callbacks_sent(idle_broker) == [f"{job_id}:callback:failed"] * 2
    fields = records.get(job_id).fields
    assert fields["deliveries:callback"] == "2" and "lost:callback" in fields
    assert "lease:callback" not in fields and "callback_pending" not in fields
    assert sweep(records, timeout_s=0, lease_s=lease_s) == []
    new = records.begin_stage(job_id, "callback", lease_s=LEASE_S, max_deliveries=3, run=0)
    assert (new.outcome, new.deliveries) == ("run", 2)


def test_a_callback_delivered_or_no_longer_due_is_not_sent_again(
    idle_broker: redis.Redis, records: JobRecords
) -> None:
    delivered, retried, expired = (queued_job(records) for _ in range(3))
    for job_id in (delivered, retried, expired):
        fail(records, job_id)
    records.write(delivered, **{"callback_sent:failed": "1"})
    records.write(retried, status="queued")
    idle_broker.delete(records.key(expired))

    assert sweep(records, timeout_s=0) == []

    # The delivered and the expired leave the index of active jobs; the job running again
    # stays in it, owing nothing yet
    assert idle_broker.zrange(ACTIVE_KEY, 0, -1) == [retried.encode()]
    assert len(final_callbacks_sent(idle_broker)) == 3  # the writers' own sends only


def test_a_job_missing_from_the_index_of_active_jobs_enters_it_when_it_ends(
    idle_broker: redis.Redis, records: JobRecords
) -> None:
    # Given a running job that is not in the index (recorded before the index existed)
    job_id = queued_job(records)
    idle_broker.zrem(ACTIVE_KEY, job_id)

    # When it fails and its callback's publish never happens (its sender died)
    records.fail(job_id, stage="generate", error=RuntimeError("the GPU caught fire"))

    # Then the sweep, which reads only the index, finds it and sends the callback
    assert active(idle_broker, job_id)
    assert sweep(records, timeout_s=0) == [job_id]
    assert final_callbacks_sent(idle_broker) == [f"{job_id}:callback:failed"]


def test_a_retried_undelivered_callback_gets_a_fresh_window_and_deliveries(
    records: JobRecords,
) -> None:
    # Given a failed job whose callback was given up after its window and two deliveries
    job_id = queued_job(records)
    records.write(job_id, status="delivery_failed", error="boom", error_stage="generate",
                  **{"first_started:callback": "1.0", "deliveries:callback": "2",
                     "attempts:callback": "5", "started:callback": "1.0"})  # fmt: skip

    job_control.retry(records, job_id, sender=SENDER)

    # Then its callback starts afresh: no first start, no deliveries counted
    fields = records.get(job_id).fields
    assert not any(name.endswith(":callback") for name in fields)
    assert fields["retries"] == "1" and fields["status"] == "failed"


# --- The fence of a stage run ---


def running(records: JobRecords, stage: str = "generate", *, lease_s: float = LEASE_S) -> str:
    job_id = queued_job(records)
    records.write(job_id, status="processing")
    start = records.begin_stage(job_id, stage, lease_s=lease_s, max_deliveries=3, run=0)
    assert start.outcome == "run"
    return job_id


def resend(records: JobRecords, job_id: str) -> None:
    """What the lost-job sweep does to a job whose host went silent: a new run."""
    outcome, _ = records.resend_lost(records.get(job_id), stage="generate", restart="generate",
                                     forget=job_control.run_again_fields(records.get(job_id),
                                                                         "generate"),
                                     max_deliveries=3)  # fmt: skip
    assert outcome == "resent"


def test_a_stage_run_writes_only_while_it_owns_its_job(records: JobRecords) -> None:
    # Given a generation running as run 0 in this process
    job_id = running(records)
    stage_run = Fence(job_id, "generate", 0, owner=lease_owner())
    after_failure = Fence(job_id, "generate", 0, owner=None)

    # Then its writes land while it holds the lease, and other jobs' writes are not fenced
    with fencing.fenced(stage_run):
        records.update(job_id, seed=7)
        records.confirm_run(job_id)
        records.write("another-job", status="queued")

    # When the job is sent again as run 1 (this host was cut off past the timeout)
    resend(records, job_id)

    # Then nothing of run 0 lands: not the stage's writes, not its failure handler's
    before = records.get(job_id).fields
    for fence in (stage_run, after_failure):
        with fencing.fenced(fence), pytest.raises(RunSuperseded, match="no longer owns"):
            records.fail(job_id, stage="generate", error=RuntimeError("late"))
        with fencing.fenced(fence), pytest.raises(RunSuperseded):
            records.confirm_run(job_id)
    assert records.get(job_id).fields == before
    # And run 1 writes as usual, even with another lease holder gone
    with fencing.fenced(Fence(job_id, "generate", 1, owner=None)):
        records.update(job_id, seed=8)
    assert records.get(job_id).value("seed") == 8


def test_a_lease_released_on_purpose_stops_nothing_but_another_owner_does(
    records: JobRecords,
) -> None:
    # Given a generation running as run 0 whose worker hands it back at shutdown: the lease
    # released, its message about to go back to the queue as the pool child is stopped
    job_id = running(records)
    fence = Fence(job_id, "generate", 0, owner=lease_owner())
    assert records.release_stage(job_id, "generate", note="handed_back")

    # Then what it writes until then lands: dropping its message would lose the job
    with fencing.fenced(fence):
        records.update(job_id, seed=7)
    assert fencing.holds(records.redis, records.key(job_id), fence)
    # But once another process holds the stage, nothing does
    records.write(job_id, **{"lease:generate": "another-host:1"})
    with fencing.fenced(fence), pytest.raises(RunSuperseded):
        records.update(job_id, seed=8)
    assert records.get(job_id).value("seed") == 7


def test_a_stage_run_whose_lease_was_taken_over_stops_and_writes_nothing(
    records: JobRecords,
) -> None:
    from tasks.base import leased

    # Given a generation running as run 0, its lease renewed by its heartbeat
    lease_s = 0.3
    job_id = running(records, lease_s=lease_s)

    with pytest.raises(Ignore), leased(records, job_id, "generate", lease_s, run=0):
        # When its job is sent again while it runs (its host was cut off, and is back)
        resend(records, job_id)

        # Then its heartbeat finds the lease gone, and the step hook's check stops it
        fence = fencing.active(job_id)
        assert fence is not None
        wait_until(fence.lost.is_set, timeout_s=10, what="the lost lease noticed")
        with pytest.raises(RunSuperseded):
            fencing.raise_if_lost()
        # And a write it tries anyway is refused: its message is dropped (Celery's Ignore),
        # so neither its chain nor its failure handler go on
        records.update(job_id, generation={"host": "the cut-off host"})

    fields = records.get(job_id).fields
    assert fields["retries"] == "1" and "generation" not in fields


@pytest.fixture
def worker_settings(
    monkeypatch: pytest.MonkeyPatch, idle_broker: redis.Redis, tmp_path: Path
) -> Iterator[None]:
    """This process's settings as a worker's, on the idle broker's database."""
    kwargs = idle_broker.get_connection_kwargs()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{kwargs['port']}/{kwargs['db']}")
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    get_settings.cache_clear()
    get_records.cache_clear()
    yield
    get_settings.cache_clear()
    get_records.cache_clear()


@pytest.mark.parametrize("superseded", [True, False])
def test_a_stage_failure_is_reported_only_by_the_run_that_owns_the_job(
    worker_settings: None, idle_broker: redis.Redis, superseded: bool
) -> None:
    from tasks.media import encode

    # Given a job whose encode failed in run 0, and that was sent again meanwhile (or not)
    records = get_records()
    job_id = running(records, "encode")
    if superseded:
        records.write(job_id, retries="1")
    before = records.get(job_id).fields

    # When the failure handler of run 0 runs
    error = RuntimeError("the disk is full")
    encode.on_failure(error, stage_task_id(job_id, "encode"), (job_id,), {}, None)

    # Then only a run that owns the job says it failed and sends the failed callback
    if superseded:
        assert records.get(job_id).fields == before
        assert final_callbacks_sent(idle_broker) == []
    else:
        assert records.get(job_id).fields["error"] == "the disk is full"
        assert final_callbacks_sent(idle_broker) == [f"{job_id}:callback:failed"]
