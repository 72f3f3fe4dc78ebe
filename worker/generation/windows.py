"""Long videos by continuation (CONTRACT.md section 7): the windows a job runs as.

Arithmetic only, no torch: the senders of a generation (bridge, API, media worker) read the
window count from here for the stage's time limits, and the generation child its plan.

A video longer than one window (CONTINUATION_WINDOW_FRAMES, 81) is made window by window.
Window 1 makes up to a window of frames as the job asks; every later window starts with the
last CONTINUATION_OVERLAP_FRAMES of the video so far, kept (VACE's mask), and makes the rest
of its frames new; the frames it makes again over the overlap are dropped. The last window
of each storyboard segment is shortened, so the video has exactly the frames asked for and
each segment exactly its own. Every count stays 4n+1 (WAN's latent grid): the overlap and
the window are normalised to it, the new frames of a window are a multiple of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.errors import UnsupportedMode
from worker.jobs.model import FRAMES_MAX, SEED_MAX, Job, Segment, normalise_frames
from worker.settings import Settings


@dataclass(frozen=True)
class Continuation:
    """The continuation settings in force, normalised to WAN's 4n+1 frames."""

    window_frames: int
    overlap_frames: int
    #: Wan2GP's scale, 0..150: noise added to the kept frames' conditioning.
    overlap_noise: float
    #: 0..1: how far each window's colours are moved to the first window's.
    color_match: float
    #: Frames cross-faded at each seam instead of cut (0: a hard cut).
    blend_frames: int

    @classmethod
    def of(cls, settings: Settings) -> Continuation:
        """The settings' values, or UnsupportedMode naming the setting that cannot work."""
        window = normalise_frames(settings.continuation_window_frames)
        overlap = normalise_frames(settings.continuation_overlap_frames)
        if overlap >= window:
            raise UnsupportedMode(
                f"CONTINUATION_OVERLAP_FRAMES={settings.continuation_overlap_frames} "
                f"(normalised to {overlap}) must be below CONTINUATION_WINDOW_FRAMES="
                f"{settings.continuation_window_frames} (normalised to {window}): every window "
                "after the first must make new frames"
            )
        if settings.continuation_blend_frames > overlap:
            raise UnsupportedMode(
                f"CONTINUATION_BLEND_FRAMES={settings.continuation_blend_frames} must be at most "
                f"the overlap, CONTINUATION_OVERLAP_FRAMES normalised to {overlap}: only "
                "frames made twice can be cross-faded"
            )
        return cls(
            window_frames=window,
            overlap_frames=overlap,
            overlap_noise=settings.continuation_overlap_noise,
            color_match=settings.continuation_color_match,
            blend_frames=settings.continuation_blend_frames,
        )

    def described(self) -> dict[str, float | int]:
        """As the callback's `continuation` reports them."""
        return {
            "window_frames": self.window_frames,
            "overlap_frames": self.overlap_frames,
            "overlap_noise": self.overlap_noise,
            "color_match": self.color_match,
            "blend_frames": self.blend_frames,
        }


@dataclass(frozen=True)
class Window:
    """One pipeline call of a long video."""

    #: 1 for the first window.
    number: int
    #: Frames the pipeline makes (4n+1).
    frames: int
    #: Frames at its start that continue the video so far (0 for the first window).
    overlap: int
    #: Index in the video of the first frame it adds.
    first_frame: int
    prompt: str
    #: Index of the storyboard segment it belongs to (0 without a storyboard).
    segment: int

    @property
    def adds(self) -> int:
        """Frames it adds to the video: what it makes past the overlap."""
        return self.frames - self.overlap


def windowed(job: Job, settings: Settings) -> bool:
    """Whether the job runs as continuation windows: a storyboard of several segments, or a
    video longer than a window. Image to image never does (its limit is one pass). Up to
    FRAMES_MAX frames, a worker without WAN_VACE_MODEL_PATH makes it in one pass, as before
    continuation; above that a long job needs VACE (`require_vace` says so)."""
    if job.image_to_image or not job.type.is_video:
        return False
    if len(job.segments) > 1 or job.frames > FRAMES_MAX:
        return True
    window = normalise_frames(settings.continuation_window_frames)
    return job.frames > window and settings.wan_vace_model_path is not None


def segments_of(job: Job) -> tuple[Segment, ...]:
    """The job's storyboard, or the whole video as one segment with the job's prompt."""
    if job.segments:
        return job.segments
    return (Segment(prompt=job.prompt, seconds=job.frames / job.fps, frames=job.frames),)


def plan(job: Job, continuation: Continuation) -> list[Window]:
    """The windows in order: each segment's frames made by windows of at most
    `window_frames`, each after the first continuing from the last `overlap_frames` (fewer
    when the video so far is shorter), the last window of a segment shortened to end it."""
    windows: list[Window] = []
    made = 0
    for index, segment in enumerate(segments_of(job)):
        left = segment.frames
        while left > 0:
            overlap = min(continuation.overlap_frames, made)
            adds = min(left, continuation.window_frames - overlap)
            windows.append(Window(number=len(windows) + 1, frames=overlap + adds,
                                  overlap=overlap, first_frame=made, prompt=segment.prompt,
                                  segment=index))  # fmt: skip
            made += adds
            left -= adds
    return windows


def window_count(job: Job, settings: Settings) -> int:
    """How many pipeline calls the job's generation makes (1 in one pass). A plan that the
    settings refuse counts as one: the generation fails at once, naming the setting."""
    if not windowed(job, settings):
        return 1
    try:
        return len(plan(job, Continuation.of(settings)))
    except UnsupportedMode:
        return 1


def window_seed(seed: int, number: int) -> int:
    """Window 1 runs on the job's seed (a short job and the first window agree); every later
    window on a seed derived from the job's seed and its number, so the same job and seed
    give the same video."""
    if number == 1:
        return seed
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0]) % (SEED_MAX + 1)


def segment_ranges(job: Job) -> list[dict[str, object]]:
    """Each storyboard segment with its first and last frame in the video (0-based)."""
    ranges = []
    first = 0
    for segment in job.segments:
        ranges.append({"prompt": segment.prompt, "seconds": segment.seconds,
                       "first_frame": first, "last_frame": first + segment.frames - 1})  # fmt: skip
        first += segment.frames
    return ranges
