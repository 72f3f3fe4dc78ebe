"""The dead-letter list: jobs given up on for good, for the on-call engineer to look at.

A sorted set of job ids scored by when each died, so `jobs dead` lists them oldest first
and `jobs purge-dead --older-than` drops old ones in one command. The job record keeps the
why (stage, error, deliveries); this set only says which.
"""

from __future__ import annotations

import redis

from worker.clock import redis_now

KEY = "wan:dead_letters"


class DeadLetters:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def add(self, job_id: str) -> bool:
        """Put a job in; False if it was in already."""
        return bool(self.redis.zadd(KEY, {job_id: redis_now(self.redis)}, nx=True))

    def remove(self, job_id: str) -> None:
        """Take a job out, e.g. when it is retried."""
        self.redis.zrem(KEY, job_id)

    def list(self) -> list[tuple[str, float]]:
        """(job id, when it died) pairs, oldest first."""
        return [(m.decode(), at) for m, at in self.redis.zrange(KEY, 0, -1, withscores=True)]

    def purge(self, *, older_than_s: float = 0.0) -> int:
        """Drop entries dead for longer than `older_than_s`; how many were dropped."""
        return int(self.redis.zremrangebyscore(KEY, "-inf", redis_now(self.redis) - older_than_s))
