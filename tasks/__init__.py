"""Celery: the app, the stage tasks of the chain, bootsteps, signals, routing, the sender.

The only code that knows Celery task objects; may import every room. `celery -A tasks worker`
finds `app` here; importing it never imports torch (generation loads it in the pool child).
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
