"""The one Redis factory (worker/connections.py): what every client is given, plain or
through Sentinel, and the replica wait of the writes the platform relies on.

The wait runs against a real master and replica (redis-server on free ports); the failover
itself is tests/test_sentinel.py's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD, secret_leaks
from worker import connections
from worker.connections import RedisTarget, ReplicaWait, celery_redis, records_target
from worker.jobs.records import JobRecords, WriteLost
from worker.local.sentinel import MASTER_NAME, NODE_ARGS, SentinelSet
from worker.local.stack import ROOT, RedisServer, wait_until
from worker.settings import Settings

SENTINELS = "10.0.0.1:26379,10.0.0.2:26380,10.0.0.3"
PASSWORDS = [REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD]


def sentinel_settings(**values: str) -> Settings:
    return Settings(
        _env_file=None,
        redis_url="redis://ignored:6379/3",
        redis_sentinels=SENTINELS,
        redis_password=REDIS_PASSWORD,
        redis_sentinel_password=REDIS_SENTINEL_PASSWORD,
        **values,
    )


def test_redis_sentinels_and_sentinel_urls_name_the_same_master_set() -> None:
    # Given the Sentinel set written both ways
    by_setting = records_target(sentinel_settings())
    urls = ";".join(f"sentinel://{a}/3" for a in ("10.0.0.1:26379", "10.0.0.2:26380", "10.0.0.3"))
    by_url = records_target(
        Settings(
            _env_file=None,
            redis_url=urls,
            redis_password=REDIS_PASSWORD,
            redis_sentinel_password=REDIS_SENTINEL_PASSWORD,
        )  # fmt: skip
    )

    # Then both name the same sentinels, master, database and passwords (port 26379 by default)
    expected = RedisTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)),
        master_name="mymaster",
        db=3,
        password=REDIS_PASSWORD,
        sentinel_password=REDIS_SENTINEL_PASSWORD,
    )
    assert by_setting == by_url == expected
    # And a password in the URL wins over REDIS_PASSWORD; `?master_name=` names another master
    other = connections.target_of(
        "sentinel://:inurl@h:1;sentinel://h:2/0?master_name=platform", master_name="mymaster",
        password="setting",
    )  # fmt: skip
    assert (other.password, other.master_name) == ("inurl", "platform")
    # And no password shows in a target's text
    assert secret_leaks({"repr": repr(by_setting), "describe": by_setting.describe()},
                        PASSWORDS) == []  # fmt: skip


def test_the_platform_list_follows_redis_url_unless_it_names_a_redis_of_its_own() -> None:
    shared = sentinel_settings()
    plain = sentinel_settings(platform_redis_url="redis://platform:6379/0")
    own_set = sentinel_settings(
        platform_redis_url="sentinel://p1:26379;sentinel://p2:26379/1?master_name=platform"
    )

    assert connections.platform_target(shared) == records_target(shared)
    assert connections.platform_target(plain) == RedisTarget(url="redis://platform:6379/0")
    target = connections.platform_target(own_set)
    assert (target.sentinels, target.master_name, target.db) == (
        (("p1", 26379), ("p2", 26379)), "platform", 1,
    )  # fmt: skip
    assert target.sentinel_password == REDIS_SENTINEL_PASSWORD and target.password is None


def test_celery_reaches_the_master_through_every_sentinel_with_one_visibility_timeout() -> None:
    # Given a Sentinel set; When Celery's settings are loaded in a process of their own
    env = {**os.environ, "REDIS_SENTINELS": SENTINELS, "REDIS_PASSWORD": REDIS_PASSWORD,
           "REDIS_SENTINEL_PASSWORD": REDIS_SENTINEL_PASSWORD, "REDIS_URL": "redis://x/3",
           "BROKER_VISIBILITY_TIMEOUT_S": "1234"}  # fmt: skip
    script = (
        "import celeryconfig as c, json; print(json.dumps([c.broker_url, c.result_backend, "
        "c.broker_transport_options, c.result_backend_transport_options], default=repr))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    import json

    broker_url, backend_url, broker_options, backend_options = json.loads(out)

    # Then broker and result backend name every sentinel, each with the password and database
    # (kombu moves on to the next URL, and reads them from the one it is on)
    assert broker_url == backend_url
    chunks = broker_url.split(";")
    assert len(chunks) == 3 and all(c.startswith("sentinel://:") for c in chunks)
    assert all(c.endswith("/3") and REDIS_PASSWORD in c for c in chunks)
    # And both option sets name the master, carry the sentinels' password, and agree on the
    # visibility timeout
    for options in (broker_options, backend_options):
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == REDIS_SENTINEL_PASSWORD
        assert options["visibility_timeout"] == 1234
    # And a plain REDIS_URL stays as it was, REDIS_PASSWORD added when it carries none
    plain = celery_redis(Settings(_env_file=None, redis_url="redis://h:6379/0",
                                  redis_password="p@ss"))  # fmt: skip
    assert plain == connections.CeleryRedis(url="redis://:p%40ss@h:6379/0", transport_options={})


def test_the_settings_show_redis_passwords_only_as_set() -> None:
    settings = sentinel_settings(
        platform_redis_url=f"sentinel://:{REDIS_PASSWORD}@p:1;sentinel://p:2"
    )
    config = subprocess.run(
        [sys.executable, "-m", "worker", "config"],
        env={**os.environ, "REDIS_SENTINELS": SENTINELS, "REDIS_PASSWORD": REDIS_PASSWORD,
             "REDIS_SENTINEL_PASSWORD": REDIS_SENTINEL_PASSWORD,
             "PLATFORM_REDIS_URL": settings.platform_redis_url or ""},
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip

    masked = settings.masked()
    assert masked["redis_password"] == masked["redis_sentinel_password"] == "set"
    assert masked["platform_redis_url"] == "sentinel://***@p:1;sentinel://p:2"
    assert secret_leaks({"masked": str(masked), "config": config}, PASSWORDS) == []
    assert "redis_sentinels" in config.lower()


# --- the replica wait ------------------------------------------------------------------


@pytest.fixture(scope="module")
def master_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("replicated")
    master = RedisServer(root / "master", args=NODE_ARGS).start()
    replica = RedisServer(
        root / "replica", args=(*NODE_ARGS, "--replicaof", "127.0.0.1", str(master.port))
    )
    replica.start()
    client = redis.Redis.from_url(master.url)
    wait_until(lambda: client.info("replication").get("slave0", {}).get("state") == "online",
               timeout_s=30, what="the replica's link")  # fmt: skip
    yield master, replica
    replica.stop()
    master.stop()


def waits(client: redis.Redis) -> int:
    """How many WAITs the server has run."""
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_the_writes_the_platform_relies_on_wait_for_a_replica(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # Given job records whose acknowledged writes wait for one replica
    master, _ = master_and_replica
    client = redis.Redis.from_url(master.url)
    records = JobRecords(client, ttl_s=600, replica_wait=ReplicaWait(1000))
    client.hset(records.key("j"), "status", "processing")
    before = waits(client)

    # When a job is marked dispatched, a stage finishes, the job fails and its final
    # callback is noted delivered
    records.mark_dispatched("j")
    records.stage_finished("j", "generate")
    records.fail("j", stage="encode", error=RuntimeError("x"))
    records.callback_sent("j", "failed")
    # (a processing callback is no such write)
    records.callback_sent("j", "processing")

    # Then each waited once for the replica, which has the record as it stands
    assert waits(client) - before == 4
    assert client.ttl(records.key("j")) > 500


def test_a_wait_no_replica_answers_costs_its_timeout_once_then_is_skipped(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # Given a replica that stops answering (SIGSTOP)
    master, replica = master_and_replica
    client = redis.Redis.from_url(master.url)
    client.hset("k", "f", "1")
    wait = ReplicaWait(300)
    before = waits(client)
    assert wait.confirm(client, "k", {"f": "1"}, ttl_s=600)
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)
    try:
        client.hset("k", "f", "2")

        # When writes wait for it
        started = time.monotonic()
        first = wait.confirm(client, "k", {"f": "2"}, ttl_s=600)
        waited_s = time.monotonic() - started
        started = time.monotonic()
        second = wait.confirm(client, "k", {"f": "2"}, ttl_s=600)
        skipped_s = time.monotonic() - started
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)

    # Then the first waits the whole timeout; the next within NO_REPLICA_RECHECK_S does not
    # wait at all; both found the write on the master, which keeps it
    assert waited_s >= 0.3 and skipped_s < 0.1
    assert first and second
    assert waits(client) - before == 2


def test_an_acknowledged_write_a_failover_lost_is_written_again_or_raises(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # Given job records on a master (the master of the day after a failover, say) that
    # lacks what was just written elsewhere
    master, _ = master_and_replica
    client = redis.Redis.from_url(master.url)
    records = JobRecords(client, ttl_s=600, replica_wait=ReplicaWait(1000))
    records.write("lost", status="processing")
    finished = {"finished:encode": "1700000000.000000"}

    # When a finished stage is confirmed there, it is written again
    records.replicated("lost", finished)
    assert client.hget(records.key("lost"), "finished:encode") == b"1700000000.000000"

    # And a dispatch mark, which needs what came before it, raises an outage instead
    with pytest.raises(WriteLost):
        records.replicated("lost", {"dispatched_at": "1700000000.000000"}, rewrite=False)
    assert not client.hexists(records.key("lost"), "dispatched_at")


def test_the_wait_is_sentinels_only(tmp_path: Path) -> None:
    assert connections.replica_wait(Settings(_env_file=None)) is None
    assert connections.replica_wait(sentinel_settings(redis_wait_replica_ms=0)) is None
    wait = connections.replica_wait(sentinel_settings(redis_wait_replica_ms=250))
    assert wait is not None and wait.timeout_ms == 250


# --- reconnecting after a failover -------------------------------------------------------


@pytest.fixture(scope="module")
def failed_over(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SentinelSet, int]]:
    """A Sentinel set whose first master was killed (SIGKILL) and whose replica the
    sentinels promoted; with the dead master's port."""
    nodes = SentinelSet(tmp_path_factory.mktemp("failed-over")).start()
    dead = nodes.kill_master()
    nodes.wait_for_promotion()
    yield nodes, dead.port
    nodes.stop()


