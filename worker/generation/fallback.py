"""Out of GPU memory: free the cache and run the job again at the next lower quality preset.

A job at `high` that runs out of memory runs again at `balanced`, then at `fast`; a job
already at `fast` fails at once, with `OutOfGpuMemory` naming the presets tried. Each
preset brings its own steps and guidance; steps or guidance the job named itself (config)
stay what it asked for at every preset, so for such a job the new run differs only by
what the freed cache gives back. The result says which preset made it: `quality_used`,
and `degraded_from` when that is not the job's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from worker.errors import OutOfGpuMemory
from worker.generation import gpu_memory
from worker.jobs.model import Job, PresetName, presets_from

log = logging.getLogger(__name__)

#: What a generation made: frames in hand (`modes.Generated`) or a long video's windows in
#: the spool (`continuation.Continued`).
Made = TypeVar("Made")
#: Runs the job as given (at one preset) and returns what it made.
Attempt = Callable[[Job], Made]
#: Told (preset that ran out of memory, preset tried next) before each new run.
OnDegrade = Callable[[PresetName, PresetName], None]


@dataclass(frozen=True)
class Produced(Generic[Made]):
    """What generation made, and the job as it ran (its preset's steps and guidance)."""

    generated: Made
    job: Job
    degraded_from: PresetName | None = None

    def asset_metadata(self) -> dict[str, Any]:
        """What the callback's asset says about the preset that produced it."""
        quality: dict[str, Any] = {"quality_used": self.job.quality}
        if self.degraded_from is not None:
            quality["degraded_from"] = self.degraded_from
        return quality


def generate_within_memory(
    job: Job, attempt: Attempt[Made], *, on_degrade: OnDegrade | None = None
) -> Produced[Made]:
    """Run `attempt` at the job's preset, and at each lower one after running out of memory."""
    tried: list[PresetName] = []
    last_error = ""
    for quality in presets_from(job.quality):
        if tried:  # out of the `except`: the error's traceback no longer holds the tensors
            gpu_memory.free()
            log.warning("job=%s out of GPU memory at preset %s (%s); running again at %s",
                        job.id, tried[-1], last_error, quality)  # fmt: skip
            if on_degrade is not None:
                on_degrade(tried[-1], quality)
        run_as = job if quality == job.quality else job.at_preset(quality)  # as it came, first
        try:
            generated = attempt(run_as)
        except torch.OutOfMemoryError as e:
            tried.append(quality)
            last_error = str(e)
            continue
        degraded_from = job.quality if quality != job.quality else None
        return Produced(generated, run_as, degraded_from)
    gpu_memory.free()
    raise OutOfGpuMemory(
        f"out of GPU memory at every quality preset tried ({', '.join(tried)}); "
        f"last error: {last_error}"
    )
