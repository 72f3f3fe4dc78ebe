"""Long videos by continuation through real workers (CONTRACT.md section 7), tiny VACE.

A stack of its own (Redis database 9, its own platform list) runs with the tiny VACE model
and windows of 5 frames overlapping by 1 (each adds 4 frames), so a 9-frame job is 2
windows and a 13-frame job 3, each a few seconds on a CPU. Jobs whose id starts with
`held-` pause after the first denoising step of window 2 (WAN_TEST_FAULT), so a test can
kill or cancel them there.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.chain import SENDER
from tests.conftest import JOB_TIMEOUT_S, module_env, new_job
from tests.test_end_to_end import decode_video
from worker.flow.job_control import cancel
from worker.flow.lanes import priority_lists
from worker.jobs.model import parse_job
from worker.jobs.records import JobRecord, JobRecords, get_records
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, wait_until
from worker.settings import get_settings

pytestmark = pytest.mark.runs_long

QUEUE = "long_queue"
WINDOW, OVERLAP = 5, 1
HELD = "held-"
#: Held jobs pause long enough after window 2's first step for a test to act on them.
HELD_PAUSE_S = 4


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], redis_server: RedisServer, tiny_vace: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    return module_env(
        stack_env, tmp_path_factory, "long", redis_url=redis_server.db_url(9), queue=QUEUE,
        settings={
            "WAN_VACE_MODEL_PATH": str(tiny_vace),
            "CONTINUATION_WINDOW_FRAMES": str(WINDOW),
            "CONTINUATION_OVERLAP_FRAMES": str(OVERLAP),
            "WAN_TEST_FAULT": f"{HELD}:pause{HELD_PAUSE_S}@window2_step1",
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushdb()
    local = LocalStack(env, log_dir=tmp_path_factory.mktemp("long-logs"),
                       names=("gpu+enhance", "cpu", "bridge"))  # fmt: skip
    try:
        yield local.start()
    finally:
        local.stop()
        client.flushdb()


def long_job(frames: int | None = None, *, prefix: str = "", **config: Any) -> dict[str, Any]:
    job = new_job("video_fast", id=f"{prefix}{uuid.uuid4()}")
    if frames is not None:
        job["config"]["frame_num"] = frames
    job["config"] |= config
    return job


def run(client: redis.Redis, platform: LocalPlatform, job: dict[str, Any]) -> dict[str, Any]:
    """Push a job onto this stack's platform list; the body of its final callback."""
    client.rpush(QUEUE, queue_body(job))
    return platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body


def frames_of(platform: LocalPlatform, body: dict[str, Any]) -> int:
    upload = platform.upload_at("workspace-temp", body["assets"][0]["url"])
    assert upload is not None
    return decode_video(upload.data)[0]


def record(client: redis.Redis, job_id: str) -> JobRecord:
    return JobRecords(client, ttl_s=600).get(job_id)


def statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    return [callback.body["status"] for callback in platform.callbacks_for(job_id)]


def wait_for_window_2(client: redis.Redis, job_id: str) -> None:
    wait_until(
        lambda: (record(client, job_id).value("progress") or {}).get("window") == 2,
        timeout_s=JOB_TIMEOUT_S, what=f"window 2 of {job_id}", interval_s=0.05,
    )  # fmt: skip


@pytest.mark.parametrize(("frames", "windows"), [(9, 2), (13, 3)])
def test_a_long_job_gives_an_mp4_of_exactly_the_frames_asked_and_says_how(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform, frames: int, windows: int
) -> None:
    # Given a listener on the job's progress
    job = long_job(frames)
    listener = client.pubsub()
    listener.subscribe(f"wan:progress:{job['id']}")

    # When the job runs
    body = run(client, platform, job)

    # Then the MP4 has exactly the frames asked, and the callback says how it was made
    assert body["status"] == "completed", body
    assert frames_of(platform, body) == frames
    asset, metadata = body["assets"][0]["metadata"], body["metadata"]
    assert asset["frame_num"] == metadata["frame_num"] == frames
    assert asset["duration_seconds"] == metadata["duration_seconds"] == round(frames / 16, 2)
    assert metadata["wan_task"] == "vace-1.3B"
    assert metadata["continuation"] == {
        "windows": windows, "window_frames": WINDOW, "overlap_frames": OVERLAP,
        "overlap_noise": 20.0, "color_match": 1.0, "blend_frames": 0,
        "resumed_from_window": None, "turbo_windows": False,
    }  # fmt: skip
    assert metadata["provenance"]["continuation"] == metadata["continuation"]
    # And every step said its window, with the percent rising over the whole job
    events = [json.loads(m["data"]) for m in iter(lambda: listener.get_message(timeout=1), None)
              if m["type"] == "message"]  # fmt: skip
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["window"], e["step"]) for e in steps] == [
        (w, s) for w in range(1, windows + 1) for s in (1, 2)
    ]
    assert {e["windows"] for e in steps} == {windows}
    percents = [e["percent"] for e in steps]
    assert percents == sorted(percents) and len(set(percents)) == len(percents)
    assert steps[-1]["eta_seconds"] == 0
    # And the record says which windows are done, each made once
    done = record(client, job["id"]).value("windows")
    assert done["done"] == windows and done["runs"] == {str(n): 1 for n in range(1, windows + 1)}


