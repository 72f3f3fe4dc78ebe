"""Prompt enhancement for the `*_enhanced` job types with Qwen 2.5-7B Base.

`Enhancer.enhance` returns an `Enhancement`: the prompt WAN receives and the callback
metadata saying whether Qwen rewrote it, or why not. Nothing here knows Celery; torch and
transformers are imported only where the model is loaded (`enhancement.model`).
"""

from enhancement.enhancer import Enhancer
from enhancement.result import Enhancement, FallbackReason

__all__ = ["Enhancement", "Enhancer", "FallbackReason"]
