"""Generation out of GPU memory or hung past its soft time limit, through a stack of its own.

WAN_TEST_FAULT drives the real pipeline into each fault at the end of denoising step 1,
for the jobs whose ids start with the rule's prefix; GENERATE_SOFT_LIMIT_S is short, so a
hung step meets it within the test. Assertions read what the platform got and the record.
The unit tests at the end need no stack: settings, fault rules and the preset order.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from pydantic import ValidationError

from tests.conftest import JOB_TIMEOUT_S, module_env, new_job
from worker import faults
from worker.errors import OutOfGpuMemory
from worker.generation.fallback import generate_within_memory
from worker.generation.modes import Generated
from worker.jobs.model import BUCKET, Job, PresetName, parse_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer
from worker.observe.metrics import QUALITY_DEGRADATIONS, Metrics
from worker.observe.progress import channel
from worker.settings import Settings

QUEUE = "genfault_queue"
#: Soft limit of generation in this stack: far above a tiny job's generation (the pool child
#: loads the model and warms up before its first job: WARMUP), short enough for a hung step
#: to meet it soon.
SOFT_LIMIT_S = 20
#: Job id prefixes, one per fault rule below.
OOM_AT_HIGH, OOM_ALWAYS, HANG = "oomhigh-", "oomall-", "hang-"
FAULTS = f"{OOM_AT_HIGH}:oom@step1/high;{OOM_ALWAYS}:oom@step1;{HANG}:hang@step1"


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "genfaults",
        redis_url=redis_server.db_url(12),
        queue=QUEUE,
        settings={
            "WAN_TEST_FAULT": FAULTS,
            "GENERATE_SOFT_LIMIT_S": str(SOFT_LIMIT_S),
            "HARD_LIMIT_GRACE_S": "5",
            "WARMUP": "1",
        },
    )


@pytest.fixture(scope="module")
def fault_stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("genfault-logs")):
        yield


def run(client: redis.Redis, platform: LocalPlatform, job: dict[str, Any]) -> dict[str, Any]:
    """Push the job as the platform does; its final callback body."""
    client.rpush(QUEUE, queue_body(job))
    return platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body


def job_with_id(prefix: str, job_type: str, **fields: Any) -> dict[str, Any]:
    return new_job(job_type, id=f"{prefix}{uuid.uuid4()}", **fields)


def degradations(client: redis.Redis) -> float:
    """wan_quality_degradations_total{from_quality="high", to_quality="balanced"}, as scraped."""
    for family in Metrics(client).collector().collect():
        if family.name == QUALITY_DEGRADATIONS.name.removesuffix("_total"):
            for sample in family.samples:
                if sample.labels == {"from_quality": "high", "to_quality": "balanced"}:
                    return sample.value
    return 0.0


def published(subscription: redis.client.PubSub) -> list[dict[str, Any]]:
    """The progress events published so far on a subscribed job channel, in order."""
    events = []
    while (message := subscription.get_message(timeout=0.1)) is not None:
        if message["type"] == "message":
            events.append(json.loads(message["data"]))
    return events


def assert_a_job_still_completes(client: redis.Redis, platform: LocalPlatform) -> None:
    assert run(client, platform, new_job("image_fast"))["status"] == "completed"


def test_a_high_job_out_of_memory_completes_at_balanced_and_says_so(
    fault_stack: None, client: redis.Redis, records: JobRecords, platform: LocalPlatform
) -> None:
    # Given a `high` job whose generation runs out of GPU memory at `high` only
    job = job_with_id(OOM_AT_HIGH, "image_high")
    job["config"]["resolution"] = "384x256"
    before = degradations(client)
    progress = client.pubsub()
    progress.subscribe(channel(job["id"]))

    # When it runs
    body = run(client, platform, job)

    # Then it completes, made at `balanced`, and its asset says so
    assert body["status"] == "completed", body["error_message"]
    [asset] = body["assets"]
    assert asset["metadata"]["quality_used"] == "balanced"
    assert asset["metadata"]["degraded_from"] == "high"
    # And the image is real, of the requested size; the step count started again once
    upload = platform.upload_at(BUCKET, asset["url"])
    assert upload is not None
    assert Image.open(io.BytesIO(upload.data)).size == (384, 256)
    assert degradations(client) == before + 1
    assert records.get(job["id"]).fields["attempts:generate"] == "1"
    # And the progress said why its step count started again
    events = [e for e in published(progress) if e.get("stage") == "generate"]
    [restart] = [i for i, e in enumerate(events) if e["event"] == "stage_restarted"]
    note = "out of GPU memory at quality high: running again at balanced"
    assert events[restart]["note"] == note
    steps_after = [e for e in events[restart:] if e["event"] == "step"]
    assert [e["step"] for e in steps_after] == [1, 2]
    assert all(e["note"] == note for e in steps_after)


def test_out_of_memory_at_every_preset_fails_naming_them_and_the_worker_goes_on(
    fault_stack: None, client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a `high` job that runs out of GPU memory at every preset
    job = job_with_id(OOM_ALWAYS, "image_high")

    # When it runs
    body = run(client, platform, job)

    # Then it fails once, naming the error and the presets tried in order
    assert body["status"] == "failed"
    assert body["metadata"]["error_type"] == "OutOfGpuMemory"
    assert body["metadata"]["error_stage"] == "generate"
    assert "every quality preset tried (high, balanced, fast)" in body["error_message"]
    assert [c.body["status"] for c in platform.callbacks_for(job["id"])] == [
        "processing",
        "failed",
    ]
    # And the next job completes on the same worker
    assert_a_job_still_completes(client, platform)


def test_a_step_hung_past_the_soft_limit_fails_naming_the_stage_and_the_limit(
    fault_stack: None, client: redis.Redis, records: JobRecords, platform: LocalPlatform
) -> None:
    # Given a job whose first denoising step never ends
    job = job_with_id(HANG, "image_fast")

    # When it runs past generation's soft time limit
    body = run(client, platform, job)

    # Then it fails, saying which stage ran past which limit and which setting sets it
    assert body["status"] == "failed"
    assert body["metadata"]["error_type"] == "StageTimedOut"
    assert body["metadata"]["error_stage"] == "generate"
    assert body["error_message"] == (
        f"generate ran past its soft time limit of {SOFT_LIMIT_S} s (GENERATE_SOFT_LIMIT_S)"
    )
    record = records.get(job["id"])
    assert (record.status, record.fields["error_type"]) == ("failed", "StageTimedOut")
    # And the next job completes (the pool child survived it)
    assert_a_job_still_completes(client, platform)


def test_a_worker_given_a_malformed_fault_rule_refuses_to_start_naming_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    # Given a typo in the action of a rule
    worker = LocalStack(env | {"WAN_TEST_FAULT": "x-:boom@step1"}, log_dir=tmp_path,
                        names=("gpu",))  # fmt: skip

    # When the generation worker starts, it stops at once with the rule it could not read
    try:
        with pytest.raises(RuntimeError, match="gpu exited with 1") as refused:
            worker.start(timeout_s=JOB_TIMEOUT_S)
    finally:
        worker.stop()
    assert "WAN_TEST_FAULT: malformed rule 'x-:boom@step1'" in str(refused.value)


# --- No stack: the settings, the fault rules, the order of presets ------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("HARD_LIMIT_GRACE_S", "0"), ("HARD_LIMIT_GRACE_S", "-5"), ("GENERATE_SOFT_LIMIT_S", "0"),
     ("UPLOAD_SOFT_LIMIT_S", "-1")],
)  # fmt: skip
def test_a_time_limit_setting_that_would_put_soft_at_or_above_hard_or_at_zero_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_every_stage_has_a_soft_limit_below_its_hard_one_from_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GENERATE_SOFT_LIMIT_S", "20")
    monkeypatch.setenv("HARD_LIMIT_GRACE_S", "3")
    limits = Settings().stage_time_limits()
    assert limits["generate"] == (20, 23)
    assert set(limits) == {"enhance", "generate", "encode", "thumbnail", "upload", "callback"}
    assert all(0 < soft < hard for soft, hard in limits.values())


def test_fault_rules_accept_the_documented_forms() -> None:
    assert faults.parse(" a-:crash@step1 ; b-:oom@step3/high;c-:hang@bridge_taken;") == (
        faults.Rule("a-", "crash", "step1"),
        faults.Rule("b-", "oom", "step3", "high"),
        faults.Rule("c-", "hang", "bridge_taken"),
    )
    assert faults.parse("") == ()


@pytest.mark.parametrize("rule", ["x-:boom@step1", "x-:oom", "x-oom@step1", "x-:oom@", ":@"])
def test_a_malformed_fault_rule_is_refused_naming_it(rule: str) -> None:
    with pytest.raises(ValueError, match=rf"WAN_TEST_FAULT: malformed rule '{rule}'"):
        faults.parse(f"ok-:crash@step1;{rule}")


def fake_body(quality: str, **config: Any) -> dict[str, Any]:
    return {"id": "j1", "user_id": "u1", "type": "video_fast", "prompt": "p",
            "quality": quality, "config": config}  # fmt: skip


def out_of_memory_at(*presets: PresetName) -> tuple[list[Job], Any]:
    """A stand-in pipeline run: out of memory at `presets`; the jobs it was asked to run."""
    runs: list[Job] = []

    def attempt(job: Job) -> Generated:
        runs.append(job)
        if job.quality in presets:
            raise torch.OutOfMemoryError(f"no room at {job.quality}")
        return Generated(frames=np.zeros((1, 16, 16, 3), np.uint8))

    return runs, attempt


def test_out_of_memory_falls_back_high_then_balanced_then_fast_with_their_steps() -> None:
    runs, attempt = out_of_memory_at("high", "balanced")
    degraded: list[tuple[str, str]] = []

    produced = generate_within_memory(
        parse_job(fake_body("high")), attempt, on_degrade=lambda a, b: degraded.append((a, b))
    )

    assert [(j.quality, j.steps, j.guidance) for j in runs] == [
        ("high", 50, 7.5),
        ("balanced", 35, 7.0),
        ("fast", 25, 6.5),
    ]
    assert degraded == [("high", "balanced"), ("balanced", "fast")]
    assert produced.asset_metadata() == {"quality_used": "fast", "degraded_from": "high"}


def test_a_job_own_steps_and_guidance_stay_at_a_lower_preset() -> None:
    runs, attempt = out_of_memory_at("high")
    job = parse_job(fake_body("high", num_inference_steps=4, guidance_scale=3.0))

    produced = generate_within_memory(job, attempt)

    assert [(j.quality, j.steps, j.guidance) for j in runs] == [
        ("high", 4, 3.0),
        ("balanced", 4, 3.0),
    ]
    assert produced.asset_metadata() == {"quality_used": "balanced", "degraded_from": "high"}


def test_a_job_at_fast_out_of_memory_fails_at_once() -> None:
    runs, attempt = out_of_memory_at("fast")

    with pytest.raises(OutOfGpuMemory, match=r"tried \(fast\); last error: no room at fast"):
        generate_within_memory(parse_job(fake_body("fast")), attempt)

    assert [j.quality for j in runs] == ["fast"]


def test_a_job_that_fits_says_its_own_preset_was_used() -> None:
    _, attempt = out_of_memory_at()
    assert generate_within_memory(parse_job(fake_body("high")), attempt).asset_metadata() == {
        "quality_used": "high"
    }


def test_a_job_recorded_before_quality_was_kept_runs_at_its_type_preset() -> None:
    # Given a `video_high` job as a worker of the previous release recorded it
    recorded = parse_job(fake_body("high") | {"type": "video_high"}).model_dump(mode="json")
    del recorded["quality"]

    # Then it is read back at `high`, so running out of memory falls back from there
    assert Job.model_validate(recorded).quality == "high"
