"""One enhancement: the cache, then Qwen under its deadline, then output hygiene.

Every way it can fall short ends in the user's own prompt and a reason the callback shows:
`no_model`, `timeout`, `rejected_output` (and `error`, which the caller assigns to an
unexpected exception at its loop edge). Knows nothing of Celery.
"""

from __future__ import annotations

import logging
from pathlib import Path

from enhancement.cache import EnhancementCache
from enhancement.model import QwenModel, Sampling
from enhancement.output import RejectedOutput, clean_continuation
from enhancement.prompts import Content, Quality, completion_prompt
from enhancement.result import Enhancement
from worker.model_files import model_revision

log = logging.getLogger(__name__)


class Enhancer:
    """Rewrites prompts with one Qwen model directory (or says why it could not)."""

    def __init__(
        self,
        model: QwenModel | None,
        *,
        cache: EnhancementCache,
        sampling: Sampling,
        deadline_s: float,
    ) -> None:
        self.model = model
        self.cache = cache
        self.sampling = sampling
        self.deadline_s = deadline_s
        self._revision: str | None = None

    @property
    def model_name(self) -> str | None:
        return None if self.model is None else self.model.path.name

    def enhance(self, prompt: str, *, content: Content, quality: Quality) -> Enhancement:
        if self.model is None:
            return Enhancement.fallback(prompt, "no_model", "QWEN_MODEL_PATH is not set")
        if not self.model.path.is_dir():
            return Enhancement.fallback(
                prompt, "no_model", f"QWEN_MODEL_PATH={self.model.path} is not a directory"
            )
        key = self.cache.key(
            prompt, content=content, quality=quality, revision=self.revision(self.model.path),
            sampling=self.sampling,
        )  # fmt: skip
        if (entry := self.cache.get(key)) is not None:
            return Enhancement(
                original_prompt=prompt, prompt=entry["prompt"], model=entry["model"],
                seconds=entry["seconds"], cached=True,
            )  # fmt: skip
        completion = self.model.complete(
            completion_prompt(prompt, content=content, quality=quality),
            sampling=self.sampling,
            deadline_s=self.deadline_s,
        )
        log.info(
            "Qwen generated %d tokens in %.2f s (deadline %.1f s%s)",
            completion.tokens,
            completion.seconds,
            self.deadline_s,
            ", reached" if completion.timed_out else "",
        )
        if completion.timed_out:
            return Enhancement.fallback(
                prompt, "timeout",
                f"no complete prompt within ENHANCE_TIMEOUT_S={self.deadline_s:g} s",
            )  # fmt: skip
        try:
            enhanced = clean_continuation(completion.text, original=prompt)
        except RejectedOutput as e:
            return Enhancement.fallback(prompt, "rejected_output", str(e))
        result = Enhancement(
            original_prompt=prompt, prompt=enhanced, model=self.model_name,
            seconds=completion.seconds,
        )  # fmt: skip
        self.cache.put(
            key, {"prompt": enhanced, "model": self.model_name, "seconds": result.seconds}
        )
        return result

    def revision(self, path: Path) -> str:
        """Computed once per process: the model directory does not change under a worker."""
        if self._revision is None:
            self._revision = model_revision(path)
        return self._revision
