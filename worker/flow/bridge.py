"""The bridge: the platform's Redis list in, one Celery chain per job out.

Reliable and FIFO: the oldest item is moved (BLMOVE LEFT) into this host's processing
list and removed from there only once it is dealt with; at start-up whatever a crash left
in the processing list goes back to the head of the platform list. A job id seen before
starts nothing new.

An item costs only itself: whatever goes wrong with one item (it is not JSON, not a job,
its record cannot be written, ...) is answered with a `failed` callback when the item has
a usable id, and otherwise parked with the reason in `{queue}:rejected`; then the bridge
takes the next one. Only a Redis or broker outage keeps the item, to try again.

A job whose id another dispatcher has claimed (another host's bridge, the API) is not
dropped either: that dispatcher may have died between its claim and its send. The item stays
in the processing list, and the bridge asks again every HELD_RECHECK_S while it goes on
with the next items: once the holder has marked the job dispatched the item goes, and once
the holder's claim has run out (CLAIM_LEASE_S) this bridge takes it over and sends it.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from kombu.exceptions import OperationalError

from worker import connections, faults
from worker.errors import InvalidJob
from worker.flow.dispatch import claim, mark_dispatched, reject, send
from worker.flow.sender import Sender
from worker.jobs.model import Job, decode_body, job_id_of, job_type_of, parse_job
from worker.jobs.records import JobRecords, get_records
from worker.observe.logs import job_scope
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: How long one BLMOVE waits for an item before checking for a stop request, seconds.
POLL_S = 1.0
#: Pause before trying again when Redis does not answer, seconds.
RECONNECT_S = 2.0
#: How often the bridge asks again about a job another dispatcher holds the claim of, seconds.
HELD_RECHECK_S = 1.0
#: Entries kept in `{queue}:rejected`, newest first; older ones are trimmed away (and the
#: whole list expires JOB_RECORD_TTL_S after the last one).
REJECTED_MAX = 1_000
#: Errors that are an outage of Redis or the broker, not a fault of the item in hand: out
#: of memory and a read-only or cut-off replica (failover) pass like a lost connection.
OUTAGES = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    OperationalError,
)


def processing_list(queue: str) -> str:
    """One processing list per host (WORKER_HOST), so a restarting bridge recovers only its
    own items, and bridges on several hosts never take back each other's."""
    return f"{queue}:processing:{get_settings().worker_host}"


def rejected_list(queue: str) -> str:
    """Where items that cannot be answered (no usable id) are parked, with the reason."""
    return f"{queue}:rejected"


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace")


@dataclass(eq=False)
class _Held:
    """An item in the processing list whose job another dispatcher holds the claim of."""

    raw: bytes
    #: When to ask again, `time.monotonic()`.
    recheck_at: float


