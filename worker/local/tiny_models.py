"""Tiny random-weight models of the real architectures, built offline from configs.

Tests and the demo save them with `save_pretrained` and load them through the same
`from_pretrained` path real weights use. Their output is noise, by construction.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

#: Said wherever a user sees output of these models.
NOISE_WARNING = (
    "the tiny WAN model has random weights: its videos and images are noise. "
    "Set WAN_MODEL_PATH to Wan2.1-T2V-1.3B in diffusers format "
    "(Wan-AI/Wan2.1-T2V-1.3B-Diffusers) for real output."
)
#: Width of the tiny text encoder; the transformer's text input must match it.
TEXT_DIM = 32


def tiny_tokenizer() -> T5Tokenizer:
    """A small SentencePiece-style vocabulary: words, then single characters as fallback."""
    words = "a the of and in on cat dog fox red blue green sky sea city night run walk".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -1.0) for w in words]
    vocab += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


#: The transformer shape of both tiny models (diffusers' own test values, but a 1024 rope).
TRANSFORMER_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 32,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,  # 32, diffusers' test value, caps the size at 512 px
}


def _shared_parts() -> dict:
    """Tokenizer, text encoder, VAE and scheduler: the same in the T2V and VACE checkpoints.

    The real Wan2.1-T2V-1.3B and Wan2.1-VACE-1.3B ship the same umt5 encoder and Wan VAE;
    built from the same seed, the tiny ones are identical too, so the worker may share them.
    """
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # diffusers' default init leaves this 3-channel VAE's output nearly constant, whatever
    # the latents: with zero biases (a common init) different inputs give visibly different
    # frames, so tests can see a reference or a seed change the output.
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    # The scheduler the real Wan2.1-T2V-1.3B-Diffusers ships with.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
    }


def make_tiny_wan(target: Path, *, seed: int = 0) -> Path:
    """Build and save a WAN 2.1 text-to-video pipeline with 2-layer random-weight parts."""
    parts = _shared_parts()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(num_layers=2, **TRANSFORMER_CONFIG)
    WanPipeline(transformer=transformer, **parts).save_pretrained(target)
    return target


def make_tiny_vace(target: Path, *, seed: int = 0) -> Path:
    """Build and save a Wan2.1-VACE pipeline: 3 layers, VACE blocks beside layers 0 and 2.

    `vace_in_channels` is 96: 16 latent channels for the kept and for the generated part of
    the control video, and 64 for the mask folded into the VAE's 8x8 spatial patches.
    """
    parts = _shared_parts()
    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(
        num_layers=3, vace_layers=[0, 2], vace_in_channels=96, **TRANSFORMER_CONFIG
    )
    WanVACEPipeline(transformer=transformer, **parts).save_pretrained(target)
    return target


def make_tiny_wan_lora(target: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A random LoRA for the tiny WAN transformer in diffusers' Wan LoRA format: the file
    WAN_DISTILL_LORA names (its output is noise too, but different noise)."""
    inner = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    shapes = {f"blocks.{block}.{attention}.{projection}": (inner, inner)
              for block in range(2) for attention in ("attn1", "attn2")
              for projection in ("to_q", "to_k", "to_v", "to_out.0")}  # fmt: skip
    return save_random_lora(target, shapes, rank=rank, seed=seed)


def save_random_lora(
    target: Path,
    shapes: dict[str, tuple[int, int]],
    *,
    rank: int,
    seed: int = 1,
    scale: float = 1.0,
) -> Path:
    """A random LoRA over the linear layers `shapes` names ((out, in) features), saved in
    diffusers' Wan LoRA format; `scale` multiplies its values."""
    torch.manual_seed(seed)
    layers = {}
    for name, (out_features, in_features) in shapes.items():
        layers[f"{name}.lora_A.weight"] = torch.randn(rank, in_features) * scale
        layers[f"{name}.lora_B.weight"] = torch.randn(out_features, rank) * scale
    WanPipeline.save_lora_weights(target, transformer_lora_layers=layers)
    return target / "pytorch_lora_weights.safetensors"
