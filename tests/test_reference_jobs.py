"""Reference and image-to-image jobs through real workers, with references served locally.

A stack of its own (its own Redis database and platform list) runs with the tiny VACE
model and `REFERENCE_ALLOWED_HOSTS=127.0.0.1`; references come from an ImageServer on
127.0.0.1, and one on 127.0.0.2 stands for an internal host that must never be reached.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import JOB_TIMEOUT_S, new_job
from tests.test_end_to_end import decode_video
from tests.test_references import image_bytes, png_header_only
from worker.local.image_server import ImageServer, Route
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer

QUEUE = "wan_queue_refs"


def picture(seed: int, size: tuple[int, int] = (300, 200)) -> bytes:
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as server:
        for seed in (1, 2):
            server.add(f"/ref-{seed}.png", Route(picture(seed), "image/png"))
        yield server


@pytest.fixture(scope="module")
def internal() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.2") as server:
        server.add("/secret.png", Route(picture(3), "image/png"))
        yield server


@pytest.fixture(scope="module")
def refs_stack(
    stack_env: dict[str, str], redis_server: RedisServer, tiny_vace: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalStack]:  # fmt: skip
    env = stack_env | {
        "REDIS_URL": redis_server.url.removesuffix("/0") + "/3",
        "PLATFORM_QUEUE": QUEUE,
        "WAN_VACE_MODEL_PATH": str(tiny_vace),
        "REFERENCE_ALLOWED_HOSTS": "127.0.0.1",
        "REFERENCE_RETRIES": "2",
        "REFERENCE_TIMEOUT_S": "10",
    }
    env.pop("PLATFORM_REDIS_URL", None)
    local = LocalStack(env, log_dir=tmp_path_factory.mktemp("refs-logs"))
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture(scope="module")
def refs_list(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url.removesuffix("/0") + "/3")


def run(
    refs_stack: LocalStack, platform: LocalPlatform, client: redis.Redis, job: dict[str, Any]
) -> dict[str, Any]:
    """Push a job onto this stack's platform list; the final callback's body."""
    client.rpush(QUEUE, queue_body(job))
    return platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body


def reference_job(
    job_type: str = "image_fast", *, config: dict | None = None, metadata: dict | None = None
) -> dict[str, Any]:
    job = new_job(job_type)
    job["config"] |= {"frame_num": 5} if job_type.startswith("video") else {}
    job["config"] |= config or {}
    job["metadata"] = metadata or {}
    return job


def png_pixels(platform: LocalPlatform, body: dict[str, Any]) -> np.ndarray:
    upload = platform.upload_at("workspace-temp", body["assets"][0]["url"])
    assert upload is not None
    return np.asarray(Image.open(io.BytesIO(upload.data)))


# --- Each mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_type", "fields", "mode", "wan_task", "used"),
    [
        ("video_fast", {"metadata": {"reference_image_url": 1}}, "single", "vace-1.3B", ["single"]),
        ("video_fast", {"config": {"first_frame": 1}}, "start", "vace-1.3B", ["start"]),
        ("video_fast", {"metadata": {"end_reference_url": 2}}, "end", "vace-1.3B", ["end"]),
        ("video_fast", {"config": {"first_frame": 1, "last_frame": 2}}, "both", "vace-1.3B",
         ["start", "end"]),
        ("image_fast", {"config": {"image": 1, "pipeline": "img2img"}}, "single", "v2v-1.3B",
         ["single"]),
        ("video_fast", {"config": {"image": 1, "denoise_strength": 0.7}}, "single", "v2v-1.3B",
         ["single"]),
    ],
    ids=["single", "start", "end", "both", "i2i-image", "i2i-video"],
)  # fmt: skip
def test_each_mode_completes_and_reports_what_ran(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis, images: ImageServer,
    job_type: str, fields: dict, mode: str, wan_task: str, used: list[str],
) -> None:  # fmt: skip
    # Given a job whose reference fields point at the local image server (1 and 2 are seeds)
    sections = {
        section: {name: images.url(f"/ref-{v}.png") if isinstance(v, int) and name not in
                  ("denoise_strength",) else v for name, v in values.items()}
        for section, values in fields.items()
    }  # fmt: skip
    job = reference_job(job_type, **sections)

    body = run(refs_stack, platform, refs_list, job)

    assert body["status"] == "completed", body
    metadata = body["metadata"]
    assert (metadata["reference_mode"], metadata["wan_task"]) == (mode, wan_task)
    assert metadata["references_used"] == used
    assert "reference_fallback" not in metadata
    if wan_task == "v2v-1.3B":
        assert metadata["denoise_strength"] == job["config"].get("denoise_strength", 0.5)


def test_a_different_reference_gives_a_different_image_with_the_same_seed(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis, images: ImageServer
) -> None:
    def single(seed: int) -> np.ndarray:
        job = reference_job(metadata={"reference_image_url": images.url(f"/ref-{seed}.png")})
        body = run(refs_stack, platform, refs_list, job)
        assert body["metadata"]["reference_mode"] == "single"
        return png_pixels(platform, body)

    first, other, again = single(1), single(2), single(1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


# --- Every combination of the platform's fields: used, or the callback says why ------------

SOURCES = [
    ("config", "image"), ("metadata", "reference_image_url"),
    ("config", "first_frame"), ("metadata", "start_reference_url"),
    ("config", "last_frame"), ("metadata", "end_reference_url"),
]  # fmt: skip
EXTRAS = {
    "alone": {},
    "mode-none": {"metadata": {"video_reference_mode": "none"}},
    "config-mode-both": {"config": {"reference_mode": "both"}},
    "img2img": {"config": {"pipeline": "img2img"}},
    "i2i-by-strength": {"metadata": {"reference_strength": 0.8}},
}
COMBINATIONS = [(source, extra) for source in SOURCES for extra in EXTRAS]


@pytest.fixture(scope="module")
def combination_jobs(
    refs_stack: LocalStack, refs_list: redis.Redis, images: ImageServer
) -> dict[tuple, str]:
    """Every combination pushed at once (generation overlaps the media stages): job ids."""
    job_ids = {}
    for (section, name), extra in COMBINATIONS:
        fields: dict[str, dict] = {"config": {}, "metadata": {}}
        for where, values in EXTRAS[extra].items():
            fields[where] |= values
        fields[section][name] = images.url("/ref-1.png")
        job = reference_job(**fields)
        refs_list.rpush(QUEUE, queue_body(job))
        job_ids[(section, name), extra] = job["id"]
    return job_ids


@pytest.mark.parametrize(
    ("source", "extra"), COMBINATIONS, ids=[f"{s}.{n}-{e}" for (s, n), e in COMBINATIONS]
)
def test_a_reference_in_any_field_is_used_or_the_callback_says_why(
    platform: LocalPlatform, combination_jobs: dict[tuple, str], source: tuple, extra: str
) -> None:
    job_id = combination_jobs[source, extra]

    body = platform.wait_for_final(job_id, timeout_s=JOB_TIMEOUT_S).body

    assert body["status"] == "completed", body
    metadata = body["metadata"]
    assert metadata["references_used"] or metadata["reference_fallback_reason"]
    assert metadata["reference_mode"] != "none"
    expects_i2i = extra in ("img2img", "i2i-by-strength")
    assert metadata["wan_task"] == ("v2v-1.3B" if expects_i2i else "vace-1.3B")
    if "mode" in extra:  # the mode field disagreed with the reference present: reported
        assert "the references decide" in metadata["reference_mode_note"]


# --- Refusals: text-only, the callback says why, no request reached a refused address ------


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(noise), "JPEG")
    return data[: len(data) // 2]


REFUSALS = {
    "127.0.0.2-not-allow-listed": (None, "127.0.0.2, a loopback address"),
    "metadata-address": ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    "private-10": ("http://10.0.0.1/ref.png", "10.0.0.1, a private address"),
    "file": ("file:///etc/passwd", "scheme 'file' is not allowed"),
    "redirect-to-refused": (Route(status=302), "127.0.0.2, a loopback address"),
    "30-mb": (Route(b"\x89PNG\r\n\x1a\n" + bytes(30 << 20), "image/png"), "over the limit"),
    "20000x20000-png": (Route(png_header_only(20_000, 20_000), "image/png"), "bomb guard"),
    "html-as-png": (Route(b"<!doctype html><title>login</title>", "image/png"), "not a PNG"),
    "truncated-jpeg": (Route(truncated_jpeg(), "image/jpeg"), "JPEG cannot be decoded"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_reference_falls_back_to_text_only_and_says_why(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis,
    images: ImageServer, internal: ImageServer, case: str,
) -> None:  # fmt: skip
    target, reason = REFUSALS[case]
    if target is None:
        url = internal.url("/secret.png")
    elif isinstance(target, Route):
        if target.status == 302:
            target = Route(status=302, location=internal.url("/secret.png"))
        url = images.add(f"/{case}", target)
    else:
        url = target
    job = reference_job("video_fast", metadata={"start_reference_url": url})

    body = run(refs_stack, platform, refs_list, job)

    assert body["status"] == "completed", body
    metadata = body["metadata"]
    assert metadata["reference_fallback"] is True
    assert metadata["reference_mode_requested"] == "start"
    assert metadata["reference_mode"] == "none" and metadata["wan_task"] == "t2v-1.3B"
    assert metadata["reference_fallback_reason"].startswith("start reference: ")
    assert reason in metadata["reference_fallback_reason"]
    assert internal.requests == []


# --- Transient failures: Celery retries, then text-only -----------------------------------


def test_a_transient_reference_failure_is_retried_and_then_used(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis, images: ImageServer
) -> None:
    url = images.add("/flaky.png", Route(picture(4), "image/png"))
    images.fail_next("/flaky.png", [503, 503])

    body = run(refs_stack, platform, refs_list, reference_job(config={"image": url}))

    assert body["status"] == "completed", body
    assert body["metadata"]["references_used"] == ["single"]
    assert images.requests_for("/flaky.png") == 3
    assert [c.body["status"] for c in platform.callbacks_for(body["job_id"])] == [
        "processing",
        "completed",
    ]


def test_a_reference_that_keeps_failing_falls_back_after_the_retries(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis, images: ImageServer
) -> None:
    url = images.add("/down.png", Route(status=503, body=b"down"))

    body = run(refs_stack, platform, refs_list, reference_job(config={"image": url}))

    assert body["status"] == "completed", body
    assert body["metadata"]["reference_fallback"] is True
    assert "HTTP 503" in body["metadata"]["reference_fallback_reason"]
    assert "after 2 retries" in body["metadata"]["reference_fallback_reason"]
    assert images.requests_for("/down.png") == 3  # the first try and REFERENCE_RETRIES=2


def test_exact_copy_mode_clamps_strength_and_guidance_and_says_so(
    refs_stack: LocalStack, platform: LocalPlatform, refs_list: redis.Redis, images: ImageServer
) -> None:
    job = reference_job(
        config={"image": images.url("/ref-1.png"), "guidance_scale": 6.0, "denoise_strength": 0.6},
        metadata={"exact_copy_mode": True},
    )
    metadata = run(refs_stack, platform, refs_list, job)["metadata"]
    assert metadata["wan_task"] == "v2v-1.3B"
    assert metadata["denoise_strength"] == 0.05
    assert metadata["exact_copy_mode"] is True
    assert metadata["exact_copy_strength_clamped_from"] == 0.6
    assert metadata["exact_copy_guidance_clamped_from"] == 6.0


# --- The frontend's own body (submitWANJob): values at the top level, null where empty ------
# Each value from each place: tests/test_jobs.py's FRONTEND_TABLE. Here, through real
# workers, the places that decide what is generated: a start frame, a single reference, size,
# frames, fps and quality only at the top level; config and metadata winning over it.


def frontend_job(job_type: str, *, config: dict, metadata: dict | None = None, **top: Any) -> dict:
    """A job as submitWANJob builds it: every top-level field, null unless given."""
    fields = ("width", "height", "frame_num", "fps", "quality", "reference_mode",
              "reference_image_url", "first_frame", "last_frame", "denoise_strength",
              "reference_strength")  # fmt: skip
    job = new_job(job_type) | dict.fromkeys(fields) | {"target_worker": "wan"} | top
    return job | {"config": {"num_inference_steps": 2, "seed": 7} | config,
                  "metadata": metadata or {}}  # fmt: skip


@pytest.fixture(scope="module")
def frontend_jobs(
    refs_stack: LocalStack, refs_list: redis.Redis, images: ImageServer
) -> dict[str, dict[str, Any]]:
    """Every row pushed at once (generation overlaps the media stages): the jobs by row."""
    ref_1, ref_2 = images.url("/ref-1.png"), images.url("/ref-2.png")
    never = images.add("/never-read.png", Route(picture(5), "image/png"))
    jobs = {
        "start-size-frames-fps-quality-top-only": frontend_job(
            "video_fast", config={}, first_frame=ref_1, reference_mode="start", width=256,
            height=256, frame_num=5, fps=12, quality="balanced"),
        "single-top-only-config-size-and-frames-win": frontend_job(
            "video_fast", config={"resolution": "256x256", "frame_num": 5},
            reference_image_url=ref_2, width=832, height=480, frame_num=49),
        "metadata-reference-wins-top-strength-counts": frontend_job(
            "image_fast", config={"resolution": "256x256"},
            metadata={"reference_image_url": ref_1}, reference_image_url=never,
            denoise_strength=0.7),
        "fps-out-of-range": frontend_job("video_fast", config={}, fps=30),
        "another-target-worker": frontend_job("image_fast", config={}, target_worker="sdxl"),
    }  # fmt: skip
    for job in jobs.values():
        refs_list.rpush(QUEUE, queue_body(job))
    return jobs


#: Per row: what the callback says (job metadata, asset metadata), or the failed field.
FRONTEND_ROWS = {
    "start-size-frames-fps-quality-top-only": (
        {"reference_mode": "start", "wan_task": "vace-1.3B", "references_used": ["start"]},
        {"width": 256, "height": 256, "frame_num": 5, "fps": 12, "duration_seconds": 0.42,
         "quality_used": "balanced"}),
    "single-top-only-config-size-and-frames-win": (
        {"reference_mode": "single", "wan_task": "vace-1.3B", "references_used": ["single"]},
        {"width": 256, "height": 256, "frame_num": 5, "fps": 16, "duration_seconds": 0.31,
         "quality_used": "fast"}),
    "metadata-reference-wins-top-strength-counts": (
        {"reference_mode": "single", "wan_task": "v2v-1.3B", "denoise_strength": 0.7},
        {"width": 256, "height": 256, "frame_num": 1}),
    "fps-out-of-range": "fps: 30 is outside the allowed range 12..24",
    "another-target-worker": "target_worker: this worker is 'wan', the job is for 'sdxl'",
}  # fmt: skip


@pytest.mark.parametrize("row", FRONTEND_ROWS)
def test_the_frontends_body_is_read_from_every_place_through_real_workers(
    platform: LocalPlatform, images: ImageServer, frontend_jobs: dict[str, dict], row: str
) -> None:
    job = frontend_jobs[row]

    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body

    expected = FRONTEND_ROWS[row]
    if isinstance(expected, str):  # refused, naming the field and the limit
        assert (body["status"], body["error_message"]) == ("failed", expected)
        return
    assert body["status"] == "completed", body
    job_metadata, asset_metadata = expected
    assert body["metadata"].items() >= job_metadata.items()
    [asset] = body["assets"]
    assert asset["metadata"].items() >= asset_metadata.items()
    assert images.requests_for("/never-read.png") == 0
    if job["type"].startswith("video"):  # the MP4 itself has the frames and rate reported
        upload = platform.upload_at("workspace-temp", asset["url"])
        assert upload is not None
        frames, width, height, fps = decode_video(upload.data)
        assert (frames, width, height, fps) == (5, 256, 256, asset_metadata["fps"])
