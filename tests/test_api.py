"""The HTTP API as the platform and an operator use it: real uvicorn, real workers, real HTTP.

The session stack runs `python -m worker api` beside the workers; APIs that need other
settings (no key, a dead Redis, registration) run as processes of their own.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bench.api import HEALTH_BURST, posts_during_health_burst
from tests.conftest import API_KEY, JOB_TIMEOUT_S, PLATFORM_QUEUE, api_url, auth, new_job
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, free_port, wait_until


@contextmanager
def api_process(env: dict[str, str], log_dir: Path, **overrides: str) -> Iterator[str]:
    """A `python -m worker api` of its own, with `overrides` in its environment."""
    port = str(free_port())
    stack = LocalStack(env | {"API_PORT": port} | overrides, log_dir=log_dir, names=("api",))
    try:
        stack.start(timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


# -- /health -----------------------------------------------------------------------------


def health_once_surveyed(api: str, path: str = "/health") -> dict[str, Any]:
    """The answer once the background survey has seen a worker on every queue."""
    answers: list[dict[str, Any]] = []

    def ok() -> bool:
        answers.append(httpx.get(f"{api}{path}", headers=auth(), timeout=10).json())
        return answers[-1]["status"] == "ok"

    wait_until(ok, timeout_s=JOB_TIMEOUT_S, what=f"{path} says ok")
    return answers[-1]


def test_health_counts_the_workers_and_shows_the_queue_depths_but_no_node_or_model(
    stack: LocalStack, stack_env: dict[str, str]
) -> None:
    health_once_surveyed(api_url(stack_env))

    response = httpx.get(f"{api_url(stack_env)}/health", timeout=10)  # no key

    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["redis"] is True and health["worker"] == "wan"
    assert health["workers_answering"] == 3 and health["queues_without_workers"] == []
    assert set(health["queue_depths"]) == {"gpu", "enhance", "cpu", "platform"}
    assert 0 <= health["workers_checked_s_ago"] < 30
    assert "workers" not in health
    for private in (socket.gethostname(), stack_env["WAN_MODEL_PATH"], "@"):
        assert private not in response.text


def test_health_details_list_the_workers_and_their_queues_with_the_key_only(
    stack: LocalStack, stack_env: dict[str, str]
) -> None:
    details = health_once_surveyed(api_url(stack_env), "/health/details")
    without_key = httpx.get(f"{api_url(stack_env)}/health/details", timeout=10)

    queues = {queue for worker in details["workers"].values() for queue in worker["queues"]}
    assert queues == {"gpu", "enhance", "cpu", f"cpu.{socket.gethostname()}"}  # + WORKER_HOST's
    assert set(details["queue_depths"]) == {"gpu", "enhance", "cpu", "platform"}
    assert without_key.status_code == 401


def test_health_details_show_the_models_a_worker_loaded(
    stack: LocalStack,
    stack_env: dict[str, str],
    platform: LocalPlatform,
    platform_list: redis.Redis,
) -> None:
    # Given a finished enhanced job (WAN and Qwen both loaded by now)
    job = new_job("image7b_fast_enhanced")
    response = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    assert response.status_code == 202
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    models: dict[str, dict[str, Any]] = {}

    def both_loaded() -> bool:  # once the background survey has run since
        workers = httpx.get(f"{api_url(stack_env)}/health/details", headers=auth()).json()
        models.update({name: node["models"] for name, node in workers["workers"].items()})
        return {"wan_t2v", "qwen"} <= {model for node in models.values() for model in node}

    wait_until(both_loaded, timeout_s=JOB_TIMEOUT_S, what="/health/details shows both models")
    gpu = next(node for name, node in models.items() if name.startswith("gpu@"))
    enhance = next(node for name, node in models.items() if name.startswith("enhance@"))
    assert gpu["wan_t2v"]["path"] == stack_env["WAN_MODEL_PATH"]
    assert enhance["qwen"]["path"] == stack_env["QWEN_MODEL_PATH"]


def test_a_burst_of_health_checks_leaves_post_jobs_its_normal_time(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given an API whose workers never answer a broadcast (none on its Redis database)
    db = redis_server.db_url(10)
    redis.Redis.from_url(db).flushdb()
    try:
        with api_process(stack_env, tmp_path, REDIS_URL=db, PLATFORM_REDIS_URL=db) as api:
            alone = posts_during_health_burst(api, API_KEY, posts=5, burst=0)
            # When 200 /health requests come at once, and jobs are posted meanwhile
            burst = posts_during_health_burst(api, API_KEY, posts=5, deadline_s=10)
    finally:
        redis.Redis.from_url(db).flushdb()

    # Then each job is accepted in its normal time (milliseconds alone; the burst costs the
    # API CPU, never a wait), and each probe is answered within the platform's 5 s
    assert max(burst.posts_s) < 2.5, (alone.posts_s, burst.posts_s)
    assert burst.health_codes == [200] * HEALTH_BURST
    assert max(burst.health_s) < 5


def test_health_answers_503_with_the_reason_when_redis_is_down(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with api_process(stack_env, tmp_path, REDIS_URL=dead, PLATFORM_REDIS_URL=dead) as url:
        response = httpx.get(f"{url}/health", timeout=10)

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "Redis unreachable" in response.json()["reason"]


# -- auth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, auth("wrong-key"), {"Authorization": API_KEY}, auth(API_KEY + "x")]
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/enhance"), ("POST", "/jobs"), ("GET", "/jobs/abc"), ("GET", "/debug/env")],
)
def test_protected_endpoints_refuse_a_missing_or_wrong_key(
    stack: LocalStack, stack_env: dict[str, str], headers: dict, method: str, path: str
) -> None:
    response = httpx.request(
        method, api_url(stack_env) + path, json={"prompt": "a fox"}, headers=headers, timeout=10
    )

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_without_a_configured_key_protected_endpoints_answer_503(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in stack_env.items() if k != "WAN_WORKER_API_KEY"}
    with api_process(env, tmp_path) as url:
        enhance = httpx.post(f"{url}/enhance", json={"prompt": "a fox"}, headers=auth(), timeout=10)
        health = httpx.get(f"{url}/health", timeout=10)

    assert enhance.status_code == 503
    assert "WAN_WORKER_API_KEY is not set" in enhance.json()["detail"]
    assert health.status_code == 200


def test_an_empty_api_key_is_no_key(stack_env: dict[str, str], tmp_path: Path) -> None:
    # `WAN_WORKER_API_KEY=` in an env file: a request without Authorization must not pass
    with api_process(stack_env, tmp_path, WAN_WORKER_API_KEY="") as url:
        debug = httpx.get(f"{url}/debug/env", timeout=10)
        job = httpx.post(f"{url}/jobs", json=new_job(), timeout=10)

    assert (debug.status_code, job.status_code) == (503, 503)
    assert "WAN_WORKER_API_KEY is not set" in debug.json()["detail"]


def test_a_short_api_key_stops_the_api_naming_the_setting(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    env = stack_env | {"API_PORT": str(free_port()), "WAN_WORKER_API_KEY": "fifteen-chars.."}
    api = LocalStack(env, log_dir=tmp_path, names=("api",))

    try:
        with pytest.raises(RuntimeError, match="api exited with 2"):
            api.start(timeout_s=60)
    finally:
        api.stop()  # an API that did start (the check missing) is not left running

    assert "WAN_WORKER_API_KEY has 15 characters, at least 16" in api.log("api")
    assert "fifteen-chars.." not in api.log("api")


# -- /enhance ----------------------------------------------------------------------------


def test_enhance_answers_every_contract_field(stack: LocalStack, stack_env: dict[str, str]) -> None:
    from worker.local.tiny_qwen import ENHANCED_TEXT

    response = httpx.post(
        f"{api_url(stack_env)}/enhance",
        json={"prompt": "a heron fishing at dawn", "model": "qwen_base"},
        headers=auth(),
        timeout=60,
    )

    assert response.status_code == 200
    body = response.json()
    assert body | {"processing_time": 0} == {
        "success": True,
        "enhanced_prompt": ENHANCED_TEXT,
        "original_prompt": "a heron fishing at dawn",
        "enhancement_source": "qwen_base",
        "processing_time": 0,
        "model": "qwen_base",
        "enhancement_applied": True,
        "worker": "wan",
        "enhancement_cached": False,
        "enhancement_fallback_reason": None,
        "enhancement_fallback_detail": None,
    }
    assert body["processing_time"] > 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "a fox", "model": "qwen_instruct"}, "model"),
        ({"prompt": "a fox", "job_type": "video_ultra"}, "job_type"),
    ],
)
def test_enhance_refuses_a_bad_body_naming_the_field(
    stack: LocalStack, stack_env: dict[str, str], body: dict, field: str
) -> None:
    response = httpx.post(f"{api_url(stack_env)}/enhance", json=body, headers=auth(), timeout=10)

    assert response.status_code == 422
    assert [error["loc"][-1] for error in response.json()["detail"]] == [field]


# -- /jobs -------------------------------------------------------------------------------


def test_a_job_posted_over_http_runs_and_its_record_reads_back(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform
) -> None:
    job = new_job("video_fast")

    posted = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    wait_until(
        lambda: (
            httpx.get(f"{api_url(stack_env)}/jobs/{job['id']}", headers=auth()).json()["status"]
            == "completed"
        ),
        timeout_s=JOB_TIMEOUT_S,
        what="the record says completed",
    )
    view = httpx.get(f"{api_url(stack_env)}/jobs/{job['id']}", headers=auth(), timeout=10)

    assert posted.status_code == 202
    answer = posted.json()
    assert answer == {"job_id": job["id"], "status": "queued", "created": True,
                      "watch_token": answer["watch_token"]}  # fmt: skip
    assert final["status"] == "completed"
    record = view.json()
    assert record["job_id"] == job["id"] and record["job_type"] == "video_fast"
    assert record["error"] is None and record["seed"] == 7
    assert record["assets"] == [
        {
            "type": "video",
            "url": f"user-1/{job['id']}/0.mp4",
            "thumbnail_url": f"user-1/{job['id']}/0.thumb.webp",
        }
    ]
    stages = ["enhance", "generate", "encode", "thumbnail", "upload", "callback"]
    assert list(record["attempts"]) == stages and set(record["attempts"].values()) == {1}
    assert all(record["timings"][stage]["seconds"] >= 0 for stage in stages[:-1])


def test_the_same_job_posted_twice_starts_one_job(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform
) -> None:
    job = new_job("image_fast")

    first = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    second = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)

    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json()["created"] is False
    statuses = [c.body["status"] for c in platform.callbacks_for(job["id"])]
    assert statuses == ["processing", "completed"]


def test_a_job_a_dead_dispatcher_claimed_is_refused_until_its_claim_runs_out_then_runs_once(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform
) -> None:
    # Given a dispatcher claimed a job and died before sending it (its claim short here)
    job = new_job("image_fast")
    client = redis.Redis.from_url(stack_env["REDIS_URL"])
    dead = JobRecords(client, ttl_s=600, owner="dead-dispatcher", claim_lease_s=3)
    assert dead.claim(job["id"]) == "claimed"

    # When the job is posted while the claim runs: 409 with the seconds left, not `queued`
    refused = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    assert refused.status_code == 409
    assert 1 <= int(refused.headers["Retry-After"]) <= 3
    assert "may have died before sending it" in refused.json()["detail"]

    # Then posted again once the claim has run out, it is taken over and runs once
    answers: list[int] = []

    def answered_other_than_409() -> bool:
        post = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
        answers.append(post.status_code)
        return post.status_code != 409

    wait_until(answered_other_than_409, timeout_s=30, interval_s=0.5, what="the job taken")
    assert answers[-1] == 202
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    statuses = [c.body["status"] for c in platform.callbacks_for(job["id"])]
    assert statuses == ["processing", "completed"]


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        ({"config": {"frame_num": 1000}}, ["body", "config", "frame_num"], "1..961"),
        ({"prompt": None}, ["body", "prompt"], "required"),
        ({"type": "video_ultra"}, ["body", "type"], "unknown job type"),
        ({"user_id": "../etc"}, ["body", "user_id"], "letters, digits"),
    ],
)
def test_a_bad_job_body_is_refused_with_422_naming_the_field(
    stack: LocalStack, stack_env: dict[str, str], change: dict, loc: list, words: str
) -> None:
    response = httpx.post(
        f"{api_url(stack_env)}/jobs", json=new_job() | change, headers=auth(), timeout=10
    )

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc and words in error["msg"]


def test_an_unknown_job_is_404(stack: LocalStack, stack_env: dict[str, str]) -> None:
    response = httpx.get(f"{api_url(stack_env)}/jobs/no-such-job", headers=auth(), timeout=10)

    assert response.status_code == 404


# -- /jobs/{id}/events --------------------------------------------------------------------

#: EVENT_STREAM_MAX_S of the events API: past the few seconds a stream takes to end by itself.
STREAM_MAX_S = 6.0


@pytest.fixture(scope="module")
def events_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A Redis of its own, so the subscriptions on it are the events API's alone."""
    server = RedisServer(tmp_path_factory.mktemp("events-redis")).start()
    try:
        yield redis.Redis.from_url(server.url)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def events_api(
    stack_env: dict[str, str], events_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An API on that Redis, no workers: the tests write the job records themselves."""
    url = "redis://{host}:{port}/0".format(**events_redis.connection_pool.connection_kwargs)
    overrides = {"REDIS_URL": url, "PLATFORM_REDIS_URL": url,
                 "EVENT_STREAM_MAX_S": str(STREAM_MAX_S)}  # fmt: skip
    with api_process(stack_env, tmp_path_factory.mktemp("events-api"), **overrides) as api:
        yield api


def events_of(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The `data` of each event of an open stream, until the server ends it (10 s without a
    byte fail the test: the first ping comes after 15)."""
    assert response.status_code == 200
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line.removeprefix("data:"))


