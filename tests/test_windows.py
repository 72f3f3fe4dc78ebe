"""The windows of a long video: arithmetic only (worker/generation/windows.py), no model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.errors import UnsupportedMode
from worker.generation.windows import (
    Continuation,
    plan,
    segment_ranges,
    window_count,
    window_seed,
    windowed,
)
from worker.jobs.model import Job, parse_job
from worker.settings import Settings

VACE = Path("/models/vace")


def job(job_type: str = "video_fast", **config: Any) -> Job:
    return parse_job({"id": "job-1", "user_id": "user-1", "type": job_type, "prompt": "a fox",
                      "config": config})  # fmt: skip


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, wan_vace_model_path=VACE, **values)


def test_60_seconds_at_the_defaults_are_13_windows_of_81_with_exactly_961_frames() -> None:
    windows = plan(job(duration_seconds=60), Continuation.of(settings()))

    assert len(windows) == 13
    assert sum(w.adds for w in windows) == 961
    assert [w.frames for w in windows] == [81] * 12 + [49]  # the last one shortened
    assert [w.overlap for w in windows] == [0] + [5] * 12
    assert all((w.frames - 1) % 4 == 0 for w in windows)
    # each window starts where the video so far ends
    ends = [w.first_frame + w.adds for w in windows]
    assert [w.first_frame for w in windows[1:]] == ends[:-1]


@pytest.mark.parametrize(
    ("frames", "sizes"), [(9, [9]), (13, [9, 9]), (17, [9, 9, 9]), (21, [9, 9, 9, 9])]
)
def test_small_windows_add_their_frames_past_the_overlap(frames: int, sizes: list[int]) -> None:
    continuation = Continuation.of(settings(continuation_window_frames=9,
                                            continuation_overlap_frames=5))  # fmt: skip
    windows = plan(job(frame_num=frames), continuation)
    assert [w.frames for w in windows] == sizes
    assert sum(w.adds for w in windows) == frames


def test_a_storyboard_gives_each_segment_its_own_windows_and_exact_frames() -> None:
    board = job(segments=[{"prompt": "snow", "seconds": 1}, {"prompt": "city", "seconds": 1.5},
                          {"prompt": "night", "seconds": 0.25}])  # fmt: skip
    windows = plan(board, Continuation.of(settings(continuation_window_frames=9)))

    assert [(w.prompt, w.frames, w.adds) for w in windows] == [
        ("snow", 9, 9), ("snow", 9, 4), ("snow", 9, 4),  # 17 frames
        ("city", 9, 4), ("city", 9, 4), ("city", 9, 4), ("city", 9, 4), ("city", 9, 4),
        ("city", 9, 4),  # 24 frames
        ("night", 9, 4),  # 4 frames
    ]  # fmt: skip
    ranges = segment_ranges(board)
    assert [(r["first_frame"], r["last_frame"]) for r in ranges] == [(0, 16), (17, 40), (41, 44)]
    assert ranges[-1]["last_frame"] + 1 == board.frames == sum(w.adds for w in windows)


def test_a_first_segment_shorter_than_the_overlap_is_continued_from_all_its_frames() -> None:
    board = job(segments=[{"prompt": "a", "seconds": 0.1}, {"prompt": "b", "seconds": 0.5}])
    windows = plan(board, Continuation.of(settings(continuation_window_frames=9)))
    assert [(w.frames, w.overlap) for w in windows] == [(1, 0), (9, 1)]


@pytest.mark.parametrize(
    ("a_job", "values", "runs_as_windows"),
    [
        (job(frame_num=81), {}, False),
        (job(frame_num=85), {}, True),
        (job(frame_num=121), {"wan_vace_model_path": None}, False),  # one pass, as before
        (job(frame_num=125), {"wan_vace_model_path": None}, True),  # then fails naming VACE
        (job(segments=[{"prompt": "a", "seconds": 1}, {"prompt": "b", "seconds": 1}]), {}, True),
        (job(segments=[{"prompt": "a", "seconds": 1}]), {}, False),
        (job(frame_num=121, image="https://x/a.png", pipeline="img2img"), {}, False),
        (job("image_fast"), {}, False),
    ],
    ids=["81", "85", "121-without-vace", "125-without-vace", "storyboard", "one-segment",
         "i2i", "image"],
)  # fmt: skip
def test_which_jobs_run_as_windows(a_job: Job, values: dict, runs_as_windows: bool) -> None:
    assert windowed(a_job, settings() if not values else
                    Settings(_env_file=None, **values)) is runs_as_windows  # fmt: skip


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"continuation_window_frames": 9, "continuation_overlap_frames": 9},
         "CONTINUATION_OVERLAP_FRAMES=9 (normalised to 9) must be below"),
        ({"continuation_window_frames": 11, "continuation_overlap_frames": 12},
         "CONTINUATION_OVERLAP_FRAMES=12 (normalised to 9) must be below"),
        ({"continuation_overlap_frames": 5, "continuation_blend_frames": 6},
         "CONTINUATION_BLEND_FRAMES=6 must be at most"),
    ],
    ids=["overlap-of-a-window", "overlap-over", "blend-over-overlap"],
)  # fmt: skip
def test_continuation_settings_that_cannot_work_are_refused_naming_the_setting(
    values: dict, setting: str
) -> None:
    with pytest.raises(UnsupportedMode, match=setting.replace("(", r"\(").replace(")", r"\)")):
        Continuation.of(settings(**values))
    # and the senders' time limits count one window: the generation fails at once
    assert window_count(job(frame_num=200), settings(**values)) == 1


def test_window_settings_are_normalised_to_4n_plus_1() -> None:
    continuation = Continuation.of(settings(continuation_window_frames=83,
                                            continuation_overlap_frames=8))  # fmt: skip
    assert (continuation.window_frames, continuation.overlap_frames) == (81, 5)


def test_window_1_runs_on_the_job_seed_and_every_later_one_on_its_own_reproducible_seed() -> None:
    seeds = [window_seed(42, n) for n in range(1, 14)]
    assert seeds[0] == 42
    assert len(set(seeds)) == 13
    assert seeds == [window_seed(42, n) for n in range(1, 14)]
    assert window_seed(43, 2) != seeds[1]
