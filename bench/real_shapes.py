"""Wan2.1-T2V-1.3B at its published shapes with random weights, built on the GPU: real
speed and memory figures on a host that has no copy of the weights (`bench.gpu --real-shapes`).

Speed depends on the shapes, not the weights' values. The configs in `configs/wan2.1-t2v-1.3b`
are those of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`: the transformer's values from diffusers'
`scripts/convert_wan_to_diffusers.py` (model type `Wan-T2V-1.3B`) with diffusers' defaults for
the keys the script leaves out (`image_dim`, `rope_max_seq_len`), the text encoder's from
`google/umt5-xxl`'s config, the VAE's and the scheduler's as diffusers writes them for
`AutoencoderKLWan()` and Wan's `UniPCMultistepScheduler` (flow shift 3). Their parameter counts
match the published checkpoint's (tests/test_real_shapes.py says against what).

Each model is made on the meta device (no memory), given empty storage on the GPU with
`to_empty`, and initialised there: nothing the size of the model passes through the CPU. The
dtypes are those the worker loads with (`load_t2v`): bf16, except the modules diffusers keeps
in fp32 (`_keep_in_fp32_modules`), and an fp32 VAE. The tokenizer is the tiny model's: the
pipeline pads every prompt to 512 tokens, so its vocabulary changes no shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import PreTrainedModel, UMT5Config, UMT5EncoderModel

from worker.devices import resolve_device
from worker.generation.load import prepare_t2v
from worker.local.tiny_models import save_random_lora, tiny_tokenizer
from worker.settings import Settings

#: diffusers' config files of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, one folder per component.
CONFIGS = Path(__file__).parent / "configs" / "wan2.1-t2v-1.3b"
#: Rank of the turbo LoRA the benchmark makes: the published step-distilled LoRAs of
#: Wan2.1-T2V-1.3B (CausVid's, as diffusers-format `..._lora_rank32`) are rank 32.
TURBO_LORA_RANK = 32
#: The linear layers such a LoRA adapts in every block: both attentions and the feed-forward.
LORA_TARGETS = re.compile(r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                          r"|blocks\.\d+\.ffn\.(net\.0\.proj|net\.2)")  # fmt: skip


class NeedsCuda(RuntimeError):
    """--real-shapes on a machine without CUDA: the message says what it would allocate."""


def _config(component: str) -> dict:
    return json.loads((CONFIGS / component / "config.json").read_text())


def transformer_on_meta() -> WanTransformer3DModel:
    with init_empty_weights():  # parameters on meta; buffers (RoPE tables) computed for real
        return WanTransformer3DModel.from_config(_config("transformer"))


def text_encoder_on_meta() -> UMT5EncoderModel:
    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config.from_dict(_config("text_encoder")))
    # accelerate's meta parameters broke the tie of `encoder.embed_tokens` to `shared` (one
    # 1.05 B-parameter table in the checkpoint): tie them again, as from_pretrained does.
    model.tie_weights()
    return model


def vae_on_meta() -> AutoencoderKLWan:
    with init_empty_weights():
        return AutoencoderKLWan.from_config(_config("vae"))


#: Each component, made on the meta device, and the dtype the worker loads it in on CUDA.
COMPONENTS: dict[str, tuple[Callable[[], torch.nn.Module], torch.dtype]] = {
    "transformer": (transformer_on_meta, torch.bfloat16),
    "text_encoder": (text_encoder_on_meta, torch.bfloat16),
    "vae": (vae_on_meta, torch.float32),
}


def parameter_counts() -> dict[str, int]:
    """Each component's parameters, counted on the meta device (no memory allocated)."""
    return {name: sum(p.numel() for p in make().parameters())
            for name, (make, _dtype) in COMPONENTS.items()}  # fmt: skip


def require_cuda() -> None:
    """Refuse before anything is allocated where no CUDA device is."""
    if torch.cuda.is_available():
        return
    counts = parameter_counts()
    sizes = ", ".join(f"{name} {count / 1e9:.2f} B" for name, count in counts.items())
    weight_gib = sum(counts[name] * dtype.itemsize
                     for name, (_, dtype) in COMPONENTS.items()) / 2**30  # fmt: skip
    raise NeedsCuda(
        f"--real-shapes builds Wan2.1-T2V-1.3B at its published shapes ({sizes} parameters), "
        f"{weight_gib:.1f} GiB of weights, on a CUDA GPU, and this machine has none: refusing "
        "rather than allocating that here. Run it on a GPU host (bench/device.sh), or run "
        "`python -m bench.gpu` without --real-shapes for the tiny model."
    )


def on_device(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A meta-device model given storage on `device` and random values there.

    Parameters take `dtype` except those of the modules the class keeps in fp32; buffers
    keep the values and dtype their constructor computed. Weights are normal with std
    1/sqrt(fan-in) (activations keep their scale through the layers), norm scales one,
    biases zero: the output is noise, but finite noise.
    """
    keep = _kept_in_fp32(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    for name, parameter in model.named_parameters():
        kept = dtype != torch.float32 and any(part in keep for part in name.split("."))
        parameter.data = parameter.data.to(torch.float32 if kept else dtype)
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.ndim < 2 or "norm" in name or name.endswith("gamma"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
    return model.eval()


def _kept_in_fp32(model: torch.nn.Module) -> set[str]:
    """Module names whose parameters stay fp32 under bf16, as from_pretrained leaves them:
    diffusers keeps `_keep_in_fp32_modules` for any lower dtype, transformers only its
    `_keep_in_fp32_modules_strict` (the others only under fp16)."""
    if isinstance(model, PreTrainedModel):
        return set(model._keep_in_fp32_modules_strict or ())
    return set(model._keep_in_fp32_modules or ())


def build_t2v(settings: Settings) -> WanPipeline:
    """The text-to-video pipeline of the worker (`load_t2v`), its weights random and made on
    the GPU: the turbo LoRA and the speed options are applied as the worker applies them."""
    device = resolve_device(settings)
    parts = {name: on_device(make(), dtype, device) for name, (make, dtype) in COMPONENTS.items()}
    scheduler = UniPCMultistepScheduler.from_pretrained(CONFIGS, subfolder="scheduler")
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), scheduler=scheduler, **parts)
    return prepare_t2v(pipe, settings, device)


def make_turbo_lora(target: Path) -> Path:
    """A random LoRA at the published rank over every block's attention and feed-forward
    layers of the real transformer, in diffusers' Wan LoRA format (WAN_DISTILL_LORA)."""
    shapes = {name: (module.out_features, module.in_features)
              for name, module in transformer_on_meta().named_modules()
              if LORA_TARGETS.fullmatch(name)}  # fmt: skip
    return save_random_lora(target, shapes, rank=TURBO_LORA_RANK, scale=0.01)
