"""Colour matching of frames: hold a long video's colour from window to window.

Each window of a long video goes through a VAE decode of its own, and its colours drift a
little from the window before. The window's frames made over the overlap show the same
moment as the video's frames they stand for: moving the window's Lab mean and standard
deviation per channel (Reinhard's colour transfer) so that those frames match the video's
holds every window to the colours of the one before, and so, window after window, to the
first. The conversions are scikit-image's (`rgb2lab`, `lab2rgb`), in float32, one frame at
a time: a window of 81 frames at 480x832 never becomes one float64 array of 780 MB.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage.color import lab2rgb, rgb2lab

#: Keeps a flat channel (deviation 0) from dividing by zero: it takes the target's mean.
MIN_DEVIATION = 1e-6


def lab_statistics(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation in Lab over all pixels of uint8 RGB frames
    (F, H, W, 3)."""
    labs = [rgb2lab(_unit(frame)).reshape(-1, 3) for frame in frames]
    pixels = np.concatenate(labs)
    return pixels.mean(axis=0, dtype=np.float64), pixels.std(axis=0, dtype=np.float64)


def match_colours(
    frames: np.ndarray, *, source: np.ndarray, target: np.ndarray, strength: float
) -> np.ndarray:
    """`frames` (uint8 RGB, F x H x W x 3) moved in Lab so that the statistics of `source`
    (frames of the same window) become those of `target` (the frames they stand for), by
    `strength` (0: unchanged, 1: fully). A new array; `frames` is left as it was."""
    if strength == 0:
        return frames.copy()
    source_mean, source_std = lab_statistics(source)
    target_mean, target_std = lab_statistics(target)
    scale = target_std / np.maximum(source_std, MIN_DEVIATION)
    scale, source_mean, target_mean = (a.astype(np.float32) for a in (scale, source_mean,
                                                                      target_mean))  # fmt: skip
    matched = np.empty_like(frames)
    for index, frame in enumerate(frames):
        lab = rgb2lab(_unit(frame))
        moved = (lab - source_mean) * scale + target_mean
        lab = lab + strength * (moved - lab)
        with warnings.catch_warnings():  # a colour moved out of sRGB is clipped, as it should
            warnings.filterwarnings("ignore", "Conversion from CIE-LAB", UserWarning)
            rgb = lab2rgb(lab)
        matched[index] = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    return matched


def _unit(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32) / 255
