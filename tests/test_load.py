"""Load through the real stack: a burst of 200 jobs, and 500+ generated payloads.

The module's stack (the three workers and the bridge) runs on a Redis database and a
platform list of its own. Jobs are the cheapest there are: a 256x256 image, one step of
the tiny model. Assertions read what the platform got, the job records and the logs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import JOB_TIMEOUT_S, module_env, new_job, settled
from tests.payloads import CONFIG_KEYS, FIELDS, json_values, usable_id
from worker.flow.bridge import rejected_list
from worker.jobs.records import FINAL_STATUSES, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until

QUEUE = "load_queue"
BURST = 200
PAYLOADS = 500
#: Each test waits for hundreds of jobs, each wait bounded by JOB_TIMEOUT_S; on a busy
#: 2-core machine that outlasts pytest's default 300 s for one test.
pytestmark = [pytest.mark.timeout(900), pytest.mark.runs_long]
#: A failed callback's message starts with the field at fault: `config.frame_num: ...`.
NAMES_A_FIELD = re.compile(r"[A-Za-z_][\w.\[\]-]*: ")


#: The cheapest valid config: one 256x256 image, one denoising step, guidance 1 (no
#: classifier-free guidance: the negative prompt is not even encoded).
TINY_CONFIG = {"resolution": "256x256", "num_inference_steps": 1, "guidance_scale": 1.0}


def tiny_job(**fields: Any) -> dict[str, Any]:
    """The cheapest job there is."""
    job = new_job("image_fast", **fields)
    job["config"] |= TINY_CONFIG
    return job


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env, tmp_path_factory, "load", redis_url=redis_server.db_url(13), queue=QUEUE
    )


@pytest.fixture(scope="module")
def load_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("load-logs")) as local:
        yield local


def finals(platform: LocalPlatform, job_id: str) -> list[dict[str, Any]]:
    """The final callbacks the platform accepted for the job, in arrival order."""
    return [c.body for c in platform.callbacks_for(job_id) if c.body["status"] in FINAL_STATUSES]


def test_a_burst_of_200_jobs_completes_each_once_in_push_order(
    load_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    # Given 200 jobs pushed onto the platform list at once
    jobs = [tiny_job() for _ in range(BURST)]
    client.rpush(QUEUE, *(queue_body(job) for job in jobs))

    # When the stack has worked through them
    for job in jobs:
        platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")

    # Then each completed with exactly one final callback, and generation started in the
    # order the jobs were pushed
    assert [[body["status"] for body in finals(platform, job["id"])] for job in jobs] == [
        ["completed"]
    ] * BURST
    started = [records.get(job["id"]).first_started("generate") for job in jobs]
    assert started == sorted(started)


@dataclass(frozen=True)
class Payload:
    """One generated item: the job's fields, where its id goes (or what stands in for it),
    and how it is written onto the list."""

    job: dict[str, Any]
    id_key: str | None
    bad_id: Any
    shape: str
    ascii_only: bool

    def render(self) -> bytes:
        """The item's bytes, with a fresh id when it has a usable one: no two collide."""
        job = dict(self.job)
        if self.id_key is not None:
            job[self.id_key] = f"fuzz-{uuid.uuid4()}" if self.bad_id is None else self.bad_id
        text = json.dumps(job, ensure_ascii=self.ascii_only)
        return (json.dumps([text]) if self.shape == "array" else text).encode()


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    """A tiny job with fields replaced by odd values or missing, in either body shape."""
    job = tiny_job()
    del job["id"]
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        job[field] = draw(json_values)
    for field in draw(st.lists(st.sampled_from(["type", "prompt", "user_id"]), max_size=2)):
        job.pop(field, None)
    if isinstance(job["config"], dict):  # a config of junk keys must not make a big job
        job["config"] = TINY_CONFIG | job["config"]
        if draw(st.booleans()):  # not null: that means "the default", a big job
            value = draw(json_values.filter(lambda value: value is not None))
            job["config"][draw(st.sampled_from(CONFIG_KEYS))] = value
    return Payload(
        job=job,
        id_key=draw(st.sampled_from(["id", "job_id", None])),
        bad_id=draw(st.none() | st.sampled_from(["abc\n", "", "../x", "x" * 129]) | json_values),
        shape=draw(st.sampled_from(["object", "array"])),
        ascii_only=draw(st.booleans()),
    )


def test_generated_payloads_each_end_answered_or_parked_and_the_workers_stay_alive(
    load_stack: LocalStack, platform: LocalPlatform, client: redis.Redis
) -> None:
    # Given 500+ generated payloads pushed through the real bridge and workers
    pushed: list[bytes] = []

    @settings(
        max_examples=PAYLOADS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(payload=payloads())
    def push(payload: Payload) -> None:
        raw = payload.render()
        client.rpush(QUEUE, raw)
        pushed.append(raw)

    push()
    ids = [usable_id(raw) for raw in pushed]
    answered = [job_id for job_id in ids if job_id is not None]

    # When every one with a usable id has been answered and every other one parked
    for job_id in answered:
        platform.wait_for_final(job_id, timeout_s=JOB_TIMEOUT_S)
    rejected = rejected_list(QUEUE)
    wait_until(lambda: client.llen(rejected) == ids.count(None), timeout_s=JOB_TIMEOUT_S,
               what="every item without an id parked")  # fmt: skip
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")

    # Then each answer is one final callback: `completed`, or `failed` naming the field
    assert len(pushed) >= PAYLOADS
    for job_id in answered:
        [body] = finals(platform, job_id)
        if body["status"] != "completed":
            assert body["status"] == "failed", body
            assert NAMES_A_FIELD.match(body["error_message"]), body["error_message"]
    # ... the bridge logged each item it parked (just after parking it), no process logged
    # an unhandled exception
    wait_until(
        lambda: load_stack.log("bridge").count(f"parked an item in {rejected}") == ids.count(None),
        timeout_s=JOB_TIMEOUT_S,
        what="every parked item logged",
    )
    for name in load_stack.names:
        assert "Traceback" not in load_stack.log(name), name
    # ... and every process is alive and still runs jobs
    assert all(process.poll() is None for process in load_stack.processes.values())
    after = tiny_job()
    client.rpush(QUEUE, queue_body(after))
    assert platform.wait_for_final(after["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == (
        "completed"
    )
