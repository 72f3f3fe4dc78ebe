"""The bridge against whatever a list may hold: raw bytes, odd JSON, jobs with odd fields.

In this process against the real Redis, chains sent to a database no worker consumes
(`idle_broker`). Items include valid JSON that Python's decoder refuses or bends (integers
over 4,300 digits, 1e400, lone surrogates, nesting thousands deep: `extreme_jobs`). For
every batch: the bridge never raises, each item with a usable id gets exactly one answer (a
chain or a `failed` callback naming a field), each item without one is parked in
`{queue}:rejected`, nothing is left in the platform or processing list, and a good job
after the batch is sent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tasks.chain import SENDER
from tests.conftest import new_job, sent_job_ids
from tests.payloads import CONFIG_KEYS, FIELDS, extreme_jobs, json_values, usable_id
from worker.flow.bridge import Bridge, rejected_list
from worker.jobs.records import JobRecords

QUEUE = "fuzz_queue"

odd_ids = st.one_of(
    st.uuids().map(str),
    st.sampled_from(["abc\n", "", "../x", "a/b", "x" * 129, "ok-id", "0", "-lead"]),
    json_values,
)
#: Items that once killed the bridge or nearly did.
POISON = (
    b"1" * 5_000,
    json.dumps(['{"id": "big", "seed": 1%s}' % ("0" * 5_000)]).encode(),
    json.dumps(new_job("image_fast")).encode("utf-16"),
    b"[" * 50_000 + b"]" * 50_000,
    b'{"id": "nan-job", "type": "image_fast", "config": {"seed": NaN}}',
)


@st.composite
def job_like(draw: st.DrawFn) -> bytes:
    """A plausible job with a few fields replaced by odd values, in either body shape."""
    job: dict[str, Any] = new_job(draw(st.sampled_from(["image_fast", "video_high"])))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        job[field] = draw(json_values)
    if draw(st.booleans()):
        job["config"] = dict(job.get("config") or {}) if isinstance(job.get("config"), dict) else {}
        job["config"][draw(st.sampled_from(CONFIG_KEYS))] = draw(json_values)
    job[draw(st.sampled_from(["id", "job_id"]))] = draw(odd_ids)
    text = json.dumps(job, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = json.dumps([text])
    return text.encode()


#: Items with the id a correct bridge answers (None: it parks the item).
items = st.lists(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda value: json.dumps(value).encode()),
        job_like(),
        st.sampled_from(POISON),
    ).map(lambda raw: (raw, usable_id(raw)))
    | extreme_jobs(),
    min_size=1,
    max_size=5,
)


@pytest.fixture
def bridge(idle_broker: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Bridge:
    monkeypatch.setattr("worker.flow.bridge.POLL_S", 0.01)  # drain ends without a 1 s wait
    return Bridge(
        idle_broker, JobRecords(idle_broker, ttl_s=600, owner="fuzz"), queue=QUEUE, sender=SENDER
    )


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=items)
def test_every_item_is_dispatched_answered_or_parked_and_the_bridge_goes_on(
    idle_broker: redis.Redis, bridge: Bridge, batch: list[tuple[bytes, str | None]]
) -> None:
    idle_broker.flushdb()
    good = new_job("image_fast")
    idle_broker.rpush(QUEUE, *(raw for raw, _ in batch), json.dumps(good))

    assert bridge.run(drain=True) == len(batch) + 1

    ids = [job_id for _, job_id in batch]
    chains, failed = sent_job_ids(idle_broker, "enhance"), sent_job_ids(idle_broker, "cpu")
    event(f"chains sent: {len(chains) > 1}, failed callbacks: {bool(failed)}")
    assert chains[-1] == good["id"]
    answered = chains[:-1] + failed
    assert sorted(answered) == sorted({i for i in ids if i is not None})
    for job_id in failed:  # each names the field: InvalidJob's text starts with it
        record = bridge.records.get(job_id)
        assert record.fields["error_type"] == "InvalidJob", record.fields["error"]
        assert record.fields["error"].split(": ")[0]
    parked = [json.loads(e) for e in idle_broker.lrange(rejected_list(QUEUE), 0, -1)]
    assert len(parked) == ids.count(None)
    event(f"items parked: {bool(parked)}")
    assert all(entry["reason"] for entry in parked)
    assert idle_broker.llen(QUEUE) == idle_broker.llen(bridge.processing) == 0
