"""GET /jobs/{id}/events: a job's progress as Server-Sent Events, for the frontend's bar.

The stream subscribes first, then sends the job's current state (`snapshot`), so a late
subscriber misses nothing that matters (a job not seen yet, e.g. still on the platform's
list, has status null and its events follow as it starts); then every `stage_started`,
`step` (with `percent` and `eta_seconds`) and `stage_finished` event, and ends with
`final` (the job's status).
Comment pings every HEARTBEAT_S keep proxies from closing an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends
from sse_starlette import EventSourceResponse

from worker.api.auth import Authorized
from worker.api.jobs import JobId
from worker.observe.progress import channel
from worker.records import FINAL_STATUSES, KEY_PREFIX
from worker.settings import Settings, get_settings

router = APIRouter(dependencies=[Authorized], tags=["jobs"])

#: Seconds between keep-alive comments on an idle stream.
HEARTBEAT_S = 15


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: JobId, settings: Annotated[Settings, Depends(get_settings)]
) -> EventSourceResponse:
    client = aioredis.Redis.from_url(settings.redis_url)
    return EventSourceResponse(_stream(client, job_id), ping=HEARTBEAT_S)


async def _stream(client: aioredis.Redis, job_id: str) -> AsyncIterator[dict[str, Any]]:
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel(job_id))  # before the snapshot: nothing falls between
        fields = {
            k.decode(): v.decode() for k, v in (await client.hgetall(KEY_PREFIX + job_id)).items()
        }
        snapshot = {
            "event": "snapshot",
            "job_id": job_id,
            "status": fields.get("status"),
            "stage": fields.get("stage") or None,
            "progress": json.loads(fields["progress"]) if "progress" in fields else None,
        }
        yield {"event": "snapshot", "data": json.dumps(snapshot)}
        if fields.get("status") in FINAL_STATUSES and "final_callback" in fields:
            final = {"event": "final", "job_id": job_id, "status": fields["status"]}
            yield {"event": "final", "data": json.dumps(final)}
            return
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            event = json.loads(message["data"])
            yield {"event": event["event"], "data": json.dumps(event)}
            if event["event"] == "final":
                return
    finally:
        await pubsub.aclose()
        await client.aclose()
