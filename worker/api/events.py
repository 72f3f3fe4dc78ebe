"""GET /jobs/{id}/events: a job's progress as Server-Sent Events, for the frontend's bar.

The stream subscribes first, then sends the job's current state (`snapshot`), so a late
subscriber misses nothing that matters (a job not seen yet, still on the platform's list,
has status null and its events follow as it starts); then every `stage_started`, `step`
(with `percent` and `eta_seconds`), `preview` and `stage_finished` event, and ends with
`final` (the job's status). It takes the API key or the job's watch token (`?token=`).
Comment pings every HEARTBEAT_S keep proxies from closing an idle stream.

Every stream ends: with the published `final` event, with a final status found in the
record (`delivery_failed` publishes no event; a record may be final before the stream
opens), when the record is gone (expired), or after EVENT_STREAM_MAX_S (a client's
EventSource then reconnects and starts from a fresh snapshot). An id that is neither
recorded nor waiting on the platform's list answers 404 before any stream starts.
All streams of one API process share one Redis subscription connection (`EventHub`)
and one pool for their reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, HTTPException, Request, status
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from worker import connections
from worker.api.paths import JobId
from worker.api.watch import REFUSED, Watching
from worker.errors import InvalidJob
from worker.jobs.model import decode_body, job_id_of
from worker.jobs.records import FINAL_STATUSES, KEY_PREFIX
from worker.observe.progress import channel
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

#: Seconds between keep-alive comments on an idle stream.
HEARTBEAT_S = 15
#: How often a stream reads its job's status from the record, seconds: a final status that
#: publishes no event, or a record that expired, ends the stream within this.
RECHECK_S = 2.0
#: Statuses that end a stream: the platform's final ones, and a final callback that was
#: never delivered (the job is over; only `retry` sends that callback again).
ENDING_STATUSES = FINAL_STATUSES | {"delivery_failed"}
#: How long a new stream waits for Redis to confirm its subscription, seconds.
SUBSCRIBE_TIMEOUT_S = 5.0
#: Events buffered for one slow client; past it progress events are dropped (the final
#: status is read from the record anyway).
STREAM_BUFFER = 1_000
#: Platform list items read per round trip while looking for a waiting job.
LIST_PAGE = 500


class EventHub:
    """One Redis subscription connection for every event stream of this process: a stream
    registers its job's channel, a reader task hands each message to the streams of that
    job. redis-py subscribes again by itself after a reconnect."""

    def __init__(self, client: aioredis.Redis, platform: aioredis.Redis) -> None:
        #: The job records' Redis (one pool for every stream's reads) and the platform list's.
        self.client = client
        self.platform = platform
        self._pubsub = client.pubsub()
        self._lock = asyncio.Lock()  # one subscribe or unsubscribe at a time
        self._streams: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}  # subscribed channels
        self._reader: asyncio.Task[None] | None = None
        self._unsubscribing: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def listen(self, job_id: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """The job's published events (raw JSON), once Redis has confirmed the subscription:
        what is published after this point reaches the queue."""
        name = channel(job_id)
        events: asyncio.Queue[bytes] = asyncio.Queue(STREAM_BUFFER)
        self._streams.setdefault(name, set()).add(events)
        try:
            async with self._lock:
                if name not in self._confirmed:
                    self._confirmed[name] = asyncio.Event()  # before: the reader may confirm
                    try:
                        await self._pubsub.subscribe(name)
                    except BaseException:
                        del self._confirmed[name]  # the next stream of this job tries again
                        raise
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read())
            await asyncio.wait_for(self._confirmed[name].wait(), SUBSCRIBE_TIMEOUT_S)
            yield events
        finally:
            self._streams[name].discard(events)
            if not self._streams[name]:
                # In a task: a cancelled stream (the client left) cannot await here.
                task = asyncio.create_task(self._unsubscribe(name))
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, name: str) -> None:
        async with self._lock:
            if self._streams.get(name):
                return  # a new stream of the same job came meanwhile
            self._streams.pop(name, None)
            if self._confirmed.pop(name, None) is None:
                return  # its subscription failed
            try:
                await self._pubsub.unsubscribe(name)
            except RedisError as e:  # gone with the connection; a resubscription is harmless
                log.warning("unsubscribing %s failed: %s", name, e)

    async def _read(self) -> None:
        """Hand every message to its job's streams; confirm subscriptions as Redis does."""
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as e:  # Redis away: pings go on, rechecks end streams
                log.warning("event subscription lost (%s); reconnecting", e)
                await asyncio.sleep(1.0)
                continue
            if message is None:
                continue
            name = message["channel"].decode()
            if message["type"] == "subscribe" and name in self._confirmed:
                self._confirmed[name].set()
            elif message["type"] == "message":
                for events in self._streams.get(name, ()):
                    if events.full():
                        continue  # a stalled client loses progress, never the final status
                    events.put_nowait(message["data"])

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._pubsub.aclose()
        await self.client.aclose()
        if self.platform is not self.client:
            await self.platform.aclose()


