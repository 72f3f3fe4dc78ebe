"""Long videos window by window (CONTRACT.md section 7), resumable after a crash.

The plan comes from `windows`. Window 1 runs as the job asks: text to video, or VACE with
its start frame (and its reference image); an end frame waits for the last window. Every
later window is a `WanVACEPipeline` call with the job's prompt (its segment's, for a
storyboard), negative prompt and settings, whose control video starts with the video's last
overlap frames, kept (mask black), with CONTINUATION_OVERLAP_NOISE on them, followed by gray
frames to make (mask white). What it makes over the overlap is dropped after it has served
to match the window's colours (`media.colour`), so the seam is a clean cut: the statistics
of those frames are moved to those of the first window's last overlap frames, so colour
is held to window 1 and a drift cannot add up from window to window. A storyboard's
segment changes the scene: the first window of a segment is matched to the frames it
continues from, and holds the colours of the windows after it.

Each window's new frames go to the spool as soon as they are made (`media.spool`), and the
caller's `WindowLog` records them; a generation that starts again on the same host passes
`first_window` and goes on from there, reading the overlap frames back from the spool. The
child holds the overlap frames and the window in hand, never more: at most two windows of
decoded frames.

With CONTINUATION_BLEND_FRAMES, the last of the frames a window makes over the overlap are
not all dropped: the video's frames they stand for fade into them (`cross_faded`), and
those frames of the spool are written again once the new window's are in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from safetensors import safe_open

from media import spool
from media.colour import match_colours
from worker.generation.load import Pipelines
from worker.generation.modes import VACE_GRAY, WAN_TASKS, call_pipeline, vace_conditions
from worker.generation.windows import Continuation, Window, plan, window_seed
from worker.jobs.model import Job
from worker.settings import Settings

#: Called after each denoising step with (window number, steps done, steps in all).
WindowStepHook = Callable[[int, int, int], None]
#: Overlap noise is given in Wan2GP's scale (0..150): this many units make a standard
#: deviation of the whole [-1, 1] pixel range.
OVERLAP_NOISE_UNITS = 1000


class WindowLog(Protocol):
    """Told when each window starts and when its frames are in the spool."""

    def started(self, window: Window) -> None: ...

    def finished(self, window: Window) -> None: ...


@dataclass(frozen=True)
class Continued:
    """What a long generation left in the spool, and what the callback says about it."""

    frames_dir: Path
    frame_num: int
    metadata: dict[str, Any]


def generate_long(
    pipelines: Pipelines,
    job: Job,
    *,
    seed: int,
    references: dict[str, Image.Image],
    continuation: Continuation,
    frames_dir: Path,
    first_window: int = 1,
    fallback_reason: str | None = None,
    on_step: WindowStepHook | None = None,
    log: WindowLog | None = None,
) -> Continued:
    """Make the job's windows from `first_window` on (the earlier ones are in `frames_dir`),
    each written there as window files; `references` are the prepared images by role."""
    windows = plan(job, continuation)
    later = windows_job(job, pipelines.settings)
    tail: np.ndarray | None = None
    #: The colours the windows are held to: the last overlap frames of their segment's first.
    anchor: np.ndarray | None = None
    blend = 0
    if first_window > 1:
        video = spool.SpooledWindows(frames_dir)
        tail = video.tail(continuation.overlap_frames)
        anchor = _anchor_of(video, windows, windows[first_window - 1], continuation)
    else:
        spool.remove_windows(frames_dir)
    for window in windows[first_window - 1 :]:
        if log is not None:
            log.started(window)
        step = _window_hook(on_step, window.number)
        if tail is None:
            frames = _first(pipelines, job, window, seed, references, step)
        else:
            made = _continue(pipelines, later, window, seed, tail, references,
                             last=window is windows[-1], continuation=continuation,
                             on_step=step)  # fmt: skip
            blend = min(continuation.blend_frames, window.overlap)
            held_to = tail[-window.overlap :] if _opens_segment(windows, window) else anchor
            matched = match_colours(made[window.overlap - blend :], source=made[: window.overlap],
                                    target=held_to, strength=continuation.color_match)  # fmt: skip
            del made
            frames = matched[blend:]
            if blend:
                tail[-blend:] = cross_faded(tail[-blend:], matched[:blend])
        spool.write_window(frames_dir, window.number, frames)
        if tail is not None and blend:  # the faded frames replace the video's, after the new
            spool.overwrite(frames_dir, window.first_frame - blend, tail[-blend:])  # window
        tail = frames if tail is None else np.concatenate([tail, frames])
        tail = tail[-continuation.overlap_frames :].copy()
        if _opens_segment(windows, window):
            anchor = tail.copy()
        del frames
        if log is not None:
            log.finished(window)
    return Continued(
        frames_dir=frames_dir,
        frame_num=sum(window.adds for window in windows),
        metadata=_metadata(
            job,
            windows,
            continuation,
            references,
            fallback_reason,
            first_window=first_window,
            turbo_windows=later.turbo,
        ),  # fmt: skip
    )


def _opens_segment(windows: list[Window], window: Window) -> bool:
    """Whether `window` is the first of its storyboard segment (window 1 opens the first)."""
    return window.number == 1 or windows[window.number - 2].segment != window.segment


def _anchor_of(
    video: spool.SpooledWindows, windows: list[Window], window: Window, continuation: Continuation
) -> np.ndarray | None:
    """The colour anchor of `window`'s segment read back from the spool (a resumed
    generation): the last overlap frames of the segment's first window; None when `window`
    opens its segment itself."""
    if _opens_segment(windows, window):
        return None
    first = next(w for w in windows if w.segment == window.segment)
    end = first.first_frame + first.adds
    return np.stack([video[i] for i in range(max(0, end - continuation.overlap_frames), end)])


def windows_job(job: Job, settings: Settings) -> Job:
    """The job as the windows after the first run it. A turbo job's distilled checkpoint
    speeds them up only when it is a VACE one (a WAN_DISTILL_LORA with weights for VACE's
    blocks); otherwise they run the job's own steps and guidance at its preset."""
    if not job.turbo or vace_distilled(settings):
        return job
    return job.at_preset(job.quality).model_copy(update={"turbo": False})