def test_a_storyboard_makes_one_video_whose_segments_frames_add_up(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform
) -> None:
    scenes = [{"prompt": "a fox in the snow", "seconds": 0.3},
              {"prompt": "a fox in a city", "seconds": 0.25}]  # fmt: skip
    job = long_job(segments=scenes)

    body = run(client, platform, job)

    assert body["status"] == "completed", body
    segments = body["metadata"]["segments"]
    assert [s["prompt"] for s in segments] == ["a fox in the snow", "a fox in a city"]
    assert [(s["first_frame"], s["last_frame"]) for s in segments] == [(0, 4), (5, 8)]
    assert frames_of(platform, body) == body["metadata"]["frame_num"] == 9
    assert body["metadata"]["continuation"]["windows"] == 2
    assert body["metadata"]["provenance"]["segment_prompts"] == [s["prompt"] for s in scenes]


def test_an_enhanced_storyboard_enhances_each_segment_and_caches_them(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform
) -> None:
    scenes = [{"prompt": "a heron by a river", "seconds": 0.3},
              {"prompt": "the heron takes off", "seconds": 0.25}]  # fmt: skip

    enhanced = {"type": "video7b_fast_enhanced"}
    first, again = (run(client, platform, long_job(segments=scenes) | enhanced) for _ in range(2))

    for body in (first, again):
        assert body["status"] == "completed", body
        metadata = body["metadata"]
        assert metadata["enhancement_applied"] is True
        done = metadata["segment_enhancements"]
        assert [d["original_prompt"] for d in done] == [s["prompt"] for s in scenes]
        assert metadata["provenance"]["segment_prompts"] == metadata["enhanced_segment_prompts"]
        assert metadata["enhanced_segment_prompts"] == [d["enhanced_prompt"] for d in done]
        # the storyboard as the user wrote it
        assert [s["prompt"] for s in metadata["segments"]] == [s["prompt"] for s in scenes]
    assert [d["enhancement_cached"] for d in again["metadata"]["segment_enhancements"]] == [
        True, True]  # fmt: skip


def test_a_generation_killed_in_window_2_goes_on_from_window_2_and_completes_once(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a 3-window job in window 2
    job = long_job(13, prefix=HELD)
    client.rpush(QUEUE, queue_body(job))
    wait_for_window_2(client, job["id"])
    assert record(client, job["id"]).value("windows")["done"] == 1

    # When its generation child is killed (the OOM killer, a preempted pod)
    owner = record(client, job["id"]).fields["lease:generate"]
    os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)

    # Then the job completes, with one final callback and every frame
    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    assert body["status"] == "completed", body
    assert [s for s in statuses(platform, job["id"]) if s != "processing"] == ["completed"]
    assert frames_of(platform, body) == 13
    # And window 1 was made once: the new delivery went on from window 2
    assert body["metadata"]["continuation"]["resumed_from_window"] == 2
    done = record(client, job["id"]).value("windows")
    assert done["runs"] == {"1": 1, "2": 2, "3": 1}
    assert record(client, job["id"]).fields["deliveries:generate"] == "2"


def test_a_job_cancelled_in_window_2_stops_there_uploads_nothing_and_empties_its_spool(
    stack: LocalStack, env: dict[str, str], client: redis.Redis, platform: LocalPlatform
) -> None:
    # Given a 3-window job in window 2, its first window in the spool
    job = long_job(13, prefix=HELD)
    client.rpush(QUEUE, queue_body(job))
    wait_for_window_2(client, job["id"])
    spooled = Path(env["SPOOL_DIR"]) / job["id"]
    assert (spooled / "windows" / "0001.npy").is_file()

    # When it is cancelled
    cancel(JobRecords(client, ttl_s=600), job["id"], sender=SENDER)

    # Then the platform hears `cancelled` once, nothing was uploaded, the spool is empty
    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    assert body["status"] == "cancelled" and body["assets"] == []
    assert body["metadata"]["progress"]["window"] == 2
    assert statuses(platform, job["id"]) == ["processing", "cancelled"]
    assert not [u for u in platform.uploads if job["id"] in u.path]
    assert not spooled.exists()


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (long_job(1000), "config.frame_num: 1000 is outside the allowed range 1..961"),
        (long_job(duration_seconds=61),
         "config.duration_seconds: 61 s at 16 fps is over the limit of 961"),
        (new_job("image_fast") | {"config": {"duration_seconds": 30}},
         "config.duration_seconds: image jobs make 1 frame"),
    ],
    ids=["1000-frames", "61-seconds", "image-30-seconds"],
)  # fmt: skip
def test_a_long_request_out_of_bounds_gets_a_failed_callback_naming_the_field(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform, job: dict, field: str
) -> None:
    body = run(client, platform, job)
    assert body["status"] == "failed"
    assert body["error_message"].startswith(field)


