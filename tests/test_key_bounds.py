"""Sweeps cost the jobs running or waiting, and every key family of Redis is bounded.

On a private redis-server: one sweep pass beside 100,000 finished records reads only the
active jobs' records (every command seen through MONITOR); 500 jobs written by the record
code's own steps leave nothing once the TTLs (set to seconds) have passed; and `jobs show`
says when a record expires.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from celery.backends.redis import RedisBackend

from enhancement.cache import EnhancementCache
from enhancement.model import Sampling
from tasks.chain import SENDER
from tests.conftest import celery_broker
from tests.test_reconcile import TIMEOUT_S, finish, sent, tiny_job, waited
from worker.errors import TooManyDeliveries
from worker.flow.bridge import Bridge
from worker.flow.job_control import finish_cancelled, give_up, retry
from worker.flow.lanes import WaitingJobs, leave_waiting
from worker.flow.leftovers import BINDING_PREFIX, drop_leftovers
from worker.flow.reconcile import QueuedJobReconciler
from worker.jobs.model import JobType, parse_job
from worker.jobs.records import (
    ACTIVE_KEY,
    FINAL_STATUSES,
    INDEX_KEY,
    KEY_PREFIX,
    MEDIA_HOSTS_KEY,
    STAGES,
    JobRecords,
)
from worker.local.many_records import add_finished, finished_record, sweep_pass
from worker.local.stack import ROOT, RedisServer, wait_until
from worker.observe.loaded_models import LoadedModels
from worker.observe.metrics import GPU_MEMORY, JOBS, OTHER, Metrics
from worker.observe.metrics import KEY_PREFIX as METRICS_PREFIX
from worker.observe.progress import Progress
from worker.settings import Settings

FINISHED = 100_000
RUNNING = 50
WAITING = 20
JOBS_RUN = 500
#: The record TTL (JOB_RECORD_TTL_S) and every TTL derived from it, shortened.
SHORT_TTL_S = 2
QUEUE = "bounds_queue"
#: Each key family our code writes, by its key's prefix (the longest match wins).
FAMILIES = {
    "wan:job:": "records",
    "wan:jobs": "record index",
    "wan:jobs:active": "active index",
    "wan:waiting:": "waiting sets",
    "wan:dead_letters": "dead letters",
    "wan:enhance:": "enhancement cache",
    "wan:metrics:": "metrics",
    f"{QUEUE}:rejected": "rejected list",
    "celery-task-meta-": "task results and progress states",
}


@pytest.fixture(scope="module")
def bounds_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("bounds-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def broker(bounds_redis: RedisServer) -> Iterator[redis.Redis]:
    with celery_broker(bounds_redis.db_url(1)) as client:
        yield client


def family(key: bytes) -> str:
    name = key.decode()
    matches = [prefix for prefix in FAMILIES if name.startswith(prefix)]
    return FAMILIES[max(matches, key=len)] if matches else name


def key_counts(client: redis.Redis) -> Counter[str]:
    return Counter(family(key) for key in client.scan_iter(count=1000))


# --- The index of active jobs --------------------------------------------------------------


def active_ids(records: JobRecords) -> set[str]:
    return {record.job_id for record, _ in records.active()}


def test_the_active_index_holds_the_jobs_not_yet_settled(broker: redis.Redis) -> None:
    records = JobRecords(broker, ttl_s=600)
    # A job is active from its send, while it runs, and while its final callback is owed
    job = sent(records).id
    assert active_ids(records) == {job}
    finish(records, job, *STAGES[:-1])
    records.write(job, status="completed", final_callback="completed")
    assert active_ids(records) == {job}
    # It leaves in the step that notes its final callback accepted, or given up
    records.callback_sent(job, "completed")
    assert broker.zscore(ACTIVE_KEY, job) is None
    undelivered = sent(records).id
    records.delivery_failed(undelivered, stage="callback", error=RuntimeError("HTTP 503"))
    assert broker.zscore(ACTIVE_KEY, undelivered) is None
    # An operator's retry makes it active again, in the step that resets its record
    assert retry(records, job, sender=SENDER, force=True).status == "queued"
    assert active_ids(records) == {job}

    # Entries whose record expired, or that settled by a step that left them, are dropped
    # as the sweeps meet them
    expired, settled_elsewhere = sent(records).id, sent(records).id
    broker.delete(records.key(expired))
    records.write(settled_elsewhere, status="failed", **{"callback_sent:failed": "1"})
    assert active_ids(records) == {job}
    assert broker.zrange(ACTIVE_KEY, 0, -1) == [job.encode()]


def test_a_host_silent_for_the_record_ttl_is_forgotten(broker: redis.Redis) -> None:
    # Given a host whose media worker was last seen longer than the record TTL ago, and one
    # seen a moment ago, each with its queue's binding, a worker's models and GPU memory
    records = JobRecords(broker, ttl_s=60)
    now = records.now()
    broker.hset(MEDIA_HOSTS_KEY, mapping={"gone": now - 61, "live": now - 1})
    for host in ("gone", "live"):
        broker.sadd(f"{BINDING_PREFIX}cpu.{host}", f"cpu.{host}\x06\x16\x06\x16cpu.{host}")
        LoadedModels(broker).note(f"gpu0@{host}", "wan_t2v", path="/models/wan", loaded=True)
        Metrics(broker).set(GPU_MEMORY, 1e9, f"gpu0@{host}", "in_use")

    # When the sweep drops leftovers
    assert drop_leftovers(records).hosts == ["gone"]

    # Then everything of the silent host is gone, and nothing of the live one
    assert set(records.media_hosts()) == {"live"}
    assert [key.decode() for key in broker.scan_iter(f"{BINDING_PREFIX}*")] == [
        f"{BINDING_PREFIX}cpu.live"
    ]
    assert set(LoadedModels(broker).all()) == {"gpu0@live"}
    gauges = broker.hkeys(METRICS_PREFIX + GPU_MEMORY.name)
    assert [json.loads(field)[0][0] for field in gauges] == ["gpu0@live"]


# --- One sweep pass beside 100,000 finished records -----------------------------------------


@contextmanager
def monitored(client: redis.Redis) -> Iterator[list[str]]:
    """Every command Redis runs while the block runs (MONITOR), scripts' own included."""
    marker = f"end-of-pass-{uuid.uuid4()}"
    commands: list[str] = []
    listening = threading.Event()

    def listen() -> None:
        with client.monitor() as monitor:
            listening.set()
            for event in monitor.listen():
                if marker in event["command"]:
                    return
                commands.append(event["command"])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert listening.wait(10)
    yield commands
    client.echo(marker)
    listener.join(10)
    assert not listener.is_alive(), "MONITOR never saw the end of the pass"


