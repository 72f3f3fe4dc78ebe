"""The command line as an operator uses it: settings with secrets masked, the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=120, check=True,
    )  # fmt: skip


def test_config_prints_settings_and_only_says_whether_secrets_are_set() -> None:
    out = run_worker(
        "config",
        env={
            "SUPABASE_URL": "https://project.supabase.co",
            "SUPABASE_SERVICE_KEY": "service-key-value-1234",
            "JOB_CALLBACK_SECRET": "callback-secret-5678",
            "PLATFORM_QUEUE": "jobs_in",
        },
    ).stdout

    assert "service-key-value" not in out and "1234" not in out
    assert "callback-secret" not in out and "5678" not in out
    assert "SUPABASE_SERVICE_KEY" in out and "JOB_CALLBACK_SECRET" in out
    assert "WAN_WORKER_API_KEY" in out
    assert "jobs_in" in out
    assert "https://project.supabase.co/functions/v1/job-callback" in out


def test_derived_settings_follow_design_md(monkeypatch) -> None:
    for name in ("PLATFORM_REDIS_URL", "CALLBACK_URL", "PUBLIC_URL", "SUPABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://broker:6379/3")
    monkeypatch.setenv("RUNPOD_POD_ID", "abc123")

    settings = Settings(_env_file=None)

    assert settings.platform_redis_url == "redis://broker:6379/3"
    assert settings.callback_url is None
    assert settings.public_url == "https://abc123-7860.proxy.runpod.net"
    assert settings.masked()["job_callback_secret"] == "unset"


def test_make_tiny_builds_a_diffusers_model_directory(tmp_path: Path) -> None:
    out = run_worker("models", "make-tiny", str(tmp_path / "tiny")).stdout

    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= index.keys()
    assert "noise" in out


def test_config_masks_credentials_inside_urls() -> None:
    url = "rediss://default:s3cr3t-pw@redis.example.com:6380/0"

    out = run_worker("config", env={"REDIS_URL": url}).stdout

    assert "s3cr3t-pw" not in out and "default:" not in out
    assert "rediss://***@redis.example.com:6380/0" in out


def test_make_tiny_qwen_builds_a_model_that_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_worker("models", "make-tiny", "--qwen", str(tmp_path / "qwen")).stdout

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qwen")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    assert model.config.model_type == "qwen2"
    assert tokenizer.decode(tokenizer.encode(" a fox")) == " a fox"  # byte-level round trip
    assert "fixed sentence" in out


def test_make_tiny_vace_builds_a_vace_model_directory(tmp_path: Path) -> None:
    out = run_worker("models", "make-tiny", "--vace", str(tmp_path / "vace")).stdout

    index = json.loads((tmp_path / "vace" / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["transformer"] == ["diffusers", "WanVACETransformer3DModel"]
    assert "tiny VACE pipeline saved" in out
