"""Live previews: the latent-to-RGB map, their size and pacing in a real generation, a slow
Redis that never holds a step, and `preview` events through real workers and the API."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from PIL import Image

from tests.conftest import JOB_TIMEOUT_S, PACED, api_url, auth, new_job, push
from worker.jobs.model import parse_job
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, RedisServer
from worker.observe import preview_store
from worker.observe.progress import channel
from worker.settings import Settings

#: How long a test waits for a preview event, seconds.
EVENT_WAIT_S = 30


@pytest.fixture(scope="module")
def pipelines(tiny_wan: Path):
    from worker.generation import Pipelines

    return Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A Redis of this module's own: one test pauses its writes."""
    server = RedisServer(tmp_path_factory.mktemp("previews-redis")).start()
    yield redis.Redis.from_url(server.url)
    server.stop()


def a_job(steps: int, *, frames: int = 5):
    config = {"resolution": "256x320", "frame_num": frames, "num_inference_steps": steps}
    return parse_job({"id": f"job-{uuid.uuid4()}", "type": "video_fast", "prompt": "a red fox",
                      "user_id": "user-1", "config": config})  # fmt: skip


def generate_with_previews(pipelines, job, client: redis.Redis, *, every_s: float) -> None:
    from worker.generation import generate
    from worker.generation.previews import Previewer

    previewer = Previewer(client, job.id, every_s=every_s, max_px=64)
    generate(pipelines, job, seed=3, references={}, on_step=previewer.step)


def preview_steps(pubsub: redis.client.PubSub, *, until_step: int) -> list[int]:
    """The steps of the `preview` events published, up to the one of `until_step`."""
    steps: list[int] = []
    deadline = time.monotonic() + EVENT_WAIT_S
    while not steps or steps[-1] != until_step:
        assert time.monotonic() < deadline, f"no preview of step {until_step} came (got {steps})"
        message = pubsub.get_message(timeout=1.0)  # None too for a subscription's confirmation
        if message is not None:
            event = json.loads(message["data"])
            assert event["event"] == "preview"
            steps.append(event["step"])
    return steps


def test_the_latent_to_rgb_map_gives_comfyuis_colours_for_known_latents() -> None:
    from worker.generation.previews import latent_to_rgb

    # Given a 1x4 latent frame: channel 2 at 1, nothing, channel 6 far negative, channel 14
    # far positive
    frame = torch.zeros(16, 1, 4)
    frame[2, 0, 0] = 1.0
    frame[6, 0, 2] = 10.0
    frame[14, 0, 3] = 10.0

    rgb = latent_to_rgb(frame)

    # Then each pixel is (factors . latent + bias) taken from [-1, 1] to [0, 255]: channel 2's
    # factors (0.3568, 0.2548, 0.1747) plus the bias (-0.1835, -0.0868, -0.3360) give
    # (0.1733, 0.1680, -0.1613), i.e. (150, 149, 107); the bias alone (104, 116, 85); far
    # outside the range, black and white
    assert rgb.shape == (1, 4, 3) and rgb.dtype.name == "uint8"
    assert rgb[0].tolist() == [[150, 149, 107], [104, 116, 85], [0, 0, 0], [255, 255, 255]]


def test_the_preview_is_the_middle_latent_frame_with_its_longest_edge_at_preview_max_px() -> None:
    from worker.generation.previews import encode_webp, middle_frame, preview_image

    # Given latents of 5 frames whose middle one alone is bright, in three shapes
    for (height, width), max_px, expected in [
        ((104, 60), 256, (148, 256)),  # 480x832 portrait: latents are 1/8 of the pixels
        ((60, 104), 256, (256, 148)),
        ((32, 32), 96, (96, 96)),
    ]:
        latents = torch.zeros(1, 16, 5, height, width)
        latents[0, 14, 2] = 10.0

        image = Image.open(
            io.BytesIO(encode_webp(preview_image(middle_frame(latents), max_px=max_px)))
        )

        assert image.format == "WEBP"
        assert image.size == expected  # (width, height)
        assert image.convert("L").getextrema()[0] >= 250


