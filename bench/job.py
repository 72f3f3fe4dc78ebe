"""Benchmark one job's stages and the first targets on this machine; prints a table.

    make bench        (or: .venv/bin/python -m bench.job)

Runs the real stack (private redis-server, the three Celery workers, the bridge, the
tiny random-weight WAN model, local storage, callbacks to a local endpoint):
- per-stage seconds of one 81-frame 480x832 video job (2 denoising steps);
- model loads over 10 jobs on the one generation worker (target: 1);
- the media stages (encode + thumbnail + local upload, run by the media worker) for 81
  frames at 480x832, against a bare PyAV libx264 `veryfast` encode of the same frames
  (target: at most 1.15x);
- the media worker's RSS after those jobs (target: at most 150 MiB, torch never loaded);
- on an idle system, RPUSH onto the platform list to the start of `generate`
  (target: p50 at most 50 ms).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from rich.console import Console
from rich.table import Table

from bench import tiny_stack
from worker.jobs.records import JobRecords
from worker.local.platform import queue_body

JOBS = 10
#: Runs of the media stages and of the bare encode; the table shows medians.
MEDIA_REPEATS = 3
WIDTH_PX, HEIGHT_PX, FRAMES = 480, 832, 81
JOB_TIMEOUT_S = 900
QUEUE = "wan_queue"


def synthetic_frames(seed: int = 0) -> np.ndarray:
    """81 frames of moving gradients with grain: content x264 works about as hard on as video."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX].astype(np.float32)
    frames = np.empty((FRAMES, HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8)
    for t in range(FRAMES):
        for c in range(3):
            wave = np.sin((x + 4 * t) / (37 + 11 * c)) + np.cos((y - 3 * t) / (53 + 7 * c))
            grain = rng.normal(0, 6, size=wave.shape)
            frames[t, ..., c] = np.clip(127 + 60 * wave + grain, 0, 255)
    return frames


def bare_encode_s(frames: np.ndarray, out: Path) -> float:
    """The yardstick: PyAV libx264 veryfast, yuv420p, 16 fps, nothing else."""
    started = time.perf_counter()
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(16))
        stream.width, stream.height, stream.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return time.perf_counter() - started


