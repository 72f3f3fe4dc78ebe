"""WAN generation: load the pipelines once, run them per job, window by window for long videos.

Imported only by the generation worker's pool child (and tools), never by the media
worker: torch and diffusers come in with `load`, `speed`, `modes` and `continuation`. The
names below are imported lazily, on first use (as diffusers' own packages do), so
`worker.generation.windows`, plain arithmetic, is read by any process without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.generation.load import Pipelines, load_t2v, model_dir
    from worker.generation.modes import Generated, StepHook, generate

#: Each name this package offers, and the module that defines it.
_HOMES = {
    "Pipelines": "load",
    "load_t2v": "load",
    "model_dir": "load",
    "Generated": "modes",
    "StepHook": "modes",
    "generate": "modes",
}

__all__ = ["Generated", "Pipelines", "StepHook", "generate", "load_t2v", "model_dir"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
