"""Leftovers: what outlives its job in Redis, dropped once it can say nothing more.

Records expire by themselves after JOB_RECORD_TTL_S; what only points at records (the index
of every job, the dead letters) or at hosts (their media worker's heartbeat, their own queue's
binding, their workers' loaded models and GPU memory) is dropped here once what it points at
is gone or silent for as long. Each media worker does it on its lost-job sweep's timer
(tasks/worker_steps.py); every step is cheap when there is nothing to drop.
README's "Keys in Redis" lists every key family and its bound.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import MEDIA_HOSTS_KEY, JobRecords
from worker.observe.loaded_models import KEY as LOADED_MODELS_KEY
from worker.observe.metrics import KEY_PREFIX as METRICS_PREFIX
from worker.observe.metrics import PER_WORKER_GAUGES

log = logging.getLogger(__name__)

#: kombu's set of the queues bound to an exchange; each host's `cpu.<host>` has its own.
BINDING_PREFIX = "_kombu.binding."


@dataclass(frozen=True)
class Dropped:
    """What one pass dropped."""

    #: Entries of the index of every job (`wan:jobs`) whose record expired.
    index_entries: int
    #: Dead letters older than the record TTL (their record, the why, is gone).
    dead_letters: int
    #: Hosts whose media worker has been silent for the record TTL.
    hosts: list[str]


def drop_leftovers(records: JobRecords) -> Dropped:
    """One pass: drop what points at records expired, or at hosts silent, for the record TTL."""
    dropped = Dropped(
        index_entries=records.prune_index(),
        dead_letters=DeadLetters(records.redis).purge(older_than_s=records.ttl_s),
        hosts=forget_silent_hosts(records, silent_for_s=records.ttl_s),
    )
    if dropped.hosts:
        log.warning("forgot hosts silent for JOB_RECORD_TTL_S=%d s: %s", records.ttl_s,
                    ", ".join(dropped.hosts))  # fmt: skip
    return dropped


def forget_silent_hosts(records: JobRecords, *, silent_for_s: float) -> list[str]:
    """Forget hosts whose media worker has not been seen for `silent_for_s`: its heartbeat,
    its queue's binding (its worker binds it again if it ever starts), and the loaded models,
    GPU memory and image rate of its workers (`<name>@<host>`). No record still names such a
    host."""
    cutoff = records.now() - silent_for_s
    silent = [host for host, seen in records.media_hosts().items() if seen < cutoff]
    if not silent:
        return []
    client = records.redis
    nodes = [n.decode() for n in client.hkeys(LOADED_MODELS_KEY)]
    gauges = {key: [f.decode() for f in client.hkeys(key)]
              for key in (METRICS_PREFIX + gauge.name for gauge in PER_WORKER_GAUGES)}  # fmt: skip
    with client.pipeline() as pipe:
        for host in silent:
            pipe.hdel(MEDIA_HOSTS_KEY, host)
            pipe.delete(f"{BINDING_PREFIX}cpu.{host}")
            for node in nodes:
                if node.endswith(f"@{host}"):
                    pipe.hdel(LOADED_MODELS_KEY, node)
            for key, fields in gauges.items():
                for field in fields:
                    if json.loads(field)[0][0].endswith(f"@{host}"):  # [[worker, ...], part]
                        pipe.hdel(key, field)
        pipe.execute()
    return silent
