"""Image batches in a running stack (IMAGE_BATCH_MAX=4): compatible image jobs that wait
while the GPU is busy run in one pipeline call each four, and each stays its own job.

The stack runs on a Redis of its own. A first video (`hold-`) hangs at its first denoising
step until GENERATE_SOFT_LIMIT_S ends it, so the images queue up behind it; `slow-` jobs
pause at their first step, so a test acts on a batch while it runs.
"""

from __future__ import annotations

import io
import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from tasks.chain import SENDER
from tests.conftest import JOB_TIMEOUT_S, api_url, module_env, new_job
from tests.test_load import TINY_CONFIG
from worker.flow.job_control import cancel
from worker.flow.lanes import queue_depth
from worker.jobs.model import BUCKET, parse_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, LocalStack, RedisServer, free_port, wait_until
from worker.settings import Settings

#: About four minutes with its own stack: started first (tests/conftest.py).
pytestmark = pytest.mark.runs_long

QUEUE = "batches_queue"
BATCH_MAX = 4
#: How long the `hold-` video keeps the GPU busy: every image is queued well before.
HOLD_S = 20
#: How long a `slow-` job's batch pauses at its first step: time to act on it.
SLOW_S = 6
#: The most a batched image's pixels may differ from the same job made alone, on average
#: (uint8): a batched matmul sums in another order, and the random-weight model amplifies
#: that at a few pixels (one differed by 64 in a CI run); another job's image differs by tens.
MAX_MEAN_DIFFERENCE = 1.0
#: The least an image differs from another job's, on average (another seed and prompt).
MIN_MEAN_DIFFERENCE_FROM_OTHERS = 10.0


@pytest.fixture(scope="module")
def batches_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("batches-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str],
    batches_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    return module_env(
        stack_env, tmp_path_factory, "batches", redis_url=batches_redis.url, queue=QUEUE,
        settings={
            "API_PORT": str(free_port()),
            "IMAGE_BATCH_MAX": str(BATCH_MAX),
            "WAN_TEST_FAULT": f"hold-:hang@step1;slow-:pause{SLOW_S}@step1",
            "GENERATE_SOFT_LIMIT_S": str(HOLD_S),
            "WARMUP": "1",
            # the jobs a killed pool child held come back within seconds (its worker puts
            # the message it ran back; the others' stage leases run out)
            "STAGE_LEASE_S": "6",
            "LOST_JOB_TIMEOUT_S": "10",
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def batches_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("batches-logs"),
                    names=FULL_STACK) as local:  # fmt: skip
        yield local


def image(user: str, *, prefix: str = "", **config: Any) -> dict[str, Any]:
    job = new_job("image_fast", id=f"{prefix}{uuid.uuid4()}", user_id=user,
                  prompt=f"a red fox number {uuid.uuid4().hex[:6]}")  # fmt: skip
    job["config"] |= TINY_CONFIG | {"seed": int(uuid.uuid4().int % 10_000)} | config
    return job


def hold_gpu(client: redis.Redis, records: JobRecords) -> dict[str, Any]:
    """Push a video that hangs in generation for HOLD_S; return once it is denoising."""
    held = new_job("video_fast", id=f"hold-{uuid.uuid4()}", user_id="holder")
    held["config"] |= TINY_CONFIG
    client.rpush(QUEUE, queue_body(held))
    wait_until(lambda: (records.get(held["id"]).value("progress") or {}).get("step", 0) >= 1,
               timeout_s=JOB_TIMEOUT_S, what="the held video's first step")  # fmt: skip
    return held


def push_behind(client: redis.Redis, jobs: list[dict[str, Any]]) -> None:
    """Push jobs while the GPU is held; return once all their generate messages wait."""
    for queued in jobs:
        client.rpush(QUEUE, queue_body(queued))
    wait_until(lambda: queue_depth(client, "gpu") == len(jobs), timeout_s=JOB_TIMEOUT_S,
               what="the generate messages")  # fmt: skip


def final_statuses(platform: LocalPlatform, jobs: list[dict[str, Any]]) -> dict[str, str]:
    return {job["id"]: platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S + HOLD_S)
            .body["status"] for job in jobs}  # fmt: skip


def batch_of(records: JobRecords, job_id: str) -> str | None:
    return ((records.get(job_id).value("generation") or {}).get("metadata") or {}).get("batch_id")


@pytest.fixture
def client(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["REDIS_URL"])


@pytest.fixture
def records(client: redis.Redis) -> JobRecords:
    return JobRecords(client, ttl_s=600)


def test_eight_waiting_images_run_in_two_batches_each_its_own_job(
    batches_stack: LocalStack,
    env: dict[str, str],
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
    tiny_wan: Path,
) -> None:
    # Given the GPU busy, eight compatible images of eight users, each its prompt and seed
    hold_gpu(client, records)
    images = [image(f"user-{n}") for n in range(8)]
    push_behind(client, images)

    # Then all complete, in two pipeline calls of four
    assert set(final_statuses(platform, images).values()) == {"completed"}
    batches = Counter(batch_of(records, job["id"]) for job in images)
    assert sorted(batches.values()) == [4, 4] and None not in batches
    text = httpx.get(f"{api_url(env)}/metrics", timeout=10).text
    assert "wan_batch_size_count 2.0" in text
    assert "wan_images_per_second{" in text

    # And each is its own job: one completed callback with its own seed and prompt, its
    # batch in its metadata, and the pixels it gets made alone
    from worker.generation import Pipelines, generate

    alone = Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))
    previous: np.ndarray | None = None  # the image made alone of the job before
    for job in images:
        [done] = [c for c in platform.callbacks_for(job["id"]) if c.body["status"] == "completed"]
        metadata = done.body["metadata"]
        assert done.body["assets"][0]["metadata"]["seed"] == job["config"]["seed"]
        assert metadata["provenance"]["prompt"] == job["prompt"]
        assert metadata["batch_size"] == 4 == metadata["provenance"]["batch_size"]
        upload = platform.upload_at(BUCKET, done.body["assets"][0]["url"])
        assert upload is not None
        made = np.asarray(Image.open(io.BytesIO(upload.data)).convert("RGB")).astype(int)
        reference = generate(alone, parse_job(job), seed=job["config"]["seed"],
                             references={}).frames[0].astype(int)  # fmt: skip
        assert np.abs(made - reference).mean() <= MAX_MEAN_DIFFERENCE
        if previous is not None:
            assert np.abs(made - previous).mean() >= MIN_MEAN_DIFFERENCE_FROM_OTHERS
        previous = reference


