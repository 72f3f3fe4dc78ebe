"""Running one job: text to video, reference frames (VACE) or image to image (video to video).

Which one runs follows the job (`worker.jobs.model._references` decides the mode) and whether
its references could be used: a job whose references failed runs text-only and says so.
- text only: `WanPipeline`.
- single: VACE with `reference_images=[image]`.
- start / end / both: VACE with a control video (the image, then gray frames; the mirror
  for end; image, gray, image for both) and a mask that keeps the given frames (black) and
  generates the rest (white). An image beside start/end frames also goes in as reference.
- image to image: video to video with `strength`, the source repeated over the frames (one
  frame for an image job). diffusers runs int(steps x strength) steps; at least one runs.
  Its transformer calls are named for the step cache (`speed.named_passes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from worker.generation import previews, speed
from worker.generation.load import Pipelines
from worker.jobs.model import Job

#: Called after each denoising step with (steps done, steps in all).
StepHook = Callable[[int, int], None]
#: The platform's names for what ran (`wan_task` in callbacks).
WAN_TASKS = {"t2v": "t2v-1.3B", "vace": "vace-1.3B", "v2v": "v2v-1.3B"}
#: VACE's "nothing here" colour for frames to generate (diffusers' example uses 128).
VACE_GRAY = (128, 128, 128)


@dataclass(frozen=True)
class Generated:
    """Frames as uint8 (F, H, W, 3) and what the callback should say about how they came."""

    frames: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def generate(
    pipelines: Pipelines,
    job: Job,
    *,
    seed: int,
    references: dict[str, Image.Image],
    fallback_reason: str | None = None,
    on_step: StepHook | None = None,
) -> Generated:
    """Run the job's mode; `references` are the prepared images by role."""
    common = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "height": job.height,
        "width": job.width,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
    }
    if job.reference_mode == "none" or fallback_reason is not None:
        metadata: dict[str, Any] = {"wan_task": WAN_TASKS["t2v"], "reference_mode": "none"}
        if job.reference_mode != "none":
            metadata |= {
                "reference_fallback": True,
                "reference_fallback_reason": fallback_reason,
                "reference_mode_requested": job.reference_mode,
            }
        frames = call_pipeline(
            pipelines.for_job("t2v", job), job, seed, on_step, num_frames=job.frames, **common
        )
        return Generated(frames, metadata)
    if job.image_to_image:
        return _image_to_image(pipelines, job, seed, on_step, references, common)
    conditions, used = vace_conditions(
        references, frames=job.frames, width=job.width, height=job.height
    )
    metadata = {
        "wan_task": WAN_TASKS["vace"],
        "reference_mode": job.reference_mode,
        "references_used": used,
    }
    if ignored := [role for role in references if role not in used]:
        metadata["references_ignored"] = {
            role: "a 1-frame job has room for the start frame only" for role in ignored
        }
    frames = call_pipeline(
        pipelines.for_job("vace", job),
        job,
        seed,
        on_step,
        num_frames=job.frames,
        **conditions,
        **common,
    )
    return Generated(frames, metadata)


def vace_conditions(
    references: dict[str, Image.Image], *, frames: int, width: int, height: int
) -> tuple[dict[str, Any], list[str]]:
    """VACE's inputs for the references given, and the roles placed in them."""
    conditions: dict[str, Any] = {}
    used = []
    if "start" in references or "end" in references:
        gray = Image.new("RGB", (width, height), VACE_GRAY)
        keep, make = Image.new("L", (width, height), 0), Image.new("L", (width, height), 255)
        video, mask = [gray] * frames, [make] * frames
        # start last: on a 1-frame job the start frame wins the only frame
        placed = {index: role for role, index in (("end", frames - 1), ("start", 0))
                  if role in references}  # fmt: skip
        for index, role in placed.items():
            video[index], mask[index] = references[role], keep
        used = [role for role in ("start", "end") if role in placed.values()]
        conditions |= {"video": video, "mask": mask}
    if "single" in references:
        conditions["reference_images"] = [references["single"]]
        used.append("single")
    return conditions, used


