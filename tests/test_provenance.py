"""Every completed callback says what reproduces its result."""

from __future__ import annotations

import tomllib
from pathlib import Path

import redis

import worker
from tests.conftest import JOB_TIMEOUT_S, new_job, push
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack
from worker.local.tiny_qwen import ENHANCED_TEXT
from worker.model_files import model_revision

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_the_projects() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    assert worker.__version__ == pyproject["project"]["version"]


def test_a_completed_callback_carries_the_provenance_of_its_result(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis, tiny_wan: Path,
) -> None:  # fmt: skip
    job = new_job("image7b_high_enhanced", negative_prompt="blurry")
    job["config"] |= {"resolution": "256x320", "seed": 99, "guidance_scale": 4.5}
    push(platform_list, job)

    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body

    assert body["status"] == "completed"
    assert body["metadata"]["provenance"] == {
        "model": tiny_wan.name,
        "model_revision": model_revision(tiny_wan),
        "pipeline": "WanPipeline",
        "scheduler": "UniPCMultistepScheduler",
        "shift": 5.0,
        "steps": 2,
        "guidance": 4.5,
        "seed": 99,
        "width": 256,
        "height": 320,
        "frames": 1,
        "prompt": ENHANCED_TEXT,  # what WAN received, not what the user typed
        "negative_prompt": "blurry",
        "dtype": "float32",
        "device": "cpu",
        "speed_options": {  # the defaults, on CPU
            "attention_backend": "native",
            "torch_compile": "off",
            "cache": "none",
            "vae_tiling": False,
            "offload": "none",
            "quantize": "none",
        },
        "step_cache": {"ran": "none"},
        "turbo": False,
        "worker_version": worker.__version__,
    }
