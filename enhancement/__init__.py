"""Prompt enhancement for the `*_enhanced` job types.

Qwen 2.5-7B Base rewriting comes in its own issue; until then the stage passes the
user's prompt through and says so in the callback metadata.
"""

from __future__ import annotations

from typing import Any

from worker.jobs import Job


def passthrough(job: Job) -> dict[str, Any]:
    """Callback metadata for a job whose prompt is used as given."""
    if not job.enhance:
        return {}
    return {
        "enhancement_applied": False,
        "enhancement_note": "prompt enhancement is not built yet: prompt used as given",
    }
