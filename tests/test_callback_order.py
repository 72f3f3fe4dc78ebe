"""Callbacks through real workers: none after the final one, a wait for another run costs
no retry, and the service-role key stays with the Supabase project.

A stack of its own (its own redis-server; generation and enhancement on one worker, the
media worker, the bridge and the API) posts its callbacks to the local platform under
another name (`localhost`, not SUPABASE_URL's `127.0.0.1`) with CALLBACK_BEARER, with
progress callbacks on. Jobs whose id starts with SLOW hold each progress callback in flight
for PAUSE_S (WAN_TEST_FAULT: a slow network); references come from an ImageServer that can
hold a download open.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import (
    CALLBACK_BEARER,
    JOB_TIMEOUT_S,
    api_url,
    auth,
    module_env,
    new_job,
    settled,
)
from tests.test_reference_jobs import picture
from worker.jobs.records import JobRecords
from worker.local.image_server import ImageServer, Route
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, free_port, wait_until

QUEUE = "wan_queue_callbacks"
#: Jobs whose progress callbacks each stay in flight this long, seconds: longer than the
#: media stages take to send the final callback after the generation.
SLOW = "slow-progress-"
PAUSE_S = 6


@pytest.fixture(scope="module")
def callbacks_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("callbacks-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as server:
        yield server


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], callbacks_redis: RedisServer,
    platform_with_bearer: LocalPlatform, tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    return module_env(
        stack_env,
        tmp_path_factory,
        "callbacks",
        redis_url=callbacks_redis.url,
        queue=QUEUE,
        settings={
            **platform_with_bearer.worker_env(),
            "CALLBACK_URL": platform_with_bearer.other_origin_callback_url,
            "CALLBACK_BEARER": CALLBACK_BEARER,
            "API_PORT": str(free_port()),
            "PROGRESS_CALLBACKS": "true",
            "PROGRESS_CALLBACK_EVERY_S": "0",
            "REFERENCE_ALLOWED_HOSTS": "127.0.0.1",
            "REFERENCE_RETRIES": "1",
            "WAN_TEST_FAULT": f"{SLOW}:pause{PAUSE_S}@progress_callback",
        },
    )


@pytest.fixture(scope="module")
def callbacks_stack(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    names = ("gpu+enhance", "cpu", "bridge", "api")
    with LocalStack(env, log_dir=tmp_path_factory.mktemp("callbacks-logs"), names=names) as local:
        yield local


def statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    return [c.body["status"] for c in platform.callbacks_for(job_id)]


def image_to_image(images: ImageServer, path: str) -> dict[str, Any]:
    """A one-image job whose reference is `path` on the image server (no VACE needed)."""
    images.add(path, Route(picture(1), "image/png"))
    job = new_job("image_fast")
    job["config"] |= {"image": images.url(path), "pipeline": "img2img"}
    return job


def test_callbacks_to_another_origin_carry_callback_bearer_never_the_service_key(
    callbacks_stack: LocalStack, platform_with_bearer: LocalPlatform, client: redis.Redis
) -> None:
    # When a job runs with CALLBACK_URL outside SUPABASE_URL's origin
    job = new_job("image_fast")
    client.rpush(QUEUE, queue_body(job))
    final = platform_with_bearer.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    # Then every callback carried CALLBACK_BEARER and the signature, never the service key
    # (which that origin refuses), and each worker said so when it started
    assert final.body["status"] == "completed"
    for callback in platform_with_bearer.callbacks_for(job["id"]):
        assert callback.headers["authorization"] == f"Bearer {CALLBACK_BEARER}"
        assert callback.headers["x-callback-signature"].startswith("sha256=")
    origin = platform_with_bearer.other_origin_callback_url.removesuffix(
        "/functions/v1/job-callback"
    )
    said = (
        f"callbacks go to {origin}, not SUPABASE_URL's origin: they carry CALLBACK_BEARER as "
        "Bearer, never the service-role key"
    )
    assert said in callbacks_stack.log("cpu") and said in callbacks_stack.log("gpu+enhance")


def test_a_job_cancelled_during_its_reference_download_gets_no_processing_after_cancelled(
    callbacks_stack: LocalStack, platform_with_bearer: LocalPlatform, client: redis.Redis,
    records: JobRecords, images: ImageServer, env: dict[str, str],
) -> None:  # fmt: skip
    # Given a job whose generation is downloading its reference (still `queued`)
    job = image_to_image(images, "/held.png")
    released = images.hold("/held.png")
    try:
        client.rpush(QUEUE, queue_body(job))
        wait_until(lambda: images.requests_for("/held.png") > 0, timeout_s=JOB_TIMEOUT_S,
                   what="the reference download")  # fmt: skip

        # When it is cancelled: at once, its `cancelled` callback sent
        answer = httpx.post(f"{api_url(env)}/jobs/{job['id']}/cancel", headers=auth(), timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
        platform_with_bearer.wait_for_callback(job["id"], "cancelled", timeout_s=JOB_TIMEOUT_S)
    finally:
        released.set()  # and then the download ends

    # Then the generation stops before it starts: nothing follows the final callback
    wait_until(lambda: "lease:generate" not in records.get(job["id"]).fields,
               timeout_s=JOB_TIMEOUT_S, what="the generate stage ends")  # fmt: skip
    wait_until(lambda: settled(client, QUEUE), timeout_s=JOB_TIMEOUT_S, what="queues drained")
    assert statuses(platform_with_bearer, job["id"]) == ["cancelled"]
    record = records.get(job["id"])
    assert record.status == "cancelled" and "generation" not in record.fields


def test_a_progress_callback_still_in_flight_reaches_the_platform_before_completed(
    callbacks_stack: LocalStack, platform_with_bearer: LocalPlatform, client: redis.Redis
) -> None:
    # Given a job whose progress callbacks are slow to arrive (each in flight PAUSE_S)
    job = new_job("image_fast", id=f"{SLOW}{uuid.uuid4()}")

    # When it runs to the end
    client.rpush(QUEUE, queue_body(job))
    platform_with_bearer.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    def progress_arrived() -> bool:
        return any(
            c.body["status"] == "processing" and "metadata" in c.body
            for c in platform_with_bearer.callbacks_for(job["id"])
        )

    wait_until(progress_arrived, timeout_s=JOB_TIMEOUT_S, what="a progress callback")

    # Then the final callback came last: the platform saw the status only move forward
    sent = statuses(platform_with_bearer, job["id"])
    assert sent[-1] == "completed" and set(sent[:-1]) == {"processing"}, sent


def test_a_delivery_that_waited_for_another_run_keeps_its_reference_retries(
    callbacks_stack: LocalStack, platform_with_bearer: LocalPlatform, client: redis.Redis,
    records: JobRecords, images: ImageServer,
) -> None:  # fmt: skip
    # Given a job whose reference fails once (HTTP 503; REFERENCE_RETRIES=1), and whose
    # generate stage another live run holds (the test renews that run's lease)
    job = image_to_image(images, "/flaky-after-wait.png")
    images.fail_next("/flaky-after-wait.png", [503])
    key = records.key(job["id"])
    lease = ("lease:generate", "lease_until:generate", "lease_pidns:generate")

    def hold_lease() -> None:
        until = f"{records.now() + 2:.6f}"
        client.hset(key, mapping=dict(zip(lease, ("elsewhere:1", until, "elsewhere"), strict=True)))

    def waited() -> bool:
        """This delivery found the stage busy and waits as a retry (Celery's RETRY state)."""
        hold_lease()
        meta = client.get(f"celery-task-meta-{job['id']}:generate")
        return meta is not None and json.loads(meta)["status"] == "RETRY"

    hold_lease()
    client.rpush(QUEUE, queue_body(job))
    wait_until(waited, timeout_s=JOB_TIMEOUT_S, what="the delivery waits for the other run")

    # When that run lets go of the stage, and this delivery runs it
    client.hdel(key, *lease)
    body = platform_with_bearer.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body

    # Then the wait used up no retry: the 503 was retried and the reference used
    assert body["status"] == "completed", body
    assert body["metadata"]["references_used"] == ["single"], body["metadata"]
    assert images.requests_for("/flaky-after-wait.png") == 2
    assert records.get(job["id"]).fields["deliveries:generate"] == "1"
