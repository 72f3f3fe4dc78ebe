"""Benchmark long videos by continuation (issue 17); prints a table.

    .venv/bin/python -m bench.long

- seconds per window and end to end for jobs of 1, 2, 4 and 12 windows (growth should be
  linear in windows: the seconds per window stay flat);
- the peak resident memory (VmHWM) of a process that makes a 961-frame job window by window
  as the generation child does, against the size of the whole video as one array;
- the peak resident memory of a process that encodes a 961-frame 480x832 video from its
  windows in the spool as the media worker does (frames streamed, never all loaded);
- at each seam, the mean absolute difference between the last kept frame and the next one
  over the median difference between consecutive frames inside a window, and the colour
  drift (mean Lab difference of window k to window 1), with and without colour matching.

Each measurement runs in a fresh interpreter (`--child`), so its peak memory is its own.
Without WAN_MODEL_PATH and WAN_VACE_MODEL_PATH the tiny random-weight models are built and
used: on a CPU the numbers are for the machinery only (window bookkeeping, spool, colour
matching, encode), and seams and drift of noise say nothing about real video.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

#: Timing runs: small windows at the smallest size, so 12 windows fit a CPU's patience.
TIMING = {"window": 17, "overlap": 5, "size": 256, "steps": 2}
WINDOW_COUNTS = (1, 2, 4, 12)
#: The memory run: the default windows (81, overlap 5), 961 frames, one step.
MEMORY = {"window": 81, "overlap": 5, "size": 256, "steps": 1}
LONGEST_FRAMES = 961
#: The media worker's encode from the spool: a 961-frame video at the platform's size.
ENCODE_WIDTH_PX, ENCODE_HEIGHT_PX = 480, 832


def frames_for(windows: int, window: int, overlap: int) -> int:
    return window + (windows - 1) * (window - overlap)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmHWM")


def models(scratch: Path) -> tuple[Path, Path, bool]:
    """WAN and VACE model directories: the settings', else tiny ones built in `scratch`."""
    wan, vace = os.environ.get("WAN_MODEL_PATH"), os.environ.get("WAN_VACE_MODEL_PATH")
    if wan and vace:
        return Path(wan), Path(vace), False
    from worker.local.tiny_models import make_tiny_vace, make_tiny_wan

    return make_tiny_wan(scratch / "wan"), make_tiny_vace(scratch / "vace"), True


def generate_child(args: argparse.Namespace) -> dict[str, Any]:
    """Make one long job window by window in this process; what it measured."""
    from media.spool import SpooledWindows
    from worker.generation import Pipelines
    from worker.generation.continuation import generate_long
    from worker.generation.windows import Continuation, plan
    from worker.jobs.model import parse_job
    from worker.settings import Settings

    settings = Settings(
        wan_model_path=args.wan, wan_vace_model_path=args.vace,
        continuation_window_frames=args.window, continuation_overlap_frames=args.overlap,
        continuation_color_match=args.color_match,
    )  # fmt: skip
    pipelines = Pipelines(settings)
    pipelines.t2v, pipelines.vace  # noqa: B018 (the properties load: not timed)
    job = parse_job({"id": "bench", "user_id": "bench", "type": "video_fast",
                     "prompt": "a red fox runs through fresh snow, the camera follows",
                     "config": {"frame_num": args.frames, "seed": 1,
                                "resolution": f"{args.size}x{args.size}",
                                "num_inference_steps": args.steps}})  # fmt: skip
    continuation = Continuation.of(settings)
    ended: list[float] = []

    class Clock:
        def started(self, window: Any) -> None:
            pass

        def finished(self, window: Any) -> None:
            ended.append(time.perf_counter())

    started = time.perf_counter()
    generate_long(pipelines, job, seed=1, references={}, continuation=continuation,
                  frames_dir=args.spool, log=Clock())  # fmt: skip
    total_s = time.perf_counter() - started
    peak = peak_rss_mib()
    windows = plan(job, continuation)
    video = SpooledWindows(args.spool)
    return {
        "windows": len(windows),
        "frames": len(video),
        "seconds": total_s,
        "window_seconds": list(np.diff([started, *ended])),
        "peak_rss_mib": peak,
        "video_mib": video.shape[0] * np.prod(video.shape[1:]) / 2**20,
        "window_mib": args.window * args.size * args.size * 3 / 2**20,
        **seams_and_drift(video, [w.first_frame for w in windows]),
    }


