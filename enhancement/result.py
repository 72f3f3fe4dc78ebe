"""What one enhancement gives back: the prompt WAN receives, and why Qwen did not rewrite it.

Apart from the enhancer, so what only reads results (the metrics' known fallback reasons, a
job's callback metadata) imports neither the model loader nor, through it, torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FallbackReason = Literal["timeout", "no_model", "rejected_output", "error"]


@dataclass(frozen=True)
class Enhancement:
    """The prompt WAN receives, and what the callback metadata says about how it came about."""

    original_prompt: str
    prompt: str
    model: str | None = None
    seconds: float = 0.0
    cached: bool = False
    fallback_reason: FallbackReason | None = None
    detail: str | None = None

    @property
    def applied(self) -> bool:
        return self.fallback_reason is None

    @classmethod
    def fallback(cls, prompt: str, reason: FallbackReason, detail: str) -> Enhancement:
        return cls(original_prompt=prompt, prompt=prompt, fallback_reason=reason, detail=detail)

    def metadata(self) -> dict[str, Any]:
        """The callback's job metadata fields (CONTRACT.md section 4 and issue 5)."""
        if not self.applied:
            return {
                "enhancement_applied": False,
                "enhancement_fallback_reason": self.fallback_reason,
                "enhancement_fallback_detail": self.detail,
                "original_prompt": self.original_prompt,
            }
        return {
            "enhancement_applied": True,
            "enhanced_prompt": self.prompt,
            "original_prompt": self.original_prompt,
            "enhancement_model": self.model,
            "enhancement_seconds": round(self.seconds, 3),
            "enhancement_cached": self.cached,
        }
