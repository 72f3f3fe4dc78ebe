"""Benchmark reference handling and the pipelines' memory; prints a table.

    .venv/bin/python -m bench.references

- download + decode + preparation of a ~4 MB JPEG served on 127.0.0.1 (through the SSRF
  guard, allow-listed), to 480x832, median of several runs;
- the resident memory (VmRSS) of a fresh process that loads what the generation child
  loads: nothing, then text to video, then VACE, then video to video (tiny models; with real
  weights the shared text encoder and VAE are what keeps the second and third cheap).
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from media.references import Guard, decode, fetch, prepare
from worker.local.image_server import ImageServer, Route

RUNS = 5
WIDTH_PX, HEIGHT_PX = 480, 832

#: Run in a fresh interpreter: the RSS after each pipeline, as one line per step.
MEMORY_PROBE = """
import sys
from pathlib import Path
from worker.generation import Pipelines
from worker.settings import Settings

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

pipes = Pipelines(Settings(_env_file=None, wan_model_path=Path(sys.argv[1]),
                           wan_vace_model_path=Path(sys.argv[2]), device="cpu"))
print("imports only", rss_mib())
pipes.t2v
print("t2v", rss_mib())
pipes.vace
print("t2v + vace", rss_mib())
pipes.v2v
print("t2v + vace + v2v", rss_mib())
"""


def four_mb_jpeg() -> bytes:
    """A photo-sized JPEG of noise: it compresses badly, so 2400x1600 at quality 94 is ~4 MB."""
    pixels = np.random.default_rng(0).integers(0, 256, (1600, 2400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=94)
    return buffer.getvalue()


def reference_seconds() -> tuple[int, dict[str, float]]:
    data = four_mb_jpeg()
    guard = Guard(allowed_hosts=frozenset({"127.0.0.1"}))
    stages: dict[str, list[float]] = {"download": [], "decode": [], "prepare": [], "total": []}
    with ImageServer("127.0.0.1") as server:
        url = server.add("/photo.jpg", Route(data, "image/jpeg"))
        for _ in range(RUNS):
            t0 = time.perf_counter()
            body = fetch(url, guard=guard, timeout_s=30)
            t1 = time.perf_counter()
            image = decode(body)
            t2 = time.perf_counter()
            prepare(image, width=WIDTH_PX, height=HEIGHT_PX)
            t3 = time.perf_counter()
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                stages[name].append(seconds)
    return len(data), {name: statistics.median(values) for name, values in stages.items()}


def memory_mib() -> list[tuple[str, float]]:
    from worker.local.tiny_models import make_tiny_vace, make_tiny_wan

    with tempfile.TemporaryDirectory() as scratch:
        wan = make_tiny_wan(Path(scratch) / "wan")
        vace = make_tiny_vace(Path(scratch) / "vace")
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(wan), str(vace)],
            capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
    rows = []
    for line in done.stdout.strip().splitlines():
        name, value = line.rsplit(" ", 1)
        rows.append((name, float(value)))
    return rows


def main() -> None:
    size, seconds = reference_seconds()
    table = Table(title="reference handling and pipeline memory (this machine)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in seconds.items():
        table.add_row(
            f"{name}: {size / 1e6:.1f} MB JPEG -> {WIDTH_PX}x{HEIGHT_PX}", f"{value:.3f} s"
        )
    for name, rss in memory_mib():
        table.add_row(f"generation child RSS, {name} (tiny models)", f"{rss:.0f} MiB")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
