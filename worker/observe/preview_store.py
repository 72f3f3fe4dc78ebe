"""A job's newest live preview in Redis, and the `preview` event that announces it.

The generation child makes the pictures (`worker.generation.previews`); this module is what
the API reads too, so it stays free of torch. Only the newest preview of a job is kept, for
PREVIEW_TTL_S after it was made: previews are for watching, never results, and never go to
the platform's storage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.observe.progress import channel

KEY_PREFIX = "wan:preview:"
#: How long a job's newest preview stays readable after it was made, seconds.
PREVIEW_TTL_S = 600


def key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}"


def preview_url(job_id: str, step: int, window: int | None) -> str:
    """The API path that answers the newest preview; the step and window make each event's
    URL new, so a browser's <img> fetches again instead of showing its cached picture."""
    where = f"step={step}" if window is None else f"window={window}&step={step}"
    return f"/jobs/{job_id}/preview?{where}"


@dataclass(frozen=True)
class Preview:
    webp: bytes
    step: int
    total_steps: int
    window: int | None


def store(
    client: redis.Redis,
    job_id: str,
    webp: bytes,
    *,
    step: int,
    total_steps: int,
    window: int | None = None,
) -> dict[str, Any]:
    """Keep `webp` as the job's newest preview, then publish its `preview` event on the job's
    event stream; returns the event. The write and its expiry are one transaction: no
    preview outlives PREVIEW_TTL_S."""
    fields = {"webp": webp, "step": step, "total_steps": total_steps}
    if window is not None:
        fields["window"] = window
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key(job_id))  # a window field of an earlier run must not linger
        pipe.hset(key(job_id), mapping=fields)
        pipe.expire(key(job_id), PREVIEW_TTL_S)
        pipe.execute()
    event = {
        "event": "preview",
        "job_id": job_id,
        "step": step,
        "total_steps": total_steps,
        "window": window,
        "url": preview_url(job_id, step, window),
        "at": time.time(),
    }
    client.publish(channel(job_id), json.dumps(event))
    return event


def latest(client: redis.Redis, job_id: str) -> Preview | None:
    """The job's newest preview, or None (none made, previews off, or expired)."""
    fields = client.hgetall(key(job_id))
    if b"webp" not in fields:
        return None
    window = fields.get(b"window")
    return Preview(
        webp=fields[b"webp"],
        step=int(fields[b"step"]),
        total_steps=int(fields[b"total_steps"]),
        window=None if window is None else int(window),
    )
