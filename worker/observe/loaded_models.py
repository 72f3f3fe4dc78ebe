"""Which models each worker's pool child holds, kept in Redis for GET /health.

The pool child that loads or unloads a model says so here; a worker clears its own entry
when it starts, so a restarted worker never shows what its dead child held.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from worker.observe.metrics import MODEL_LOADS, Metrics

KEY = "wan:loaded_models"


class LoadedModels:
    """One hash field per worker node: {model name: {path, pid, loaded_at}}."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def note(
        self, node: str, model: str, *, path: str | None, loaded: bool,
        details: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Record that `node` now holds (or no longer holds) `model`, with `details` of how
        it runs (the generation child's speed options)."""
        models = self.of(node)
        if loaded:
            models[model] = {"path": path, "pid": os.getpid(), "loaded_at": time.time(),
                             **(details or {})}  # fmt: skip
            Metrics(self.redis).count(MODEL_LOADS, model)
        else:
            models.pop(model, None)
        self.redis.hset(KEY, node, json.dumps(models))

    def clear(self, node: str) -> None:
        self.redis.hdel(KEY, node)

    def of(self, node: str) -> dict[str, Any]:
        raw = self.redis.hget(KEY, node)
        return {} if raw is None else json.loads(raw)

    def all(self) -> dict[str, dict[str, Any]]:
        return {node.decode(): json.loads(raw) for node, raw in self.redis.hgetall(KEY).items()}
