"""A worker outlives a Redis outage that finds it holding an unacknowledged message.

kombu's Redis `Channel.close` first reads the reply of the BRPOP the channel has pending.
When Redis has gone that read raises a connection error, and close stops there, half done:
the channel stays open with its unacknowledged message noted. Celery's consumer, on the
connection error, closes the broker connection twice (`collect`, then `close`); between the
two kombu detaches the transport from its connection (`transport.client = None`), so the
second close restores the message through a pool built from no connection parameters and
raises `AttributeError: 'NoneType' object has no attribute 'hostname'` in
`Channel._connparams`. Celery takes that for an unrecoverable error and the worker exits.
It happens to a worker with a free pool slot (a BRPOP pending) and a task running: a media
worker uploading, say, not the generation worker with one pool child and one job.

The fix: a connection error from that read counts as the empty reply kombu already allows
for (`Empty`), so the first close goes on while the connection parameters are still known.
Its restore of the message fails (Redis is away) and the message stays in Redis's unacked
set; the channel keeps the pool that restore opened, so the running task's acknowledgement
goes through once Redis is back, as it does for a worker with no BRPOP pending. If the
worker dies before that, Redis's visibility timeout (or the lost-job sweep) brings the job
back; a stage run twice is kept apart by its lease in the job record.

Upstream: the read came with celery/kombu#1733 in kombu 5.4.0 (it keeps a message popped
by a BRPOP whose reply was never read from being lost, so an older kombu is no way out, and
celery 5.7 needs kombu 5.7); celery/kombu#2154, a revert proposed for the trouble it caused
(celery/kombu#1785), was closed unmerged. The same AttributeError from a channel closed
after its connection let go of the transport is celery/kombu#582. kombu 5.7.0, the latest
release (celery 5.7.0 likewise), and kombu's main branch still stop at the read: no upgrade
fixes it. Applied when a worker starts (Celery's `worker_init`); the bridge and API only
publish and never hold a BRPOP.
"""

from __future__ import annotations

import functools
from queue import Empty
from typing import Any

from celery.signals import worker_init
from kombu.transport import redis as kombu_redis

#: Marks kombu's close once wrapped, so applying the fix twice wraps it once.
_FIXED = "_wan_finishes_past_a_lost_brpop"


def close_channels_past_a_lost_brpop() -> None:
    """Wrap kombu's Redis `Channel.close`: a pending BRPOP whose connection is gone no
    longer stops the close half way (module docstring). Idempotent."""
    close = kombu_redis.Channel.close
    if getattr(close, _FIXED, False):
        return

    @functools.wraps(close)
    def close_past_a_lost_brpop(channel: kombu_redis.Channel) -> None:
        if channel._in_poll and not channel.closed:
            channel._closing = True  # what kombu's close sets before the same read
            try:
                channel._brpop_read()  # delivers a reply that came in, as kombu's close does
            except (Empty, *channel.connection_errors):
                pass  # `_in_poll` is cleared either way: kombu's close reads nothing more
        close(channel)

    setattr(close_past_a_lost_brpop, _FIXED, True)
    kombu_redis.Channel.close = close_past_a_lost_brpop


@worker_init.connect
def fix_kombu_at_worker_start(**_: Any) -> None:
    close_channels_past_a_lost_brpop()