def test_a_worker_that_cannot_make_windows_fails_the_job_naming_the_setting(
    stack: LocalStack, client: redis.Redis, platform: LocalPlatform
) -> None:
    def failure(settings: dict[str, str], frames: int) -> dict[str, Any]:
        """The `failed` callback of a long job on a generation worker with `settings`."""
        stack.kill("gpu+enhance")
        stack.restart("gpu+enhance", env=settings)
        body = run(client, platform, long_job(frames))
        assert body["status"] == "failed" and body["metadata"]["error_stage"] == "generate"
        return body

    try:
        # An overlap of a whole window: no window after the first would make a new frame
        overlap = failure({"CONTINUATION_OVERLAP_FRAMES": str(WINDOW)}, 9)
        # No VACE model, and a video over what one pass makes
        no_vace = failure({"WAN_VACE_MODEL_PATH": "/nonexistent"}, 125)
    finally:
        stack.kill("gpu+enhance")
        stack.restart("gpu+enhance")

    assert overlap["error_message"].startswith(
        f"CONTINUATION_OVERLAP_FRAMES={WINDOW} (normalised to {WINDOW}) must be below "
        f"CONTINUATION_WINDOW_FRAMES={WINDOW}"
    )
    assert no_vace["error_message"].startswith(
        "a video of 125 frames is made window by window with VACE, and "
        "WAN_VACE_MODEL_PATH=/nonexistent holds no diffusers model"
    )


@pytest.fixture
def sender(
    idle_broker: redis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[JobRecords]:
    """This process sends generations as the bridge does, with records in the idle broker's
    database (no worker takes them), a generate soft limit of 100 s and a grace of 30 s."""
    settings = {"REDIS_URL": redis_server.db_url(1), "WAN_VACE_MODEL_PATH": "/models/vace",
                "CONTINUATION_WINDOW_FRAMES": str(WINDOW),
                "CONTINUATION_OVERLAP_FRAMES": str(OVERLAP), "GENERATE_SOFT_LIMIT_S": "100",
                "HARD_LIMIT_GRACE_S": "30"}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    get_records.cache_clear()
    yield get_records()
    get_settings.cache_clear()
    get_records.cache_clear()


def test_a_long_jobs_generation_is_sent_with_the_time_limits_of_its_windows(
    sender: JobRecords,
) -> None:
    from tasks import build_chain
    from tasks.generate import generate

    # Given a 3-window job and a one-pass job, recorded
    jobs = {"long": long_job(13), "short": long_job(5)}
    for job in jobs.values():
        sender.create(parse_job(job), payload=json.dumps(job))

    # When their generations are sent
    for job in jobs.values():
        build_chain(job["id"], from_stage="generate").apply_async()

    # Then the long one's message carries 3 x 100 s soft, plus 30 s grace hard; the other the
    # stage's own (celeryconfig's, read when this process imported it)
    raws = [m for name in priority_lists("gpu") for m in sender.redis.lrange(name, 0, -1)]
    limits = {json.loads(m)["headers"]["id"].split(":")[0]: json.loads(m)["headers"]["timelimit"]
              for m in raws}  # fmt: skip
    own = [generate.time_limit, generate.soft_time_limit]
    assert limits == {jobs["long"]["id"]: [330, 300], jobs["short"]["id"]: own}


def test_a_long_jobs_time_out_messages_count_its_windows(sender: JobRecords) -> None:
    from tasks.generate import generate

    # Given a recorded 3-window job
    job = long_job(13)
    sender.create(parse_job(job), payload=json.dumps(job))

    # When its generation times out, the failure names the limit per window and the windows
    # (the hard limit's message comes from the worker's main process, with no task request)
    soft, hard = generate.timed_out(job["id"]), generate.killed_at_hard_limit(job["id"])

    assert str(soft) == (
        "generate ran past its soft time limit of 300 s "
        "(GENERATE_SOFT_LIMIT_S=100 per window x 3 windows)"
    )
    assert str(hard).startswith(
        "generate was killed at its hard time limit of 330 s "
        "(GENERATE_SOFT_LIMIT_S=100 per window x 3 windows + HARD_LIMIT_GRACE_S)"
    )
