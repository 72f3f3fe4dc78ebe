"""One job at a time through the real stack: platform list -> chain -> storage -> callback."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import JOB_TIMEOUT_S, new_job, push
from worker.local.platform import Callback, LocalPlatform
from worker.local.stack import LocalStack

BUCKET = "workspace-temp"


def run_job(platform: LocalPlatform, client: redis.Redis, job: dict, **push_options) -> Callback:
    """Push a job like the platform does and wait for its final callback."""
    push(client, job, **push_options)
    job_id = job.get("id") or job["job_id"]
    return platform.wait_for_final(job_id, timeout_s=JOB_TIMEOUT_S)


def decode_video(data: bytes) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) as a player sees the file."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, float(stream.average_rate)


def thumbnail_size(platform: LocalPlatform, key: str) -> tuple[int, int]:
    upload = platform.upload_at(BUCKET, key)
    assert upload is not None, f"no thumbnail at {key}"
    assert upload.content_type == "image/webp"
    image = Image.open(io.BytesIO(upload.data))
    assert image.format == "WEBP"
    return image.size


@pytest.mark.parametrize("shape", ["object", "array"])
def test_video_job_arrives_as_a_faststart_mp4_with_processing_then_completed(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis, shape: str
) -> None:
    # Given a video job of 11 requested frames at 256x384 with a fixed seed
    job = new_job("video_fast")
    job["config"] |= {"frame_num": 11, "resolution": "256x384"}

    # When the platform pushes it in either body shape
    final = run_job(platform, platform_list, job, shape=shape)

    # Then the platform saw processing, then completed, and nothing else
    assert [c.body["status"] for c in platform.callbacks_for(job["id"])] == [
        "processing",
        "completed",
    ]
    body = final.body
    key = f"user-1/{job['id']}/0.mp4"
    assert body["job_id"] == job["id"]
    assert body["error_message"] is None
    [asset] = body["assets"]
    assert asset["type"] == "video"
    assert asset["url"] == key
    assert asset["thumbnail_url"] == f"user-1/{job['id']}/0.thumb.webp"

    # The MP4 in storage is H.264, faststart, and has the reported shape (11 -> 9 frames)
    upload = platform.upload_at(BUCKET, key)
    assert upload is not None and upload.content_type == "video/mp4" and upload.upsert
    data = upload.data
    assert data[4:8] == b"ftyp"
    assert data.index(b"moov") < data.index(b"mdat")
    frames, width, height, fps = decode_video(data)
    assert (frames, width, height, fps) == (9, 256, 384, 16.0)
    assert asset["metadata"] == {
        "file_size_bytes": len(data),
        "format": "mp4",
        "duration_seconds": round(9 / 16, 2),
        "seed": 7,
        "asset_index": 0,
        "width": 256,
        "height": 384,
        "frame_num": 9,
        "fps": 16,
        "quality_used": "fast",
    }
    metadata = body["metadata"]
    assert metadata["job_type"] == "video_fast"
    assert metadata["content_type"] == "video"
    assert metadata["frame_num"] == 9
    assert metadata["frames_requested"] == 11
    assert metadata["wan_task"] == "t2v-1.3B"
    assert metadata["reference_mode"] == "none"
    assert metadata["generation_time"] > 0
    stages = list(metadata["stage_seconds"])
    assert stages == ["enhance", "generate", "encode", "thumbnail", "upload"]

    # The thumbnail keeps the 2:3 aspect with a longest edge of 256
    assert thumbnail_size(platform, asset["thumbnail_url"]) == (171, 256)


@pytest.mark.parametrize("shape", ["object", "array"])
def test_image_job_arrives_as_a_png_of_the_requested_size(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis, shape: str
) -> None:
    job = new_job("image_high")
    job["config"] |= {"resolution": "384x256", "seed": 123}

    body = run_job(platform, platform_list, job, shape=shape).body

    assert [c.body["status"] for c in platform.callbacks_for(job["id"])] == [
        "processing",
        "completed",
    ]
    [asset] = body["assets"]
    key = f"user-1/{job['id']}/0.png"
    assert asset["type"] == "image" and asset["url"] == key
    upload = platform.upload_at(BUCKET, key)
    assert upload is not None and upload.content_type == "image/png"
    assert upload.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(upload.data)).size == (384, 256)
    assert asset["metadata"] == {
        "file_size_bytes": len(upload.data),
        "format": "png",
        "seed": 123,
        "asset_index": 0,
        "width": 384,
        "height": 256,
        "frame_num": 1,
        "quality_used": "high",
    }
    assert body["metadata"]["content_type"] == "image"
    assert body["metadata"]["job_type"] == "image_high"
    assert thumbnail_size(platform, asset["thumbnail_url"]) == (256, 171)


def test_legacy_field_names_are_honoured(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given a job in the older names: job_id, wan_-prefixed job_type, size 'W*H', sample_*
    job = new_job("image_fast")
    job_id = job.pop("id")
    job.pop("type")
    job |= {
        "job_id": job_id,
        "job_type": "wan_image_fast",
        "quality": "fast",
        "format": "image",
        "config": {"size": "256*320", "sample_steps": 3, "sample_guide_scale": 5.0, "seed": 9},
    }

    body = run_job(platform, platform_list, job).body

    assert body["status"] == "completed"
    assert body["assets"][0]["metadata"]["width"] == 256
    assert body["assets"][0]["metadata"]["height"] == 320
    assert body["assets"][0]["metadata"]["seed"] == 9


def test_a_job_without_seed_reports_the_random_seed_it_used(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    first, second = new_job("image_fast"), new_job("image_fast")
    for job in (first, second):
        del job["config"]["seed"]

    seeds = [
        run_job(platform, platform_list, job).body["assets"][0]["metadata"]["seed"]
        for job in (first, second)
    ]

    assert all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in seeds)
    assert seeds[0] != seeds[1]


def test_the_same_seed_twice_gives_identical_frames(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    pixels = []
    for seed in (42, 42, 43):
        job = new_job("image_fast")
        job["config"]["seed"] = seed
        body = run_job(platform, platform_list, job).body
        upload = platform.upload_at(BUCKET, body["assets"][0]["url"])
        pixels.append(np.asarray(Image.open(io.BytesIO(upload.data))))

    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_jobs_are_taken_oldest_first(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given three jobs pushed at once
    jobs = [new_job("image_fast") for _ in range(3)]
    for job in jobs:
        push(platform_list, job)

    # When all have finished
    for job in jobs:
        platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    # Then generation started them in the order they were pushed
    ids = {job["id"] for job in jobs}
    started = [
        c.body["job_id"]
        for c in platform.callbacks
        if c.body["status"] == "processing" and c.body["job_id"] in ids
    ]
    assert started == [job["id"] for job in jobs]


def test_the_model_is_loaded_once_across_jobs(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    for _ in range(3):
        run_job(platform, platform_list, new_job("image_fast"))

    assert stack.log("gpu").count("WAN pipeline loaded") == 1


def test_torch_lives_only_in_the_generation_pool_child(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given the media worker has encoded a video and an image
    run_job(platform, platform_list, new_job("video_fast"))
    run_job(platform, platform_list, new_job("image_fast"))

    # Then none of its processes has torch's library mapped; on the generation worker only
    # the pool child has (the model is loaded after the fork, never in the main process)
    def has_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert not any(has_torch(pid) for pid in stack.pids("cpu"))
    gpu_main, *gpu_children = stack.pids("gpu")
    assert not has_torch(gpu_main)
    assert [has_torch(pid) for pid in gpu_children] == [True]


def test_a_final_callback_answered_503_is_retried_until_it_is_accepted(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given the platform answers the next three callbacks with 503: the best-effort
    # `processing` one takes the first, the final callback the other two
    job = new_job("image_fast")
    platform.fail_next_callbacks(3)

    # When a job runs
    body = run_job(platform, platform_list, job).body

    # Then the final callback was refused twice, retried, and accepted once
    assert platform.rejected_callbacks_for(job["id"]) == ["processing", "completed", "completed"]
    assert body["status"] == "completed"
    finals = [c for c in platform.callbacks_for(job["id"]) if c.body["status"] == "completed"]
    assert len(finals) == 1


def test_an_upload_answered_503_is_retried_until_it_is_accepted(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    # Given the platform answers the next two uploads with 503
    job = new_job("image_fast")
    platform.fail_next_uploads(2)
    rejected_before = platform.rejected_uploads

    # When a job runs
    body = run_job(platform, platform_list, job).body

    # Then it still completes, its files stored and its final callback sent once
    assert body["status"] == "completed"
    assert platform.rejected_uploads == rejected_before + 2
    assert platform.upload_at(BUCKET, body["assets"][0]["url"]) is not None
    finals = [c for c in platform.callbacks_for(job["id"]) if c.body["status"] == "completed"]
    assert len(finals) == 1
