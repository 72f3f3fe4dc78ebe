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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from worker.jobs import JobType

log = logging.getLogger(__name__)

KEY_PREFIX = "wan:metrics:"
#: Stage seconds: from a thumbnail (well under a second) to a long video (half an hour).
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # empty: a counter (or a gauge, with gauge=True)
    gauge: bool = False


JOBS = Metric("wan_jobs_total", "Jobs by type and final status.", ("job_type", "status"))
#: `job_type` of a job whose body named no type the platform sends (refused at the bridge):
#: one value for all of them, so the label holds the platform's types and this, whatever
#: bodies arrive (the metric's hash stays bounded).
OTHER_JOB_TYPE = "other"
STAGE_SECONDS = Metric(
    "wan_stage_seconds", "Seconds per stage run.", ("stage", "outcome"), STAGE_BUCKETS_S
)
RETRIES = Metric("wan_retries_total", "Stage retries, by stage.", ("stage",))
MODEL_LOADS = Metric("wan_model_loads_total", "Models loaded by pool children.", ("model",))
ENHANCEMENT_FALLBACKS = Metric(
    "wan_enhancement_fallbacks_total", "Enhancements that fell back, by reason.", ("reason",)
)
DEAD_LETTERS = Metric("wan_dead_letters_total", "Jobs moved to the dead-letter set.", ())
CANCELLATIONS = Metric("wan_cancellations_total", "Jobs cancelled.", ())
QUALITY_DEGRADATIONS = Metric(
    "wan_quality_degradations_total",
    "Generations run again at a lower quality preset after running out of GPU memory.",
    ("from_quality", "to_quality"),
)
GPU_MEMORY = Metric(
    "wan_gpu_memory_bytes",
    "CUDA memory of each generation worker after its last job: in use, and that job's peak.",
    ("worker", "kind"),
    gauge=True,
)
ALL = (JOBS, STAGE_SECONDS, RETRIES, MODEL_LOADS, ENHANCEMENT_FALLBACKS, DEAD_LETTERS,
       CANCELLATIONS, QUALITY_DEGRADATIONS, GPU_MEMORY)  # fmt: skip


def job_type_label(job_type: str) -> str:
    """The `job_type` label of `JOBS` for a record's `job_type`: the type, or OTHER_JOB_TYPE."""
    return job_type if job_type in JobType.__members__ else OTHER_JOB_TYPE


class Metrics:
    """Writes events to Redis; `collector()` reads them back for Prometheus."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def count(self, metric: Metric, *labels: str, by: float = 1) -> None:
        self._write(metric, lambda pipe, key: pipe.hincrbyfloat(key, _field(labels), by))

    def set(self, metric: Metric, value: float, *labels: str) -> None:
        self._write(metric, lambda pipe, key: pipe.hset(key, _field(labels), value))

    def observe(self, metric: Metric, value: float, *labels: str) -> None:
        bucket = bisect_left(metric.buckets, value)  # the first bucket holding the value

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