def sentinel_target(nodes: SentinelSet) -> RedisTarget:
    return RedisTarget(sentinels=tuple(("127.0.0.1", s.port) for s in nodes.sentinels),
                       master_name=MASTER_NAME)  # fmt: skip


def test_a_sentinel_connection_that_lost_its_socket_connects_to_the_new_master(
    failed_over: tuple[SentinelSet, int],
) -> None:
    # Given a connection of a Sentinel client whose socket to the old master died (its
    # address is the dead master's, as a pipeline's connection is after a failover)
    nodes, dead_port = failed_over
    client = connections.client(sentinel_target(nodes), retry=Retry(NoBackoff(), 2))
    connection = client.connection_pool.get_connection()
    connection.disconnect()
    connection.port = dead_port

    # When it sends again on a socket it opens anew (a pipeline's retry: send_packed_command)
    connection.send_command("ROLE")

    # Then it asked the sentinels: it is on the new master, not refused by the old one
    assert connection.read_response()[0] == b"master"
    assert connection.port == nodes.master.port != dead_port
    client.connection_pool.release(connection)


def test_so_does_an_asyncio_one(failed_over: tuple[SentinelSet, int]) -> None:
    nodes, dead_port = failed_over

    async def role_after_reconnecting() -> tuple[bytes, int]:
        client = connections.async_client(sentinel_target(nodes), retry=AsyncRetry(NoBackoff(), 2))
        connection = await client.connection_pool.get_connection()
        await connection.disconnect()
        connection.port = dead_port
        await connection.send_command("ROLE")
        role = (await connection.read_response())[0]
        port = connection.port
        await client.connection_pool.release(connection)
        await client.aclose()
        return role, port

    assert asyncio.run(role_after_reconnecting()) == (b"master", nodes.master.port)
