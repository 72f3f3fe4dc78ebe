"""Prompt enhancement with Qwen 2.5-7B Base: prompts, loading, deadline, output hygiene, cache.

May import worker.jobs and the root; knows no Celery. torch and transformers come in only
where the model loads (`enhancement.model`); `enhancement.result` is what readers need.
"""

from enhancement.enhancer import Enhancer
from enhancement.result import Enhancement, FallbackReason

__all__ = ["Enhancement", "Enhancer", "FallbackReason"]
