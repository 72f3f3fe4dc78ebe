"""WAN generation: load the pipelines once, speed them up, run a mode per job; warm-up, fallback.

May import worker.observe, worker.jobs and the root; torch and diffusers come in here, in the
GPU worker's pool child only. Inside, top to bottom: warmup, fallback, provenance; modes;
load; speed (pyproject.toml's contract).
"""

from worker.generation.load import Pipelines, load_t2v, model_dir
from worker.generation.modes import Generated, StepHook, generate, generate_images

__all__ = [
    "Generated",
    "Pipelines",
    "StepHook",
    "generate",
    "generate_images",
    "load_t2v",
    "model_dir",
]
