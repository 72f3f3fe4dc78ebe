"""WAN generation: load the pipelines once, speed them up, run a mode per job, window by window
for long videos; warm-up, fallback.

May import worker.observe, worker.jobs and the root; torch and diffusers come in with `load`,
`speed`, `modes` and `continuation`, in the GPU worker's pool child only. The names below are
imported lazily, on first use (as diffusers' own packages do), so `worker.generation.windows`,
plain arithmetic, is read by any process without torch. Inside, top to bottom: warmup,
fallback, provenance, continuation; modes; load; speed; windows (pyproject.toml's contract).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.generation.load import Pipelines, load_t2v, model_dir
    from worker.generation.modes import Generated, StepHook, generate, generate_images

#: Each name this package offers, and the module that defines it.
_HOMES = {
    "Pipelines": "load",
    "load_t2v": "load",
    "model_dir": "load",
    "Generated": "modes",
    "StepHook": "modes",
    "generate": "modes",
    "generate_images": "modes",
}

__all__ = [
    "Generated",
    "Pipelines",
    "StepHook",
    "generate",
    "generate_images",
    "load_t2v",
    "model_dir",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
