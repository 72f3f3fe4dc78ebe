"""GET /metrics, no auth (like /health): Prometheus text for the whole system.

The counters and histograms every process wrote to Redis, plus live queue depths of the
Celery queues and the platform list: what an autoscaler or an alert watches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.api.health import QUEUES, broker_client, platform_client
from worker.flow.lanes import WaitingJobs, queue_depth
from worker.observe.metrics import Metrics
from worker.settings import Settings, get_settings

router = APIRouter(tags=["health"])


class _QueueDepths(Collector):
    """Live gauges read at scrape time: queue depths, and per lane the jobs waiting for
    generation and the oldest one's wait (what an autoscaler scales the GPU workers on)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "wan_queue_depth", "Messages waiting, by queue (all priority steps).", labels=["queue"]
        )
        broker = broker_client(self.settings)
        for queue in QUEUES:
            depth.add_metric([queue], queue_depth(broker, queue))
        platform = platform_client(self.settings)
        depth.add_metric(["platform"], platform.llen(self.settings.platform_queue))
        yield depth
        waiting = GaugeMetricFamily(
            "wan_lane_waiting_jobs",
            "Jobs sent and not yet generating, by lane (image, video).",
            labels=["lane"],
        )
        oldest = GaugeMetricFamily(
            "wan_lane_oldest_wait_seconds",
            "Seconds the oldest job waiting for generation has waited, by lane (0: none).",
            labels=["lane"],
        )
        for lane, state in WaitingJobs(broker, self.settings).state().items():
            waiting.add_metric([lane], state.waiting)
            oldest.add_metric([lane], state.oldest_wait_s)
        yield waiting
        yield oldest


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 503: {"description": "no Redis"}},
)
def metrics(settings: Annotated[Settings, Depends(get_settings)]) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_QueueDepths(settings))
    registry.register(Metrics(broker_client(settings)).collector())
    try:
        body = generate_latest(registry)
    except redis.RedisError as e:
        return Response(f"Redis unreachable: {e}\n", status_code=503, media_type="text/plain")
    return Response(body, media_type=CONTENT_TYPE_LATEST)
