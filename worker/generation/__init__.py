"""WAN generation: load the pipelines once, run them per job.

Imported only by the generation worker's pool child (and tools), never by the media
worker: this is where torch and diffusers come in.
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