def open_stream(api: str, job_id: str) -> Any:
    return httpx.stream("GET", f"{api}/jobs/{job_id}/events", headers=auth(), timeout=10)


@pytest.mark.parametrize("waiting_on", [None, PLATFORM_QUEUE, f"{PLATFORM_QUEUE}:processing:h1"])
def test_events_of_a_job_nowhere_are_404_and_of_a_waiting_one_a_stream(
    events_api: str, events_redis: redis.Redis, waiting_on: str | None
) -> None:
    job = new_job()
    if waiting_on:  # on the platform list, or taken by a bridge and not yet recorded
        events_redis.rpush(waiting_on, queue_body(new_job()), queue_body(job, shape="array"))

    with open_stream(events_api, job["id"]) as response:
        if waiting_on is None:
            assert response.status_code == 404
            return
        snapshot = next(events_of(response))

    assert snapshot == snapshot | {"event": "snapshot", "job_id": job["id"], "status": None}


@pytest.mark.parametrize("final", ["completed", "failed", "cancelled", "delivery_failed"])
def test_a_job_already_final_when_its_stream_opens_ends_it_at_once(
    events_api: str, events_redis: redis.Redis, final: str
) -> None:
    # Given a record whose final callback is still retrying (or never went through)
    job_id = str(uuid.uuid4())
    JobRecords(events_redis, ttl_s=600).write(job_id, status=final)

    with open_stream(events_api, job_id) as response:
        events = list(events_of(response))

    assert [(e["event"], e["status"]) for e in events] == [("snapshot", final), ("final", final)]


