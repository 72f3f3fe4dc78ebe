"""The bridge on its own, in this process, against a real Redis: order, recovery, dedupe.

Chains go to a Redis database no worker listens on (`idle_broker`), so what the bridge
sent can be read back from the Celery queue lists.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tasks.chain import SENDER
from tests.conftest import new_job, sent_job_ids
from tests.payloads import json_object
from worker.flow.bridge import RECONNECT_S, Bridge, rejected_list
from worker.jobs.records import JobRecords
from worker.local.stack import RedisServer, wait_until

QUEUE = "bridge_test_queue"


@pytest.fixture
def bridge(idle_broker: redis.Redis) -> Bridge:
    return Bridge(
        idle_broker,
        JobRecords(idle_broker, ttl_s=600, owner="this-host"),
        queue=QUEUE,
        sender=SENDER,
    )


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


@pytest.fixture
def draining(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Thread]:
    """The bridge draining its list in a thread (stopped after the test), asking again
    about held jobs every 0.05 s."""
    monkeypatch.setattr("worker.flow.bridge.POLL_S", 0.05)
    monkeypatch.setattr("worker.flow.bridge.HELD_RECHECK_S", 0.05)
    serving = threading.Thread(target=bridge.run, kwargs={"drain": True})
    yield serving
    bridge.stop()
    serving.join(timeout=10)


def kept_while_held(client: redis.Redis, bridge: Bridge, job: dict) -> None:
    """Wait until the bridge has taken the job and kept it: in its processing list, held,
    nothing sent and nothing answered."""
    wait_until(lambda: bool(bridge.held), timeout_s=10, what="the item kept")
    assert client.llen(QUEUE) == 0
    assert [json.loads(raw)["id"] for raw in client.lrange(bridge.processing, 0, -1)] == [job["id"]]
    assert sent_job_ids(client, "enhance") == sent_job_ids(client, "cpu") == []


def test_a_job_another_dispatcher_is_sending_is_kept_until_it_is_dispatched_and_not_sent_twice(
    idle_broker: redis.Redis, bridge: Bridge, draining: threading.Thread
) -> None:
    # Given another bridge (or the API) claimed a job a moment ago and is still sending it
    job = new_job("video_fast")
    other = bridge.records.for_owner("bridge-on-another-host")
    assert other.claim(job["id"]) == "claimed"
    idle_broker.rpush(QUEUE, json.dumps(job))

    # When this bridge takes the same job id, it keeps the item while the claim is held
    draining.start()
    kept_while_held(idle_broker, bridge, job)

    # Then once the owner has sent it, the item goes: no second chain, no failed callback
    other.mark_dispatched(job["id"])
    draining.join(timeout=10)
    assert not draining.is_alive()
    assert sent_job_ids(idle_broker, "enhance") == sent_job_ids(idle_broker, "cpu") == []
    assert bridge.records.claim_owner(job["id"]) == "bridge-on-another-host"
    assert idle_broker.llen(bridge.processing) == 0


def test_a_job_whose_dispatcher_died_between_claim_and_send_is_sent_once_its_claim_runs_out(
    idle_broker: redis.Redis, bridge: Bridge, draining: threading.Thread
) -> None:
    # Given a dispatcher claimed a job and died before sending it (its lease is short here),
    # and the same job reaches this bridge, with another job behind it
    job, behind = new_job("video_fast"), new_job("image_fast")
    dead = JobRecords(idle_broker, ttl_s=600, owner="dead-dispatcher", claim_lease_s=1.0)
    assert dead.claim(job["id"]) == "claimed"
    idle_broker.rpush(QUEUE, json.dumps(job))

    # When the bridge takes it: it keeps it while the claim is live, and goes on meanwhile
    draining.start()
    kept_while_held(idle_broker, bridge, job)
    idle_broker.rpush(QUEUE, json.dumps(behind))
    wait_until(lambda: sent_job_ids(idle_broker, "enhance") == [behind["id"]], timeout_s=10,
               what="the job behind sent")  # fmt: skip
    assert bridge.records.claim_owner(job["id"]) == "dead-dispatcher"

    # Then once the claim has run out, it takes the job over and sends its chain, once
    draining.join(timeout=10)
    assert not draining.is_alive()
    assert sent_job_ids(idle_broker, "enhance") == [behind["id"], job["id"]]
    assert bridge.records.claim_owner(job["id"]) == bridge.records.owner
    assert bridge.records.is_dispatched(job["id"])
    assert idle_broker.llen(bridge.processing) == 0


def test_a_held_item_goes_back_on_the_list_when_the_bridge_restarts(
    idle_broker: redis.Redis, bridge: Bridge, draining: threading.Thread
) -> None:
    # Given the bridge keeps a held job's item, and dies (stops) with it
    job = new_job("video_fast")
    assert bridge.records.for_owner("dead-dispatcher").claim(job["id"]) == "claimed"
    idle_broker.rpush(QUEUE, json.dumps(job))
    draining.start()
    kept_while_held(idle_broker, bridge, job)
    bridge.stop()
    draining.join(timeout=10)

    # When it starts again, the item is still in its processing list: it is put back first
    assert idle_broker.llen(bridge.processing) == 1
    restarted = Bridge(idle_broker, bridge.records, queue=QUEUE, sender=SENDER)
    assert restarted.recover() == 1
    assert idle_broker.lrange(QUEUE, 0, -1) == [json.dumps(job).encode()]


def test_a_claim_whose_owner_died_is_taken_over_once_its_lease_has_run_out(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    # Given a dispatcher claimed a job and died; its lease (short here) has run out
    job = new_job("video_fast")
    dead = JobRecords(idle_broker, ttl_s=600, owner="dead-bridge", claim_lease_s=0.2)
    assert dead.claim(job["id"]) == "claimed"
    time.sleep(0.3)
    idle_broker.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    assert sent_job_ids(idle_broker, "enhance") == [job["id"]]
    assert bridge.records.claim_owner(job["id"]) == bridge.records.owner


def test_a_bridge_restarted_after_a_crash_takes_back_its_own_claim_at_once(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    # Given this host's bridge claimed a job and died before sending its chain
    job = new_job("video_fast")
    assert bridge.records.claim(job["id"]) == "claimed"
    idle_broker.rpush(bridge.processing, json.dumps(job))

    # When the bridge of this host starts again (same owner), well within the lease
    restarted = Bridge(
        idle_broker, bridge.records.for_owner(bridge.records.owner), queue=QUEUE, sender=SENDER
    )
    restarted.run(drain=True)

    assert sent_job_ids(idle_broker, "enhance") == [job["id"]]


def test_two_bridges_given_the_same_jobs_send_each_chain_once(idle_broker: redis.Redis) -> None:
    # Given the same 40 jobs on the lists of two bridges of two hosts
    jobs = [new_job("image_fast") for _ in range(40)]
    bridges = [
        Bridge(
            idle_broker,
            JobRecords(idle_broker, ttl_s=600, owner=f"host-{n}"),
            queue=queue,
            sender=SENDER,
        )
        for n, queue in enumerate(("queue_a", "queue_b"))
    ]
    for b in bridges:
        idle_broker.rpush(b.queue, *(json.dumps(job) for job in jobs))

    # When both drain their lists at the same time
    with ThreadPoolExecutor(max_workers=2) as pool:
        handled = list(pool.map(lambda b: b.run(drain=True), bridges))

    # Then every job got one chain, and both bridges went through all their items
    assert handled == [40, 40]
    sent = sent_job_ids(idle_broker, "enhance")
    assert sorted(sent) == sorted(job["id"] for job in jobs)


def test_an_invalid_job_is_recorded_as_failed_and_answered(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    job = new_job("video_fast") | {"config": {"frame_num": 1000}}
    idle_broker.rpush(QUEUE, json.dumps(job))

    bridge.run(drain=True)

    record = bridge.records.get(job["id"])
    assert record.status == "failed"
    assert record.fields["error_stage"] == "validate"
    assert record.fields["error"] == "config.frame_num: 1000 is outside the allowed range 1..961"
    assert sent_job_ids(idle_broker, "enhance") == []
    assert sent_job_ids(idle_broker, "cpu") == [job["id"]]  # the failed callback


def _point_celery_at(url: str) -> None:
    """Send this process's Celery messages to `url`, dropping pools made for the old one."""
    from tasks import app

    app.conf.broker_url = url
    app._pool = None  # what Celery itself resets after a fork; kombu keeps a pool per URL
    app.amqp._producer_pool = None