@cache
def _lora_keys(path: Path) -> tuple[str, ...]:
    with safe_open(str(path), framework="pt") as weights:
        return tuple(weights.keys())


def vace_distilled(settings: Settings) -> bool:
    """Whether the turbo checkpoint was distilled for VACE: a LoRA holding weights of VACE's
    own blocks. A distilled transformer (WAN_TURBO_MODEL_PATH) is a text-to-video one."""
    lora = settings.wan_distill_lora
    return lora is not None and any("vace_blocks" in key for key in _lora_keys(lora))


def _window_hook(on_step: WindowStepHook | None, number: int) -> Callable[[int, int], None]:
    def step(done: int, total: int) -> None:
        if on_step is not None:
            on_step(number, done, total)

    return step


def _common(job: Job, window: Window) -> dict[str, Any]:
    """What every window's pipeline call takes from the job."""
    return {
        "prompt": window.prompt,
        "negative_prompt": job.negative_prompt or None,
        "height": job.height,
        "width": job.width,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
        "num_frames": window.frames,
    }


def _first(
    pipelines: Pipelines,
    job: Job,
    window: Window,
    seed: int,
    references: dict[str, Image.Image],
    on_step: Callable[[int, int], None],
) -> np.ndarray:
    """Window 1 as the job asks: its start frame and reference image, else text only."""
    first = {role: image for role, image in references.items() if role in ("start", "single")}
    call = _common(job, window)
    if not first:
        return call_pipeline(pipelines.for_job("t2v", job), job, seed, on_step, **call)
    conditions, _ = vace_conditions(first, frames=window.frames, width=job.width,
                                    height=job.height)  # fmt: skip
    return call_pipeline(pipelines.for_job("vace", job), job, seed, on_step, **conditions, **call)


