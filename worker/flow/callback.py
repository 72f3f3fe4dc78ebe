"""The signed callback to the platform (CONTRACT.md section 4): bodies, signature, delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker import faults
from worker.errors import DeliveryFailed, JobError, TransientError, error_for_status
from worker.jobs.model import WAN_TASK
from worker.jobs.records import FINAL_STATUSES, JobRecord, JobRecords, get_records
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
                for name in ("stage", "step", "total_steps", "window", "windows", "percent")
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
    settings: Settings,
    job_id: str,
    progress: dict[str, Any] | None = None,
    *,
    run: int | None = None,
) -> None:
    """Best effort: a lost `processing` callback must not stop the generation. Nothing is
    sent once the job is cancelled or its final callback is on its way (`CallbackGate`);
    `run`: the run of the chain that sends it (None: the record's current one)."""
    gate = CallbackGate(get_records(), settings)
    with gate.processing(job_id, run=run) as allowed:
        if not allowed:
            log.info("job=%s processing callback not sent: the job is ending", job_id)
            return
        if progress is not None:
            faults.hit("progress_callback", job_id)
        try:
            post_callback(settings, processing_body(job_id, progress))
        except JobError as e:
            log.warning("job=%s processing callback not delivered: %s", job_id, e)
        else:
            gate.records.callback_sent(job_id, "processing")


#: Atomically: may a `processing` callback of this run go out now? Not after a cancel, a
#: final status, the close of the gate for this run (its final callback is on its way) or a
#: newer run. If it may, it holds a field of the gate, its token, valued with the Redis time
#: its lease ends. KEYS: the gate, the record; ARGV: run ('' for the record's), token,
#: lease seconds, TTL, then the final statuses. 1 if it may go.
_OPEN_SCRIPT = """
local fields = redis.call('HMGET', KEYS[2], 'status', 'retries', 'cancel_requested_at')
local current = tonumber(fields[2] or '0')
local run = current
if ARGV[1] ~= '' then run = tonumber(ARGV[1]) end
if fields[3] or run < current then return 0 end
for i = 5, #ARGV do if fields[1] == ARGV[i] then return 0 end end
local closed = redis.call('HGET', KEYS[1], 'closed')
if closed and tonumber(closed) >= run then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[2],
           string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3])))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

#: Atomically: close the gate for the record's run, drop tokens whose lease ended, and
#: count those still in flight. KEYS: the gate, the record; ARGV: TTL.
_CLOSE_SCRIPT = """
local run = tonumber(redis.call('HGET', KEYS[2], 'retries') or '0')
if tonumber(redis.call('HGET', KEYS[1], 'closed') or '-1') < run then
  redis.call('HSET', KEYS[1], 'closed', run)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local fields = redis.call('HGETALL', KEYS[1])
local live = 0
for i = 1, #fields, 2 do
  if fields[i] ~= 'closed' then
    if tonumber(fields[i + 1]) > now then live = live + 1
    else redis.call('HDEL', KEYS[1], fields[i]) end
  end
end
return live
"""


class CallbackGate:
    """Keeps one job's callbacks in order: none reaches the platform after its final one.

    `processing` callbacks (the one at the start of generation, the progress callbacks
    from their own threads) go out only through `processing`, which refuses them once the
    job is cancelled or ending, and marks each one in flight until its POST has ended. The
    final callback `close`s the gate first: no new one starts, and it waits for those in
    flight. A worker killed mid-POST leaves its mark: it lapses after its lease, two
    callback timeouts (connect, then read). A new run of the job (a retry, a resend) opens
    the gate again. Kept in `wan:callbacks:{job_id}`, beside the record.
    """

    PREFIX = "wan:callbacks:"
    #: How often `close` looks again while callbacks are in flight, seconds.
    POLL_S = 0.05

    def __init__(self, records: JobRecords, settings: Settings) -> None:
        self.records = records
        self.lease_s = 2 * settings.callback_timeout_s
        self._open = records.redis.register_script(_OPEN_SCRIPT)
        self._close = records.redis.register_script(_CLOSE_SCRIPT)

    def key(self, job_id: str) -> str:
        return f"{self.PREFIX}{job_id}"

    @contextmanager
    def processing(self, job_id: str, *, run: int | None = None) -> Iterator[bool]:
        """Whether a `processing` callback may go out; if so it is in flight until the block
        ends."""
        token = uuid.uuid4().hex
        allowed = self._open(
            keys=[self.key(job_id), self.records.key(job_id)],
            args=["" if run is None else run, token, self.lease_s, self.records.ttl_s,
                  *FINAL_STATUSES, "delivery_failed"],
        )  # fmt: skip
        try:
            yield bool(allowed)
        finally:
            if allowed:
                self.records.redis.hdel(self.key(job_id), token)

    def close(self, job_id: str) -> None:
        """Before the final callback: start no more `processing` callbacks, and wait for
        those in flight (each at most its lease)."""
        keys = [self.key(job_id), self.records.key(job_id)]
        in_flight = self._close(keys=keys, args=[self.records.ttl_s])
        if in_flight:
            log.info("job=%s final callback waits for %d processing callback(s) in flight",
                     job_id, in_flight)  # fmt: skip
        while in_flight:
            time.sleep(self.POLL_S)
            in_flight = self._close(keys=keys, args=[self.records.ttl_s])
