"""The signed callback to the platform (CONTRACT.md section 4): bodies, signature, delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker.errors import DeliveryFailed, JobError, TransientError, error_for_status
from worker.jobs import WAN_TASK
from worker.records import JobRecord, get_records
from worker.settings import Settings

log = logging.getLogger(__name__)

#: The port a URL without one means.
DEFAULT_PORTS = {"http": 80, "https": 443}


def completed_body(record: JobRecord) -> dict[str, Any]:
    """The success body: one asset with its real size, seed and shape, and the job's metadata."""
    job = record.job
    generation = record.value("generation")
    output = record.value("output")
    enhancement = record.value("enhancement") or {}
    timings = record.stage_seconds()
    asset_metadata = {
        "file_size_bytes": output["file_size_bytes"],
        "format": job.extension,
        "seed": generation["seed"],
        "asset_index": 0,
        "width": generation["width"],
        "height": generation["height"],
        "frame_num": generation["frame_num"],
    }
    if job.type.is_video:
        asset_metadata |= {"duration_seconds": output["duration_seconds"], "fps": output["fps"]}
    # the quality preset that produced it: quality_used, and degraded_from after running out
    # of GPU memory at the job's own
    asset_metadata |= generation.get("asset_metadata", {})
    metadata = {
        "generation_time": timings.get("generate"),
        "job_type": job.type.value,
        "content_type": job.content_type,
        "frame_num": generation["frame_num"],
        "frames_requested": job.frames_requested,
        "wan_task": WAN_TASK,
        "reference_mode": job.reference_mode,
        "stage_seconds": timings,
        **enhancement,
        # what ran (wan_task, reference_mode), references used or why not, i2i strength
        **generation.get("metadata", {}),
        # what reproduces the result: model and revision, pipeline, scheduler, values used
        "provenance": generation.get("provenance"),
    }
    return {
        "job_id": job.id,
        "status": "completed",
        "error_message": None,
        "assets": [
            {
                "type": job.content_type,
                "url": job.asset_key,
                "thumbnail_url": job.thumbnail_key,
                "metadata": asset_metadata,
            }
        ],
        "metadata": metadata,
    }


def failed_body(record: JobRecord) -> dict[str, Any]:
    """The failure body: the human error text, the exception class and where it happened."""
    fields = record.fields
    return {
        "job_id": record.job_id,
        "status": "failed",
        "error_message": fields.get("error", "unknown error"),
        "assets": [],
        "metadata": {
            "error_type": fields.get("error_type", "Exception"),
            "error_stage": fields.get("error_stage"),
            "job_type": fields.get("job_type"),
            "wan_task": WAN_TASK,
            "timestamp": datetime.now(UTC).isoformat(),
        },
    }


def cancelled_body(record: JobRecord) -> dict[str, Any]:
    """A cancelled job: no assets, and where it stopped (`queued` when it never started;
    `progress` says how far it got, e.g. the denoising step)."""
    fields = record.fields
    progress = record.value("cancelled_progress") or {}
    return {
        "job_id": record.job_id,
        "status": "cancelled",
        "error_message": None,
        "assets": [],
        "metadata": {
            "cancelled_stage": fields.get("cancelled_stage"),
            "progress": {
                name: progress[name]
                for name in ("stage", "step", "total_steps", "percent")
                if name in progress
            },
            "job_type": fields.get("job_type"),
            "wan_task": WAN_TASK,
            "timestamp": datetime.now(UTC).isoformat(),
        },
    }


#: The body of each final status.
FINAL_BODIES = {"completed": completed_body, "failed": failed_body, "cancelled": cancelled_body}


def processing_body(job_id: str, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"job_id": job_id, "status": "processing", "error_message": None, "assets": []}
    if progress is not None:
        body["metadata"] = {"progress": progress}
    return body


