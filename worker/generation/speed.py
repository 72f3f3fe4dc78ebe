"""Speed options of the generation child: checked at worker start, applied once per model.

ATTENTION_BACKEND, TORCH_COMPILE, WAN_CACHE, VAE_TILING, OFFLOAD, QUANTIZE and the turbo
checkpoint all go through diffusers' and torchao's own APIs (`set_attention_backend`,
`compile_repeated_blocks`, `enable_cache`, `enable_tiling`, `enable_model_cpu_offload`,
`apply_group_offloading`, `quantize_`, `load_lora_weights` / `set_adapters`). Modules the
pipelines share (one transformer for text to video and video to video, one VAE and text
encoder for all) are sped up once. What the device cannot run is refused by `check` when
the worker starts, naming the setting, so no job is taken by a worker that cannot serve it.

Per job, `for_job` re-arms the step cache (fresh state, the step count the pipeline runs:
MagCache needs it) and switches the turbo checkpoint on for the fast types, off for the
others. Where a cache cannot run right it does not run, and the job's provenance says why
(`step_cache`): VACE takes no residual cache (`RESIDUAL_CACHES`), a turbo job no cache.
Video to video gets its transformer calls named by `named_passes`, as WanPipeline names its
own, so each guidance pass keeps its own cache state.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
    WanVideoToVideoPipeline,
)
from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_group_offloading,
)
from diffusers.hooks.mag_cache import nearest_interp
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
)
from diffusers.utils import is_flash_attn_3_available, is_flash_attn_available, is_torchao_available

from worker.jobs.model import Job
from worker.settings import Settings

log = logging.getLogger(__name__)

#: Backends that run on a CPU (the rest need CUDA kernels).
CPU_BACKENDS = ("native", "_native_math")
#: Name of the distilled LoRA's adapter in the transformers that carry it.
TURBO_ADAPTER = "turbo"
#: Guidance of a turbo job: distilled checkpoints run without the negative branch.
TURBO_GUIDANCE = 1.0
#: The generation that measures MagCache's magnitude ratios on the loaded weights: the fast
#: preset's steps, one frame at a quarter of the default size, no guidance.
MAG_CALIBRATION = {"width": 240, "height": 416, "num_frames": 1, "num_inference_steps": 25}
#: diffusers' configs of the caches that have a threshold (their defaults are read from them).
CACHE_DEFAULTS = {"first_block": FirstBlockCacheConfig, "mag": MagCacheConfig}
#: Caches that skip the blocks after the first and add back the residual of the last computed
#: step. VACE adds its control hints between the blocks, in the transformer's own forward:
#: that residual holds them, and a skipped step would add them a second time.
RESIDUAL_CACHES = ("first_block", "mag")
#: What a VACE job says in its provenance when WAN_CACHE is a residual cache.
VACE_UNCACHED = (
    "VACE runs without {cache}: its control hints, added between the transformer's blocks, "
    "would be counted twice on a skipped step"
)
#: The modules TaylorSeer forecasts: each block's self-attention, cross-attention and
#: feed-forward output. diffusers' default patterns (`^blocks.*attn`) match no module of
#: WAN's transformers, whose attention modules are `attn1` and `attn2`: it hooked nothing.
TAYLORSEER_MODULES = [r"blocks\.\d+\.(attn1|attn2|ffn)"]
#: Pipelines whose denoising loop calls the transformer outside a `cache_context` (diffusers
#: 0.42): `named_passes` names their calls.
UNNAMED_PASSES = (WanVideoToVideoPipeline,)


class SpeedOptionRefused(ValueError):
    """A speed setting this machine cannot run; the message names the setting."""


def cuda_present(settings: Settings) -> bool:
    """Whether generation runs on CUDA. NVML-based: safe in the worker before it forks."""
    if settings.device != "auto":
        return settings.device == "cuda"
    return torch.cuda.device_count() > 0


def refusals(settings: Settings, *, cuda: bool) -> list[str]:
    """Each speed setting the device cannot run, as a sentence naming the setting."""
    refused = []
    backend = settings.attention_backend
    known = {name.value for name in AttentionBackendName}
    if backend != "auto" and backend not in known:
        refused.append(
            f"ATTENTION_BACKEND={backend} is not a diffusers attention backend; "
            f"known: auto, {', '.join(sorted(known))}"
        )
    elif backend not in ("auto", *CPU_BACKENDS) and not cuda:
        refused.append(
            f"ATTENTION_BACKEND={backend} needs a CUDA GPU and this worker has none "
            f"(on CPU: {' or '.join(('auto', *CPU_BACKENDS))})"
        )
    elif backend not in ("auto", *CPU_BACKENDS):
        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except RuntimeError as e:
            refused.append(f"ATTENTION_BACKEND={backend}: {e}")
    if settings.offload != "none" and not cuda:
        refused.append(
            f"OFFLOAD={settings.offload} moves weights between CPU and GPU memory: it needs a "
            "CUDA GPU and this worker has none (set OFFLOAD=none)"
        )
    if settings.quantize == "fp8" and not cuda:
        refused.append(
            "QUANTIZE=fp8 needs a CUDA GPU (torchao float8 kernels, Ada or newer) and this "
            "worker has none (set QUANTIZE=none)"
        )
    elif settings.quantize == "fp8" and not is_torchao_available():
        refused.append("QUANTIZE=fp8 needs torchao: pip install -r requirements-gpu.txt")
    for variable, path, marker in (
        ("WAN_DISTILL_LORA", settings.wan_distill_lora, None),
        ("WAN_TURBO_MODEL_PATH", settings.wan_turbo_model_path, "config.json"),
    ):
        if path is not None and not (path / marker if marker else path).exists():
            what = f"no {marker} in {path}" if marker else f"{path} does not exist"
            refused.append(f"{variable}: {what}")
    return refused


def check(settings: Settings) -> None:
    """Refuse at start what the device cannot run (SpeedOptionRefused naming each setting)."""
    refused = refusals(settings, cuda=cuda_present(settings))
    if refused:
        raise SpeedOptionRefused("; ".join(refused))


def attention_backend(settings: Settings, device: torch.device) -> str:
    """The backend in force: `auto` is the fastest installed on CUDA, `native` on CPU."""
    if settings.attention_backend != "auto":
        return settings.attention_backend
    if device.type != "cuda":
        return "native"
    hopper = torch.cuda.get_device_capability(device) >= (9, 0)
    if hopper and is_flash_attn_3_available():
        return "_flash_3"
    if is_flash_attn_available():
        return "flash"
    return "native"  # PyTorch's SDPA, which picks its own flash or cuDNN kernel


def turbo_checkpoint(settings: Settings) -> Path | None:
    return settings.wan_distill_lora or settings.wan_turbo_model_path


def in_force(settings: Settings, device: torch.device) -> dict[str, Any]:
    """The options a result was made with, for provenance and /health."""
    options: dict[str, Any] = {
        "attention_backend": attention_backend(settings, device),
        "torch_compile": settings.torch_compile,
        "cache": settings.wan_cache,
        "vae_tiling": settings.vae_tiling,
        "offload": settings.offload,
        "quantize": settings.quantize,
    }
    if settings.wan_cache in CACHE_DEFAULTS:
        default = CACHE_DEFAULTS[settings.wan_cache].threshold
        options["cache_threshold"] = settings.wan_cache_threshold or default
    if (checkpoint := turbo_checkpoint(settings)) is not None:
        options |= {"turbo_checkpoint": checkpoint.name, "turbo_steps": settings.turbo_steps}
    return options


# --- once per loaded model ---------------------------------------------------------------

#: Modules already sped up in this process: shared modules are done once.
_done: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
#: MagCache's magnitude ratios, measured once per transformer.
_mag_ratios: weakref.WeakKeyDictionary[torch.nn.Module, list[float]] = weakref.WeakKeyDictionary()


def apply(pipe: DiffusionPipeline, settings: Settings, device: torch.device) -> None:
    """Place the pipeline on the device and apply the speed options to its new modules."""
    transformer, vae = pipe.transformer, pipe.vae
    if settings.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif settings.offload == "group":
        for module in (transformer, pipe.text_encoder):
            if module not in _done:
                _group_offload(module, device)
        vae.to(device)
    else:
        pipe.to(device)
    if transformer not in _done:
        speed_up_transformer(transformer, settings, device)
        if settings.wan_cache == "mag" and _unfit("mag", transformer) is None:
            _mag_ratios[transformer] = _calibrate_mag(pipe)
        _done.add(transformer)
    if vae not in _done:
        if settings.vae_tiling:
            vae.enable_tiling()
        _done.add(vae)
    _done.add(pipe.text_encoder)


def _group_offload(module: torch.nn.Module, device: torch.device) -> None:
    """Blocks stream to the GPU one at a time, overlapped with compute on a CUDA stream."""
    apply_group_offloading(module, onload_device=device, offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)  # fmt: skip


def speed_up_transformer(
    transformer: torch.nn.Module, settings: Settings, device: torch.device
) -> None:
    """Quantise, pick the attention backend, then compile: in that order, so the compiled
    blocks see the final weights and kernels. The step cache is armed per job (`for_job`)."""
    if settings.quantize == "fp8":
        _quantize_fp8(transformer, device)
    transformer.set_attention_backend(attention_backend(settings, device))
    if settings.torch_compile == "blocks":
        transformer.compile_repeated_blocks()


def _quantize_fp8(transformer: torch.nn.Module, device: torch.device) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise SpeedOptionRefused(f"QUANTIZE=fp8 needs an Ada, Hopper or newer GPU, not {name}")
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig())


def load_turbo(pipe: DiffusionPipeline, settings: Settings) -> None:
    """Load WAN_DISTILL_LORA into the pipeline's transformer as an adapter, never fused:
    the high types run the same weights with the adapter off."""
    if settings.wan_distill_lora is not None:
        pipe.load_lora_weights(str(settings.wan_distill_lora), adapter_name=TURBO_ADAPTER)
        pipe.disable_lora()


def load_turbo_transformer(
    settings: Settings, *, dtype: torch.dtype, device: torch.device
) -> WanTransformer3DModel | None:
    """The distilled transformer of WAN_TURBO_MODEL_PATH (sped up like the base one)."""
    if settings.wan_turbo_model_path is None:
        return None
    started = time.perf_counter()
    transformer = WanTransformer3DModel.from_pretrained(settings.wan_turbo_model_path, dtype=dtype)
    if settings.offload == "group":
        _group_offload(transformer, device)
    else:  # with OFFLOAD=model it stays on the GPU: the offload hooks belong to the pipelines
        transformer.to(device)
    speed_up_transformer(transformer, settings, device)
    _done.add(transformer)
    log.info("turbo transformer loaded from %s in %.1f s", settings.wan_turbo_model_path,
             time.perf_counter() - started)  # fmt: skip
    return transformer


# --- per job -----------------------------------------------------------------------------


def as_run(job: Job, settings: Settings) -> Job:
    """The job as it will run: a `*_fast` job that names no steps runs turbo when a turbo
    checkpoint is configured (TURBO_STEPS, guidance 1.0); `*_high` never does.

    A distilled transformer (WAN_TURBO_MODEL_PATH) is a text-to-video one: reference jobs
    that need VACE run on their own steps. A LoRA goes into every transformer.
    """
    if (
        turbo_checkpoint(settings) is None
        or job.type.quality != "fast"
        or job.own_steps is not None
    ):
        return job
    vace = job.reference_mode != "none" and not job.image_to_image
    if vace and settings.wan_turbo_model_path is not None:
        return job
    return job.model_copy(
        update={"steps": settings.turbo_steps, "guidance": TURBO_GUIDANCE, "turbo": True}
    )


def for_job(
    pipe: DiffusionPipeline,
    job: Job,
    settings: Settings,
    turbo: torch.nn.Module | None,
    *,
    steps: int | None = None,
) -> DiffusionPipeline:
    """The pipeline to call for this job: turbo switched on or off, the step cache re-armed.

    `turbo` is the distilled transformer of WAN_TURBO_MODEL_PATH, if any: a turbo job runs a
    twin of the pipeline around it (same parts, that transformer). `steps` are the denoising
    steps the pipeline will run, when fewer than the job's (video to video runs the last
    int(steps x strength) of them).
    """
    if turbo is not None and job.turbo:
        pipe = type(pipe)(**(pipe.components | {"transformer": turbo}))
        pipe.set_progress_bar_config(disable=True)
    elif settings.wan_distill_lora is not None and job.turbo:
        pipe.enable_lora()
        pipe.set_adapters([TURBO_ADAPTER], [1.0])
    elif settings.wan_distill_lora is not None:
        pipe.disable_lora()
    transformer = pipe.transformer
    if transformer.is_cache_enabled:
        transformer.disable_cache()  # a fresh state: a cancelled job may have left one
    if step_cache(settings, job, transformer, steps=steps or job.steps)["ran"] != "none":
        ratios = _mag_ratios.get(transformer)
        transformer.enable_cache(
            cache_config(settings, steps=job.steps, run_steps=steps, mag_ratios=ratios)
        )
    return pipe


def step_cache(
    settings: Settings, job: Job, transformer: torch.nn.Module, *, steps: int
) -> dict[str, Any]:
    """What WAN_CACHE does on this job, for its provenance: the cache that ran and the steps
    it was set for, or `none` and, when WAN_CACHE is set, why not."""
    if settings.wan_cache == "none":
        return {"ran": "none"}
    if job.turbo:
        return {"ran": "none", "reason": "a turbo job's few distilled steps leave nothing to reuse"}
    if (reason := _unfit(settings.wan_cache, transformer)) is not None:
        return {"ran": "none", "reason": reason}
    return {"ran": settings.wan_cache, "steps": steps}


def _unfit(cache: str, transformer: torch.nn.Module) -> str | None:
    """Why `cache` cannot run right on this transformer, or None."""
    if cache in RESIDUAL_CACHES and isinstance(transformer, WanVACETransformer3DModel):
        return VACE_UNCACHED.format(cache=cache)
    return None


def cache_config(
    settings: Settings,
    *,
    steps: int,
    run_steps: int | None = None,
    mag_ratios: list[float] | None = None,
) -> FirstBlockCacheConfig | MagCacheConfig | TaylorSeerCacheConfig:
    """diffusers' config of WAN_CACHE. MagCache interpolates its ratios to the job's `steps`
    and, when the pipeline runs only the last `run_steps` of them (video to video), takes
    their tail and counts those."""
    threshold = {} if settings.wan_cache_threshold is None else {
        "threshold": settings.wan_cache_threshold}  # fmt: skip
    if settings.wan_cache == "first_block":
        return FirstBlockCacheConfig(**threshold)
    if settings.wan_cache == "mag":
        run_steps = run_steps or steps
        ratios = None if mag_ratios is None else (
            nearest_interp(torch.tensor(mag_ratios), steps)[steps - run_steps :])  # fmt: skip
        return MagCacheConfig(**threshold, num_inference_steps=run_steps, mag_ratios=ratios)
    return TaylorSeerCacheConfig(cache_identifiers=TAYLORSEER_MODULES)


@contextmanager
def named_passes(pipe: DiffusionPipeline) -> Iterator[None]:
    """While `pipe` runs, each call of its transformer in a `cache_context` named as
    WanPipeline names its own: `cond`, then `uncond` when guidance runs, per step.

    diffusers' video to video calls its transformer outside any: First Block Cache and
    TaylorSeer then fail ("No cache context is set"), and MagCache runs both passes on one
    state (its step count runs twice as fast and a skipped unconditional pass reuses the
    conditional residual, weakening guidance). Other pipelines name their calls themselves.
    """
    transformer = pipe.transformer
    if not isinstance(pipe, UNNAMED_PASSES) or not transformer.is_cache_enabled:
        yield
        return
    calls = itertools.count()
    context = ExitStack()

    def enter(_module: torch.nn.Module, _args: tuple, _kwargs: dict) -> None:
        passes = 2 if pipe.do_classifier_free_guidance else 1
        step, which = divmod(next(calls), passes)
        name = ("cond", "uncond")[which]
        context.enter_context(transformer.cache_context(
            name, step_index=step, num_inference_steps=pipe.num_timesteps))  # fmt: skip

    def leave(_module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        context.close()

    hooks = (
        transformer.register_forward_pre_hook(enter, with_kwargs=True),
        transformer.register_forward_hook(leave),
    )
    try:
        with context:  # a pass that raised leaves its context here
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _calibrate_mag(pipe: DiffusionPipeline) -> list[float]:
    """MagCache's per-step ratios for these weights, measured as diffusers' calibration mode
    does (mean token-norm ratio of the transformer's residual, step over step), on a small
    one-frame generation without guidance. diffusers ships ratios for Flux only."""
    blocks = pipe.transformer.blocks
    inputs: list[torch.Tensor] = []
    residuals: list[torch.Tensor] = []
    first = blocks[0].register_forward_pre_hook(lambda _block, args: inputs.append(args[0]))
    last = blocks[-1].register_forward_hook(
        lambda _block, _args, output: residuals.append((output - inputs[-1]).float())
    )
    try:
        pipe(prompt="calibration", **MAG_CALIBRATION, guidance_scale=1.0, output_type="latent")
    finally:
        first.remove()
        last.remove()
    ratios = [1.0]
    for previous, current in zip(residuals, residuals[1:], strict=False):
        norms = torch.linalg.norm(current, dim=-1) / (torch.linalg.norm(previous, dim=-1) + 1e-8)
        ratios.append(norms.mean().item())
    log.info("MagCache ratios measured on %s: %s", type(pipe.transformer).__name__,
             [round(r, 4) for r in ratios])  # fmt: skip
    return ratios
