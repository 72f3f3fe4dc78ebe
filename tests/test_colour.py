"""Colour matching of a long video's windows (media/colour.py), on frames built here."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab

from media.colour import match_colours
from tests.test_media import moving_gradients

OVERLAP = 5


def lab_mean(frames: np.ndarray) -> np.ndarray:
    """Mean L, a, b over every pixel, with scikit-image directly (float64)."""
    return np.mean([rgb2lab(frame).reshape(-1, 3).mean(axis=0) for frame in frames], axis=0)


def tinted(frames: np.ndarray) -> np.ndarray:
    """What a window's VAE round trip might do to its colours: warmer and a little brighter."""
    shifted = frames.astype(np.int16) + np.array([28, 8, -24], dtype=np.int16)
    return np.clip(shifted, 0, 255).astype(np.uint8)


def windows() -> tuple[np.ndarray, np.ndarray]:
    """Window 1 of a video, and window 2's raw frames: its first OVERLAP frames made again
    over window 1's last ones, then the new ones, all of it tinted."""
    video = moving_gradients(13, height=64, width=96)
    return video[:9], tinted(video[9 - OVERLAP :])


def test_a_tinted_window_comes_out_with_the_first_windows_lab_mean() -> None:
    first, raw = windows()

    kept = match_colours(raw[OVERLAP:], source=raw[:OVERLAP], target=first[-OVERLAP:],
                         strength=1.0)  # fmt: skip

    assert np.abs(lab_mean(raw[OVERLAP:]) - lab_mean(first)).max() > 8  # the drift
    assert np.abs(lab_mean(kept) - lab_mean(first)).max() < 2.0


def test_without_colour_matching_the_tint_stays() -> None:
    first, raw = windows()

    kept = match_colours(raw[OVERLAP:], source=raw[:OVERLAP], target=first[-OVERLAP:],
                         strength=0.0)  # fmt: skip

    np.testing.assert_array_equal(kept, raw[OVERLAP:])
    assert np.abs(lab_mean(kept) - lab_mean(first)).max() > 8


def test_half_strength_moves_the_colours_half_way() -> None:
    first, raw = windows()
    target, drifted = lab_mean(first), lab_mean(raw[OVERLAP:])

    kept = match_colours(raw[OVERLAP:], source=raw[:OVERLAP], target=first[-OVERLAP:],
                         strength=0.5)  # fmt: skip

    np.testing.assert_allclose(lab_mean(kept), (target + drifted) / 2, atol=2.0)


def test_a_flat_window_keeps_its_flatness_and_takes_the_mean() -> None:
    flat = np.full((3, 16, 16, 3), 100, dtype=np.uint8)
    first = moving_gradients(3, height=16, width=16)

    kept = match_colours(flat, source=flat, target=first, strength=1.0)

    assert np.ptp(kept.reshape(-1, 3), axis=0).max() <= 1  # no contrast made from nothing
    np.testing.assert_allclose(lab_mean(kept), lab_mean(first), atol=1.5)