@pytest.fixture
def own_broker(idle_broker: redis.Redis, tmp_path: Path) -> Iterator[RedisServer]:
    """A broker of this test's own, which it can stop and start again on the same port."""
    from tasks import app

    idle_url = app.conf.broker_url
    server = RedisServer(tmp_path / "broker").start()
    _point_celery_at(server.url)
    try:
        yield server
    finally:
        server.stop()
        _point_celery_at(idle_url)


def test_a_failed_callback_is_not_lost_to_a_broker_outage_while_rejecting(
    own_broker: RedisServer, idle_broker: redis.Redis, bridge: Bridge
) -> None:
    # Given the broker is down when an invalid job arrives
    job = new_job("video_fast") | {"config": {"frame_num": 1000}}
    own_broker.stop()
    idle_broker.rpush(QUEUE, json.dumps(job))
    serving = threading.Thread(target=bridge.run)
    serving.start()
    try:
        # When the bridge has recorded the failure, failed to publish, and tried again
        wait_until(
            lambda: bridge.records.get(job["id"]).status == "failed",
            timeout_s=10,
            what="the failure recorded",
        )
        time.sleep(2 * RECONNECT_S + 1)
        # and then the broker comes back
        own_broker.start()

        # Then the failed callback is published once, and the item is done with
        broker = redis.Redis.from_url(own_broker.url)
        wait_until(
            lambda: sent_job_ids(broker, "cpu") == [job["id"]],
            timeout_s=15,
            what="the failed callback published",
        )
        wait_until(
            lambda: idle_broker.llen(bridge.processing) == 0,
            timeout_s=5,
            what="the processing list emptied",
        )
    finally:
        bridge.stop()
        serving.join(timeout=10)
    assert bridge.records.is_dispatched(job["id"])
    assert sent_job_ids(broker, "enhance") == []


