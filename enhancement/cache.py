"""Enhanced prompts kept in Redis, so a redelivered job or a repeated request costs no GPU.

The key covers everything that shapes the answer: the prompt, content, quality, the model's
revision and the sampling settings. A changed model or setting never reuses an old answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

import redis

from enhancement.model import Sampling

log = logging.getLogger(__name__)

KEY_PREFIX = "wan:enhance:"


class EnhancementCache:
    """Finished enhancements by request; Redis trouble is a cache miss, never a failed job."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(prompt: str, *, content: str, quality: str, revision: str, sampling: Sampling) -> str:
        request = [prompt, content, quality, revision, asdict(sampling)]
        return KEY_PREFIX + hashlib.sha256(json.dumps(request).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self.redis.get(key)
        except redis.RedisError as e:
            log.warning("enhancement cache unavailable (%s): treated as a miss", e)
            return None
        return None if raw is None else json.loads(raw)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        try:
            self.redis.set(key, json.dumps(entry), ex=self.ttl_s)
        except redis.RedisError as e:
            log.warning("enhancement cache unavailable (%s): result not kept", e)
