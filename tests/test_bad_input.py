"""Bad input gets a `failed` callback naming the field and the limit; the workers go on."""

from __future__ import annotations

import json

import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, PLATFORM_QUEUE, new_job, push
from tests.payloads import json_object
from worker.flow.bridge import rejected_list
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack


def without(job: dict, key: str) -> dict:
    return {k: v for k, v in job.items() if k != key}


def with_config(job: dict, **config: object) -> dict:
    return job | {"config": job["config"] | config}


BAD_JOBS = {
    "missing prompt": (without(new_job(), "prompt"), "prompt", "required"),
    "unknown type": (new_job() | {"type": "video_ultra"}, "type", "video_ultra"),
    "frames 1000": (with_config(new_job(), frame_num=1000), "config.frame_num", "1..961"),
    "width 100": (with_config(new_job(), resolution="100x256"), "config.resolution", "256..1280"),
    "steps 101": (
        with_config(new_job(), num_inference_steps=101),
        "config.num_inference_steps",
        "1..100",
    ),
    "prompt too long": (new_job() | {"prompt": "x" * 2001}, "prompt", "2000"),
}


@pytest.mark.parametrize("name", BAD_JOBS)
def test_a_bad_job_gets_a_failed_callback_naming_the_field_and_the_next_job_runs(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis, name: str
) -> None:
    bad, field, limit = BAD_JOBS[name]
    good = new_job("image_fast")

    push(platform_list, bad)
    push(platform_list, good)

    failed = platform.wait_for_final(bad["id"], timeout_s=JOB_TIMEOUT_S).body
    assert failed["status"] == "failed"
    assert failed["assets"] == []
    assert failed["error_message"].startswith(f"{field}:")
    assert limit in failed["error_message"]
    assert failed["metadata"]["error_type"] == "InvalidJob"
    assert failed["metadata"]["wan_task"] == "t2v-1.3B"
    assert failed["metadata"]["timestamp"]
    assert [c.body["status"] for c in platform.callbacks_for(bad["id"])] == ["failed"]
    assert (
        platform.wait_for_final(good["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"
    )


def extreme_body(job: dict, **fields: str) -> str:
    """The job's text with these fields' values as raw JSON texts: valid JSON (RFC 8259)
    that Python's decoder refuses or bends."""
    return json_object({key: json.dumps(value) for key, value in job.items()} | fields)


EXTREME_JOBS = {
    "seed-of-5001-digits-in-an-array-body": (
        lambda job: json.dumps([extreme_body(job, config='{"seed": 1%s}' % ("0" * 5_000))]),
        "config.seed", "an integer of 5001 digits"),
    "metadata-nested-5000-deep": (
        lambda job: extreme_body(job, metadata='{"x": %s}' % ("[" * 5_000 + "]" * 5_000)),
        "metadata.x", "nested deeper than 32 levels"),
    "type-and-prompt-with-lone-surrogates": (
        lambda job: extreme_body(job, prompt='"a fox \\ud800"', type='"\\udfff"'),
        "type", "unknown job type"),
    "fps-1e400": (lambda job: extreme_body(job, fps="1e400"), "fps", "whole number"),
}  # fmt: skip


def test_valid_json_with_extreme_values_gets_failed_callbacks_naming_fields_and_the_next_job_runs(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given valid JSON jobs whose values Python's decoder refuses or bends, and a good job
    jobs = {name: new_job() for name in EXTREME_JOBS}
    good = new_job("image_fast")
    for name, (make_item, _, _) in EXTREME_JOBS.items():
        push(platform_list, make_item(jobs[name]))
    push(platform_list, good)

    # Then each gets one failed callback naming its field, and the good job completes
    for name, (_, field, words) in EXTREME_JOBS.items():
        failed = platform.wait_for_final(jobs[name]["id"], timeout_s=JOB_TIMEOUT_S).body
        assert failed["error_message"].startswith(f"{field}"), failed
        assert words in failed["error_message"]
        assert failed["metadata"]["error_type"] == "InvalidJob"
        assert [c.body["status"] for c in platform.callbacks_for(jobs[name]["id"])] == ["failed"]
    assert (
        platform.wait_for_final(good["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"
    )


def test_an_item_that_is_not_json_is_parked_and_the_next_job_runs(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    good = new_job("image_fast")
    junk = f"{{this is not json {good['id']}"

    push(platform_list, junk)
    push(platform_list, good)

    assert (
        platform.wait_for_final(good["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"
    )
    parked = [json.loads(e) for e in platform_list.lrange(rejected_list(PLATFORM_QUEUE), 0, -1)]
    [entry] = [e for e in parked if e.get("item") == junk]
    assert "not valid UTF-8 JSON" in entry["reason"]


def test_a_job_failing_in_generation_reports_the_stage_and_the_reason(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given a reference-frame job on a worker without WAN_VACE_MODEL_PATH (the test stack)
    job = new_job("video_fast") | {"metadata": {"reference_image_url": "https://example.com/a.png"}}

    push(platform_list, job)

    # Then generation failed before any work (nothing was downloaded), saying where and why
    failed = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    assert [c.body["status"] for c in platform.callbacks_for(job["id"])] == ["failed"]
    assert failed["metadata"]["error_type"] == "ModelNotConfigured"
    assert failed["metadata"]["error_stage"] == "generate"
    assert failed["metadata"]["job_type"] == "video_fast"
    assert failed["error_message"].startswith("WAN_VACE_MODEL_PATH is not set")
    # And the job record, which the on-call engineer reads, says the same
    record = JobRecords(platform_list, ttl_s=60).get(job["id"])
    assert (record.status, record.fields["error_stage"]) == ("failed", "generate")
    assert record.fields["error_type"] == "ModelNotConfigured"
