"""Long videos window by window, as the generation child runs them: tiny WAN and VACE.

What the windows hand VACE is read off its pipeline calls (the real pipeline runs; the
calls are only recorded), and windows are started at window 2 from frames this test puts
in the spool, as a resumed generation does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import WanPipeline, WanVACEPipeline

from media import spool
from tests.test_media import moving_gradients
from worker.generation.continuation import generate_long, overlap_noised
from worker.generation.windows import Continuation
from worker.jobs.model import Job, parse_job
from worker.settings import Settings

#: About a minute of CPU: a 3-window storyboard and five single windows, at 256x256.
pytestmark = pytest.mark.runs_long

SIZE = 256
WINDOW, OVERLAP = 9, 5


@pytest.fixture(scope="module")
def pipelines(tiny_wan: Path, tiny_vace: Path):
    from worker.generation import Pipelines

    return Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan,
                              wan_vace_model_path=tiny_vace, device="cpu"))  # fmt: skip


def continuation(**values: Any) -> Continuation:
    settings = {"continuation_window_frames": WINDOW, "continuation_overlap_frames": OVERLAP,
                "continuation_overlap_noise": 0} | values  # fmt: skip
    return Continuation.of(Settings(_env_file=None, **settings))


def job(**config: Any) -> Job:
    config = {"resolution": f"{SIZE}x{SIZE}", "num_inference_steps": 2, "seed": 5} | config
    return parse_job({"id": "long-1", "type": "video_fast", "prompt": "a red fox",
                      "user_id": "user-1", "config": config})  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every WanPipeline and WanVACEPipeline call's arguments, in order, and (under the key
    `made`) the frames it made as uint8; the calls run."""
    recorded: list[tuple[str, dict[str, Any]]] = []

    def recording(kind: str, call: Callable) -> Callable:
        def wrapper(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            output = call(pipe, *args, **kwargs)
            made = (np.clip(output.frames[0], 0, 1) * 255).round().astype(np.uint8)
            recorded.append((kind, kwargs | {"made": made}))
            return output

        return wrapper

    monkeypatch.setattr(WanPipeline, "__call__", recording("t2v", WanPipeline.__call__))
    monkeypatch.setattr(WanVACEPipeline, "__call__", recording("vace", WanVACEPipeline.__call__))
    yield recorded


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def test_each_window_continues_from_the_last_overlap_frames_and_follows_its_segment(
    pipelines: Any, calls: list, tmp_path: Path
) -> None:
    # Given a storyboard of 9 frames of snow, then 8 of a city: 3 windows of 9
    board = job(segments=[{"prompt": "snow", "seconds": 9 / 16},
                          {"prompt": "city", "seconds": 8 / 16}])  # fmt: skip

    made = generate_long(pipelines, board, seed=5, references={}, continuation=continuation(),
                         frames_dir=tmp_path)  # fmt: skip

    # Then window 1 ran on text, windows 2 and 3 on VACE, with their segments' prompts
    assert [(kind, call["prompt"], call["num_frames"]) for kind, call in calls] == [
        ("t2v", "snow", 9), ("vace", "city", 9), ("vace", "city", 9)]  # fmt: skip
    video = np.stack(list(spool.SpooledWindows(tmp_path)))
    assert made.frame_num == len(video) == 17
    # And each VACE call's control video starts with the video's last 5 frames so far, kept
    for (_, call), so_far in zip(calls[1:], (9, 13), strict=True):
        control, mask = pixels(call["video"]), pixels(call["mask"])
        np.testing.assert_array_equal(control[:OVERLAP], video[so_far - OVERLAP : so_far])
        assert (control[OVERLAP:] == 128).all()  # gray: to make
        assert (mask[:OVERLAP] == 0).all() and (mask[OVERLAP:] == 255).all()


def second_window(pipelines: Any, first: np.ndarray, where: Path, **values: Any) -> np.ndarray:
    """Window 2 of a 2-window job, made after `first` (window 1's frames, in the spool)."""
    spool.write_window(where, 1, first)
    generate_long(pipelines, job(frame_num=13), seed=5, references={}, first_window=2,
                  continuation=continuation(**values), frames_dir=where)  # fmt: skip
    return np.load(spool.window_path(where, 2))


def test_window_2_depends_on_window_1_and_its_colours_are_matched_to_it(
    pipelines: Any, tmp_path: Path
) -> None:
    first = moving_gradients(9, height=SIZE, width=SIZE)
    other = first[:, ::-1].copy()  # the same colours, mirrored

    made = second_window(pipelines, first, tmp_path / "a", continuation_color_match=0)
    again = second_window(pipelines, first, tmp_path / "b", continuation_color_match=0)
    after_other = second_window(pipelines, other, tmp_path / "c", continuation_color_match=0)
    matched = second_window(pipelines, first, tmp_path / "d")

    assert made.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(made, again)  # the same job, seed and window 1
    assert np.abs(made.astype(int) - after_other).mean() > 1  # another window 1
    assert np.abs(made.astype(int) - matched).mean() > 1  # CONTINUATION_COLOR_MATCH 1 and 0


def test_colour_is_held_to_window_1_so_a_drift_of_window_2_does_not_carry_on(
    pipelines: Any, tmp_path: Path
) -> None:
    from media.colour import lab_statistics
    from tests.test_colour import tinted

    # Given windows 1 and 2 of 13 frames in the spool (window 2 adds 8: window 3 continues
    # from window 2 alone), window 1 as made or tinted
    video = moving_gradients(21, height=SIZE, width=SIZE)
    held = continuation(continuation_window_frames=13)

    def third_window(first: np.ndarray, where: Path) -> np.ndarray:
        spool.write_window(where, 1, first)
        spool.write_window(where, 2, video[13:])
        generate_long(pipelines, job(frame_num=29), seed=5, references={}, first_window=3,
                      continuation=held, frames_dir=where)  # fmt: skip
        return np.load(spool.window_path(where, 3))

    # When window 3 is made after each
    plain = third_window(video[:13], tmp_path / "a")
    warm = third_window(tinted(video[:13]), tmp_path / "b")

    # Then its colours follow window 1's, the frames it continues from being the same
    shift = lab_statistics(warm)[0] - lab_statistics(plain)[0]
    tint = lab_statistics(tinted(video[8:13]))[0] - lab_statistics(video[8:13])[0]
    np.testing.assert_allclose(shift, tint, atol=3)
    assert np.abs(tint).max() > 8


def test_blend_frames_fade_the_videos_last_frames_into_the_new_windows_own(
    pipelines: Any, calls: list, tmp_path: Path
) -> None:
    first = moving_gradients(9, height=SIZE, width=SIZE)

    second_window(pipelines, first, tmp_path, continuation_color_match=0,
                  continuation_blend_frames=2)  # fmt: skip

    [(_, call)] = calls
    made = call["made"]  # window 2's 9 frames: 5 over the overlap, then 4 new
    video = np.stack(list(spool.SpooledWindows(tmp_path)))
    np.testing.assert_array_equal(video[:7], first[:7])
    for index, weight in ((7, 1 / 3), (8, 2 / 3)):  # the last 2: window 2's own weigh more
        faded = np.rint(first[index] * (1 - weight) + made[index - 4] * weight)
        np.testing.assert_allclose(video[index], faded, atol=1)
    np.testing.assert_array_equal(video[9:], made[5:])


def test_overlap_noise_is_wan2gp_thousandths_of_the_pixel_range_and_seeded() -> None:
    kept = moving_gradients(5, height=64, width=64)

    noisy = overlap_noised(kept, 20, seed=1)

    deviation = (noisy.astype(float) - kept).std()
    assert 2.2 < deviation < 2.9  # 20 / 1000 of [-1, 1] is 2.55 of uint8's 0..255
    np.testing.assert_array_equal(noisy, overlap_noised(kept, 20, seed=1))
    assert not np.array_equal(noisy, overlap_noised(kept, 20, seed=2))
    assert overlap_noised(kept, 0, seed=1) is kept


def test_turbo_speeds_up_later_windows_only_with_a_lora_distilled_for_vace(
    tiny_wan_lora: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from worker.generation.continuation import windows_job
    from worker.generation.speed import as_run

    vace_lora = tmp_path / "vace-lora.safetensors"
    weights = load_file(tiny_wan_lora)
    name = next(iter(weights))
    save_file(weights | {name.replace("blocks.", "vace_blocks.", 1): weights[name].clone()},
              vace_lora)  # fmt: skip

    for lora, turbo_windows in ((tiny_wan_lora, False), (vace_lora, True)):
        settings = Settings(_env_file=None, wan_distill_lora=lora, turbo_steps=4)
        fast = as_run(job(duration_seconds=10, num_inference_steps=None), settings)
        assert (fast.turbo, fast.steps) == (True, 4)  # window 1

        later = windows_job(fast, settings)

        assert later.turbo is turbo_windows
        assert (later.steps, later.guidance) == ((4, 1.0) if turbo_windows else (25, 6.5))


@pytest.mark.gpu
def test_with_real_weights_no_seam_is_sharper_than_the_motion_inside_a_window(
    tmp_path: Path,
) -> None:
    # Needs Wan2.1-T2V-1.3B and Wan2.1-VACE-1.3B (WAN_MODEL_PATH, WAN_VACE_MODEL_PATH) and a
    # GPU: the random-weight models make noise, whose every frame is a cut.
    import os

    import torch

    if not torch.cuda.is_available() or not (
        os.environ.get("WAN_MODEL_PATH") and os.environ.get("WAN_VACE_MODEL_PATH")
    ):
        pytest.skip("needs CUDA and real WAN_MODEL_PATH / WAN_VACE_MODEL_PATH weights")
    from worker.generation import Pipelines
    from worker.generation.windows import plan

    settings = Settings(_env_file=None)
    a_job = parse_job({"id": "gpu-long", "type": "video_fast", "user_id": "u",
                       "prompt": "a sailing boat crosses a calm bay at sunset, the camera follows",
                       "config": {"duration_seconds": 15, "seed": 3}})  # fmt: skip
    default = Continuation.of(settings)

    generate_long(Pipelines(settings), a_job, seed=3, references={}, continuation=default,
                  frames_dir=tmp_path)  # fmt: skip

    video = [np.asarray(frame, dtype=float) for frame in spool.SpooledWindows(tmp_path)]
    steps = [float(np.abs(b - a).mean()) for a, b in zip(video, video[1:], strict=False)]
    seams = {w.first_frame for w in plan(a_job, default)[1:]}
    inside = [step for index, step in enumerate(steps) if index + 1 not in seams]
    for seam in seams:
        assert steps[seam - 1] <= 1.5 * float(np.median(inside)), f"the seam at frame {seam}"
