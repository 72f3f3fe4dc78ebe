"""Loading the WAN pipelines: once per generation child, on the device and dtype of the settings."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline

from worker.errors import ModelNotConfigured
from worker.settings import Settings

log = logging.getLogger(__name__)


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
