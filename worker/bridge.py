"""The bridge: the platform's Redis list in, one Celery chain per job out.

Reliable and FIFO: the oldest item is moved (BLMOVE LEFT) into this host's processing
list and removed from there only once its chain is sent; at start-up whatever a crash
left in the processing list goes back to the head of the platform list. A job id seen
before starts nothing new. A malformed item with an id gets a `failed` callback; one
without an id is logged and dropped.
"""

from __future__ import annotations

import logging
import socket
import threading

import redis
from kombu.exceptions import OperationalError

from worker.dispatch import reject, seen_before, submit
from worker.errors import InvalidJob
from worker.jobs import decode_body, job_id_of, parse_job
from worker.records import JobRecords, get_records
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: How long one BLMOVE waits for an item before checking for a stop request, seconds.
POLL_S = 1.0
#: Pause before trying again when Redis does not answer, seconds.
RECONNECT_S = 2.0


def processing_list(queue: str) -> str:
    """One processing list per host, so a restarting bridge recovers only its own items."""
    return f"{queue}:processing:{socket.gethostname()}"


class Bridge:
    """Moves jobs from the platform list into Celery, one at a time, oldest first."""

    def __init__(self, platform: redis.Redis, records: JobRecords, *, queue: str) -> None:
        self.platform = platform
        self.records = records
        self.queue = queue
        self.processing = processing_list(queue)
        self.stopping = threading.Event()

    def recover(self) -> int:
        """Put back, in their order, the items a crashed bridge had taken but not finished."""
        moved = 0
        while self.platform.lmove(self.processing, self.queue, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.warning("put %d unfinished item(s) back on %s", moved, self.queue)
        return moved

    def run(self, *, drain: bool = False) -> int:
        """Serve until stopped (or, with drain, until the list is empty); return items handled.

        Redis going away is waited out: the item in hand stays in the processing list and
        is put back on the platform list once Redis answers again.
        """
        handled = 0
        recovered = False
        log.info("bridge serving %s (processing list %s)", self.queue, self.processing)
        while not self.stopping.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                raw = self.platform.blmove(self.queue, self.processing, POLL_S, "LEFT", "RIGHT")
                if raw is None:
                    if drain:
                        break
                    continue
                self.handle(raw)
                self.platform.lrem(self.processing, 1, raw)
                handled += 1
            except (redis.ConnectionError, redis.TimeoutError, OperationalError) as e:
                log.error("Redis unavailable (%s); retrying in %.0f s", e, RECONNECT_S)
                recovered = False
                self.stopping.wait(RECONNECT_S)
        return handled

    def handle(self, raw: bytes) -> None:
        """Validate one item and send its chain, or answer it with a `failed` callback."""
        try:
            body = decode_body(raw)
        except InvalidJob as e:
            log.error("dropped an item that is not a job (%s): %.200r", e, raw)
            return
        job_id = job_id_of(body)
        if job_id is None:
            log.error("dropped a job without a usable id: %.200r", raw)
            return
        if seen_before(self.records, job_id):
            return
        try:
            job = parse_job(body)
        except Exception as e:  # a parser bug, too, must cost one job, never the whole list
            log.error("job=%s invalid: %s", job_id, e, exc_info=not isinstance(e, InvalidJob))
            job_type = str(body.get("type") or body.get("job_type") or "")
            reject(self.records, job_id, job_type=job_type, payload=raw.decode(errors="replace"),
                   error=e)  # fmt: skip
            return
        submit(self.records, job, payload=raw.decode())

    def stop(self) -> None:
        self.stopping.set()


def make_bridge(settings: Settings) -> Bridge:
    platform = redis.Redis.from_url(settings.platform_redis_url)
    return Bridge(platform, get_records(), queue=settings.platform_queue)


def main() -> None:
    """`python -m worker bridge`: serve until SIGTERM or Ctrl-C."""
    import signal

    bridge = make_bridge(get_settings())
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
    try:
        bridge.run()
    except KeyboardInterrupt:
        bridge.stop()
    log.info("bridge stopped")