def test_a_generation_previews_its_first_and_last_step_and_none_at_every_s_zero(
    pipelines, own_redis: redis.Redis
) -> None:
    # Given a 4-step generation with a preview due once an hour (so: the first step, then
    # the last), and another with PREVIEW_EVERY_S=0
    shown, hidden = a_job(4), a_job(4)
    pubsub = own_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(shown.id))

    generate_with_previews(pipelines, shown, own_redis, every_s=3600)
    generate_with_previews(pipelines, hidden, own_redis, every_s=0)

    # Then the first made previews of steps 1 and 4, the newest kept as a 64 px WEBP
    assert preview_steps(pubsub, until_step=4) == [1, 4]
    kept = preview_store.latest(own_redis, shown.id)
    assert kept is not None and (kept.step, kept.total_steps) == (4, 4)
    assert Image.open(io.BytesIO(kept.webp)).size == (51, 64)  # 256x320
    assert 0 < own_redis.ttl(preview_store.key(shown.id)) <= preview_store.PREVIEW_TTL_S
    # and the other made none: nothing kept, no preview thread ever started
    assert preview_store.latest(own_redis, hidden.id) is None
    assert not [t for t in threading.enumerate() if t.name == f"preview-{hidden.id}"]


def test_a_redis_that_holds_writes_never_holds_a_step_and_the_newest_preview_wins(
    pipelines, own_redis: redis.Redis
) -> None:
    # Given a generation with a preview due at every step, and a Redis that holds every write
    job = a_job(5)
    pubsub = own_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job.id))
    own_redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
    try:
        # When the generation runs
        generate_with_previews(pipelines, job, own_redis, every_s=1e-9)

        # Then it finished while its first preview's write was still held
        assert preview_store.latest(own_redis, job.id) is None
    finally:
        own_redis.execute_command("CLIENT", "UNPAUSE")

    # and once Redis takes writes, the last step's preview comes, and none of those that
    # were superseded while the thread waited
    steps = preview_steps(pubsub, until_step=5)
    assert steps == sorted(steps) and len(steps) <= 2, steps


def sse_events(url: str) -> Iterator[dict[str, Any]]:
    with httpx.stream("GET", url, headers=auth(), timeout=JOB_TIMEOUT_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line.removeprefix("data:").strip())


def test_a_twelve_step_video_streams_previews_of_rising_steps_each_a_webp_that_changes(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:  # fmt: skip
    # Given a 12-step video job paced after steps 1 and 2 (conftest's PACED_RULES), so that
    # its denoising lasts longer than PREVIEW_EVERY_S (1 s) on any machine
    job = new_job("video_fast", id=f"{PACED}{uuid.uuid4()}")
    job["config"]["num_inference_steps"] = 12
    base = api_url(stack_env)
    previews: list[tuple[dict[str, Any], httpx.Response]] = []

    # When a subscriber reads its stream and fetches each preview as it is announced
    push(platform_list, job)
    for event in sse_events(f"{base}/jobs/{job['id']}/events"):
        if event["event"] == "preview":
            previews.append((event, httpx.get(base + event["url"], headers=auth(), timeout=10)))

    # Then previews came with rising steps up to the last, each URL answering a WEBP of
    # 256 px on its longest edge, the first picture differing from the last
    steps = [event["step"] for event, _ in previews]
    assert len(steps) >= 2 and steps == sorted(set(steps)) and steps[-1] == 12, steps
    assert all(event["total_steps"] == 12 and event["window"] is None for event, _ in previews)
    for event, answer in previews:
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/webp"
        assert int(answer.headers["x-preview-step"]) >= event["step"]
        image = Image.open(io.BytesIO(answer.content))
        assert image.format == "WEBP" and max(image.size) == 256
    assert previews[0][1].content != previews[-1][1].content
    # and the platform's storage holds the video and its thumbnail, no preview
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"
    stored = {upload.path for upload in platform.uploads if job["id"] in upload.path}
    assert stored == {f"user-1/{job['id']}/0.mp4", f"user-1/{job['id']}/0.thumb.webp"}