class Bridge:
    """Moves jobs from the platform list into Celery (through `sender`), one at a time,
    oldest first."""

    def __init__(
        self, platform: redis.Redis, records: JobRecords, *, queue: str, sender: Sender
    ) -> None:
        self.platform = platform
        self.records = records
        self.queue = queue
        self.sender = sender
        self.processing = processing_list(queue)
        self.rejected = rejected_list(queue)
        self.stopping = threading.Event()
        #: Items kept in the processing list while another dispatcher holds their claim.
        self.held: list[_Held] = []

    def recover(self) -> int:
        """Put back, in their order, the items a crashed bridge had taken but not finished."""
        moved = 0
        while self.platform.lmove(self.processing, self.queue, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.warning("put %d unfinished item(s) back on %s", moved, self.queue)
        return moved

    def run(self, *, drain: bool = False) -> int:
        """Serve until stopped (or, with drain, until the list is empty and no item is held);
        return items handled.

        Redis going away is waited out: the items in hand stay in the processing list and
        are put back on the platform list once Redis answers again.
        """
        handled = 0
        recovered = False
        log.info("bridge serving %s (processing list %s)", self.queue, self.processing)
        while not self.stopping.is_set():
            try:
                if not recovered:
                    self.held.clear()  # recover() puts their items back on the list
                    self.recover()
                    recovered = True
                handled += self.recheck_held()
                raw = self.platform.blmove(self.queue, self.processing, POLL_S, "LEFT", "RIGHT")
                if raw is None:
                    if drain and not self.held:
                        break
                    continue
                if self.handle(raw):
                    self.platform.lrem(self.processing, 1, raw)
                    handled += 1
                else:
                    self.held.append(_Held(raw, time.monotonic() + HELD_RECHECK_S))
            except OUTAGES as e:
                log.error("Redis unavailable (%s); retrying in %.0f s", e, RECONNECT_S)
                recovered = False
                self.stopping.wait(RECONNECT_S)
        return handled

    def recheck_held(self) -> int:
        """Ask again about the held items whose time has come; how many were dealt with
        (and left the processing list)."""
        now = time.monotonic()
        done = 0
        for item in [item for item in self.held if item.recheck_at <= now]:
            if self.handle(item.raw, again=True):
                self.platform.lrem(self.processing, 1, item.raw)
                self.held.remove(item)
                done += 1
            else:
                item.recheck_at = now + HELD_RECHECK_S
        return done

    def handle(self, raw: bytes, *, again: bool = False) -> bool:
        """Send one item's chain, or answer it: True once the item is dealt with, False
        while another dispatcher holds its job's claim (`again`: asked before). Raises
        nothing but an outage."""
        body: dict[str, Any] = {}
        job_id = None
        try:
            body = decode_body(raw)
            job_id = job_id_of(body)
            if job_id is None:
                raise InvalidJob("id", "missing, or not 1-128 letters, digits, '-' or '_'")
            with job_scope(job_id=job_id, stage="bridge"):
                outcome = claim(self.records, job_id, quiet=again)
                if outcome == "held":
                    return False
                if outcome == "claimed":
                    if again:
                        log.warning("job=%s taken over: its claim ran out undispatched", job_id)
                    self.dispatch(parse_job(body), payload=_text(raw))
        except OUTAGES:
            raise
        except Exception as e:  # the broad catch at the loop's edge: one item, never the list
            with job_scope(job_id=job_id, stage="bridge") if job_id else nullcontext():
                self.refuse(raw, job_id, body, e)
        return True

    def dispatch(self, job: Job, *, payload: str) -> None:
        """Send a claimed job's chain and mark it; the test faults strike on either side of
        the send, where a bridge that dies leaves a claim it cannot tell was sent or not."""
        faults.hit("bridge_taken", job.id)
        send(self.records, job, payload=payload, sender=self.sender)
        faults.hit("bridge_sent", job.id)
        mark_dispatched(self.records, job)

    def refuse(
        self, raw: bytes, job_id: str | None, body: dict[str, Any], error: Exception
    ) -> None:
        """A `failed` callback for an item with an id; parked when that is impossible too."""
        log.error(
            "job=%s refused: %s: %s; item %.200r",
            job_id or "-", type(error).__name__, error, raw,
            exc_info=not isinstance(error, InvalidJob),
        )  # fmt: skip
        if job_id is not None:
            try:
                reject(
                    self.records,
                    job_id,
                    job_type=job_type_of(body),
                    payload=_text(raw),
                    error=error,
                    sender=self.sender,
                )
                return
            except OUTAGES:
                raise
            except Exception as e:
                log.error("job=%s cannot be answered: %s", job_id, e, exc_info=True)
                error = e
        try:
            self.park(raw, f"{type(error).__name__}: {error}")
        except OUTAGES:
            raise
        except redis.RedisError:  # e.g. the rejected list's key holds another type
            log.critical("item dropped, it could not be parked: %r", raw, exc_info=True)

    def park(self, raw: bytes, reason: str) -> None:
        """Keep the raw item and why in `{queue}:rejected` for an operator; bounded length."""
        entry: dict[str, str] = {"reason": reason, "at": datetime.now(UTC).isoformat()}
        try:
            entry["item"] = raw.decode()
        except UnicodeDecodeError:
            entry["item_base64"] = base64.b64encode(raw).decode()
        with self.platform.pipeline() as pipe:
            pipe.lpush(self.rejected, json.dumps(entry))
            pipe.ltrim(self.rejected, 0, REJECTED_MAX - 1)
            pipe.expire(self.rejected, self.records.ttl_s)  # gone a record's life after the last
            pipe.execute()
        log.error("parked an item in %s: %s", self.rejected, reason)

    def stop(self) -> None:
        self.stopping.set()


def make_bridge(settings: Settings, sender: Sender) -> Bridge:
    """A bridge whose claims are its host's: restarted after a crash, it takes them back."""
    platform = connections.client(connections.platform_target(settings))
    queue = settings.platform_queue
    records = get_records().for_owner(f"bridge:{processing_list(queue)}")
    return Bridge(platform, records, queue=queue, sender=sender)


def main(sender: Sender) -> None:
    """`python -m worker bridge`: serve until SIGTERM or Ctrl-C, sending through `sender`."""
    import signal

    try:
        faults.rules()
    except ValueError as e:  # a typo must not pass for a fault that never fires
        sys.exit(f"bridge not started: {e}")
    bridge = make_bridge(get_settings(), sender)
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
    try:
        bridge.run()
    except KeyboardInterrupt:
        bridge.stop()
    log.info("bridge stopped")