@pytest.mark.parametrize("change", ["delivery_failed", "expired"])
def test_a_stream_ends_when_its_record_does_without_a_published_event(
    events_api: str, events_redis: redis.Redis, change: str
) -> None:
    records = JobRecords(events_redis, ttl_s=600)
    job_id = str(uuid.uuid4())
    records.write(job_id, status="processing", stage="callback")

    with open_stream(events_api, job_id) as response:
        stream = events_of(response)
        assert next(stream)["status"] == "processing"
        started = time.monotonic()
        if change == "delivery_failed":  # the final callback gave up: no `final` is published
            records.delivery_failed(job_id, stage="callback", error=RuntimeError("platform down"))
        else:
            events_redis.delete(records.key(job_id))
        rest = list(stream)
        ended_after = time.monotonic() - started

    assert ended_after < STREAM_MAX_S
    expected = [("final", "delivery_failed")] if change == "delivery_failed" else []
    assert [(e["event"], e["status"]) for e in rest] == expected


def test_a_stream_ends_after_its_maximum_lifetime(
    events_api: str, events_redis: redis.Redis
) -> None:
    job_id = str(uuid.uuid4())
    JobRecords(events_redis, ttl_s=600).write(job_id, status="processing", stage="generate")

    started = time.monotonic()
    with open_stream(events_api, job_id) as response:
        events = list(events_of(response))
    lasted = time.monotonic() - started

    assert [e["event"] for e in events] == ["snapshot"]
    assert STREAM_MAX_S - 0.5 <= lasted < STREAM_MAX_S + 5


