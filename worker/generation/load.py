"""Loading the WAN pipelines: once per generation child, on the device and dtype of the settings.

Text to video loads first. VACE (reference frames) and video to video (image to image) load
on first use and are built around its parts: one text encoder, one tokenizer and one VAE
in memory whatever runs, and video to video also reuses the T2V transformer. Each is placed
on the device and sped up by `speed.apply` (the speed settings) as it is made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVideoToVideoPipeline,
)

from worker.devices import resolve_device, resolve_dtype
from worker.errors import ModelNotConfigured
from worker.generation import speed
from worker.jobs.model import Job
from worker.settings import Settings

log = logging.getLogger(__name__)


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
    pipe = prepare_t2v(WanPipeline.from_pretrained(path, vae=vae, dtype=dtype), settings, device)
    log.info(
        "WAN pipeline loaded from %s on %s (%s) in %.1f s",
        path,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return pipe


def prepare_t2v(pipe: WanPipeline, settings: Settings, device: torch.device) -> WanPipeline:
    """A made text-to-video pipeline set up as the worker runs it: quiet, the turbo LoRA in,
    on the device and sped up."""
    pipe.set_progress_bar_config(disable=True)
    speed.load_turbo(pipe, settings)
    speed.apply(pipe, settings, device)
    return pipe


def shared_parts(pipe: WanPipeline) -> dict[str, object]:
    """The parts every pipeline takes from the text-to-video one, by identity."""
    return {"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "vae": pipe.vae}


def load_vace(settings: Settings, t2v: WanPipeline) -> WanVACEPipeline:
    """Wan2.1-VACE from WAN_VACE_MODEL_PATH: only its transformer and scheduler are read."""
    path = vace_model_dir(settings)
    started = time.perf_counter()
    device = resolve_device(settings)
    pipe = WanVACEPipeline.from_pretrained(path, **shared_parts(t2v), dtype=t2v.transformer.dtype)
    pipe.set_progress_bar_config(disable=True)
    speed.load_turbo(pipe, settings)
    speed.apply(pipe, settings, device)
    log.info("VACE pipeline loaded from %s in %.1f s", path, time.perf_counter() - started)
    return pipe


def vace_model_dir(settings: Settings) -> Path:
    return model_dir(settings.wan_vace_model_path, "WAN_VACE_MODEL_PATH", "Wan2.1-VACE-1.3B")


def build_v2v(settings: Settings, t2v: WanPipeline) -> WanVideoToVideoPipeline:
    """Video to video on the T2V weights: nothing new is loaded, nothing sped up twice."""
    pipe = WanVideoToVideoPipeline(
        **shared_parts(t2v), transformer=t2v.transformer, scheduler=t2v.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    speed.apply(pipe, settings, resolve_device(settings))
    return pipe


class Pipelines:
    """The generation child's pipelines, each made once, on first use."""

    def __init__(
        self, settings: Settings, *, load: Callable[[Settings], WanPipeline] = load_t2v
    ) -> None:
        """`load` makes the text-to-video pipeline (the benchmark passes one that builds it
        with random weights)."""
        self.settings = settings
        self._load = load
        self._t2v: WanPipeline | None = None
        self._vace: WanVACEPipeline | None = None
        self._v2v: WanVideoToVideoPipeline | None = None
        self._turbo: WanTransformer3DModel | None = None

    @property
    def t2v(self) -> WanPipeline:
        if self._t2v is None:
            self._t2v = self._load(self.settings)
            self._turbo = speed.load_turbo_transformer(
                self.settings, dtype=self._t2v.transformer.dtype, device=self.device
            )
        return self._t2v

    @property
    def turbo(self) -> WanTransformer3DModel | None:
        """The distilled transformer of WAN_TURBO_MODEL_PATH (loaded with text to video)."""
        return self._turbo

    @property
    def device(self) -> torch.device:
        return resolve_device(self.settings)

    @property
    def vace(self) -> WanVACEPipeline:
        if self._vace is None:
            self._vace = load_vace(self.settings, self.t2v)
        return self._vace

    @property
    def v2v(self) -> WanVideoToVideoPipeline:
        if self._v2v is None:
            self._v2v = build_v2v(self.settings, self.t2v)
        return self._v2v

    def for_job(self, name: str, job: Job, *, steps: int | None = None) -> DiffusionPipeline:
        """The pipeline `name` set up for `job`: turbo on or off, the step cache re-armed for
        the `steps` it runs (default: the job's)."""
        return speed.for_job(getattr(self, name), job, self.settings, self.turbo, steps=steps)

    def loaded(self) -> list[str]:
        """Names of the pipelines in memory, for logs and the benchmark."""
        made = {"t2v": self._t2v, "vace": self._vace, "v2v": self._v2v}
        return [name for name, pipe in made.items() if pipe is not None]
