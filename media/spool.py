"""The spool: frames handed from the generation worker to the media workers of one host.

Frames never pass through Redis. One directory per job holds the frames as a raw uint8
array (F, H, W, 3) and, later, the encoded file and thumbnail.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def job_dir(spool_dir: Path, job_id: str) -> Path:
    return spool_dir / job_id


def frames_path(spool_dir: Path, job_id: str) -> Path:
    return job_dir(spool_dir, job_id) / "frames.npy"


def write_frames(path: Path, frames: np.ndarray) -> Path:
    """Write atomically, so a media stage never reads half a file after a crash."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, frames)
    os.replace(partial, path)
    return path


def read_frames(path: Path) -> np.ndarray:
    """Memory-mapped: encoding streams frames from the page cache instead of copying them."""
    return np.load(path, mmap_mode="r")


def remove_job(spool_dir: Path, job_id: str) -> None:
    shutil.rmtree(job_dir(spool_dir, job_id), ignore_errors=True)


def sweep_orphans(
    spool_dir: Path, *, older_than_s: float, running: Callable[[str], bool]
) -> list[str]:
    """Remove job directories untouched for `older_than_s` whose job is not `running`;
    the job ids removed. What a job that ended normally leaves is removed at its end;
    this catches what a crash or a lost record left behind."""
    if not spool_dir.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for path in sorted(spool_dir.iterdir()):
        if path.is_dir() and path.stat().st_mtime < cutoff and not running(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
