"""Tiny random-weight models of the real architectures, built offline from configs.

Tests and the demo save them with `save_pretrained` and load them through the same
`from_pretrained` path real weights use. Their output is noise, by construction.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

#: Said wherever a user sees output of these models.
NOISE_WARNING = (
    "the tiny WAN model has random weights: its videos and images are noise. "
    "Set WAN_MODEL_PATH to Wan2.1-T2V-1.3B in diffusers format "
    "(Wan-AI/Wan2.1-T2V-1.3B-Diffusers) for real output."
)
#: Width of the tiny text encoder; the transformer's text input must match it.
TEXT_DIM = 32


def _tokenizer() -> T5Tokenizer:
    """A small SentencePiece-style vocabulary: words, then single characters as fallback."""
    words = "a the of and in on cat dog fox red blue green sky sea city night run walk".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -1.0) for w in words]
    vocab += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_wan(target: Path, *, seed: int = 0) -> Path:
    """Build and save a WAN 2.1 text-to-video pipeline with 2-layer random-weight parts."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
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
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,  # 32, diffusers' test value, caps the size at 512 px
    )
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # The scheduler the real Wan2.1-T2V-1.3B-Diffusers ships with.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )
    pipe.save_pretrained(target)
    return target
