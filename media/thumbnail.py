"""The 256 px WEBP thumbnail the platform shows in its galleries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from media.spool import Frames

#: Longest edge of a thumbnail, pixels (aspect ratio kept).
THUMBNAIL_EDGE_PX = 256
THUMBNAIL_QUALITY = 85


def middle_frame(frames: Frames) -> np.ndarray:
    """The frame a thumbnail shows: the middle one (the only one for an image)."""
    return np.asarray(frames[len(frames) // 2])


def make_thumbnail(frame: np.ndarray, out: Path) -> Path:
    image = Image.fromarray(frame)
    image.thumbnail((THUMBNAIL_EDGE_PX, THUMBNAIL_EDGE_PX), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="WEBP", quality=THUMBNAIL_QUALITY)
    return out
