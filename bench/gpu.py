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
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from worker.devices import resolve_device
from worker.generation import Pipelines, generate
from worker.generation.speed import as_run, refusals
from worker.jobs.model import parse_job
from worker.settings import Settings

SEED = 42
#: Real weights on CUDA: the issue's shapes (resolution, frames, steps). The tiny model on
#: CPU: small enough for a minute or two.
REAL = {"video_fast": ("480x832", 81, 25), "image_fast": ("480x832", 1, 25)}
TINY = {"video_fast": ("256x448", 5, 10), "image_fast": ("256x448", 1, 10)}
PROMPT = "a red fox runs through fresh snow at dawn"


@dataclass
class Run:
    load_s: float
    first_s: float
    step_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    peak_gib: float | None
    last_frame: np.ndarray


def option_sets(cuda: bool) -> dict[str, dict[str, Any]]:
    """The issue's option sets; fp8 and compile only where they can run in reasonable time."""
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
    for variable in ("WAN_DISTILL_LORA", "WAN_TURBO_MODEL_PATH"):
        if os.environ.get(variable):
            sets["turbo"] = compiled | {variable.lower(): Path(os.environ[variable])}
    return sets


def run_set(model: Path, device: str, options: dict[str, Any], shapes: dict) -> dict[str, Run]:
    settings = Settings(_env_file=None, wan_model_path=model, device=device, **options)
    started = time.perf_counter()
    pipelines = Pipelines(settings)
    pipelines.t2v  # noqa: B018 (the property loads)
    load_s = time.perf_counter() - started
    turbo = "wan_distill_lora" in options or "wan_turbo_model_path" in options
    runs = {}
    for job_type, (resolution, frames, steps) in shapes.items():
        config = {"resolution": resolution, "frame_num": frames, "seed": SEED}
        if not turbo:
            config["num_inference_steps"] = steps
        body = {"id": "bench", "user_id": "bench", "type": job_type, "prompt": PROMPT}
        job = as_run(parse_job(body | {"config": config}), settings)
        first_s = _timed(pipelines, job)[0]
        total_s, marks, frames_out = _timed(pipelines, job)
        step_s = (marks[-1] - marks[0]) / max(len(marks) - 1, 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        runs[job_type] = Run(load_s, first_s, step_s, step_s * len(marks),
                             total_s - marks[-1], total_s, peak, frames_out[-1])  # fmt: skip
    del pipelines
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return runs


def _timed(pipelines: Pipelines, job) -> tuple[float, list[float], np.ndarray]:
    """Seconds end to end, the step ends (seconds from the start), the frames."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    marks: list[float] = []
    started = time.perf_counter()
    frames = generate(pipelines, job, seed=SEED, references={},
                      on_step=lambda done, total: marks.append(time.perf_counter() - started)
                      ).frames  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, marks, frames


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
    console = Console(width=150)
    cuda = torch.cuda.is_available()
    model = os.environ.get("WAN_MODEL_PATH")
    real = cuda and model is not None
    device = str(resolve_device(Settings(_env_file=None)))
    with tempfile.TemporaryDirectory() as tmp:
        if not real:
            from worker.local.tiny_models import make_tiny_wan

            model = str(make_tiny_wan(Path(tmp) / "tiny-wan"))
        shapes = REAL if real else TINY
        if not cuda:
            console.print("[yellow]+ compile and fp8: left out without CUDA (fp8 needs it; "
                          "a CPU compile costs about a minute)[/]")  # fmt: skip
        results: dict[str, dict[str, Run]] = {}
        for name, options in option_sets(cuda).items():
            refused = refusals(Settings(_env_file=None, **options), cuda=cuda)
            if refused:
                console.print(f"[yellow]{name}: skipped: {'; '.join(refused)}[/]")
                continue
            console.print(f"{name} ...")
            results[name] = run_set(Path(model), device, options, shapes)
    table = Table(title=f"Speed options on {device}, {'Wan2.1-T2V-1.3B' if real else 'tiny'}")
    for column in ("option set", "job", "load s", "first job s", "s/step", "denoise s",
                   "decode s", "end to end s", "peak VRAM GiB", "PSNR dB", "SSIM"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("option set", "job") else "right")
    baseline = results.get("baseline", {})
    for name, runs in results.items():
        for job_type, run in runs.items():
            reference = baseline[job_type].last_frame
            table.add_row(
                name, job_type, f"{run.load_s:.1f}", f"{run.first_s:.1f}", f"{run.step_s:.3f}",
                f"{run.denoise_s:.1f}", f"{run.decode_s:.2f}", f"{run.total_s:.1f}",
                "-" if run.peak_gib is None else f"{run.peak_gib:.1f}",
                f"{psnr_db(run.last_frame, reference):.1f}",
                f"{ssim(run.last_frame, reference):.3f}",
            )  # fmt: skip
    console.print(table)
    if not real:
        console.print(
            "[bold yellow]No CUDA device with WAN_MODEL_PATH: this ran the tiny random-weight "
            "model on the CPU. Its numbers mean nothing for real weights on a GPU; run it on a "
            "GPU host with WAN_MODEL_PATH set.[/]"
        )


if __name__ == "__main__":
    main()
