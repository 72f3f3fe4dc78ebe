"""The bridge on its own, in this process, against a real Redis: order, recovery, dedupe.

Chains go to a Redis database no worker listens on, so what the bridge sent can be
read back from the Celery queue lists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import new_job
from worker.bridge import Bridge
from worker.records import JobRecords
from worker.stack import RedisServer

QUEUE = "bridge_test_queue"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    from tasks import app

    url = redis_server.url.removesuffix("/0") + "/1"
    app.conf.update(broker_url=url, result_backend=url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def bridge(client: redis.Redis) -> Bridge:
    return Bridge(client, JobRecords(client, ttl_s=600), queue=QUEUE)


def sent_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Job ids of the task messages waiting on a Celery queue, oldest first."""
    messages = [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]
    return [m["headers"]["id"].split(":")[0] for m in messages]


def test_jobs_are_dispatched_oldest_first(client: redis.Redis, bridge: Bridge) -> None:
    jobs = [new_job("image_fast") for _ in range(4)]
    for job in jobs:
        client.rpush(QUEUE, json.dumps(job))

    assert bridge.run(drain=True) == 4

    assert sent_job_ids(client, "enhance") == [job["id"] for job in jobs]
    assert client.llen(QUEUE) == 0
    assert client.llen(bridge.processing) == 0


def test_items_a_crash_left_in_the_processing_list_go_first_at_start(
    client: redis.Redis, bridge: Bridge
) -> None:
    # Given a bridge died holding one job, and a newer one waits on the platform list
    interrupted, waiting = new_job("image_fast"), new_job("image_fast")
    client.rpush(bridge.processing, json.dumps(interrupted))
    client.rpush(QUEUE, json.dumps(waiting))

    # When a bridge starts again
    bridge.run(drain=True)

    # Then the interrupted job is dispatched first, and nothing is left behind
    assert sent_job_ids(client, "enhance") == [interrupted["id"], waiting["id"]]
    assert client.llen(bridge.processing) == 0


def test_a_job_id_seen_twice_starts_one_chain(client: redis.Redis, bridge: Bridge) -> None:
    job = new_job("video_fast")
    client.rpush(QUEUE, json.dumps(job), json.dumps([json.dumps(job)]))

    assert bridge.run(drain=True) == 2

    assert sent_job_ids(client, "enhance") == [job["id"]]


def test_a_claimed_but_undispatched_job_is_sent_again(client: redis.Redis, bridge: Bridge) -> None:
    # Given a bridge claimed a job and died before sending its chain
    job = new_job("video_fast")
    bridge.records.claim(job["id"])
    client.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    assert sent_job_ids(client, "enhance") == [job["id"]]


def test_an_invalid_job_is_recorded_as_failed_and_answered(
    client: redis.Redis, bridge: Bridge
) -> None:
    job = new_job("video_fast") | {"config": {"frame_num": 500}}
    client.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    record = bridge.records.get(job["id"])
    assert record.status == "failed"
    assert record.fields["error_stage"] == "validate"
    assert record.fields["error"] == "config.frame_num: 500 is outside the allowed range 1..121"
    assert sent_job_ids(client, "enhance") == []
    assert sent_job_ids(client, "cpu") == [job["id"]]  # the failed callback


def test_an_item_without_a_usable_id_is_logged_and_dropped(
    client: redis.Redis, bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    client.rpush(QUEUE, json.dumps({"type": "video_fast", "prompt": "no id"}), "not json")

    with caplog.at_level(logging.ERROR, logger="worker.bridge"):
        assert bridge.run(drain=True) == 2

    assert "dropped a job without a usable id" in caplog.text
    assert "dropped an item that is not a job" in caplog.text
    assert client.llen(bridge.processing) == 0
    assert sent_job_ids(client, "enhance") == sent_job_ids(client, "cpu") == []
