"""Benchmark the speed options of issue 9, one option set after another; prints a table.

    make bench        (or: .venv/bin/python -m bench.gpu)

With WAN_MODEL_PATH at Wan2.1-T2V-1.3B (diffusers format) and a CUDA device it runs
`video_fast` (480x832, 81 frames, 25 steps) and `image_fast` (480x832, 25 steps) for each
option set: baseline (diffusers' defaults), the attention backend, + compiled blocks,
+ First Block Cache, + MagCache, fp8, and turbo when WAN_DISTILL_LORA or
WAN_TURBO_MODEL_PATH is set. Per set and job: load seconds, first-job seconds, seconds per
step, denoise, decode, end to end (a second run, warm), peak VRAM, and PSNR / SSIM of the
last frame against the baseline's (same seed).

Without CUDA it runs the same table on the tiny random-weight model, smaller (256x448,
5 frames, 10 steps) and without the compiled set (a CPU compile costs about a minute): its numbers
say nothing about real weights.

    python -m bench.gpu --real-shapes [--out table.txt] [--budget-s 420]

runs the same table on a CUDA card without the weights: Wan2.1-T2V-1.3B's transformer, its
umt5-xxl text encoder and its VAE built from their published configs with random weights
(`bench/real_shapes.py`), turbo as a random LoRA at the published rank. Every time and memory
figure is real; PSNR and SSIM mean nothing and say so. The video runs once per set (its
s/step, denoise and decode come from that run) to fit `bench/device.sh`'s eight minutes, and
sets that would run past `--budget-s` are left out by name. Without CUDA it refuses.

Every mode ends with image batching: `image_fast` jobs of batch 1, 2 and 4 in one pipeline call
each (`generate_images`), seconds per call and per image, images per minute, peak VRAM.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import WanPipeline
from rich.console import Console
from rich.table import Table

from worker.devices import resolve_device
from worker.generation import Pipelines, generate, generate_images, load_t2v
from worker.generation.speed import as_run, in_force, refusals, turbo_checkpoint
from worker.jobs.model import Job, parse_job
from worker.settings import Settings

SEED = 42
#: Real weights on CUDA: the issue's shapes (resolution, frames, steps). The tiny model on
#: CPU: small enough for a minute or two.
REAL = {"video_fast": ("480x832", 81, 25), "image_fast": ("480x832", 1, 25)}
TINY = {"video_fast": ("256x448", 5, 10), "image_fast": ("256x448", 1, 10)}
PROMPT = "a red fox runs through fresh snow at dawn"
#: Images per pipeline call in the batching table.
BATCH_SIZES = (1, 2, 4)
#: Job types that run once per set with --real-shapes (a second warm video would not fit
#: bench/device.sh's window): their figures come from that first run.
ONCE_AT_REAL_SHAPES = frozenset({"video_fast"})
#: Makes the text-to-video pipeline from the settings: `load_t2v`, or random weights.
Loader = Callable[[Settings], WanPipeline]


@dataclass
class Run:
    load_s: float
    first_s: float
    step_s: float
    denoise_s: float
    decode_s: float
    #: End to end of a second, warm run; None where the job ran once.
    total_s: float | None
    peak_gib: float | None
    last_frame: np.ndarray


@dataclass
class Batch:
    size: int
    call_s: float
    peak_gib: float | None


def option_sets(cuda: bool, *, turbo_lora: Path | None = None) -> dict[str, dict[str, Any]]:
    """The issue's option sets; fp8 and compile only where they can run in reasonable time.
    Turbo runs with `turbo_lora`, or with WAN_DISTILL_LORA / WAN_TURBO_MODEL_PATH."""
    fast = {"attention_backend": "auto"}
    sets: dict[str, dict[str, Any]] = {"baseline": {"attention_backend": "native"},
                                       "attention backend": fast}  # fmt: skip
    if cuda:
        sets["+ compile"] = fast | {"torch_compile": "blocks"}
    compiled = sets.get("+ compile", fast)
    sets["+ first-block cache"] = compiled | {"wan_cache": "first_block"}
    sets["+ mag cache"] = compiled | {"wan_cache": "mag"}
    if cuda:
        sets["fp8"] = fast | {"quantize": "fp8"}
    turbo = {"wan_distill_lora": turbo_lora} if turbo_lora is not None else {}
    for variable in ("WAN_DISTILL_LORA", "WAN_TURBO_MODEL_PATH"):
        if os.environ.get(variable):
            turbo = {variable.lower(): Path(os.environ[variable])}
    if turbo:
        sets["turbo"] = compiled | turbo
    return sets


def run_set(
    settings: Settings, shapes: dict, *, load: Loader, once: frozenset[str] = frozenset()
) -> dict[str, Run]:
    """Each job type of `shapes` on the option set of `settings`: a first run, then a warm
    one (not for the job types in `once`)."""
    started = time.perf_counter()
    pipelines = Pipelines(settings, load=load)
    pipelines.t2v  # noqa: B018 (the property loads)
    load_s = time.perf_counter() - started
    runs = {}
    for job_type in shapes:
        job = _job(job_type, shapes, settings)
        first_s, marks, frames_out = _timed(pipelines, job)
        total_s = None
        if job_type not in once:
            total_s, marks, frames_out = _timed(pipelines, job)
        step_s = (marks[-1] - marks[0]) / max(len(marks) - 1, 1)
        runs[job_type] = Run(load_s, first_s, step_s, step_s * len(marks),
                             (total_s or first_s) - marks[-1], total_s, _peak_gib(),
                             frames_out[-1])  # fmt: skip
    del pipelines
    _release_memory()
    return runs


def run_batches(settings: Settings, shapes: dict, *, load: Loader) -> list[Batch]:
    """`image_fast` jobs, each with its own seed, `BATCH_SIZES` at a time in one pipeline
    call; each size once to warm up, then timed."""
    pipelines = Pipelines(settings, load=load)
    batches = []
    for size in BATCH_SIZES:
        seeds = [SEED + i for i in range(size)]
        jobs = [_job("image_fast", shapes, settings, seed=seed) for seed in seeds]
        for _warm_then_timed in range(2):
            _sync_and_reset()
            started = time.perf_counter()
            generate_images(pipelines, jobs, seeds)
            _sync_and_reset(reset=False)
            call_s = time.perf_counter() - started
        batches.append(Batch(size, call_s, _peak_gib()))
    del pipelines
    _release_memory()
    return batches


def _job(job_type: str, shapes: dict, settings: Settings, *, seed: int = SEED) -> Job:
    resolution, frames, steps = shapes[job_type]
    config = {"resolution": resolution, "frame_num": frames, "seed": seed}
    if turbo_checkpoint(settings) is None:  # a turbo job names no steps: it runs its own
        config["num_inference_steps"] = steps
    body = {"id": "bench", "user_id": "bench", "type": job_type, "prompt": PROMPT}
    return as_run(parse_job(body | {"config": config}), settings)


def _timed(pipelines: Pipelines, job: Job) -> tuple[float, list[float], np.ndarray]:
    """Seconds end to end, the step ends (seconds from the start), the frames."""
    _sync_and_reset()
    marks: list[float] = []
    started = time.perf_counter()
    frames = generate(pipelines, job, seed=SEED, references={},
                      on_step=lambda done, total: marks.append(time.perf_counter() - started)
                      ).frames  # fmt: skip
    _sync_and_reset(reset=False)
    return time.perf_counter() - started, marks, frames


def _sync_and_reset(*, reset: bool = True) -> None:
    """Wait for the GPU's queued work (and start a new peak-memory count)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _release_memory() -> None:
    """Give the GPU memory of the models just dropped back before the next set loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 8) -> float:
    """Mean SSIM over 8x8 windows of the luma (Wang et al. 2004 constants)."""

    def luma(x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float64) @ [0.299, 0.587, 0.114]
        h, w = (s - s % window for s in y.shape)
        return y[:h, :w].reshape(h // window, window, w // window, window).swapaxes(1, 2)

    x, y = luma(a), luma(b)
    mx, my = x.mean((2, 3)), y.mean((2, 3))
    vx, vy = x.var((2, 3)), y.var((2, 3))
    cov = ((x - mx[..., None, None]) * (y - my[..., None, None])).mean((2, 3))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * cov + c2)
                         / ((mx**2 + my**2 + c1) * (vx + vy + c2))))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--real-shapes",
        action="store_true",
        help="Wan2.1-T2V-1.3B's published shapes, random weights (CUDA only)",
    )
    parser.add_argument("--out", type=Path, help="also write the tables to this text file")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="leave out the option sets that would end past this many seconds",
    )
    args = parser.parse_args()
    console = Console(width=150, record=True)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.real_shapes:
        from bench import real_shapes

        try:
            real_shapes.require_cuda()
        except real_shapes.NeedsCuda as e:
            sys.exit(f"bench.gpu: {e}")
    real = cuda and os.environ.get("WAN_MODEL_PATH") is not None and not args.real_shapes
    device = resolve_device(Settings(_env_file=None))
    with tempfile.TemporaryDirectory() as tmp:
        load: Loader = load_t2v
        model: Path | None = Path(os.environ["WAN_MODEL_PATH"]) if real else None
        turbo_lora = None
        once: frozenset[str] = frozenset()
        if args.real_shapes:
            load, once = real_shapes.build_t2v, ONCE_AT_REAL_SHAPES
            turbo_lora = real_shapes.make_turbo_lora(Path(tmp) / "turbo-lora")
            counts = real_shapes.parameter_counts()
            console.print("Random weights at the published shapes: " + ", ".join(
                f"{name} {count:,} parameters" for name, count in counts.items()))  # fmt: skip
        elif not real:
            from worker.local.tiny_models import make_tiny_wan

            model = make_tiny_wan(Path(tmp) / "tiny-wan")
        shapes = REAL if real or args.real_shapes else TINY
        if not cuda:
            console.print("[yellow]+ compile and fp8: left out without CUDA (fp8 needs it; "
                          "a CPU compile costs about a minute)[/]")  # fmt: skip
        results: dict[str, dict[str, Run]] = {}
        seen: dict[str, str] = {}  # the options in force, as text -> the set that ran them
        longest_s = 0.0
        for name, options in option_sets(cuda, turbo_lora=turbo_lora).items():
            settings = Settings(_env_file=None, wan_model_path=model, device=device.type,
                                **options)  # fmt: skip
            refused = refusals(settings, cuda=cuda)
            same = seen.get(repr(in_force(settings, device)))
            elapsed_s = time.perf_counter() - started
            if refused:
                console.print(f"[yellow]{name}: skipped: {'; '.join(refused)}[/]")
            elif same is not None:
                console.print(f"[yellow]{name}: skipped: the same options in force as {same}[/]")
            elif args.budget_s is not None and elapsed_s + longest_s > args.budget_s:
                console.print(f"[yellow]{name}: skipped: would end past --budget-s "
                              f"{args.budget_s:.0f} ({elapsed_s:.0f} s spent)[/]")  # fmt: skip
            else:
                console.print(f"{name} ...")
                seen[repr(in_force(settings, device))] = name
                results[name] = run_set(settings, shapes, load=load, once=once)
                longest_s = max(longest_s, time.perf_counter() - started - elapsed_s)
        console.print("image batching ...")
        baseline = Settings(_env_file=None, wan_model_path=model, device=device.type,
                            **option_sets(cuda)["baseline"])  # fmt: skip
        batches = run_batches(baseline, shapes, load=load)
    what = ("Wan2.1-T2V-1.3B" if real else
            "Wan2.1-T2V-1.3B shapes, random weights" if args.real_shapes else "tiny")  # fmt: skip
    console.print(options_table(results, f"Speed options on {device}, {what}",
                                random_weights=args.real_shapes))  # fmt: skip
    console.print(batch_table(batches, f"Image batching on {device}, {what}, baseline options"))
    if args.real_shapes:
        console.print(
            "[bold yellow]Random weights at the real shapes: every time and memory figure is "
            "real; PSNR and SSIM (and what the step caches skipped) mean nothing. 'load s' is "
            "building the weights on the GPU and applying the options, not reading a "
            "checkpoint. The video ran once per set: its s/step, denoise and decode come from "
            "that first run.[/]"
        )
    elif not real:
        console.print(
            "[bold yellow]No CUDA device with WAN_MODEL_PATH: this ran the tiny random-weight "
            "model on the CPU. Its numbers mean nothing for real weights on a GPU; run it on a "
            "GPU host with WAN_MODEL_PATH set, or with --real-shapes.[/]"
        )
    if args.out is not None:
        console.save_text(str(args.out))


def options_table(results: dict[str, dict[str, Run]], title: str, *, random_weights: bool) -> Table:
    """One row per option set and job; PSNR and SSIM against the baseline's last frame."""
    marker = " (meaningless)" if random_weights else ""
    table = Table(title=title)
    for column in ("option set", "job", "load s", "first job s", "s/step", "denoise s",
                   "decode s", "end to end s", "peak VRAM GiB", f"PSNR dB{marker}",
                   f"SSIM{marker}"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("option set", "job") else "right")
    baseline = results.get("baseline", {})
    for name, runs in results.items():
        for job_type, run in runs.items():
            reference = baseline[job_type].last_frame
            table.add_row(
                name, job_type, f"{run.load_s:.1f}", f"{run.first_s:.1f}", f"{run.step_s:.3f}",
                f"{run.denoise_s:.1f}", f"{run.decode_s:.2f}",
                "-" if run.total_s is None else f"{run.total_s:.1f}",
                "-" if run.peak_gib is None else f"{run.peak_gib:.1f}",
                f"{psnr_db(run.last_frame, reference):.1f}",
                f"{ssim(run.last_frame, reference):.3f}",
            )  # fmt: skip
    return table


def batch_table(batches: list[Batch], title: str) -> Table:
    table = Table(title=title)
    for column in ("images per call", "s per call", "s per image", "images per minute",
                   "peak VRAM GiB"):  # fmt: skip
        table.add_column(column, justify="right")
    for batch in batches:
        table.add_row(str(batch.size), f"{batch.call_s:.2f}", f"{batch.call_s / batch.size:.2f}",
                      f"{60 * batch.size / batch.call_s:.1f}",
                      "-" if batch.peak_gib is None else f"{batch.peak_gib:.1f}")  # fmt: skip
    return table


if __name__ == "__main__":
    main()