def seams_and_drift(video: Any, starts: list[int]) -> dict[str, float]:
    """The worst seam over the median step between frames inside windows, and the mean Lab
    drift of each window from window 1; read one frame at a time."""
    from media.colour import lab_statistics

    steps: list[float] = []
    previous = None
    for frame in video:
        current = np.asarray(frame, dtype=np.float32)
        if previous is not None:
            steps.append(float(np.abs(current - previous).mean()))
        previous = current
    seams = [steps[start - 1] for start in starts[1:]]
    inside = [step for index, step in enumerate(steps) if index + 1 not in starts]
    ends = [*starts[1:], len(video)]
    means = [lab_statistics(np.stack([video[i] for i in range(a, b)]))[0]
             for a, b in zip(starts, ends, strict=True)]  # fmt: skip
    drift = [float(np.abs(mean - means[0]).mean()) for mean in means[1:]]
    return {
        "seam_ratio": max(seams) / float(np.median(inside)) if seams else 0.0,
        "drift_mean": float(np.mean(drift)) if drift else 0.0,
        "drift_last": drift[-1] if drift else 0.0,
    }


def encode_child(args: argparse.Namespace) -> dict[str, Any]:
    """Encode a 961-frame video from window files as the media worker does; its peak RSS."""
    from media.encode import encode_mp4
    from media.spool import read_frames, write_window

    rng = np.random.default_rng(0)
    window = rng.integers(0, 256, (81, ENCODE_HEIGHT_PX, ENCODE_WIDTH_PX, 3), dtype=np.uint8)
    left, number = LONGEST_FRAMES, 1
    while left:
        count = min(left, 81 if number == 1 else 76)
        write_window(args.spool, number, window[:count])
        left, number = left - count, number + 1
    del window
    baseline = peak_rss_mib()
    started = time.perf_counter()
    encode_mp4(read_frames(args.spool), args.spool / "video.mp4", fps=16)
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
        "before_mib": baseline,
        "video_mib": LONGEST_FRAMES * ENCODE_HEIGHT_PX * ENCODE_WIDTH_PX * 3 / 2**20,
    }


def run_child(*options: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.long", "--child", *options],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        wan, vace, tiny = models(scratch)
        common = ["--wan", str(wan), "--vace", str(vace)]

        def generation(frames: int, config: dict[str, int], name: str, match: float = 1.0):
            options = [f"--{key}={value}" for key, value in config.items()]
            return run_child("generate", *common, f"--frames={frames}", *options,
                             f"--color-match={match}", f"--spool={scratch / name}")  # fmt: skip

        timings = {n: generation(frames_for(n, TIMING["window"], TIMING["overlap"]), TIMING,
                                 f"timing-{n}") for n in WINDOW_COUNTS}  # fmt: skip
        unmatched = generation(frames_for(12, TIMING["window"], TIMING["overlap"]), TIMING,
                               "unmatched", match=0.0)  # fmt: skip
        longest = generation(LONGEST_FRAMES, MEMORY, "longest")
        encoded = run_child("encode", "--spool", str(scratch / "encode"))

    table = Table(title="long videos by continuation (this machine)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    per = TIMING
    rows: list[tuple[str, str]] = []
    for count, result in timings.items():
        rows += [
            (f"{count} window(s) of {per['window']} frames ({result['frames']} frames, "
             f"{per['size']}x{per['size']}, {per['steps']} steps): end to end",
             f"{result['seconds']:.1f} s"),
            ("    seconds per window (mean)", f"{np.mean(result['window_seconds']):.2f} s"),
        ]  # fmt: skip
    rows += [
        (f"generation child peak RSS, {longest['frames']} frames in {longest['windows']} "
         f"windows of {MEMORY['window']} at {MEMORY['size']}x{MEMORY['size']}",
         f"{longest['peak_rss_mib']:.0f} MiB"),
        ("    the whole video as one array would be", f"{longest['video_mib']:.0f} MiB"),
        ("    one window of frames is", f"{longest['window_mib']:.0f} MiB"),
        (f"media worker encode from the spool, {LONGEST_FRAMES} frames at "
         f"{ENCODE_WIDTH_PX}x{ENCODE_HEIGHT_PX}: peak RSS",
         f"{encoded['peak_rss_mib']:.0f} MiB ({encoded['before_mib']:.0f} before)"),
        ("    the whole video as one array would be", f"{encoded['video_mib']:.0f} MiB"),
        ("    encode seconds", f"{encoded['seconds']:.1f} s"),
    ]  # fmt: skip
    for name, result in (("colour matched", timings[12]), ("no colour matching", unmatched)):
        rows += [
            (f"12 windows, {name}: worst seam / median step inside",
             f"{result['seam_ratio']:.2f}"),
            (f"12 windows, {name}: Lab drift from window 1, mean / last",
             f"{result['drift_mean']:.2f} / {result['drift_last']:.2f}"),
        ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if tiny:
        console.print(
            "[yellow]tiny random-weight models on this machine: these numbers are for the "
            "machinery only (windows, spool, colour matching, encode); seams and drift of "
            "noise say nothing about real video.[/]"
        )


def child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("generate", "encode"))
    parser.add_argument("--wan", type=Path)
    parser.add_argument("--vace", type=Path)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--window", type=int)
    parser.add_argument("--overlap", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--color-match", type=float, default=1.0)
    parser.add_argument("--spool", type=Path, required=True)
    args = parser.parse_args(argv)
    result = generate_child(args) if args.what == "generate" else encode_child(args)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
