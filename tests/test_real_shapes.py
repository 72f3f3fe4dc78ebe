"""`bench.gpu --real-shapes` without a GPU: the three models built from bench/configs have the
published checkpoint's parameter counts, a model made on the meta device gets its storage,
values and computed buffers on the device it is sent to, and a machine without CUDA refuses
the run before allocating anything. The timings themselves need a GPU (bench/device.sh)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench.real_shapes import on_device, parameter_counts

ROOT = Path(__file__).resolve().parents[1]
#: The published models' parameter counts. Wan-AI/Wan2.1-T2V-1.3B-Diffusers (revision
#: 0fad780) stores the transformer and the text encoder in fp32; their safetensors indexes'
#: `total_size` over 4 bytes is the count (the "1.3B" of the name is rounded down). The VAE:
#: Wan's technical report (arXiv 2503.20314) gives Wan-VAE as 127M parameters.
PUBLISHED = {
    "transformer": 5_675_987_200 // 4,  # 1,418,996,800
    "text_encoder": 22_723_641_344 // 4,  # 5,680,910,336: umt5-xxl's encoder
    "vae": 127_000_000,
}
#: How far a count may be from the published one (the issue's bound).
TOLERANCE = 0.01
#: Address space the refusing process may take: torch's import fits, the models' 13.7 GiB
#: do not, so a run that went on to build them fails with a MemoryError instead of swapping.
REFUSAL_ADDRESS_SPACE_BYTES = 8 * 2**30


def test_models_from_the_configs_have_the_published_parameter_counts() -> None:
    counts = parameter_counts()
    print({name: f"{count:,}" for name, count in counts.items()})
    for name, published in PUBLISHED.items():
        assert abs(counts[name] - published) <= TOLERANCE * published, (name, counts[name])


def test_a_meta_model_gets_storage_values_and_its_computed_buffers_on_the_device() -> None:
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from worker.local.tiny_models import TRANSFORMER_CONFIG

    with init_empty_weights():
        meta = WanTransformer3DModel(num_layers=1, **TRANSFORMER_CONFIG)
    built = on_device(meta, torch.bfloat16, torch.device("cpu"))
    made_on_cpu = WanTransformer3DModel(num_layers=1, **TRANSFORMER_CONFIG)
    buffers = dict(built.named_buffers())
    for name, buffer in made_on_cpu.named_buffers():  # the RoPE tables, as computed
        assert torch.equal(buffers[name], buffer), name
    kept = WanTransformer3DModel._keep_in_fp32_modules
    for name, parameter in built.named_parameters():
        in_fp32 = any(part in kept for part in name.split("."))
        assert parameter.dtype == (torch.float32 if in_fp32 else torch.bfloat16), name
        assert parameter.device.type == "cpu" and bool(torch.isfinite(parameter).all()), name
    weight = built.blocks[0].ffn.net[2].weight  # fan-in ffn_dim: std ffn_dim ** -0.5
    assert abs(weight.float().std().item() * TRANSFORMER_CONFIG["ffn_dim"] ** 0.5 - 1) < 0.2


def test_without_cuda_it_refuses_before_allocating() -> None:
    def limit_address_space() -> None:
        limit = REFUSAL_ADDRESS_SPACE_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--real-shapes"],
        cwd=ROOT,
        env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
        preexec_fn=limit_address_space,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "this machine has none: refusing rather than allocating" in result.stderr
    assert "13.7 GiB of weights" in result.stderr  # what it would have built
    assert "bench/device.sh" in result.stderr  # where to run it instead
    assert "Speed options" not in result.stdout  # no table was started
