"""H.264 MP4 (yuv420p, faststart) with PyAV, and PNG for single-frame jobs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from media.spool import Frames

#: x264 speed/size trade-off; veryfast keeps encoding well under generation time.
X264_PRESET = "veryfast"
#: x264 constant rate factor: x264's own default. 18 looks the same on generated video but
#: makes files ~5x larger and encodes ~30% slower (measured with bench/job.py's frames).
X264_CRF = 23


def encode_mp4(frames: Frames, out: Path, *, fps: int) -> Path:
    """Encode (F, H, W, 3) uint8 frames; the moov atom goes first so browsers play at once.
    The frames are read one at a time: a long video's windows stream from the spool."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _, height, width, _ = frames.shape
    with av.open(str(out), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": X264_PRESET, "crf": str(X264_CRF)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out


def write_png(frame: np.ndarray, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame)).save(out, format="PNG")
    return out
