"""Redis connections, plain or through Sentinel: the one factory every Redis client comes from.

REDIS_URL's Redis (Celery's broker and result backend, job records, leases, lanes, sweeps,
metrics) and PLATFORM_REDIS_URL's (the platform's job list) are each one server named by a
`redis://` URL, or the master that a set of sentinels names: REDIS_SENTINELS with
REDIS_MASTER_NAME, or `sentinel://host:port;sentinel://host:port/<db>` URLs (a
`?master_name=` on them names another master). A client of a Sentinel set asks the
sentinels for the master each time it connects (redis-py's `Sentinel.master_for`, kombu's
and Celery's Sentinel transports), so a failover is a short outage to it: the retries that
ride out a Redis restart carry it over to the promoted replica, with no restart (every
reconnection, a pipeline's too: worker/sentinel_fix.py).

Passwords (REDIS_PASSWORD for the data nodes, REDIS_SENTINEL_PASSWORD for the sentinels)
reach the clients only: `RedisTarget` never shows them, and Celery masks the URLs it logs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFoundError
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from worker.sentinel_fix import reconnect_through_the_sentinels
from worker.settings import Settings, mask_url_credentials

log = logging.getLogger(__name__)

# Every client of this process, kombu's and Celery's too: a lost connection asks the
# sentinels where the master is now (redis/redis-py#3874; worker/sentinel_fix.py).
reconnect_through_the_sentinels()

SENTINEL_SCHEME = "sentinel"
#: Sentinel's own port, when an address names none.
SENTINEL_PORT = 26379
#: How long one question to one sentinel may take, seconds: a sentinel that does not answer
#: is passed over for the next at once (no retries: the next sentinel is the retry).
SENTINEL_TIMEOUT_S = 1.0
#: No retries: for a question to one sentinel (the next one is the retry), and for probes,
#: which say how things stand now (the next probe asks again). Sync and asyncio clients.
NO_RETRY = Retry(NoBackoff(), 0)
ASYNC_NO_RETRY = AsyncRetry(NoBackoff(), 0)


@dataclass(frozen=True)
class RedisTarget:
    """Where one Redis is: a plain `url`, or `sentinels` that name the master `master_name`,
    with the database and credentials of its data nodes. Passwords are never shown."""

    url: str = field(default="", repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """For logs and pages: the sentinels and the master's name, or the masked URL."""
        if not self.is_sentinel:
            return mask_url_credentials(self.url)
        where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"Sentinel master {self.master_name!r} via {where} (db {self.db})"


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port, host:port` (REDIS_SENTINELS) as addresses; a bare host is on port 26379."""
    addresses = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        addresses.append((host, int(port) if port else SENTINEL_PORT))
    return tuple(addresses)


def target_of(
    url: str,
    *,
    sentinels: str = "",
    master_name: str,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> RedisTarget:
    """The Redis that `url` names: `sentinel://` URLs, `sentinels` (REDIS_SENTINELS) with
    the database and credentials of a `redis://` URL, or that URL alone. `password` serves
    where the URL carries none."""
    chunks = [urlsplit(chunk) for chunk in url.split(";")]
    if chunks[0].scheme == SENTINEL_SCHEME:
        addresses = tuple((c.hostname or "127.0.0.1", c.port or SENTINEL_PORT) for c in chunks)
    elif sentinels:
        addresses, chunks = parse_sentinels(sentinels), chunks[:1]
    else:
        return RedisTarget(url=url, password=None if chunks[0].password else password)
    query = {k: v[-1] for c in chunks for k, v in parse_qs(c.query).items()}
    paths = [c.path.strip("/") for c in chunks if c.path.strip("/")]
    return RedisTarget(
        sentinels=addresses,
        master_name=query.get("master_name", master_name),
        db=int(paths[0]) if paths else 0,
        username=next((c.username for c in chunks if c.username), None),
        password=next((c.password for c in chunks if c.password), password),
        sentinel_password=sentinel_password,
    )


def _secret(value: Any) -> str | None:
    return None if value is None else value.get_secret_value()


def records_target(settings: Settings) -> RedisTarget:
    """REDIS_URL's Redis: broker, result backend, job records and everything beside them."""
    return target_of(
        settings.redis_url,
        sentinels=settings.redis_sentinels,
        master_name=settings.redis_master_name,
        password=_secret(settings.redis_password),
        sentinel_password=_secret(settings.redis_sentinel_password),
    )


