"""One clock for every stamp that another host reads: Redis's own `TIME`.

Hosts' clocks drift, and a container's may be minutes off: a duration, an age or a deadline
made of stamps from two hosts is right only when both came from one clock. Times that never
leave a host (a spool directory's age, a process's own intervals) keep that host's clock.
"""

from __future__ import annotations

import redis


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, seconds since the epoch: the same for every host that reads it."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def redis_stamp(client: redis.Redis) -> str:
    """`redis_now` as a record field, in the format the Lua scripts write (`%.6f`)."""
    return f"{redis_now(client):.6f}"
