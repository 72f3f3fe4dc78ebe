"""CUDA memory of the generation child: what /metrics and each job's summary report, and
freeing it after a failure."""

from __future__ import annotations

import gc

import torch

from worker.observe.metrics import GPU_MEMORY, Metrics

MIB = 1024 * 1024


def report(metrics: Metrics, worker: str) -> float | None:
    """After a job: export memory in use and the job's peak, reset the peak; None on CPU."""
    if not torch.cuda.is_available():
        return None
    in_use, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    metrics.set(GPU_MEMORY, in_use, worker, "in_use")
    metrics.set(GPU_MEMORY, peak, worker, "peak")
    torch.cuda.reset_peak_memory_stats()
    return round(peak / MIB, 1)


def free() -> None:
    """Give back what a failed or finished run held: Python's garbage, then CUDA's cache.

    On a CPU `empty_cache` does nothing (CUDA never initialised).
    """
    gc.collect()
    torch.cuda.empty_cache()