def records_read(commands: list[str]) -> list[str]:
    """The job ids of the records each command names."""
    return [
        word.strip('"').removeprefix(KEY_PREFIX)
        for command in commands
        for word in command.split()
        if word.strip('"').startswith(KEY_PREFIX)
    ]


def test_a_sweep_pass_reads_the_running_and_waiting_jobs_not_the_finished_ones(
    broker: redis.Redis,
) -> None:
    records = JobRecords(broker, ttl_s=3600)
    settings = Settings()
    # Given 100,000 finished records, 50 jobs generating and 20 waiting past half the timeout
    # (their messages on the enhance queue, so the reconciler reads the queues too)
    built_at = time.monotonic()
    add_finished(records, finished_record(records), FINISHED)
    build_s = time.monotonic() - built_at
    running = []
    for _ in range(RUNNING):
        job = parse_job(tiny_job())
        assert records.claim(job.id) == "claimed"
        records.create(job, payload="{}")
        started = records.begin_stage(job.id, "generate", lease_s=60, max_deliveries=3)
        assert started.outcome == "run"
        running.append(job.id)
    waiting = [sent(records).id for _ in range(WAITING)]
    for job_id in waiting:
        waited(records, job_id, TIMEOUT_S)
    reconciler = QueuedJobReconciler(
        records, sender=SENDER, timeout_s=TIMEOUT_S, lease_s=60, max_deliveries=3
    )

    # When one sweep pass runs
    with monitored(redis.Redis(connection_pool=broker.connection_pool)) as commands:
        swept_at = time.monotonic()
        sweep_pass(records, reconciler, settings)
        sweep_s = time.monotonic() - swept_at

    # Then it read the active jobs' records only: twice each (the lost-job sweep, the
    # reconciler), the waiting ones once more (the lanes' prune), no finished one
    read = Counter(records_read(commands))
    assert set(read) == {*running, *waiting}
    assert sum(read.values()) == 2 * (RUNNING + WAITING) + WAITING
    assert records.redis.zcard(INDEX_KEY) == FINISHED + RUNNING + WAITING
    print(f"built {FINISHED} records in {build_s:.1f} s; one sweep pass: {sweep_s * 1000:.0f} ms, "
          f"{len(commands)} Redis commands")  # fmt: skip
    assert build_s < 60


# --- 500 jobs, then the TTLs -----------------------------------------------------------------


