"""Per-host media routing: a job's spool stages go to the host whose spool holds its frames.

Frames never pass through Redis: they sit in the spool of the host that generated them.
Every media worker consumes the shared `cpu` queue and its own host's `cpu.<WORKER_HOST>`
(added at start by `consume_own_host_queue`, so the process table keeps `-Q cpu`), and
`route_to_frames_host`, a Celery router (`task_routes` in celeryconfig), sends encode,
thumbnail and upload to the queue of the host named in the job record's `generation.host`.

Why a router reading the record rather than the generation task sending its tail: routes are
decided whenever a stage is sent, by whichever process sends it, so the same rule holds for
the chain's next stage, for an operator's retry from any machine, and for a generation
redelivered to another host (its new frames name the new host; a delivery that finds the
generation finished elsewhere sends the media stages to the host that holds the frames).
The final callback needs no files and stays on the shared `cpu` queue, as does any media
stage of a job with no frames recorded.
"""

from __future__ import annotations

import json
from typing import Any

from kombu import Exchange, Queue

from worker.jobs.records import get_records

#: The tasks that read the spool of the host that generated the job.
SPOOL_TASKS = frozenset({"wan.encode", "wan.thumbnail", "wan.upload"})


def host_queue(host: str) -> Queue:
    """`cpu.<host>`, with an exchange and routing key of its own like every other queue."""
    name = f"cpu.{host}"
    return Queue(name, Exchange(name), routing_key=name)


def frames_host(job_id: str) -> str | None:
    """The WORKER_HOST whose spool holds the job's frames, from its record; None if none."""
    records = get_records()
    generation = records.redis.hget(records.key(job_id), "generation")
    return None if generation is None else json.loads(generation).get("host")


def route_to_frames_host(
    name: str, args: tuple, kwargs: dict, options: dict, task: Any = None, **_: Any
) -> dict[str, Queue] | None:
    """Celery router: a spool stage goes to `cpu.<host of its frames>`; None lets the next
    router (celeryconfig's table) decide. A Celery retry keeps the queue it came from."""
    if name not in SPOOL_TASKS or not args:
        return None
    host = frames_host(str(args[0]))
    return None if host is None else {"queue": host_queue(host)}
