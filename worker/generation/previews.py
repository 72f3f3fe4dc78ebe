"""Live previews: the forming video or image, from the latents at a denoising step.

A WAN 2.1 latent frame becomes a picture by a linear map from its 16 channels to RGB, as
ComfyUI's Latent2RGB previews do; the factors and bias are ComfyUI's `Wan21` latent format
(`comfy/latent_formats.py`, `latent_rgb_factors` and `latent_rgb_factors_bias`). They apply
to the latents the transformer sees (normalised by the VAE's mean and std), which is what
diffusers' WAN pipelines hand to `callback_on_step_end`. The picture is the middle latent
frame of the model's current estimate of the finished latents (the only frame of an image),
scaled to PREVIEW_MAX_PX on its longest edge and encoded as WEBP.

The denoising loop pays for one copy of one latent frame (queued on the GPU, no wait); a
thread of its own maps, encodes, stores and announces the preview
(`worker.observe.preview_store`). The newest frame wins: one that arrives while the thread
is busy replaces the one still waiting, so a slow Redis or encoder never holds a step.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from worker.observe import preview_store

log = logging.getLogger(__name__)

#: WAN 2.1 latent channel -> (R, G, B): ComfyUI's `Wan21.latent_rgb_factors`.
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
#: ... and `Wan21.latent_rgb_factors_bias`.
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)
#: WEBP quality and effort of a preview (a glance, not a result): method 2 encodes in half
#: the time of the default 4, for a file a few percent larger.
WEBP_QUALITY = 80
WEBP_METHOD = 2
#: A preview thread with nothing to do for this long ends; the next preview starts another.
IDLE_EXIT_S = 5.0


def latent_to_rgb(frame: torch.Tensor) -> np.ndarray:
    """One latent frame (16, H, W) as an RGB picture (H, W, 3) uint8: the linear map, then
    [-1, 1] to [0, 255] (values outside are clipped), as ComfyUI's previews."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.nn.functional.linear(frame.float().cpu().movedim(0, -1), factors.T, bias)
    return ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()


def middle_frame(latents: torch.Tensor) -> torch.Tensor:
    """The middle latent frame (16, H, W) of the first video of (B, 16, F, H, W) latents."""
    return latents[0, :, latents.shape[2] // 2]


def clean_estimate(
    pipeline: DiffusionPipeline, latents: torch.Tensor, done: int, total: int
) -> torch.Tensor:
    """The model's current estimate of the finished latents after step `done` of `total`.

    After the last step, the latents themselves. Before it, the scheduler's prediction of
    the clean sample where it keeps one (UniPC, WAN's scheduler, stores it as its newest
    model output when `predict_x0`); other schedulers give the noisy latents, a preview that
    sharpens as the noise goes.
    """
    scheduler = pipeline.scheduler
    outputs = getattr(scheduler, "model_outputs", None)
    if done < total and getattr(scheduler, "predict_x0", False) and outputs:
        newest = outputs[-1]
        if newest is not None and newest.shape == latents.shape:
            return newest
    return latents


def preview_image(frame: torch.Tensor, *, max_px: int) -> Image.Image:
    """The latent frame as a picture whose longest edge is `max_px`, aspect ratio kept."""
    image = Image.fromarray(latent_to_rgb(frame))
    scale = max_px / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def encode_webp(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return buffer.getvalue()


class _Seen:
    """The latents (and pipeline) the newest denoising step's callback saw: diffusers hands
    them to `callback_on_step_end` only, and the job's step hook decides on a preview."""

    pipeline: DiffusionPipeline | None = None
    latents: torch.Tensor | None = None


_seen = _Seen()


def hand(pipeline: DiffusionPipeline, latents: torch.Tensor) -> None:
    """Called by the pipeline call's step callback before the job's step hook: a reference,
    no copy."""
    _seen.pipeline, _seen.latents = pipeline, latents


def _take() -> tuple[DiffusionPipeline, torch.Tensor] | None:
    pipeline, latents = _seen.pipeline, _seen.latents
    _seen.pipeline = _seen.latents = None  # the pipeline's tensors are not kept past a job
    return None if pipeline is None or latents is None else (pipeline, latents)


@dataclass(frozen=True)
class _Frame:
    """One latent frame waiting for the preview thread."""

    latent: torch.Tensor
    #: Recorded after the copy on the GPU: the thread waits for it, never for later steps.
    ready: torch.cuda.Event | None
    step: int
    total_steps: int
    window: int | None


class Previewer:
    """One generation's previews: every `every_s` seconds of denoising and at the last step
    (none when `every_s` is 0)."""

    def __init__(self, client: redis.Redis, job_id: str, *, every_s: float, max_px: int) -> None:
        self.client = client
        self.job_id = job_id
        self.every_s = every_s
        self.max_px = max_px
        self._due_at = 0.0  # the first step makes one
        self._cond = threading.Condition()
        self._waiting: _Frame | None = None
        self._thread: threading.Thread | None = None

    def step(self, done: int, total: int, *, window: int | None = None) -> None:
        """After denoising step `done` of `total` (of long-video window `window`): hand the
        thread the step's latent frame when a preview is due. Returns at once."""
        seen = _take()
        if seen is None or self.every_s <= 0:
            return
        now = time.monotonic()
        if done < total and now < self._due_at:
            return
        self._due_at = now + self.every_s
        pipeline, latents = seen
        latent = middle_frame(clean_estimate(pipeline, latents, done, total)).detach().clone()
        ready = None
        if latent.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        with self._cond:
            self._waiting = _Frame(latent, ready, done, total, window)  # the newest wins
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"preview-{self.job_id}", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._waiting is None:
                    self._cond.wait(timeout=IDLE_EXIT_S)
                if self._waiting is None:
                    self._thread = None  # under the lock: `step` starts another if needed
                    return
                frame, self._waiting = self._waiting, None
            try:
                self._publish(frame)
            except Exception:  # the thread's edge: a preview never fails a job or stops previews
                log.warning("job=%s preview of step %d failed", self.job_id, frame.step,
                            exc_info=True)  # fmt: skip

    def _publish(self, frame: _Frame) -> None:
        latent = frame.latent
        if frame.ready is not None:
            frame.ready.synchronize()  # the copy is done; later steps may still run
            with torch.cuda.stream(torch.cuda.Stream(latent.device)):  # not behind them
                latent = latent.to("cpu")
        webp = encode_webp(preview_image(latent, max_px=self.max_px))
        preview_store.store(self.client, self.job_id, webp, step=frame.step,
                            total_steps=frame.total_steps, window=frame.window)  # fmt: skip
