"""A Sentinel-managed Redis connection asks the sentinels where the master is each time it
connects again, not only when it leaves its pool.

redis-py's `SentinelManagedConnection` asks them in `connect()`: when a pool hands out a
connection, and when a single command reconnects. A pipeline (the job records' writes, and
kombu's and Celery's) that loses its connection reconnects through `send_packed_command`,
which calls `connect_check_health`: that retries the socket to the address the connection
had, the dead master after a failover. With the records' retry policy (REDIS_OUTAGE_RETRY)
that was about 35 s of refused connections to the old master, after which the write failed:
a generation running through the failover stopped there, and the lost-job sweep had to
send its job again (bench/failover.py saw it in one failover of five).

The fix: a reconnection that would retry the socket (the path above) goes through
`connect()`, whose every try asks the sentinels (a replica's connection rotates the
replicas as before). The same for redis-py's asyncio client (the API). Upstream:
redis/redis-py#3874 ("SentinelConnectionPool does not retrieve updated master address from
Sentinel on connection retries", open, PR #3875); #3560 was the same for `connect()` itself,
fixed in #3601. redis-py 8.1.0, the latest release, has it. Applied when worker/connections.py
is imported, so in every process that makes a Redis client, kombu's and Celery's included.
"""

from __future__ import annotations

import functools
from typing import Any

from redis import sentinel
from redis.asyncio import sentinel as async_sentinel

#: Marks a method once wrapped, so applying the fix twice wraps it once.
_FIXED = "_wan_asks_the_sentinels"


def reconnect_through_the_sentinels() -> None:
    """Wrap `connect_check_health` of redis-py's sync and asyncio Sentinel-managed
    connections (module docstring). Idempotent."""
    sync_connection = sentinel.SentinelManagedConnection
    check = sync_connection.connect_check_health
    if not getattr(check, _FIXED, False):

        @functools.wraps(check)
        def connect_check_health(self: Any, check_health: bool = True,
                                 retry_socket_connect: bool = True) -> None:  # fmt: skip
            if self._sock is not None or not retry_socket_connect:
                return check(self, check_health=check_health,
                             retry_socket_connect=retry_socket_connect)  # fmt: skip
            return self.connect()

        setattr(connect_check_health, _FIXED, True)
        sync_connection.connect_check_health = connect_check_health

    async_connection = async_sentinel.SentinelManagedConnection
    async_check = async_connection.connect_check_health
    if not getattr(async_check, _FIXED, False):

        @functools.wraps(async_check)
        async def connect_async(self: Any, check_health: bool = True,
                                retry_socket_connect: bool = True) -> None:  # fmt: skip
            if self.is_connected or not retry_socket_connect:
                return await async_check(self, check_health=check_health,
                                         retry_socket_connect=retry_socket_connect)  # fmt: skip
            return await self.connect()

        setattr(connect_async, _FIXED, True)
        async_connection.connect_check_health = connect_async