def memory_mib(pid: int, field: str) -> float:
    """`Rss` (pages in memory, shared ones counted in full) or `Pss` (shared ones split)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid}")


def has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def main() -> None:
    console = Console(width=110)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-"))
    with ExitStack() as cleanup:
        tiny = tiny_stack(cleanup, workdir, queue=QUEUE)
        stack, platform, records = tiny.stack, tiny.platform, tiny.records
        client = records.redis
        # The media-stage run below sends Celery tasks from this process: same Redis.
        os.environ["REDIS_URL"] = tiny.redis_url

        def run(job_type: str, config: dict) -> tuple[float, dict[str, float]]:
            """One job on an idle system: (RPUSH to generate start, stage seconds)."""
            job = {"id": str(uuid.uuid4()), "type": job_type, "prompt": "a red fox in snow",
                   "user_id": "bench", "config": config}  # fmt: skip
            pushed_at = time.time()
            client.rpush(QUEUE, queue_body(job))
            body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
            if body["status"] != "completed":
                raise RuntimeError(f"bench job failed: {body['error_message']}")
            record = records.get(job["id"])
            return float(record.fields["started:generate"]) - pushed_at, record.stage_seconds()

        console.print("job 1: 81-frame 480x832 video, 2 steps ...")
        first_delay, stages = run(
            "video_fast",
            {"resolution": f"{WIDTH_PX}x{HEIGHT_PX}", "num_inference_steps": 2, "seed": 1},
        )
        delays = [first_delay]
        for i in range(2, JOBS + 1):
            console.print(f"job {i}: 256x256 image, 2 steps ...")
            delay, _ = run("image_fast", {"resolution": "256x256", "num_inference_steps": 2})
            delays.append(delay)

        console.print(
            "media stages on the media worker, then a bare encode, of the same frames ..."
        )
        frames = synthetic_frames()
        media_runs, bare_runs = [], []
        for _ in range(MEDIA_REPEATS):  # alternated, so drift in machine load hits both
            media_runs.append(media_stages_s(records, frames, workdir / "spool"))
            bare_runs.append(bare_encode_s(frames, workdir / "bare.mp4"))
        media_s, bare_s = statistics.median(media_runs), statistics.median(bare_runs)

        loads = stack.log("gpu").count("WAN pipeline loaded")
        cpu_pids = stack.pids("cpu")
        rss = [memory_mib(pid, "Rss") for pid in cpu_pids]
        pss = sum(memory_mib(pid, "Pss") for pid in cpu_pids)
        torch_in_media = any(has_torch(pid) for pid in cpu_pids)

    stage_table = Table(title="job 1: 81 frames 480x832, 2 steps, tiny model on CPU", min_width=60)
    stage_table.add_column("stage")
    stage_table.add_column("seconds", justify="right")
    for stage, seconds in stages.items():
        stage_table.add_row(stage, f"{seconds:.3f}")
    console.print(stage_table)

    p50_ms = statistics.median(delays) * 1000
    targets = Table(title=f"targets ({os.cpu_count()} CPU cores)")
    for column in ("measure", "value", "target", "met"):
        targets.add_column(column)
    rows = [
        ("model loads over 10 jobs, one generation worker", f"{loads}", "1", loads == 1),
        ("media stages (encode+thumbnail+upload), 81 frames 480x832, median of 3",
         f"{media_s:.2f} s", "", True),
        ("bare PyAV libx264 veryfast encode, same frames, median of 3", f"{bare_s:.2f} s",
         "", True),
        ("media stages / bare encode", f"{media_s / bare_s:.2f}x", "<= 1.15x",
         media_s / bare_s <= 1.15),
        ("media worker RSS per process (main, pool children), after the jobs (MiB)",
         ", ".join(f"{v:.0f}" for v in rss), "<= 150", max(rss) <= 150),
        ("media worker PSS, its processes summed (MiB)", f"{pss:.0f}", "", True),
        ("torch loaded in the media worker", str(torch_in_media), "False", not torch_in_media),
        ("RPUSH -> generate start, p50 over 10 jobs", f"{p50_ms:.1f} ms", "<= 50 ms",
         p50_ms <= 50),
        ("RPUSH -> generate start, max", f"{max(delays) * 1000:.1f} ms", "", True),
    ]  # fmt: skip
    for measure, value, target, met in rows:
        targets.add_row(measure, value, target, ("yes" if met else "NO") if target else "")
    console.print(targets)
    console.print(
        "[yellow]The tiny model's output is noise: generation seconds say nothing of real WAN.[/]"
    )


def media_stages_s(records: JobRecords, frames: np.ndarray, spool_dir: Path) -> float:
    """Run encode, thumbnail and upload on the media worker for frames put in the spool."""
    from celery import chain

    from media import spool
    from tasks.media import encode, thumbnail, upload
    from worker.jobs.model import parse_job

    job = parse_job({"id": str(uuid.uuid4()), "type": "video_fast", "prompt": "bench",
                     "user_id": "bench", "config": {"frame_num": FRAMES}})  # fmt: skip
    path = spool.write_frames(spool.frames_path(spool_dir, job.id), frames)
    records.create(job, payload="{}")
    records.update(job.id, generation={"seed": 0, "width": WIDTH_PX, "height": HEIGHT_PX,
                                       "frame_num": FRAMES, "frames_path": str(path)})  # fmt: skip
    result = chain(encode.si(job.id), thumbnail.si(job.id), upload.si(job.id)).apply_async()
    result.get(timeout=JOB_TIMEOUT_S)
    return sum(records.get(job.id).stage_seconds().values())


if __name__ == "__main__":
    main()