def parked(client: redis.Redis) -> list[dict[str, str]]:
    """Entries of the rejected list, oldest first."""
    return [json.loads(e) for e in reversed(client.lrange(rejected_list(QUEUE), 0, -1))]


def test_an_item_without_a_usable_id_is_parked_with_the_reason(
    idle_broker: redis.Redis, bridge: Bridge
) -> None:
    no_id = json.dumps({"type": "video_fast", "prompt": "no id"})
    idle_broker.rpush(QUEUE, no_id, "not json", b"\xff\xfe raw bytes")

    assert bridge.run(drain=True) == 3

    entries = parked(idle_broker)
    assert [e.get("item") for e in entries] == [no_id, "not json", None]
    assert base64.b64decode(entries[2]["item_base64"]) == b"\xff\xfe raw bytes"
    assert entries[0]["reason"].startswith("InvalidJob: id: missing")
    assert entries[1]["reason"].startswith("InvalidJob: body: not valid UTF-8 JSON")
    assert all(e["at"] for e in entries)
    assert idle_broker.llen(bridge.processing) == 0
    assert sent_job_ids(idle_broker, "enhance") == sent_job_ids(idle_broker, "cpu") == []


def test_the_rejected_list_keeps_only_the_newest_entries(
    idle_broker: redis.Redis, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.flow.bridge.REJECTED_MAX", 3)
    idle_broker.rpush(QUEUE, *(f"junk {n}" for n in range(5)))

    bridge.run(drain=True)

    assert [e["item"] for e in parked(idle_broker)] == ["junk 2", "junk 3", "junk 4"]


def _utf16_job() -> bytes:
    return json.dumps(new_job("image_fast")).encode("utf-16")


def _record_of_another_type(client: redis.Redis) -> str:
    """A job whose record key holds a string: every write to it fails with WRONGTYPE."""
    job = new_job("image_fast")
    client.set(f"wan:job:{job['id']}", "not a hash")
    return json.dumps(job)


@pytest.mark.parametrize(
    "make_item",
    [
        lambda client: "1" * 5_000,
        lambda client: _utf16_job(),
        _record_of_another_type,
    ],
    ids=["integer-over-4300-digits", "utf-16", "record-wrongtype"],
)
def test_a_poison_item_costs_only_itself(
    idle_broker: redis.Redis, bridge: Bridge, make_item: Callable[[redis.Redis], str | bytes]
) -> None:
    # Given an item that breaks decoding or recording, with a good job behind it
    good = new_job("image_fast")
    idle_broker.rpush(QUEUE, make_item(idle_broker), json.dumps(good))

    # When the bridge takes both (it used to raise here and, at each restart, again)
    assert bridge.run(drain=True) == 2

    # Then the poison item is parked with its reason and the good job is sent
    [entry] = parked(idle_broker)
    assert entry["reason"]
    assert sent_job_ids(idle_broker, "enhance") == [good["id"]]
    assert idle_broker.llen(bridge.processing) == idle_broker.llen(QUEUE) == 0


def extreme(**fields: str) -> str:
    """A job's text with these fields' values as raw JSON texts (valid JSON, extreme values)."""
    job = new_job("image_fast")
    return json_object({key: json.dumps(value) for key, value in job.items()} | fields)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        (json.dumps([extreme(config='{"seed": 1%s}' % ("0" * 5_000))]), "config.seed"),
        (extreme(metadata='{"x": %s}' % ("[" * 5_000 + "]" * 5_000)), "metadata.x[0]"),
        (extreme(prompt='"a fox \\ud800"'), "prompt"),
        (extreme(metadata='{"big": 1e400}'), "metadata.big"),
        (extreme(type='"\\ud800"', user_id="1" * 5_000), "user_id"),
    ],
    ids=["array-with-a-huge-seed", "metadata-nested-5000", "prompt-lone-surrogate",
         "metadata-1e400", "type-lone-surrogate-huge-user-id"],
)  # fmt: skip
def test_valid_json_with_extreme_values_and_a_usable_id_gets_a_failed_callback_naming_the_field(
    idle_broker: redis.Redis,
    bridge: Bridge,
    monkeypatch: pytest.MonkeyPatch,
    item: str,
    field: str,
) -> None:
    monkeypatch.setattr("worker.flow.bridge.POLL_S", 0.05)  # drain ends without a 1 s wait
    # Given a valid JSON job whose values Python's decoder refuses or cannot keep, and a
    # good job behind it
    good = new_job("image_fast")
    idle_broker.rpush(QUEUE, item, json.dumps(good))

    # When the bridge takes both
    assert bridge.run(drain=True) == 2

    # Then the first is answered, a failed callback naming the field; the good job is sent
    [job_id] = sent_job_ids(idle_broker, "cpu")
    record = bridge.records.get(job_id)
    assert (record.status, record.fields["error_type"]) == ("failed", "InvalidJob")
    assert record.fields["error"].startswith(f"{field}")
    assert parked(idle_broker) == []
    assert sent_job_ids(idle_broker, "enhance") == [good["id"]]
