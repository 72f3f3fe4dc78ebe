"""The spool: frames handed from the generation worker to the media workers of one host.

Frames never pass through Redis. One directory per job holds the frames as a raw uint8
array (F, H, W, 3) and, later, the encoded file and thumbnail. A long video (made window by
window, worker/generation/continuation.py) has one such array per window instead, under
`windows/`, written as each window is made: a crash costs the window in progress, and
the media stages read the video one window at a time (`SpooledWindows`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
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


def read_frames(path: Path) -> Frames:
    """Memory-mapped: encoding streams frames from the page cache instead of copying them.
    A directory is a long video's windows, read one window at a time."""
    if path.is_dir():
        return SpooledWindows(path)
    return np.load(path, mmap_mode="r")


def windows_dir(spool_dir: Path, job_id: str) -> Path:
    return job_dir(spool_dir, job_id) / "windows"


def window_path(directory: Path, number: int) -> Path:
    """Where window `number` (1 for the first) keeps the frames it added to the video."""
    return directory / f"{number:04d}.npy"


def write_window(directory: Path, number: int, frames: np.ndarray) -> Path:
    """Window `number`'s new frames, written atomically (a crash leaves the window whole or
    absent)."""
    return write_frames(window_path(directory, number), frames)


def overwrite(directory: Path, first: int, frames: np.ndarray) -> None:
    """Replace the video's frames from index `first` on with `frames`, in whichever window
    files hold them (each written again atomically)."""
    start = 0
    for number in range(1, windows_written(directory) + 1):
        path = window_path(directory, number)
        end = start + np.load(path, mmap_mode="r").shape[0]
        if first < end and first + len(frames) > start:
            window = np.load(path)
            lo, hi = max(first, start), min(first + len(frames), end)
            window[lo - start : hi - start] = frames[lo - first : hi - first]
            write_frames(path, window)
        start = end


def remove_windows(directory: Path) -> None:
    """Forget every window written here (a generation that starts from the first again)."""
    shutil.rmtree(directory, ignore_errors=True)


def windows_written(directory: Path) -> int:
    """How many windows, from the first on without a gap, have their frames here."""
    count = 0
    while window_path(directory, count + 1).is_file():
        count += 1
    return count


class SpooledWindows:
    """A long video's frames as one sequence, read from its window files: iterating maps one
    window at a time and lets it go before the next, so a reader holds one window of the
    video in memory, never all of it."""

    def __init__(self, directory: Path) -> None:
        self.paths = [window_path(directory, n) for n in range(1, windows_written(directory) + 1)]
        if not self.paths:
            raise FileNotFoundError(f"no window frames in {directory}")
        headers = [np.load(path, mmap_mode="r").shape for path in self.paths]
        self.lengths = [shape[0] for shape in headers]
        self.shape = (sum(self.lengths), *headers[0][1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield from np.load(path, mmap_mode="r")

    def __getitem__(self, index: int) -> np.ndarray:
        """One frame, by its index in the video (negative from the end)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} of {len(self)}")
        index %= len(self)
        for path, length in zip(self.paths, self.lengths, strict=True):
            if index < length:
                return np.array(np.load(path, mmap_mode="r")[index])
            index -= length
        raise AssertionError("unreachable: the lengths add up to len(self)")

    def tail(self, count: int) -> np.ndarray:
        """The last `count` frames of the video (fewer if it is shorter), as one array."""
        parts: list[np.ndarray] = []
        for path in reversed(self.paths):
            if count <= 0:
                break
            window = np.load(path, mmap_mode="r")
            parts.insert(0, np.array(window[-count:]))
            count -= len(parts[0])
        return np.concatenate(parts)


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


#: A job's frames as the media stages read them: one array, or a long video's windows.
Frames = np.ndarray | SpooledWindows
