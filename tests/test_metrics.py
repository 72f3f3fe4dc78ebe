"""GET /metrics as Prometheus scrapes it: parseable, and moving when jobs run or fail."""

from __future__ import annotations

import uuid

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import JOB_TIMEOUT_S, PLATFORM_QUEUE, api_url, new_job, push, settled
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, RedisServer, wait_until
from worker.observe.metrics import ALL, OTHER, Metric, Metrics


def scrape(env: dict[str, str]) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}; no auth, like Prometheus."""
    response = httpx.get(f"{api_url(env)}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_counters_and_histograms_move_when_a_job_completes_and_one_fails(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:  # fmt: skip
    completed = ("wan_jobs_total", (("job_type", "image_fast"), ("status", "completed")))
    failed = ("wan_jobs_total", (("job_type", "image_fast"), ("status", "failed")))
    generate_runs = ("wan_stage_seconds_count", (("outcome", "success"), ("stage", "generate")))
    # (a job of an earlier test is counted after its final callback: let the stack settle)
    wait_until(lambda: settled(platform_list, PLATFORM_QUEUE), timeout_s=JOB_TIMEOUT_S,
               what="the session stack idle")  # fmt: skip
    before = scrape(stack_env)

    good, bad = new_job("image_fast"), new_job("image_fast")
    bad["config"]["resolution"] = "100x100"
    push(platform_list, good)
    push(platform_list, bad)
    platform.wait_for_final(good["id"], timeout_s=JOB_TIMEOUT_S)
    platform.wait_for_final(bad["id"], timeout_s=JOB_TIMEOUT_S)
    # (each job is counted just after the platform took its final callback)
    wait_until(lambda: settled(platform_list, PLATFORM_QUEUE), timeout_s=JOB_TIMEOUT_S,
               what="both jobs counted")  # fmt: skip
    after = scrape(stack_env)

    assert after[completed] == before.get(completed, 0) + 1
    assert after[failed] == before.get(failed, 0) + 1
    assert after[generate_runs] >= before.get(generate_runs, 0) + 1
    bucket = ("wan_stage_seconds_bucket", (("le", "+Inf"), ("outcome", "success"),
                                           ("stage", "generate")))  # fmt: skip
    assert after[bucket] == after[generate_runs]
    for queue in ("gpu", "enhance", "cpu", "platform"):
        assert ("wan_queue_depth", (("queue", queue),)) in after
    assert any(name == "wan_model_loads_total" for name, _ in after)


def test_a_refused_items_made_up_type_is_counted_as_other(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:  # fmt: skip
    # Given an item whose type is any string (each would be a new series, kept for ever)
    made_up = f"type-{uuid.uuid4()}"
    other = ("wan_jobs_total", (("job_type", OTHER), ("status", "failed")))
    before = scrape(stack_env)

    job = new_job(made_up)
    push(platform_list, job)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    after = scrape(stack_env)

    assert after[other] == before.get(other, 0) + 1
    assert not [key for key in after if made_up in str(key)]


@pytest.mark.parametrize("metric", [m for m in ALL if m.known], ids=lambda m: m.name)
def test_every_label_with_known_values_takes_no_other_value(
    metric: Metric, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.db_url(11))
    client.flushdb()
    made_up = [f"{label}-{uuid.uuid4()}" for label in metric.labels]

    metrics = Metrics(client)
    if metric.buckets:
        metrics.observe(metric, 1.0, *made_up)
    elif metric.gauge:
        metrics.set(metric, 1.0, *made_up)
    else:
        metrics.count(metric, *made_up)

    name = metric.name.removesuffix("_total")  # as prometheus-client names a counter family
    [family] = [f for f in metrics.collector().collect() if f.name == name]
    assert {
        label: {sample.labels[label] for sample in family.samples} for label in metric.labels
    } == {
        label: {OTHER if label in metric.known else value}
        for label, value in zip(metric.labels, made_up, strict=True)
    }