def test_images_of_another_size_or_steps_are_not_batched_together(
    batches_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    hold_gpu(client, records)
    small = [image(f"small-{n}") for n in range(2)]
    wide = [image(f"wide-{n}", resolution="256x448") for n in range(2)]
    longer = [image(f"longer-{n}", num_inference_steps=2) for n in range(2)]
    push_behind(client, [small[0], wide[0], longer[0], small[1], wide[1], longer[1]])

    assert set(final_statuses(platform, small + wide + longer).values()) == {"completed"}
    for group in (small, wide, longer):
        batch = {batch_of(records, job["id"]) for job in group}
        assert len(batch) == 1 and None not in batch, group
    assert len({batch_of(records, group[0]["id"]) for group in (small, wide, longer)}) == 3


def test_fair_share_a_light_users_image_is_in_the_first_batch(
    batches_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    hold_gpu(client, records)
    heavy = [image("user-a") for _ in range(8)]
    light = image("user-b")
    push_behind(client, [*heavy, light])

    assert set(final_statuses(platform, [*heavy, light]).values()) == {"completed"}
    first = batch_of(records, heavy[0]["id"])
    assert batch_of(records, light["id"]) == first
    # B's one job taken, A fills the rest: nobody else waits
    assert [batch_of(records, job["id"]) for job in heavy[:3]] == [first] * 3


def test_cancel_one_job_of_a_running_batch_and_it_alone_is_cancelled(
    batches_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    hold_gpu(client, records)
    slow = image("slow-user", prefix="slow-")
    others = [image(f"other-{n}") for n in range(3)]
    push_behind(client, [slow, *others])
    # When the batch pauses at its first step, one of its jobs is cancelled
    target = others[1]
    wait_until(lambda: (records.get(target["id"]).value("progress") or {}).get("step", 0) >= 1,
               timeout_s=JOB_TIMEOUT_S + HOLD_S, what="the batch's first step")  # fmt: skip
    assert records.get(target["id"]).fields.get("batch:generate") is not None
    cancel(records, target["id"], sender=SENDER)

    # Then it alone is cancelled, once; the others complete
    statuses = final_statuses(platform, [slow, *others])
    assert statuses.pop(target["id"]) == "cancelled"
    assert set(statuses.values()) == {"completed"}
    assert [c.body["status"] for c in platform.callbacks_for(target["id"])
            if c.body["status"] != "processing"] == ["cancelled"]  # fmt: skip
    # ... at its generation: the batch dropped its result
    cancelled = records.get(target["id"])
    assert cancelled.fields["cancelled_stage"] == "generate"
    assert cancelled.value("generation") is None


def test_the_generation_child_killed_mid_batch_every_job_completes_once(
    batches_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    hold_gpu(client, records)
    jobs = [image("slow-user", prefix="slow-"), *(image(f"kill-{n}") for n in range(3))]
    push_behind(client, jobs)
    wait_until(lambda: all((records.get(j["id"]).value("progress") or {}).get("step", 0) >= 1
                           for j in jobs),
               timeout_s=JOB_TIMEOUT_S + HOLD_S, what="the batch's first step")  # fmt: skip
    # When the generation worker's pool child is killed, as the OOM killer would
    [child] = batches_stack.pids("gpu")[1:]
    os.kill(child, signal.SIGKILL)

    # Then each job completes, once: the head redelivered, the others from their own messages

    assert set(final_statuses(platform, jobs).values()) == {"completed"}
    for job in jobs:
        finals = [c for c in platform.callbacks_for(job["id"]) if c.body["status"] == "completed"]
        assert len(finals) == 1, job["id"]
