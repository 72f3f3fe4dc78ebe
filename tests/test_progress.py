"""Progress as the frontend sees it: Server-Sent Events from GET /jobs/{id}/events."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import redis

from tests.conftest import (
    JOB_TIMEOUT_S,
    PACED,
    PLATFORM_QUEUE,
    api_url,
    auth,
    new_job,
    pauses,
    push,
)
from worker.jobs.records import FINAL_STATUSES, JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, wait_until

STAGES = ("enhance", "generate", "encode", "thumbnail", "upload")


def sse_events(url: str) -> Iterator[dict[str, Any]]:
    """The `data` of each event of a stream, as JSON, until the server ends it."""
    with httpx.stream("GET", url, headers=auth(), timeout=JOB_TIMEOUT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line.removeprefix("data:").strip())


class Listener(threading.Thread):
    """Reads one job's stream in the background; `events` in arrival order."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        for event in sse_events(self.url):
            self.events.append(event)


def test_the_stream_shows_every_stage_and_step_with_a_rising_percent_and_ends_with_the_status(
    stack: LocalStack, stack_env: dict[str, str], platform_list: redis.Redis
) -> None:
    # Given a subscriber listening while the job waits (the frontend right after queue-job),
    # held where no bridge takes it (the processing list of a host without one) until then
    job = new_job("video_fast")
    job["config"]["num_inference_steps"] = 6
    held = f"{PLATFORM_QUEUE}:processing:no-bridge-here"
    platform_list.rpush(held, queue_body(job))
    listener = Listener(f"{api_url(stack_env)}/jobs/{job['id']}/events")
    listener.start()
    wait_until(lambda: listener.events, timeout_s=JOB_TIMEOUT_S, what="the snapshot")

    # When the job reaches the platform list and runs
    platform_list.lmove(held, PLATFORM_QUEUE, "LEFT", "RIGHT")
    listener.join(timeout=JOB_TIMEOUT_S)

    # Then: the snapshot, every stage's start and end, every step, a rising percent, the status
    events = listener.events
    assert events[0]["event"] == "snapshot" and events[0]["status"] is None
    assert events[-1] == events[-1] | {"event": "final", "status": "completed", "percent": 100.0}
    for stage in STAGES:
        kinds = [e["event"] for e in events if e.get("stage") == stage]
        assert kinds[0] == "stage_started" and kinds[-1] == "stage_finished", stage
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e["total_steps"] == 6 and e["eta_seconds"] >= 0 for e in steps)
    assert steps[-1]["eta_seconds"] == 0
    percents = [e["percent"] for e in events if e.get("percent") is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0
    view = httpx.get(f"{api_url(stack_env)}/jobs/{job['id']}", headers=auth(), timeout=10).json()
    assert view["status"] == "completed"


def test_a_late_subscriber_gets_the_current_state_first_and_the_final_status(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:  # fmt: skip
    # Given a job paused after its second denoising step (conftest's PACED_RULES), so the
    # stream opens mid-denoise however fast the machine
    job = new_job("video_fast", id=f"{PACED}{uuid.uuid4()}")
    job["config"]["num_inference_steps"] = 4
    push(platform_list, job)
    records = JobRecords(platform_list, ttl_s=60)

    def denoising() -> bool:
        progress = records.get(job["id"]).value("progress") or {}
        return (progress.get("step") or 0) >= 2

    wait_until(denoising, timeout_s=JOB_TIMEOUT_S, what="denoising", interval_s=0.02)
    events = list(sse_events(f"{api_url(stack_env)}/jobs/{job['id']}/events"))

    snapshot = events[0]
    assert snapshot["event"] == "snapshot" and snapshot["status"] == "processing"
    assert snapshot["stage"] == "generate" and snapshot["progress"]["step"] >= 2
    assert events[-1]["event"] == "final" and events[-1]["status"] == "completed"


def test_a_finished_job_streams_its_snapshot_and_final_status_at_once(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:  # fmt: skip
    job = new_job("image_fast")
    push(platform_list, job)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    events = list(sse_events(f"{api_url(stack_env)}/jobs/{job['id']}/events"))

    assert [e["event"] for e in events] == ["snapshot", "final"]
    assert events[-1]["status"] == "completed"


def test_progress_callbacks_reach_the_platform_at_most_once_per_ten_percent_and_interval(
    stack_env: dict[str, str], platform: LocalPlatform, tmp_path_factory
) -> None:
    # Given workers with PROGRESS_CALLBACKS on (a Redis database of their own), whose
    # generation pauses longer than PROGRESS_CALLBACK_EVERY_S after steps 10 and 30 of 60:
    # at least two callbacks are due (by step 11 and at step 31) however fast the steps run
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/14"
    queue = "wan_queue_progress"
    env = stack_env | {
        "REDIS_URL": db, "PLATFORM_REDIS_URL": db, "PLATFORM_QUEUE": queue,
        "PROGRESS_CALLBACKS": "true", "PROGRESS_CALLBACK_EVERY_S": "0.5",
        "WAN_TEST_FAULT": pauses(PACED, 0.6, [10, 30]),
    }  # fmt: skip
    workers = LocalStack(env, log_dir=tmp_path_factory.mktemp("progress-logs")).start()
    job = new_job("video_fast", id=f"{PACED}{uuid.uuid4()}")
    job["config"] |= {"num_inference_steps": 60}
    try:
        # When the generation runs
        redis.Redis.from_url(db).rpush(queue, json.dumps(job))
        platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    finally:
        workers.stop()

    # Then signed processing callbacks carried the progress, spaced as promised (each from
    # a thread of its own: only the final callback's uniqueness is promised, not that no
    # progress callback lands after it)
    callbacks = platform.callbacks_for(job["id"])
    updates = [c for c in callbacks if "progress" in (c.body.get("metadata") or {})]
    assert len(updates) >= 2, "too few progress callbacks during a generation of seconds"
    assert [c.body["status"] for c in callbacks if c.body["status"] in FINAL_STATUSES] == [
        "completed"
    ]
    progress = [c.body["metadata"]["progress"] for c in updates]
    assert all(p["stage"] == "generate" and 0 < p["percent"] <= 100 for p in progress)
    for earlier, later in zip(progress, progress[1:], strict=False):
        assert later["percent"] - earlier["percent"] >= 10
        assert later["at"] - earlier["at"] >= 0.5
