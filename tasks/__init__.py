"""Celery tasks of the chain `enhance -> generate -> encode -> thumbnail -> upload -> callback`.

`celery -A tasks worker ...` finds `app` here. Importing this package never imports
torch: generation loads it inside the GPU worker's pool child.
"""

from tasks import enhance, generate, kombu_fix, media, shutdown, worker_signals, worker_steps
from tasks.app import app
from tasks.chain import build_chain

__all__ = [
    "app",
    "build_chain",
    "enhance",
    "generate",
    "kombu_fix",
    "media",
    "shutdown",
    "worker_signals",
    "worker_steps",
]