def _continue(
    pipelines: Pipelines,
    job: Job,
    window: Window,
    seed: int,
    tail: np.ndarray,
    references: dict[str, Image.Image],
    *,
    last: bool,
    continuation: Continuation,
    on_step: Callable[[int, int], None],
) -> np.ndarray:
    """A later window: VACE continuing from the video's last `window.overlap` frames."""
    number_seed = window_seed(seed, window.number)
    kept = overlap_noised(tail[-window.overlap :], continuation.overlap_noise, seed=number_seed)
    conditions = continuation_conditions(
        kept, frames=window.frames, end=references.get("end") if last else None
    )
    if "single" in references:
        conditions["reference_images"] = [references["single"]]
    call = _common(job, window)
    vace = pipelines.for_job("vace", job)
    return call_pipeline(vace, job, number_seed, on_step, **conditions, **call)


def cross_faded(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """CONTINUATION_BLEND_FRAMES: the video's last frames faded into the new window's own
    versions of them, linearly, the new window's weight rising towards the seam."""
    weights = np.arange(1, len(old) + 1, dtype=np.float32) / (len(old) + 1)
    faded = old * (1 - weights[:, None, None, None]) + new * weights[:, None, None, None]
    return np.clip(np.rint(faded), 0, 255).astype(np.uint8)


def overlap_noised(frames: np.ndarray, noise: float, *, seed: int) -> np.ndarray:
    """The kept frames with CONTINUATION_OVERLAP_NOISE on them: Gaussian noise whose
    standard deviation is `noise` thousandths of the [-1, 1] pixel range (Wan2GP's scale),
    the same for the same seed."""
    if noise == 0:
        return frames
    sigma = noise / OVERLAP_NOISE_UNITS * 127.5  # of uint8's 255 = the range's 2
    noisy = frames + np.random.default_rng(seed).normal(0.0, sigma, frames.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def continuation_conditions(
    kept: np.ndarray, *, frames: int, end: Image.Image | None = None
) -> dict[str, Any]:
    """VACE's control video and mask for a window of `frames`: the kept frames (black:
    keep), then gray frames (white: make), the end frame last (kept) when one is given."""
    height, width = kept.shape[1:3]
    gray = Image.new("RGB", (width, height), VACE_GRAY)
    keep, make = Image.new("L", (width, height), 0), Image.new("L", (width, height), 255)
    video = [Image.fromarray(frame) for frame in kept] + [gray] * (frames - len(kept))
    mask = [keep] * len(kept) + [make] * (frames - len(kept))
    if end is not None:
        video[-1], mask[-1] = end, keep
    return {"video": video, "mask": mask}


def _metadata(
    job: Job,
    windows: list[Window],
    continuation: Continuation,
    references: dict[str, Image.Image],
    fallback_reason: str | None,
    *,
    first_window: int,
    turbo_windows: bool,
) -> dict[str, Any]:
    """What the callback says: what ran, the continuation, and a storyboard's frames."""
    metadata: dict[str, Any] = {
        "wan_task": WAN_TASKS["vace"],
        "reference_mode": job.reference_mode if fallback_reason is None else "none",
        "duration_seconds": round(sum(w.adds for w in windows) / job.fps, 2),
        "continuation": {
            "windows": len(windows),
            **continuation.described(),
            "resumed_from_window": first_window if first_window > 1 else None,
            "turbo_windows": turbo_windows,
        },
    }
    if references:
        metadata["references_used"] = [role for role in ("start", "single", "end")
                                       if role in references]  # fmt: skip
    if fallback_reason is not None:
        metadata |= {
            "reference_fallback": True,
            "reference_fallback_reason": fallback_reason,
            "reference_mode_requested": job.reference_mode,
        }
    return metadata
