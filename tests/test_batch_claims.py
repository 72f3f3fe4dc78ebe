"""Taking waiting image jobs into a batch, against a real Redis with real Celery messages:
the jobs in take order, and the claim on each record: one batch per job however many workers
claim at once, and the job's own generate message then waits for the batch and skips the
stage it finished."""

from __future__ import annotations

import multiprocessing
import random
import uuid
from typing import Any

import redis

from tasks.chain import SENDER
from tests.conftest import new_job
from tests.test_lanes import send_generate
from worker.flow.batch_claims import claim, waiting_in_take_order
from worker.flow.job_control import cancel
from worker.jobs.records import JobRecords
from worker.local.stack import RedisServer
from worker.settings import Settings

#: Rounds of the race between two claiming processes, and jobs waiting in each.
ROUNDS, JOBS_PER_ROUND = 40, 8
LEASE_S = 60.0


def image(user: str, **fields: Any) -> dict[str, Any]:
    return new_job("image_fast", id=f"img-{uuid.uuid4()}", user_id=user, **fields)


def claimed_by_process(url: str, job_ids: list[str], batch_id: str, out: Any) -> None:
    """In a process of its own (another worker): claim every waiting job it still can."""
    records = JobRecords(redis.Redis.from_url(url), ttl_s=600)
    mine = []
    waiting = {w.job.id: w for w in waiting_in_take_order(records)}
    for job_id in random.sample(job_ids, len(job_ids)):
        if job_id in waiting and claim(records, waiting[job_id], batch_id=batch_id,
                                       lease_s=LEASE_S, host="h"):  # fmt: skip
            mine.append(job_id)
    out.put(mine)


def begin_generate_elsewhere(url: str, job_id: str, out: Any) -> None:
    """What the job's own generate message does when another worker takes it."""
    records = JobRecords(redis.Redis.from_url(url), ttl_s=600)
    out.put(records.begin_stage(job_id, "generate", lease_s=LEASE_S, max_deliveries=3).outcome)


def in_process(target: Any, *args: Any) -> Any:
    out: Any = multiprocessing.Queue()
    process = multiprocessing.Process(target=target, args=(*args, out))
    process.start()
    answer = out.get(timeout=60)
    process.join(timeout=60)
    return answer


def test_waiting_jobs_come_in_take_order_with_their_enhanced_prompt(
    idle_broker: redis.Redis,
) -> None:
    settings = Settings()
    records = JobRecords(idle_broker, ttl_s=600)
    first, second, third = image("a"), image("a"), image("b")
    for body in (first, second, third):
        send_generate(records, settings, body)
    records.update(third["id"], enhancement={"enhanced_prompt": "a richer prompt"})
    # a's second image waits one step below b's first (fair share)
    waiting = waiting_in_take_order(records)
    assert [w.job.id for w in waiting] == [first["id"], third["id"], second["id"]]
    assert [w.prompt for w in waiting][1] == "a richer prompt"
    assert all(w.run == 0 and w.waited_s >= 0 for w in waiting)


def test_two_workers_claiming_at_once_never_take_the_same_job(
    redis_server: RedisServer, idle_broker: redis.Redis
) -> None:
    url = redis_server.db_url(1)  # idle_broker's database
    records = JobRecords(idle_broker, ttl_s=600)
    for _ in range(ROUNDS):
        bodies = [image(f"u{i}") for i in range(JOBS_PER_ROUND)]
        for body in bodies:
            send_generate(records, Settings(), body)
        job_ids = [body["id"] for body in bodies]
        out: Any = multiprocessing.Queue()
        workers = [multiprocessing.Process(target=claimed_by_process,
                                           args=(url, job_ids, f"batch-{n}", out))
                   for n in range(2)]  # fmt: skip
        for worker in workers:
            worker.start()
        claims = [out.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert not set(claims[0]) & set(claims[1]), claims
        assert sorted(claims[0] + claims[1]) == sorted(job_ids)
        idle_broker.flushdb()


def test_a_claimed_jobs_own_message_waits_for_the_batch_then_skips_the_stage(
    redis_server: RedisServer, idle_broker: redis.Redis
) -> None:
    url = redis_server.db_url(1)  # idle_broker's database
    records = JobRecords(idle_broker, ttl_s=600)
    claimed, cancelled = image("a"), image("b")
    for body in (claimed, cancelled):
        send_generate(records, Settings(), body)
    cancel(records, cancelled["id"], sender=SENDER)
    waiting = {w.job.id: w for w in waiting_in_take_order(records)}
    assert not claim(records, waiting[cancelled["id"]], batch_id="b1", lease_s=LEASE_S, host="h")
    assert claim(records, waiting[claimed["id"]], batch_id="b1", lease_s=LEASE_S, host="h")
    assert not claim(records, waiting[claimed["id"]], batch_id="b2", lease_s=LEASE_S, host="h")
    assert records.get(claimed["id"]).fields["batch:generate"] == "b1"
    # While the batch runs, the job's own message (taken by another worker) waits
    assert in_process(begin_generate_elsewhere, url, claimed["id"]) == "busy"
    # Once the batch finished the job's generation, it is skipped and the chain goes on
    records.stage_finished(claimed["id"], "generate")
    assert in_process(begin_generate_elsewhere, url, claimed["id"]) == "done"
