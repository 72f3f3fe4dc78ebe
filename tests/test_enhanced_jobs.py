"""Enhanced job types through real workers: the rewrite WAN receives, each fallback, the cache.

A stack of its own (gpu and cpu workers and the bridge on a Redis database of its own)
takes one enhancement worker at a time, started with the settings each case needs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import JOB_TIMEOUT_S, new_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, wait_until
from worker.local.tiny_qwen import ENHANCED_TEXT, make_tiny_qwen

QUEUE = "wan_queue_enhanced"


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str]) -> dict[str, str]:
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/6"
    return stack_env | {"REDIS_URL": db, "PLATFORM_REDIS_URL": db, "PLATFORM_QUEUE": QUEUE}


@pytest.fixture(scope="module")
def base_stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    log_dir = tmp_path_factory.mktemp("enhanced-logs")
    with LocalStack(env, log_dir=log_dir, names=("gpu", "cpu", "bridge")):
        yield


@contextmanager
def enhancement_worker(env: dict[str, str], log_dir: Path, **settings: str) -> Iterator[LocalStack]:
    """An enhancement worker with `settings` (a value of None removes the variable)."""
    worker_env = {k: v for k, v in (env | settings).items() if v is not None}
    worker = LocalStack(worker_env, log_dir=log_dir, names=("enhance",)).start()
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def client(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["REDIS_URL"])


def run(client: redis.Redis, platform: LocalPlatform, job: dict) -> dict:
    client.rpush(QUEUE, queue_body(job))
    return platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body


def wan_prompt(client: redis.Redis, job_id: str) -> str:
    """The prompt WAN received, from the job record."""
    return JobRecords(client, ttl_s=60).get(job_id).value("generation")["prompt"]


def pixels(platform: LocalPlatform, body: dict) -> np.ndarray:
    upload = platform.upload_at("workspace-temp", body["assets"][0]["url"])
    assert upload is not None
    return np.asarray(Image.open(io.BytesIO(upload.data)))


def test_wan_receives_the_enhanced_prompt(
    base_stack: None, env: dict, client: redis.Redis, platform: LocalPlatform, tmp_path: Path
) -> None:
    # Given an enhanced image job, and plain jobs with the same seed for comparison
    enhanced = new_job("image7b_fast_enhanced", prompt="a cat asleep on a windowsill")
    as_rewritten = new_job("image_fast", prompt=ENHANCED_TEXT)
    as_given = new_job("image_fast", prompt="a cat asleep on a windowsill")

    with enhancement_worker(env, tmp_path):
        body = run(client, platform, enhanced)
        same, other = run(client, platform, as_rewritten), run(client, platform, as_given)

    # Then the callback says what Qwen wrote, and WAN drew exactly that prompt
    assert body["status"] == "completed"
    metadata = body["metadata"]
    assert metadata["enhancement_applied"] is True
    assert metadata["enhanced_prompt"] == ENHANCED_TEXT
    assert metadata["original_prompt"] == "a cat asleep on a windowsill"
    assert metadata["enhancement_model"] == Path(env["QWEN_MODEL_PATH"]).name
    assert metadata["enhancement_seconds"] > 0 and metadata["enhancement_cached"] is False
    assert wan_prompt(client, enhanced["id"]) == ENHANCED_TEXT
    assert np.array_equal(pixels(platform, body), pixels(platform, same))
    assert not np.array_equal(pixels(platform, body), pixels(platform, other))


def test_a_repeated_enhancement_is_served_from_the_cache(
    base_stack: None, env: dict, client: redis.Redis, platform: LocalPlatform, tmp_path: Path
) -> None:
    first = new_job("image7b_fast_enhanced", prompt="waves breaking on black sand")
    again = new_job("image7b_fast_enhanced", prompt="waves breaking on black sand")

    with enhancement_worker(env, tmp_path) as worker:
        one, two = run(client, platform, first), run(client, platform, again)
        generations = worker.log("enhance").count("Qwen generated")

    assert one["metadata"]["enhancement_cached"] is False
    assert two["metadata"]["enhancement_cached"] is True
    assert two["metadata"]["enhanced_prompt"] == one["metadata"]["enhanced_prompt"]
    assert generations == 1


@pytest.fixture(scope="module")
def broken_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broken-qwen")
    (path / "config.json").write_text("{ this is not json")
    return path


@pytest.fixture(scope="module")
def terse_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen(tmp_path_factory.mktemp("terse") / "terse-qwen", continuation="ok.")


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"QWEN_MODEL_PATH": None}, "no_model"),
        ({"QWEN_MODEL_PATH": "terse"}, "rejected_output"),
        ({"ENHANCE_TIMEOUT_S": "0.001"}, "timeout"),
        ({"QWEN_MODEL_PATH": "broken"}, "error"),
    ],
)
def test_each_fallback_completes_the_job_with_the_users_prompt_and_says_why(
    base_stack: None, env: dict, client: redis.Redis, platform: LocalPlatform, tmp_path: Path,
    broken_qwen: Path, terse_qwen: Path, settings: dict, reason: str,
) -> None:  # fmt: skip
    paths = {"terse": str(terse_qwen), "broken": str(broken_qwen)}
    settings = {k: paths.get(v, v) if v else v for k, v in settings.items()}
    job = new_job("image7b_high_enhanced", prompt=f"a lighthouse in a storm ({reason})")

    with enhancement_worker(env, tmp_path, **settings):
        body = run(client, platform, job)

    assert body["status"] == "completed"
    metadata = body["metadata"]
    assert metadata["enhancement_applied"] is False
    assert metadata["enhancement_fallback_reason"] == reason
    assert metadata["enhancement_fallback_detail"]
    assert "enhanced_prompt" not in metadata
    assert wan_prompt(client, job["id"]) == job["prompt"]


def test_an_idle_qwen_is_unloaded_and_reloaded_for_the_next_job(
    base_stack: None, env: dict, client: redis.Redis, platform: LocalPlatform, tmp_path: Path
) -> None:
    with enhancement_worker(env, tmp_path, ENHANCE_IDLE_UNLOAD_S="1") as worker:
        run(client, platform, new_job("image7b_fast_enhanced", prompt="a fox at dusk"))
        wait_until(
            lambda: "Qwen unloaded after" in worker.log("enhance"), timeout_s=30, what="unload"
        )
        body = run(client, platform, new_job("image7b_fast_enhanced", prompt="a fox at dawn"))
        loads = worker.log("enhance").count("Qwen loaded from")

    assert body["metadata"]["enhancement_applied"] is True
    assert loads == 2


def test_a_small_box_runs_wan_and_qwen_in_one_worker(
    stack_env: dict[str, str], platform: LocalPlatform, tmp_path: Path
) -> None:
    # Given one worker on -Q gpu,enhance (README: "One worker for a small box")
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/4"
    queue = "wan_queue_small_box"
    env = stack_env | {"REDIS_URL": db, "PLATFORM_REDIS_URL": db, "PLATFORM_QUEUE": queue}
    box = LocalStack(env, log_dir=tmp_path, names=("gpu+enhance", "cpu", "bridge")).start()
    client = redis.Redis.from_url(db)
    job = new_job("video7b_fast_enhanced", prompt="a paper boat on a stream")
    try:
        client.rpush(queue, queue_body(job))
        body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
        log = box.log("gpu+enhance")
    finally:
        box.stop()

    # Then the job completes with Qwen's prompt, both models loaded in that one worker
    assert body["status"] == "completed"
    assert body["metadata"]["enhanced_prompt"] == ENHANCED_TEXT
    assert "Qwen loaded from" in log and "WAN pipeline loaded from" in log