def sign(secret: str, body: bytes) -> str:
    """The `X-Callback-Signature` value: HMAC-SHA256 over exactly the bytes sent."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def origin(url: str) -> str:
    """`scheme://host:port` of a URL, the default port written out: what a browser calls
    one origin (the path, user and password aside)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return f"{scheme}://{parts.hostname or ''}:{parts.port or DEFAULT_PORTS.get(scheme, '')}"


def sends_service_key(settings: Settings) -> bool:
    """Whether callbacks go to the Supabase project's own origin, the only place the
    service-role key may go: a CALLBACK_URL elsewhere (a relay, another service) must not
    be able to read a key that opens the whole project."""
    return bool(
        settings.callback_url
        and settings.supabase_url
        and origin(settings.callback_url) == origin(settings.supabase_url)
    )


def bearer_token(settings: Settings) -> str | None:
    """The callbacks' Bearer token: the service-role key to SUPABASE_URL's origin,
    CALLBACK_BEARER anywhere else; None sends no Authorization header (the signature alone)."""
    secret = (
        settings.supabase_service_key if sends_service_key(settings) else settings.callback_bearer
    )
    return secret.get_secret_value() if secret else None


def callback_auth_line(settings: Settings) -> str:
    """What a worker says at start about where callbacks go and what they carry (no secret)."""
    target = origin(settings.callback_url or "")
    if sends_service_key(settings):
        return f"callbacks go to SUPABASE_URL's origin {target} with the service-role key"
    carries = (
        "CALLBACK_BEARER as Bearer"
        if settings.callback_bearer
        else "the HMAC signature alone, no Authorization header (CALLBACK_BEARER is unset)"
    )
    return (
        f"callbacks go to {target}, not SUPABASE_URL's origin: they carry {carries}, "
        "never the service-role key"
    )


@cache
def _tls_context() -> ssl.SSLContext:
    """Built once per process: left to itself, httpx loads the CA bundle again for every
    request, about 25 ms of CPU per callback, paid on the GPU worker before each generation."""
    return httpx.create_ssl_context()


def post_callback(settings: Settings, body: dict[str, Any]) -> None:
    """POST one signed callback; return only once the platform answered 2xx.

    TransientError on what is worth retrying (timeouts, connection errors, 429, 5xx);
    DeliveryRejected on any other answer. A 3xx is not delivery: redirects are not
    followed (the signed body goes to the configured URL only), so it is final like a 4xx.
    DeliveryFailed when no callback URL is configured: nothing was sent.
    """
    if not settings.callback_url:
        raise DeliveryFailed(
            f"callback {body['status']} for job {body['job_id']} not sent: "
            "neither CALLBACK_URL nor SUPABASE_URL is set"
        )
    content = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if token := bearer_token(settings):
        headers["Authorization"] = f"Bearer {token}"
    if settings.job_callback_secret:
        headers["X-Callback-Signature"] = sign(
            settings.job_callback_secret.get_secret_value(), content
        )
    what = f"callback {body['status']} for job {body['job_id']}"
    try:
        response = httpx.post(
            settings.callback_url,
            content=content,
            headers=headers,
            timeout=settings.callback_timeout_s,
            verify=_tls_context(),
        )
    except httpx.TransportError as e:  # timeouts and connection errors
        raise TransientError(f"{what}: {type(e).__name__}: {e}") from e
    if not response.is_success:
        raise error_for_status(response.status_code, what)
    log.info(
        "job=%s callback %s delivered (HTTP %s)",
        body["job_id"],
        body["status"],
        response.status_code,
    )


def notify_processing(
    settings: Settings, job_id: str, progress: dict[str, Any] | None = None
) -> None:
    """Best effort: a lost `processing` callback must not stop the generation."""
    try:
        post_callback(settings, processing_body(job_id, progress))
    except JobError as e:
        log.warning("job=%s processing callback not delivered: %s", job_id, e)
    else:
        get_records().callback_sent(job_id, "processing")