def run_job(records: JobRecords, settings: Settings, results: RedisBackend, n: int) -> None:
    """Job `n`'s life in Redis through the steps the bridge and the stages take (minus the
    Celery messages, which workers consume): claim, record, lane, each stage's start, progress,
    Celery state and end, the final callback noted and counted. Every 13th is refused at the
    bridge with no id (parked), every 7th fails for good at generate (dead-lettered), every
    11th is cancelled there, every 5th has its prompt enhanced (cached), and every 3rd names
    a type the platform never sends (its failed callback's label)."""
    client = records.redis
    if n % 13 == 0:
        Bridge(client, records, queue=QUEUE, sender=SENDER).park(
            b'{"prompt": "no id"}', "InvalidJob: id"
        )
        return
    body = tiny_job()
    job = parse_job(body)
    assert records.claim(job.id) == "claimed"
    records.create(job, payload=json.dumps(body))
    WaitingJobs(client, settings).enter(job)
    records.mark_dispatched(job.id)
    status = "failed" if n % 7 == 0 else "cancelled" if n % 11 == 0 else "completed"
    for stage in STAGES:
        records.begin_stage(job.id, stage, lease_s=60, max_deliveries=3)
        progress = Progress(records, job.id)
        progress.stage_started(stage)
        results.store_result(f"{job.id}:{stage}", {"stage": stage}, "PROGRESS")
        if stage == "enhance" and n % 5 == 0:
            cache = EnhancementCache(client, ttl_s=SHORT_TTL_S)
            sampling = Sampling(0.7, 0.9, 40, 1.1, 320)
            key = cache.key(f"prompt {n}", content="image", quality="fast", revision="r",
                            sampling=sampling)  # fmt: skip
            cache.put(key, {"enhanced_prompt": "a fox"})
        if stage == "generate":
            leave_waiting(records, settings, job.id)
        if stage == "generate" and status != "completed":
            records.release_stage(job.id, stage)
            if status == "failed":
                records.fail(job.id, stage=stage, error=TooManyDeliveries.of(stage, 4, 3))
                give_up(records, job.id)
            else:
                finish_cancelled(records, job.id, stage=stage)
            break
        records.stage_finished(job.id, stage)
        progress.stage_finished(stage)
    records.write(job.id, status=status, final_callback=status)
    records.callback_sent(job.id, status)
    job_type = f"video_{'x' * n}" if n % 3 == 0 else job.type.value
    Metrics(client).count(JOBS, job_type, status)


def test_after_500_jobs_and_their_ttls_every_key_family_is_back_to_where_it_was(
    broker: redis.Redis, bounds_redis: RedisServer
) -> None:
    from tasks import app

    records = JobRecords(broker, ttl_s=SHORT_TTL_S)
    settings = Settings(job_record_ttl_s=SHORT_TTL_S)
    results = RedisBackend(app=app, url=bounds_redis.db_url(1), expires=SHORT_TTL_S)
    before = key_counts(broker)

    # Given a first job of each kind, then 500 more
    for n in range(1, 14):
        run_job(records, settings, results, n)
    metric_keys = set(broker.scan_iter("wan:metrics:*"))
    for n in range(JOBS_RUN):
        run_job(records, settings, results, n)
    during = key_counts(broker)
    assert during["records"] > 0 and during["rejected list"] == 1

    # When the TTLs have passed, the media workers' sweeps dropping what points at records
    # that expired
    def back_to_before() -> bool:
        drop_leftovers(records)
        return {f: n for f, n in key_counts(broker).items() if f != "metrics"} == before

    wait_until(back_to_before, timeout_s=30, what="every key family back to its count")

    # Then the metrics are the keys the first jobs made, their labels of bounded sets
    assert set(broker.scan_iter("wan:metrics:*")) == metric_keys
    labels = {json.dumps([[job_type, status], ""]) for job_type in [*JobType, OTHER]
              for status in FINAL_STATUSES}  # fmt: skip
    assert {field.decode() for field in broker.hkeys(METRICS_PREFIX + JOBS.name)} <= labels


def test_jobs_show_says_when_the_record_expires(
    broker: redis.Redis, bounds_redis: RedisServer
) -> None:
    records = JobRecords(broker, ttl_s=3600)
    before = records.now()
    job = sent(records)
    after = records.now()
    env = {**os.environ, "REDIS_URL": bounds_redis.db_url(1)}
    show = [sys.executable, "-m", "celery", "-A", "tasks", "jobs", "show", job.id]
    shown = subprocess.run([*show, "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    # The record's last write (between `before` and `after`) plus its TTL, however long the
    # command took to start on a loaded machine
    assert before + 3599 < json.loads(shown.stdout)["expires_at"] <= after + 3601
    table = subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    expires = r"record expires +\S+ \S+ \(in (60\.0|59\.\d) min, unless written again\)"
    assert re.search(expires, table.stdout), table.stdout
