"""WAN text-to-video generation: load the pipeline once, run it per job.

Imported only by the generation worker's pool child (and tools), never by the media
worker: this is where torch and diffusers come in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline

from worker.errors import ModelNotConfigured, UnsupportedMode
from worker.jobs import Job
from worker.settings import Settings

log = logging.getLogger(__name__)

#: Called after each denoising step with (steps done, steps in all).
StepHook = Callable[[int, int], None]


def resolve_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 kernels are slow and some are missing)."""
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.dtype)


def model_dir(path: Path | None, variable: str, what: str) -> Path:
    """A model directory that exists, or an error naming the variable to set."""
    if path is None:
        raise ModelNotConfigured(f"{variable} is not set: point it at {what} in diffusers format")
    if not (path / "model_index.json").is_file():
        raise ModelNotConfigured(
            f"{variable}={path} holds no diffusers model (no model_index.json)"
        )
    return path


def load_t2v(settings: Settings) -> WanPipeline:
    """Load Wan2.1-T2V from WAN_MODEL_PATH onto the device; the VAE stays fp32 for quality."""
    path = model_dir(settings.wan_model_path, "WAN_MODEL_PATH", "Wan2.1-T2V-1.3B")
    device = resolve_device(settings)
    dtype = resolve_dtype(settings, device)
    started = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "WAN pipeline loaded from %s on %s (%s) in %.1f s",
        path,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return pipe


def generate_frames(
    pipe: WanPipeline, job: Job, *, seed: int, on_step: StepHook | None = None
) -> np.ndarray:
    """Run one job; return its frames as uint8 (F, H, W, 3)."""
    if job.reference_mode != "none":
        raise UnsupportedMode(
            f"reference_mode {job.reference_mode!r} (reference frames, image to image) is not "
            "supported by this worker version yet: it needs the VACE and video-to-video pipelines"
        )
    _set_shift(pipe, job.shift)

    def step_end(pipeline: WanPipeline, step: int, timestep: int, kwargs: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        return kwargs

    output = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or None,
        height=job.height,
        width=job.width,
        num_frames=job.frames,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        # A CPU generator gives the same noise for a seed on every device.
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="np",
        callback_on_step_end=step_end,
    )
    frames = output.frames[0]
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _set_shift(pipe: WanPipeline, shift: float) -> None:
    """Flow shift lives in the scheduler config (`flow_shift` for UniPC, `shift` for Euler)."""
    config = pipe.scheduler.config
    name = "flow_shift" if "flow_shift" in config else "shift"
    if config.get(name) != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(config, **{name: shift})