def platform_target(settings: Settings) -> RedisTarget:
    """PLATFORM_REDIS_URL's Redis: REDIS_URL's unless it names another (a plain URL, or a
    Sentinel set of its own, whose sentinels share REDIS_SENTINEL_PASSWORD)."""
    url = settings.platform_redis_url or settings.redis_url
    if url == settings.redis_url:
        return records_target(settings)
    return target_of(
        url,
        master_name=settings.redis_master_name,
        sentinel_password=_secret(settings.redis_sentinel_password),
    )


def _sentinel_kwargs(target: RedisTarget, retry: Retry | AsyncRetry) -> dict[str, Any]:
    """How a client talks to the sentinels themselves."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "retry": retry,
    }
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _node_kwargs(
    target: RedisTarget, timeout_s: float | None, retry: Retry | AsyncRetry | None
) -> dict:
    """How a client talks to the data node(s): credentials, database, timeouts, retries."""
    kwargs: dict[str, Any] = {}
    if target.password:
        kwargs["password"] = target.password
    if target.username:
        kwargs["username"] = target.username
    if timeout_s is not None:
        kwargs |= {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if retry is not None:
        kwargs["retry"] = retry
    return kwargs


def client(
    target: RedisTarget, *, retry: Retry | None = None, timeout_s: float | None = None
) -> redis.Redis:
    """A client of the target's master (its one server, for a plain URL): under Sentinel
    every new connection asks the sentinels where the master is now."""
    kwargs = _node_kwargs(target, timeout_s, retry)
    if not target.is_sentinel:
        return redis.Redis.from_url(target.url, **kwargs)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, NO_RETRY))
    return sentinel.master_for(target.master_name, db=target.db, **kwargs)


def async_client(
    target: RedisTarget, *, retry: AsyncRetry | None = None, timeout_s: float | None = None
) -> aioredis.Redis:
    """`client` for asyncio (the HTTP API)."""
    kwargs = _node_kwargs(target, timeout_s, retry)
    if not target.is_sentinel:
        return aioredis.Redis.from_url(target.url, **kwargs)
    sentinels = list(target.sentinels)
    sentinel = AsyncSentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(target, ASYNC_NO_RETRY))
    return sentinel.master_for(target.master_name, db=target.db, **kwargs)


@lru_cache(maxsize=8)
def probe_client(target: RedisTarget, *, timeout_s: float) -> redis.Redis:
    """One shared client per target with short timeouts and no retries, for probes that
    must answer fast."""
    return client(target, timeout_s=timeout_s, retry=NO_RETRY)


@dataclass(frozen=True)
class CeleryRedis:
    """What Celery's broker and result backend are given: one URL for both, and the
    transport options that Sentinel adds to each option set."""

    url: str
    transport_options: dict[str, Any]


def celery_redis(settings: Settings) -> CeleryRedis:
    """REDIS_URL's Redis as kombu and Celery name it. Under Sentinel every sentinel's URL
    carries the credentials and database: kombu moves on to the next URL of the list when
    one fails, and takes them from the URL it is on."""
    target = records_target(settings)
    if not target.is_sentinel:
        if target.password is None:
            return CeleryRedis(url=target.url, transport_options={})
        parts = urlsplit(target.url)
        netloc = f":{quote(target.password, safe='')}@{parts.netloc}"
        return CeleryRedis(url=parts._replace(netloc=netloc).geturl(), transport_options={})
    credentials = ""
    if target.username or target.password:
        user = quote(target.username or "", safe="")
        credentials = f"{user}:{quote(target.password or '', safe='')}@"
    url = ";".join(
        f"{SENTINEL_SCHEME}://{credentials}{host}:{port}/{target.db}"
        for host, port in target.sentinels
    )
    sentinel_kwargs = _sentinel_kwargs(target, NO_RETRY)
    return CeleryRedis(
        url=url,
        transport_options={"master_name": target.master_name, "sentinel_kwargs": sentinel_kwargs},
    )


#: After a WAIT that no replica answered (the master has none in sight: the one replica was
#: promoted, and the old master is not back yet), how long the waits are skipped, seconds:
#: the master pays the wait once per this, not once per write.
NO_REPLICA_RECHECK_S = 5.0


class ReplicaWait:
    """Under Sentinel: the writes the platform relies on wait until one replica has them
    (`WAIT 1 <REDIS_WAIT_REPLICA_MS>`), so a failover right after them cannot undo them.

    WAIT covers the writes made through the connection it runs on, and a client's pool may
    hand out another: so it runs right behind a write of its own on one connection (the
    record's expiry renewed), which comes after, and so covers, every write before it from
    any connection. The same step reads the written fields back: a client that retried it
    on a new master (the old one died between the write and the wait) finds there whether
    the write made it, and the caller writes it again if not. A wait no replica answered is
    logged and not repeated for NO_REPLICA_RECHECK_S (the fields are still read back); the
    write stands either way (the master has it).
    """

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self._skip_until = 0.0

    def confirm(self, client: redis.Redis, key: str, fields: dict[str, str], *, ttl_s: int) -> bool:
        """Renew `key`'s expiry and wait for one replica: True when the master in use holds
        `fields` as written (and a replica has them, unless none answered), False when it
        does not (they were lost in a failover)."""
        waiting = time.monotonic() >= self._skip_until
        with client.pipeline(transaction=False) as pipe:
            pipe.hmget(key, list(fields))
            pipe.expire(key, ttl_s)
            if waiting:
                pipe.wait(1, self.timeout_ms)
            values, *_, replicas = pipe.execute()
        if [v.decode() if v is not None else None for v in values] != list(fields.values()):
            return False
        if waiting and replicas < 1:
            self._skip_until = time.monotonic() + NO_REPLICA_RECHECK_S
            log.warning(
                "no Redis replica confirmed the write of %s within %d ms: a failover now could "
                "lose it; not waiting again for %.0f s", key, self.timeout_ms,
                NO_REPLICA_RECHECK_S,
            )  # fmt: skip
        return True


def replica_wait(settings: Settings) -> ReplicaWait | None:
    """The wait of REDIS_URL's acknowledged writes: only under Sentinel, where a failover
    promotes a replica that may lag (REDIS_WAIT_REPLICA_MS; 0 turns it off)."""
    if not records_target(settings).is_sentinel or settings.redis_wait_replica_ms == 0:
        return None
    return ReplicaWait(settings.redis_wait_replica_ms)


@dataclass(frozen=True)
class MasterView:
    """What one probe of a Redis found: the address in use and its role (`master`, or
    `slave` on a demoted node), or why there is none."""

    address: str | None = None
    role: str | None = None
    error: str | None = None
    #: The sentinels answer but name no master that answers: a failover is under way.
    failing_over: bool = False


def _role(reply: list) -> str:
    role = reply[0]
    return role.decode() if isinstance(role, bytes) else str(role)


async def probe(client: aioredis.Redis) -> MasterView:
    """Ask the master `client` uses (under Sentinel: the one the sentinels name now) for its
    ROLE. The sentinels answering without a master that answers is a failover under way."""
    pool = client.connection_pool
    if isinstance(pool, AsyncSentinelConnectionPool):
        try:
            host, port = await pool.get_master_address()
        except AsyncMasterNotFoundError as e:
            answering = await _any_sentinel_answers(pool.sentinel_manager)
            return MasterView(error=f"no Redis master known: {e}", failing_over=answering)
        address = f"{host}:{port}"
    else:
        kwargs = pool.connection_kwargs
        address = f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}"
    try:
        role = _role(await client.execute_command("ROLE"))
    except (redis.RedisError, OSError) as e:
        return MasterView(
            address=address,
            error=f"Redis unreachable at {address}: {e}",
            failing_over=isinstance(pool, AsyncSentinelConnectionPool),
        )
    return MasterView(address=address, role=role)


async def _any_sentinel_answers(sentinel: AsyncSentinel) -> bool:
    for node in sentinel.sentinels:
        try:
            if await node.ping():
                return True
        except (redis.RedisError, OSError):
            continue
    return False


def master_address(client: redis.Redis) -> str | None:
    """The address of the master the sentinels name now (None: none, or a plain client)."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return None
    try:
        host, port = pool.get_master_address()
    except MasterNotFoundError:
        return None
    return f"{host}:{port}"
