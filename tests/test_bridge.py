"""The bridge on its own, in this process, against a real Redis: order, recovery, dedupe.

Chains go to a Redis database no worker listens on (`idle_broker`), so what the bridge
sent can be read back from the Celery queue lists.
"""

from __future__ import annotations

import json
import logging

import pytest
import redis

from tests.conftest import new_job, sent_job_ids
from worker.bridge import Bridge
from worker.records import JobRecords

QUEUE = "bridge_test_queue"


@pytest.fixture
def bridge(idle_broker: redis.Redis) -> Bridge:
    return Bridge(idle_broker, JobRecords(idle_broker, ttl_s=600), queue=QUEUE)


def test_jobs_are_dispatched_oldest_first(idle_broker: redis.Redis, bridge: Bridge) -> None:
    jobs = [new_job("image_fast") for _ in range(4)]
    for job in jobs:
        idle_broker.rpush(QUEUE, json.dumps(job))

    assert bridge.run(drain=True) == 4

    assert sent_job_ids(idle_broker, "enhance") == [job["id"] for job in jobs]
    assert idle_broker.llen(QUEUE) == 0
    assert idle_broker.llen(bridge.processing) == 0


def test_items_a_crash_left_in_the_processing_list_go_first_at_start(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    # Given a bridge died holding one job, and a newer one waits on the platform list
    interrupted, waiting = new_job("image_fast"), new_job("image_fast")
    idle_broker.rpush(bridge.processing, json.dumps(interrupted))
    idle_broker.rpush(QUEUE, json.dumps(waiting))

    # When a bridge starts again
    bridge.run(drain=True)

    # Then the interrupted job is dispatched first, and nothing is left behind
    assert sent_job_ids(idle_broker, "enhance") == [interrupted["id"], waiting["id"]]
    assert idle_broker.llen(bridge.processing) == 0


def test_a_job_id_seen_twice_starts_one_chain(idle_broker: redis.Redis, bridge: Bridge) -> None:
    job = new_job("video_fast")
    idle_broker.rpush(QUEUE, json.dumps(job), json.dumps([json.dumps(job)]))

    assert bridge.run(drain=True) == 2

    assert sent_job_ids(idle_broker, "enhance") == [job["id"]]


def test_a_claimed_but_undispatched_job_is_sent_again(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    # Given a bridge claimed a job and died before sending its chain
    job = new_job("video_fast")
    bridge.records.claim(job["id"])
    idle_broker.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    assert sent_job_ids(idle_broker, "enhance") == [job["id"]]


def test_an_invalid_job_is_recorded_as_failed_and_answered(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    job = new_job("video_fast") | {"config": {"frame_num": 500}}
    idle_broker.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    record = bridge.records.get(job["id"])
    assert record.status == "failed"
    assert record.fields["error_stage"] == "validate"
    assert record.fields["error"] == "config.frame_num: 500 is outside the allowed range 1..121"
    assert sent_job_ids(idle_broker, "enhance") == []
    assert sent_job_ids(idle_broker, "cpu") == [job["id"]]  # the failed callback


def test_an_item_without_a_usable_id_is_logged_and_dropped(
    idle_broker: redis.Redis, bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    idle_broker.rpush(QUEUE, json.dumps({"type": "video_fast", "prompt": "no id"}), "not json")

    with caplog.at_level(logging.ERROR, logger="worker.bridge"):
        assert bridge.run(drain=True) == 2

    assert "dropped a job without a usable id" in caplog.text
    assert "dropped an item that is not a job" in caplog.text
    assert idle_broker.llen(bridge.processing) == 0
    assert sent_job_ids(idle_broker, "enhance") == sent_job_ids(idle_broker, "cpu") == []