def make_hub(settings: Settings) -> EventHub:
    """The hub of this process's event streams, on the job records' Redis."""
    records, waiting = connections.records_target(settings), connections.platform_target(settings)
    client = connections.async_client(records)
    platform = client if waiting == records else connections.async_client(waiting)
    return EventHub(client, platform)


def _hub(request: Request) -> EventHub:
    return request.app.state.event_hub


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    dependencies=[Watching],  # the key, or this job's watch token: the job page's stream
    responses={
        200: {"content": {"text/event-stream": {}}},
        404: {"description": "no such job, recorded or waiting on the platform list"},
        503: {"description": "Redis unreachable"},
        **REFUSED,
    },
)
async def job_events(
    job_id: JobId,
    settings: Annotated[Settings, Depends(get_settings)],
    hub: Annotated[EventHub, Depends(_hub)],
) -> EventSourceResponse:
    try:
        known = await _known(hub, settings.platform_queue, job_id)
    except RedisError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Redis unreachable: {e}") from e
    if not known:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    stream = _stream(hub, job_id, max_s=settings.event_stream_max_s)
    return EventSourceResponse(stream, ping=HEARTBEAT_S)


async def _known(hub: EventHub, queue: str, job_id: str) -> bool:
    """Whether the job has a record, or waits on the platform list or a bridge's processing
    list. After the record, read in the order an item moves (list, processing list, record
    again): an item on its way is seen in one place or the next."""
    if await hub.client.exists(KEY_PREFIX + job_id):
        return True
    lists = [queue]
    processing = hub.platform.scan_iter(match=f"{queue}:processing:*", count=1000, _type="list")
    lists += [name.decode() async for name in processing]
    for name in lists:
        if await _waits_on(hub.platform, name, job_id):
            return True
    return bool(await hub.client.exists(KEY_PREFIX + job_id))


async def _waits_on(platform: aioredis.Redis, name: str, job_id: str) -> bool:
    """Whether an item of the list `name` is this job (read a page at a time)."""
    needle = job_id.encode()
    start = 0
    while page := await platform.lrange(name, start, start + LIST_PAGE - 1):
        for raw in page:
            if needle in raw and _id_of(raw) == job_id:
                return True
        start += LIST_PAGE
    return False


def _id_of(raw: bytes) -> str | None:
    try:
        return job_id_of(decode_body(raw))
    except (InvalidJob, AttributeError):  # not a job object at all
        return None


async def _stream(hub: EventHub, job_id: str, *, max_s: float) -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + max_s
    async with hub.listen(job_id) as published:
        fields = {
            k.decode(): v.decode()
            for k, v in (await hub.client.hgetall(KEY_PREFIX + job_id)).items()
        }
        snapshot = {
            "event": "snapshot",
            "job_id": job_id,
            "status": fields.get("status"),
            "stage": fields.get("stage") or None,
            "progress": json.loads(fields["progress"]) if "progress" in fields else None,
        }
        yield {"event": "snapshot", "data": json.dumps(snapshot)}
        recorded, job_status = bool(fields), fields.get("status")
        checked_at = loop.time()
        while job_status not in ENDING_STATUSES:
            left = ends_at - loop.time()
            if left <= 0:
                return  # the lifetime is over: the client reconnects for a fresh snapshot
            try:
                raw = await asyncio.wait_for(published.get(), min(RECHECK_S, left))
            except TimeoutError:
                raw = None
            if raw is not None:
                event = json.loads(raw)
                yield {"event": event["event"], "data": json.dumps(event)}
                if event["event"] == "final":
                    return
            if loop.time() - checked_at >= RECHECK_S:
                checked_at = loop.time()
                try:
                    exists, job_status = await _status(hub.client, job_id)
                except RedisError:  # Redis away: keep pinging, read again at the next check
                    continue
                if recorded and not exists:
                    return  # the record expired
                recorded = recorded or exists
        final = {"event": "final", "job_id": job_id, "status": job_status}
        yield {"event": "final", "data": json.dumps(final)}


async def _status(client: aioredis.Redis, job_id: str) -> tuple[bool, str | None]:
    """Whether the job's record exists, and its status."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.exists(KEY_PREFIX + job_id)
        pipe.hget(KEY_PREFIX + job_id, "status")
        exists, raw = await pipe.execute()
    return bool(exists), raw.decode() if raw is not None else None
