"""`make demo` stays true: the demo runs both jobs end to end and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.local.stack import RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: The demo's 33-frame video alone takes a minute of CPU, its 161-frame one about another.
pytestmark = [pytest.mark.runs_long, pytest.mark.timeout(600)]


def test_the_demo_completes_text_reference_image_to_image_and_long_jobs(tmp_path: Path) -> None:
    # A Redis of its own: every database of the session's is some other module's
    server = RedisServer(tmp_path / "redis").start()
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "COLUMNS": "250",
    }
    env.pop("WAN_MODEL_PATH", None)

    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "demo"], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
    finally:
        server.stop()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "noise" in done.stdout
    assert done.stdout.count("completed") == 5
    for task in ("t2v-1.3B none", "vace-1.3B start", "v2v-1.3B single", "vace-1.3B none"):
        assert task in done.stdout
    assert "161 in 3 windows" in done.stdout  # the 10 s video
    assert "enhanced: A slow cinematic dolly shot" in done.stdout  # the tiny Qwen's sentence
    assert "GET /health: ok" in done.stdout
    assert done.stdout.count("watch it live (while the demo runs): http://") == 5
    assert done.stdout.count("/ui/jobs/") == done.stdout.count("?token=") == 5
    videos = list((tmp_path / "outputs" / "workspace-temp").glob("demo-user/*/0.mp4"))
    images = list((tmp_path / "outputs" / "workspace-temp").glob("demo-user/*/0.png"))
    thumbnails = list((tmp_path / "outputs" / "workspace-temp").glob("demo-user/*/0.thumb.webp"))
    assert (len(videos), len(images), len(thumbnails)) == (3, 2, 5)
    assert not list((tmp_path / "spool").glob("*/*")), "the spool was not freed"