def _image_to_image(
    pipelines: Pipelines,
    job: Job,
    seed: int,
    on_step: StepHook | None,
    references: dict[str, Image.Image],
    common: dict[str, Any],
) -> Generated:
    [(role, source)] = references.items()
    strength = job.denoise_strength or 0.0  # always set on an image-to-image job
    steps = denoise_steps(job)
    metadata: dict[str, Any] = {
        "wan_task": WAN_TASKS["v2v"],
        "reference_mode": job.reference_mode,
        "references_used": [role],
        "denoise_strength": strength,
        "denoise_steps": steps,
    }
    run_strength = strength
    if job.steps * strength < 1:  # diffusers cannot run zero steps: the smallest strength
        run_strength = (1 + 1e-6) / job.steps  # that runs one
        metadata["denoise_note"] = (
            f"strength {strength:g} x {job.steps} steps is under one step: one step was run"
        )
    frames = call_pipeline(
        pipelines.for_job("v2v", job, steps=steps),
        job,
        seed,
        on_step,
        video=[source] * job.frames,
        strength=run_strength,
        **common,
    )
    return Generated(frames, metadata)


def denoise_steps(job: Job) -> int:
    """The steps an image-to-image job runs: diffusers' own count, int(steps x strength),
    and one where that is none."""
    strength = job.denoise_strength or 0.0  # always set on an image-to-image job
    return max(min(int(job.steps * strength), job.steps), 1)


def generate_images(
    pipelines: Pipelines,
    jobs: Sequence[Job],
    seeds: Sequence[int],
    *,
    on_step: StepHook | None = None,
) -> list[Generated]:
    """Text-only one-frame jobs in one pipeline call, each with its prompt, negative prompt
    and its seed's noise: a GPU step over several images costs little more than over one.
    The jobs share what the call takes once (size, steps, guidance, shift, turbo): the
    first job's are used."""
    first = jobs[0]
    frames = _run_batch(
        pipelines.for_job("t2v", first),
        first.shift,
        seeds,
        on_step,
        prompt=[job.prompt for job in jobs],
        negative_prompt=[job.negative_prompt or "" for job in jobs],
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        num_frames=1,
    )
    metadata = {"wan_task": WAN_TASKS["t2v"], "reference_mode": "none", "batch_size": len(jobs)}
    return [Generated(each, dict(metadata)) for each in frames]


def call_pipeline(
    pipe: DiffusionPipeline, job: Job, seed: int, on_step: StepHook | None, **call: Any
) -> np.ndarray:
    """One pipeline call for one job: its shift, its seed's noise, the step hook."""
    return _run_batch(pipe, job.shift, [seed], on_step, **call)[0]


def _run_batch(
    pipe: DiffusionPipeline,
    shift: float,
    seeds: Sequence[int],
    on_step: StepHook | None,
    **call: Any,
) -> list[np.ndarray]:
    """One pipeline call with the shift, one noise generator per seed and the step hook."""
    _set_shift(pipe, shift)

    def step_end(pipeline: DiffusionPipeline, step: int, timestep: int, kwargs: dict) -> dict:
        previews.hand(pipeline, kwargs["latents"])  # for the step hook's live preview
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        return kwargs

    # A CPU generator gives the same noise for a seed on every device. One alone is passed
    # bare: VACE takes no list, and diffusers draws a list of one as that one.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    with speed.named_passes(pipe):
        output = pipe(
            generator=generators[0] if len(generators) == 1 else generators,
            output_type="np",
            callback_on_step_end=step_end,
            **call,
        )
    return [(np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8) for frames in output.frames]


def _set_shift(pipe: DiffusionPipeline, shift: float) -> None:
    """Flow shift lives in the scheduler config (`flow_shift` for UniPC, `shift` for Euler)."""
    config = pipe.scheduler.config
    name = "flow_shift" if "flow_shift" in config else "shift"
    if config.get(name) != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(config, **{name: shift})
