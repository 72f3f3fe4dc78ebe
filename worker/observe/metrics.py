"""Prometheus metrics shared by every process through Redis, exported by the API's /metrics.

Workers, their pool children and the bridge run in many processes and often on many hosts;
prometheus-client's multiprocess mode shares files of one host only. So each event is one
Redis increment (a counter, or a histogram's bucket, sum and count), and the API turns the
hashes into Prometheus families at scrape time, with live gauges (queue depths) beside.
A metric that cannot be written is logged and dropped: metrics never fail a job.
"""

from __future__ import annotations

import json
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import get_args

import redis
from celery import states
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from enhancement.result import FallbackReason
from worker.jobs.model import JobType, PresetName
from worker.jobs.records import FINAL_STATUSES, STAGES

log = logging.getLogger(__name__)

KEY_PREFIX = "wan:metrics:"
#: Stage seconds: from a thumbnail (well under a second) to a long video (half an hour).
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)


#: What a label value outside its known values is counted as: every value is a series that
#: Redis and Prometheus keep for ever, so input (a refused item's `type`) must never be one.
OTHER = "other"
#: Known label values, shared by the metrics that carry the label.
STAGE_NAMES = frozenset(STAGES)
QUALITIES = frozenset(get_args(PresetName))
#: A task run's outcome: its Celery state, lower case (`IGNORED` is not among ALL_STATES).
OUTCOMES = frozenset(state.lower() for state in (*states.ALL_STATES, states.IGNORED))


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # empty: a counter (or a gauge, with gauge=True)
    gauge: bool = False
    #: The values a label may take; any other is counted as OTHER. A label not named here
    #: takes its value as given: only for values a deployment bounds (e.g. node names),
    #: never for anything from a job or a request.
    known: Mapping[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def label_values(self, values: Sequence[str]) -> list[str]:
        """`values` with each one outside its label's known values replaced by OTHER."""
        return [
            value if label not in self.known or value in self.known[label] else OTHER
            for label, value in zip(self.labels, values, strict=True)
        ]


JOBS = Metric(
    "wan_jobs_total", "Jobs by type and final status.", ("job_type", "status"),
    known={"job_type": frozenset(t.value for t in JobType), "status": FINAL_STATUSES},
)  # fmt: skip
STAGE_SECONDS = Metric(
    "wan_stage_seconds", "Seconds per stage run.", ("stage", "outcome"), STAGE_BUCKETS_S,
    known={"stage": STAGE_NAMES, "outcome": OUTCOMES},
)  # fmt: skip
RETRIES = Metric(
    "wan_retries_total", "Stage retries, by stage.", ("stage",), known={"stage": STAGE_NAMES}
)
#: `model`: the names the enhancement worker (`qwen`) and the generation worker (`wan_` and
#: a pipeline's name) write; they come from code, not from jobs.
MODEL_LOADS = Metric("wan_model_loads_total", "Models loaded by pool children.", ("model",))
ENHANCEMENT_FALLBACKS = Metric(
    "wan_enhancement_fallbacks_total", "Enhancements that fell back, by reason.", ("reason",),
    known={"reason": frozenset(get_args(FallbackReason))},
)  # fmt: skip
DEAD_LETTERS = Metric("wan_dead_letters_total", "Jobs moved to the dead-letter set.", ())
CANCELLATIONS = Metric("wan_cancellations_total", "Jobs cancelled.", ())
QUALITY_DEGRADATIONS = Metric(
    "wan_quality_degradations_total",
    "Generations run again at a lower quality preset after running out of GPU memory.",
    ("from_quality", "to_quality"),
    known={"from_quality": QUALITIES, "to_quality": QUALITIES},
)
GPU_MEMORY = Metric(
    "wan_gpu_memory_bytes",
    "CUDA memory of each generation worker after its last job: in use, and that job's peak.",
    ("worker", "kind"),
    gauge=True,
    known={"kind": frozenset({"in_use", "peak"})},  # `worker`: a node name of this deployment
)
REDIS_FAILOVERS = Metric(
    "wan_redis_failovers_total",
    "Redis Sentinel failovers seen: the master the sentinels name changed.",
    (),
)
#: Images per pipeline call of the image batches (tasks/image_batch.py).
BATCH_SIZE = Metric(
    "wan_batch_size", "Images generated in one pipeline call, per batch.", (),
    (1, 2, 3, 4, 6, 8, 12, 16),
)  # fmt: skip
IMAGES_PER_SECOND = Metric(
    "wan_images_per_second",
    "Images per second of each generation worker's last image batch.",
    ("worker",),  # a node name of this deployment
    gauge=True,
)
#: Gauges with one series per generation worker (`<name>@<host>`): dropped with their host
#: (worker/leftovers.py).
PER_WORKER_GAUGES = (GPU_MEMORY, IMAGES_PER_SECOND)
ALL = (JOBS, STAGE_SECONDS, RETRIES, MODEL_LOADS, ENHANCEMENT_FALLBACKS, DEAD_LETTERS,
       CANCELLATIONS, QUALITY_DEGRADATIONS, GPU_MEMORY, BATCH_SIZE, IMAGES_PER_SECOND,
       REDIS_FAILOVERS)  # fmt: skip

#: The Redis master (`host:port`) the sentinels named when last looked at (`note_master`).
MASTER_KEY = "wan:redis:master"
#: Atomically: note the master's address; 1 if another was noted before (a failover).
#: KEYS: MASTER_KEY; ARGV: the address.
_NOTE_MASTER_SCRIPT = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if old then return 1 end
return 0
"""


class Metrics:
    """Writes events to Redis; `collector()` reads them back for Prometheus."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def count(self, metric: Metric, *labels: str, by: float = 1) -> None:
        fields = _field(metric.label_values(labels))
        self._write(metric, lambda pipe, key: pipe.hincrbyfloat(key, fields, by))

    def set(self, metric: Metric, value: float, *labels: str) -> None:
        fields = _field(metric.label_values(labels))
        self._write(metric, lambda pipe, key: pipe.hset(key, fields, value))

    def observe(self, metric: Metric, value: float, *labels: str) -> None:
        bucket = bisect_left(metric.buckets, value)  # the first bucket holding the value
        labels = tuple(metric.label_values(labels))

        def write(pipe: redis.client.Pipeline, key: str) -> None:
            pipe.hincrbyfloat(key, _field(labels, f"le:{bucket}"), 1)
            pipe.hincrbyfloat(key, _field(labels, "sum"), value)

        self._write(metric, write)

    def _write(self, metric: Metric, write: Callable[[redis.client.Pipeline, str], None]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                write(pipe, KEY_PREFIX + metric.name)
                pipe.execute()
        except redis.RedisError as e:
            log.warning("metric %s not recorded: %s", metric.name, e)

    def note_master(self, address: str) -> bool:
        """Note the master the sentinels name now; a change from the one noted before is a
        failover, counted once however many processes see it. True if it was one."""
        try:
            changed = self.redis.register_script(_NOTE_MASTER_SCRIPT)(
                keys=[MASTER_KEY], args=[address]
            )
        except redis.RedisError as e:
            log.warning("Redis master %s not noted: %s", address, e)
            return False
        if changed:
            log.warning("Redis failover: the master is now %s", address)
            self.count(REDIS_FAILOVERS)
        return bool(changed)

    def collector(self) -> Collector:
        return _RedisCollector(self.redis)


def _field(labels: Sequence[str], part: str = "") -> str:
    return json.dumps([list(labels), part])


class _RedisCollector(Collector):
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def collect(self) -> Iterator:
        for metric in ALL:
            raw = self.redis.hgetall(KEY_PREFIX + metric.name)
            entries = [(*json.loads(field), float(value)) for field, value in raw.items()]
            if not metric.buckets:
                kind = GaugeMetricFamily if metric.gauge else CounterMetricFamily
                family = kind(metric.name, metric.help, labels=metric.labels)
                for labels, _, value in entries:
                    family.add_metric(labels, value)
                yield family
                continue
            family = HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
            for labels in sorted({tuple(labels) for labels, _, _ in entries}):
                mine = {part: value for ls, part, value in entries if tuple(ls) == labels}
                counts = [mine.get(f"le:{i}", 0.0) for i in range(len(metric.buckets) + 1)]
                cumulative, buckets = 0.0, []
                for bound, count in zip((*metric.buckets, float("inf")), counts, strict=True):
                    cumulative += count
                    buckets.append((_bound(bound), cumulative))
                family.add_metric(list(labels), buckets, mine.get("sum", 0.0))
            yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))
