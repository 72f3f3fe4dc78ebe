"""Faults of the platform and of the machines, through a stack of their own.

The stack runs the production commands on a Redis database and platform list of its own,
with a short DELIVERY_RETRY_WINDOW_S, so a platform that stays down outlasts the window
within a test. Assertions read what the platform got, the job record and the spool.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, module_env, new_job
from tests.test_job_control import cli
from worker.jobs.model import parse_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until

QUEUE = "fault_queue"
#: Long enough for two refused attempts (backoff 2 s, full jitter: at most 2 + 4 s).
WINDOW_S = 10
#: More refusals than any job here makes within the window: "the platform stays down".
FOREVER = 10_000
#: How long another live run still holds a final callback that a delivery finds busy.
BUSY_S = 4


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "faults",
        redis_url=redis_server.db_url(2),
        queue=QUEUE,
        settings={"DELIVERY_RETRY_WINDOW_S": str(WINDOW_S)},
    )


@pytest.fixture(scope="module")
def fault_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("fault-logs")) as local:
        yield local


@pytest.fixture
def spool_dir(env: dict[str, str]) -> Path:
    return Path(env["SPOOL_DIR"])


@pytest.fixture
def platform_down(platform: LocalPlatform) -> Iterator[LocalPlatform]:
    """The platform, back to answering everything after the test, whatever it injected."""
    yield platform
    platform.fail_next_callbacks(0)
    platform.fail_next_uploads(0)


def test_a_final_callback_refused_past_the_window_leaves_the_job_marked_undelivered(
    fault_stack: LocalStack, platform_down: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    # Given the platform answers every callback with 503 from now on
    job = new_job("image_fast")
    platform_down.fail_next_callbacks(FOREVER)

    # When a job runs to its final callback
    pushed_at = time.monotonic()
    client.rpush(QUEUE, queue_body(job))
    wait_until(
        lambda: records.get(job["id"]).status == "delivery_failed",
        timeout_s=JOB_TIMEOUT_S + WINDOW_S,
        what="the final callback given up",
    )

    # Then it was tried again and again for the whole window, and the record says so: the
    # job itself did not fail, its result was never delivered, and why
    assert time.monotonic() - pushed_at >= WINDOW_S
    assert platform_down.rejected_callbacks_for(job["id"]).count("completed") >= 2
    assert platform_down.callbacks_for(job["id"]) == []
    record = records.get(job["id"])
    assert record.fields["delivery_error_stage"] == "callback"
    assert record.fields["delivery_error_type"] == "DeliveryFailed"
    error = record.fields["delivery_error"]
    assert f"DELIVERY_RETRY_WINDOW_S={WINDOW_S}" in error
    assert f"callback completed for job {job['id']}: HTTP 503" in error
    assert "will retry" not in error
    assert "error" not in record.fields and "final_callback" not in record.fields


def failed_job(records: JobRecords, **fields: str) -> str:
    """A job that failed in generation, its record as the stages leave it, plus `fields`."""
    job = parse_job(new_job("image_fast"))
    records.create(job, payload=job.model_dump_json())
    failed = {"status": "failed", "error": "the GPU caught fire", "error_stage": "generate",
              "error_type": "RuntimeError"}  # fmt: skip
    records.write(job.id, **(failed | fields))
    return job.id


def test_a_retried_undelivered_callback_has_a_window_of_its_own_and_rides_out_an_error(
    fault_stack: LocalStack, platform_down: LocalPlatform, records: JobRecords, env: dict[str, str]
) -> None:
    # Given a failed job whose `failed` callback was given up, its first attempt two
    # DELIVERY_RETRY_WINDOW_S ago
    long_ago = f"{records.now() - 2 * WINDOW_S:.6f}"
    job_id = failed_job(records, status="delivery_failed", delivery_error="HTTP 503",
                        delivery_error_stage="callback", delivery_error_type="DeliveryFailed",
                        **{"first_started:callback": long_ago, "started:callback": long_ago,
                           "attempts:callback": "3", "deliveries:callback": "1"})  # fmt: skip

    # When an operator retries it, and the platform answers its first attempt with a 503
    platform_down.fail_next_callbacks(1)
    retried = cli(env, "retry", job_id)
    assert retried.returncode == 0, retried.stderr

    # Then the callback is tried again within a window of its own, and delivered once
    def settled() -> bool:  # delivered, or given up again
        return bool(platform_down.callbacks_for(job_id)) or (
            "delivery_error" in records.get(job_id).fields
        )

    wait_until(settled, timeout_s=JOB_TIMEOUT_S, what="the retried callback delivered")
    assert [c.body["status"] for c in platform_down.callbacks_for(job_id)] == ["failed"]
    assert platform_down.rejected_callbacks_for(job_id) == ["failed"]


def test_a_callback_finding_a_live_run_after_its_window_waits_for_it_instead_of_looping(
    fault_stack: LocalStack, platform: LocalPlatform, records: JobRecords, env: dict[str, str]
) -> None:
    from tasks import app
    from tasks.media import callback

    # Given a failed job whose final callback another live run holds for BUSY_S more, its
    # delivery window long run out
    now = records.now()
    held = {"lease:callback": "another-host:1", "lease_pidns:callback": "another",
            "lease_until:callback": f"{now + BUSY_S:.6f}",
            "first_started:callback": f"{now - 2 * WINDOW_S:.6f}"}  # fmt: skip
    job_id = failed_job(records, **held)

    # When a delivery of the same callback reaches the media worker
    with app.connection_for_write(env["REDIS_URL"]) as connection:
        callback.apply_async((job_id, "failed"), task_id=f"{job_id}:callback:failed",
                             connection=connection)  # fmt: skip

    # Then it waits once for the lease to end, and is delivered once
    assert platform.wait_for_final(job_id, timeout_s=JOB_TIMEOUT_S).body["status"] == "failed"
    waits = [line for line in fault_stack.log("cpu").splitlines()
             if f"job={job_id} stage callback is running elsewhere" in line]  # fmt: skip
    assert len(waits) == 1
    assert [c.body["status"] for c in platform.callbacks_for(job_id)] == ["failed"]


def test_an_upload_refused_past_the_window_fails_the_job_and_frees_its_spool(
    fault_stack: LocalStack,
    platform_down: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
    spool_dir: Path,
) -> None:
    # Given storage answers every upload with 503 from now on
    job = new_job("video_fast")
    platform_down.fail_next_uploads(FOREVER)

    # When a job has generated its frames and tries to upload them
    client.rpush(QUEUE, queue_body(job))
    failed = platform_down.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S + WINDOW_S).body

    # Then after the window the job fails at the upload, saying so, and its spool is gone
    assert failed["status"] == "failed"
    assert failed["metadata"]["error_stage"] == "upload"
    assert failed["metadata"]["error_type"] == "DeliveryFailed"
    assert "given up after" in failed["error_message"]
    assert "HTTP 503" in failed["error_message"]
    assert "will retry" not in failed["error_message"]
    assert platform_down.rejected_uploads >= 2
    record = records.get(job["id"])
    assert (record.status, record.fields["error_stage"]) == ("failed", "upload")
    assert record.value("generation")["frame_num"] == 9  # it failed after generation
    assert not (spool_dir / job["id"]).exists()


def test_a_job_failing_for_good_after_generation_leaves_nothing_in_the_spool(
    fault_stack: LocalStack, platform_down: LocalPlatform, client: redis.Redis, spool_dir: Path
) -> None:
    # Given storage refuses the next upload for good (403 is not retried)
    job = new_job("video_fast")
    platform_down.fail_next_uploads(1, status=403)

    client.rpush(QUEUE, queue_body(job))
    failed = platform_down.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body

    assert (failed["status"], failed["metadata"]["error_stage"]) == ("failed", "upload")
    assert "HTTP 403" in failed["error_message"]
    assert spool_dir.is_dir()
    assert not (spool_dir / job["id"]).exists()


def test_a_platform_back_within_the_window_gets_the_result_once(
    fault_stack: LocalStack, platform_down: LocalPlatform, client: redis.Redis
) -> None:
    # Given the platform refuses three callbacks: `processing`, then the final one twice
    job = new_job("image_fast")
    platform_down.fail_next_callbacks(3)

    client.rpush(QUEUE, queue_body(job))
    final = platform_down.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S + WINDOW_S)

    assert final.body["status"] == "completed"
    assert platform_down.rejected_callbacks_for(job["id"]) == [
        "processing",
        "completed",
        "completed",
    ]
    assert [c.body["status"] for c in platform_down.callbacks_for(job["id"])] == ["completed"]


def test_a_generation_killed_mid_way_runs_again_with_the_seed_chosen_the_first_time(
    fault_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    # Given a job without a seed, long enough to be caught while denoising
    job = new_job("video_fast")
    del job["config"]["seed"]
    job["config"]["num_inference_steps"] = 16
    client.rpush(QUEUE, queue_body(job))

    def denoising() -> bool:
        progress = records.get(job["id"]).value("progress")
        return progress is not None and (progress.get("step") or 0) >= 1

    wait_until(denoising, timeout_s=JOB_TIMEOUT_S, what="denoising", interval_s=0.01)
    first_seed = records.get(job["id"]).value("seed")
    loads_before = fault_stack.log("gpu").count("WAN pipeline loaded")

    # When the generation worker's pool child is killed in the middle of it
    [child] = fault_stack.pids("gpu")[1:]
    os.kill(child, signal.SIGKILL)

    # Then the generation is delivered again (acks_late, reject_on_worker_lost) and the
    # result reports the seed chosen at the first delivery
    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    assert body["status"] == "completed"
    assert records.get(job["id"]).fields["attempts:generate"] == "2"
    assert isinstance(first_seed, int)
    assert body["assets"][0]["metadata"]["seed"] == first_seed
    # ... once, and only the new pool child loaded the model again
    finals = [c.body["status"] for c in platform.callbacks_for(job["id"])]
    assert finals.count("completed") == 1 and "failed" not in finals
    assert fault_stack.log("gpu").count("WAN pipeline loaded") == loads_before + 1