def test_all_streams_share_one_subscription_connection(
    events_api: str, events_redis: redis.Redis
) -> None:
    records = JobRecords(events_redis, ttl_s=600)
    job_ids = [str(uuid.uuid4()) for _ in range(10)]
    for job_id in job_ids:
        records.write(job_id, status="processing", stage="generate")

    def subscribed() -> list[int]:
        return [int(c["sub"]) for c in events_redis.client_list() if int(c["sub"])]

    with ExitStack() as streams:
        opened = []
        for job_id in [*job_ids, job_ids[0]]:  # the first job watched twice
            stream = events_of(streams.enter_context(open_stream(events_api, job_id)))
            assert next(stream)["event"] == "snapshot"
            opened.append(stream)
        during = subscribed()
        final = {"event": "final", "job_id": job_ids[0], "status": "completed"}
        events_redis.publish(f"wan:progress:{job_ids[0]}", json.dumps(final))
        both = [next(opened[0]), next(opened[-1])]
    wait_until(lambda: not subscribed(), timeout_s=10, what="the channels unsubscribed")

    assert during == [10]  # one connection, one channel per job
    assert both == [final, final]


# -- /debug/env and `python -m worker config` ---------------------------------------------


def test_debug_env_says_which_settings_are_set_and_masks_url_credentials(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    password = "redis-pass-" + API_KEY[:8]
    url = f"redis://admin:{password}@127.0.0.1:{free_port()}/0"
    with api_process(stack_env, tmp_path, REDIS_URL=url) as api:
        response = httpx.get(f"{api}/debug/env", headers=auth(), timeout=10)

    settings = response.json()["settings"]
    assert settings["SUPABASE_SERVICE_KEY"] == "set"
    assert settings["JOB_CALLBACK_SECRET"] == "set"
    assert settings["WAN_WORKER_API_KEY"] == "set"
    assert settings["REDIS_URL"].startswith("redis://***@127.0.0.1:")
    for secret in (password, "admin", stack_env["SUPABASE_SERVICE_KEY"], API_KEY):
        assert secret not in response.text


# -- registration ------------------------------------------------------------------------


def test_registration_reaches_the_platform_once_after_health_answers(
    stack_env: dict[str, str], platform: LocalPlatform, tmp_path: Path
) -> None:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    before = len(platform.worker_url_updates)
    env = stack_env | {"API_PORT": str(port), "PUBLIC_URL": public_url}
    stack = LocalStack(env, log_dir=tmp_path, names=("api",)).start(timeout_s=60)
    try:
        wait_until(
            lambda: len(platform.worker_url_updates) > before, timeout_s=30, what="registration"
        )
        wait_until(lambda: "registered" in stack.log("api"), timeout_s=10, what="log line")
    finally:
        stack.stop()

    # The platform only accepts after its own GET {worker_url}/health answered 200.
    [update] = platform.worker_url_updates[before:]
    assert update.pop("timestamp")
    assert update == {
        "worker_url": public_url,
        "auto_registered": True,
        "registration_method": "wan_worker_self_registration",
        "detection_method": "PUBLIC_URL",
    }


def test_with_the_platform_down_the_api_still_serves(
    stack_env: dict[str, str], platform: LocalPlatform, tmp_path: Path
) -> None:
    platform.fail_next_registrations(1_000)
    try:
        with api_process(stack_env, tmp_path, RUNPOD_POD_ID="pod123") as url:
            wait_until(lambda: platform.rejected_registrations >= 2, timeout_s=30, what="retry")
            health = httpx.get(f"{url}/health", timeout=10)
    finally:
        platform.fail_next_registrations(0)

    assert health.status_code == 200


def test_a_stack_whose_api_cannot_start_leaves_none_of_its_processes_behind(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    # Given the API's port is taken, so the API exits while the bridge started fine
    marker = f"stack-{uuid.uuid4()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = stack_env | {"API_PORT": str(taken.getsockname()[1]), "STACK_MARKER": marker}
        local = LocalStack(env, log_dir=tmp_path, names=("bridge", "api"))

        # When the stack is started
        with pytest.raises(RuntimeError, match="api exited"):
            local.start(timeout_s=60)

    # Then the start failed naming the API, and no process of that stack is left running
    assert processes_with(marker) == []


def processes_with(marker: str) -> list[int]:
    """Pids of this user's processes whose environment holds `marker`."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids
