"""Priority lanes, fair share and promotion: the order in which generations start.

The unit tests compute priority steps and promote messages against a real Redis with real
Celery messages. The stack tests run the workers and the bridge on a private redis-server:
a first video (`hold-`) hangs at its first denoising step until GENERATE_SOFT_LIMIT_S ends
it, so the GPU is busy while the other jobs queue up; the order of their `generate` starts
is read from the job records.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tasks.generate import generate
from tests.conftest import (
    JOB_TIMEOUT_S,
    api_url,
    celery_broker,
    module_env,
    new_job,
    sent_job_ids,
)
from tests.test_load import TINY_CONFIG
from worker.flow.lanes import WaitingJobs, promote_overdue, queue_depth
from worker.jobs.model import Job, parse_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import FULL_STACK, LocalStack, RedisServer, free_port, wait_until
from worker.settings import Settings

QUEUE = "lanes_queue"
#: How long the `hold-` video keeps the GPU busy: every other job is queued well before.
HOLD_S = 20
#: The promotion time of the starvation test (production: 600 s).
SHORT_PROMOTE_S = 3


@pytest.fixture(scope="module")
def lanes_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("lanes-redis")).start()
    yield server
    server.stop()


def tiny(job_type: str, user_id: str, prefix: str = "") -> dict[str, Any]:
    """The cheapest job of a type, for one user."""
    job = new_job(job_type, id=f"{prefix}{uuid.uuid4()}", user_id=user_id)
    job["config"] |= TINY_CONFIG
    return job


# --- Priority steps and promotion, against Redis -------------------------------------------


@pytest.fixture
def broker(lanes_redis: RedisServer) -> Iterator[redis.Redis]:
    """This process's Celery app on a database of the private Redis no worker consumes."""
    with celery_broker(lanes_redis.db_url(1)) as client:
        yield client


def waiting(broker: redis.Redis, **settings: Any) -> WaitingJobs:
    return WaitingJobs(broker, Settings(**settings))


def job(job_type: str, user_id: str) -> Job:
    return parse_job(tiny(job_type, user_id))


def test_a_users_nth_waiting_job_goes_behind_every_other_users_first(
    broker: redis.Redis,
) -> None:
    lanes = waiting(broker)
    # Images take steps 1-4, videos 5-9; each more waiting job of a user one step lower
    assert [lanes.enter(job("image_fast", "a")) for _ in range(6)] == [1, 2, 3, 4, 4, 4]
    assert lanes.enter(job("image_fast", "b")) == 1
    assert [lanes.enter(job("video_fast", "a")) for _ in range(2)] == [5, 6]
    assert lanes.enter(job("video_fast", "b")) == 5


def test_a_users_next_job_never_goes_above_their_previous_waiting_one(
    broker: redis.Redis,
) -> None:
    # Given user a's images at steps 1, 2, 3, of which the first two start generating
    lanes = waiting(broker)
    first, second, third = (job("image_fast", "a") for _ in range(3))
    assert [lanes.enter(j) for j in (first, second, third)] == [1, 2, 3]
    lanes.leave(first)
    lanes.leave(second)
    # Then a's next image waits behind the third (same step: one list is FIFO), not at 2
    assert lanes.enter(job("image_fast", "a")) == 3
    # And a job sent again while it waits keeps its step
    assert lanes.enter(third) == 3


def test_without_lanes_or_fair_share_jobs_share_steps(broker: redis.Redis) -> None:
    no_lanes = waiting(broker, priority_lanes=False)
    assert [no_lanes.enter(job(t, "a")) for t in ("video_fast", "image_fast")] == [1, 2]
    broker.flushdb()
    no_fair_share = waiting(broker, fair_share=False)
    assert [no_fair_share.enter(job("image_fast", "a")) for _ in range(3)] == [1, 1, 1]
    assert no_fair_share.enter(job("video_fast", "a")) == 5


def send_generate(records: JobRecords, settings: Settings, body: dict[str, Any]) -> None:
    """What the enhance stage does for a dispatched job: its generate message, prioritised."""
    parsed = parse_job(body)
    records.create(parsed, payload="{}")
    step = WaitingJobs(records.redis, settings).enter(parsed)
    generate.apply_async((parsed.id,), task_id=f"{parsed.id}:generate", priority=step)


def test_a_job_waiting_past_promote_after_s_is_taken_next_once_however_many_sweep(
    broker: redis.Redis,
) -> None:
    settings = Settings(promote_after_s=0.5)
    records = JobRecords(broker, ttl_s=600)
    # Given a video waiting past PROMOTE_AFTER_S, then two images
    video = tiny("video_fast", "v")
    send_generate(records, settings, video)
    lanes = WaitingJobs(broker, settings)
    wait_until(lambda: lanes.overdue(settings.promote_after_s) == [video["id"]],
               timeout_s=JOB_TIMEOUT_S, what="the video overdue")  # fmt: skip
    images = [tiny("image_fast", f"i{n}") for n in range(2)]
    for image in images:
        send_generate(records, settings, image)
    assert sent_job_ids(broker, "gpu") == [images[0]["id"], images[1]["id"], video["id"]]

    # When four sweepers run at once
    sweepers = [
        threading.Thread(target=promote_overdue, args=(records, settings)) for _ in range(4)
    ]
    for sweeper in sweepers:
        sweeper.start()
    for sweeper in sweepers:
        sweeper.join()

    # Then the video is taken next, and every message is there once
    assert sent_job_ids(broker, "gpu") == [video["id"], images[0]["id"], images[1]["id"]]
    assert queue_depth(broker, "gpu") == 3


# --- Order of generation starts in a running stack ------------------------------------------


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], lanes_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return module_env(
        stack_env,
        tmp_path_factory,
        "lanes",
        redis_url=lanes_redis.url,
        queue=QUEUE,
        settings={
            "API_PORT": str(free_port()),
            "WAN_TEST_FAULT": "hold-:hang@step1",
            "GENERATE_SOFT_LIMIT_S": str(HOLD_S),
            # The model loaded before the first job: its load (which took over HOLD_S on a
            # loaded machine) is no part of the hold.
            "WARMUP": "1",
        },
    )


@pytest.fixture(scope="module")
def lanes_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("lanes-logs"), names=FULL_STACK) as local:
        yield local


def hold_gpu(client: redis.Redis, records: JobRecords) -> dict[str, Any]:
    """Push a video that hangs in generation for HOLD_S; return once it is denoising."""
    held = tiny("video_fast", "holder", prefix="hold-")
    client.rpush(QUEUE, queue_body(held))
    wait_until(
        lambda: (records.get(held["id"]).value("progress") or {}).get("step", 0) >= 1,
        timeout_s=JOB_TIMEOUT_S,
        what="the held video's first step",
    )
    return held


def push_waiting(
    client: redis.Redis, records: JobRecords, held: dict[str, Any], jobs: list[dict[str, Any]]
) -> None:
    """Push jobs behind the held one; return once all their generate messages wait."""
    for queued in jobs:
        client.rpush(QUEUE, queue_body(queued))
    wait_until(lambda: queue_depth(client, "gpu") == len(jobs), timeout_s=JOB_TIMEOUT_S,
               what="the generate messages")  # fmt: skip
    assert "finished:generate" not in records.get(held["id"]).fields, "the GPU freed too soon"


def generation_starts(
    platform: LocalPlatform, records: JobRecords, jobs: list[dict[str, Any]]
) -> list[str]:
    """The jobs' ids in the order their generation started, once all completed."""
    for finished in jobs:
        final = platform.wait_for_final(finished["id"], timeout_s=JOB_TIMEOUT_S + HOLD_S)
        assert final.body["status"] == "completed"
    started = {j["id"]: records.get(j["id"]).first_started("generate") for j in jobs}
    return sorted(started, key=lambda job_id: started[job_id])


def test_an_image_starts_before_waiting_videos(
    lanes_stack: LocalStack,
    env: dict[str, str],
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given a video generating and three videos, then an image, waiting (each of another
    # user: lanes alone order them)
    held = hold_gpu(client, records)
    videos = [tiny("video_fast", f"video-user-{n}") for n in range(3)]
    image = tiny("image_fast", "image-user")
    push_waiting(client, records, held, [*videos, image])

    # Then /metrics shows what an autoscaler scales on: the waiting jobs per lane, and how
    # long the oldest has waited
    text = httpx.get(f"{api_url(env)}/metrics", timeout=10).text
    assert 'wan_lane_waiting_jobs{lane="video"} 3.0' in text
    assert 'wan_lane_waiting_jobs{lane="image"} 1.0' in text
    assert 'wan_queue_depth{queue="gpu"} 4.0' in text
    oldest = next(line for line in text.splitlines() if line.startswith(
        'wan_lane_oldest_wait_seconds{lane="video"}'))  # fmt: skip
    assert float(oldest.split()[-1]) > 0

    # When the running video ends, the image starts next, then the videos in their order
    assert generation_starts(platform, records, [*videos, image]) == [
        image["id"], *(v["id"] for v in videos)
    ]  # fmt: skip
    # And nothing waits any more
    text = httpx.get(f"{api_url(env)}/metrics", timeout=10).text
    assert 'wan_lane_waiting_jobs{lane="video"} 0.0' in text


def test_a_light_users_job_starts_before_a_heavy_users_third(
    lanes_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, records: JobRecords
) -> None:
    # Given the GPU busy, user A pushes 8 images, then user B one
    held = hold_gpu(client, records)
    heavy = [tiny("image_fast", "user-a") for _ in range(8)]
    light = tiny("image_fast", "user-b")
    push_waiting(client, records, held, [*heavy, light])

    # Then B's job starts before A's third, and A's start in A's order
    order = generation_starts(platform, records, [*heavy, light])
    assert order.index(light["id"]) < order.index(heavy[2]["id"])
    assert [job_id for job_id in order if job_id != light["id"]] == [j["id"] for j in heavy]


@pytest.fixture
def promoting_gpu(lanes_stack: LocalStack) -> Iterator[None]:
    """The generation worker with PROMOTE_AFTER_S shortened, for one test."""
    lanes_stack.kill("gpu")
    lanes_stack.restart("gpu", env={"PROMOTE_AFTER_S": str(SHORT_PROMOTE_S)})
    yield
    lanes_stack.kill("gpu")
    lanes_stack.restart("gpu", env={})


def test_a_video_waiting_past_promote_after_s_starts_before_waiting_images(
    lanes_stack: LocalStack,
    promoting_gpu: None,
    platform: LocalPlatform,
    client: redis.Redis,
    records: JobRecords,
) -> None:
    # Given the GPU busy, a video waiting, then images arriving after it (at once: the hold
    # must outlast their dispatch and the video's promotion)
    held = hold_gpu(client, records)
    video = tiny("video_fast", "video-user")
    images = [tiny("image_fast", f"image-user-{n}") for n in range(4)]
    push_waiting(client, records, held, [video])
    for image in images:
        client.rpush(QUEUE, queue_body(image))
    wait_until(lambda: queue_depth(client, "gpu") == 1 + len(images), timeout_s=JOB_TIMEOUT_S,
               what="the images' generate messages")  # fmt: skip

    # When the running video ends: the waiting video, promoted after PROMOTE_AFTER_S, starts
    # before every image, though images stand ahead of videos
    order = generation_starts(platform, records, [video, *images])
    assert order == [video["id"], *(i["id"] for i in images)]
    assert f"job={video['id']} waited longer than PROMOTE_AFTER_S" in lanes_stack.log("gpu")
