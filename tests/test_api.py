"""The HTTP API as the platform and an operator use it: real uvicorn, real workers, real HTTP.

The session stack runs `python -m worker api` beside the workers; APIs that need other
settings (no key, a dead Redis, registration) run as processes of their own.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import API_KEY, JOB_TIMEOUT_S, api_url, auth, new_job
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, free_port, wait_until


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


def health_of_all(env: dict[str, str]) -> dict[str, Any]:
    """/health once every worker of the session stack has answered its broadcast in time
    (one second: a loaded machine can make a worker miss one)."""
    answers: list[dict[str, Any]] = []

    def all_answered() -> bool:
        response = httpx.get(f"{api_url(env)}/health", timeout=10)
        assert response.status_code == 200
        answers.append(response.json())
        return {name.split("@")[0] for name in answers[-1]["workers"]} >= {"gpu", "enhance", "cpu"}

    wait_until(all_answered, timeout_s=JOB_TIMEOUT_S, what="every worker answering /health")
    return answers[-1]


def test_health_lists_the_workers_their_queues_and_the_queue_depths(
    stack: LocalStack, stack_env: dict[str, str]
) -> None:
    health = health_of_all(stack_env)

    assert health["status"] == "ok" and health["redis"] is True and health["worker"] == "wan"
    queues = {queue for worker in health["workers"].values() for queue in worker["queues"]}
    assert queues == {"gpu", "enhance", "cpu", f"cpu.{socket.gethostname()}"}  # + WORKER_HOST's
    assert set(health["queue_depths"]) == {"gpu", "enhance", "cpu", "platform"}


def test_health_shows_the_models_a_worker_loaded(
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

    workers = health_of_all(stack_env)["workers"]

    models = {name: node["models"] for name, node in workers.items()}
    gpu = next(node for name, node in models.items() if name.startswith("gpu@"))
    enhance = next(node for name, node in models.items() if name.startswith("enhance@"))
    assert gpu["wan_t2v"]["path"] == stack_env["WAN_MODEL_PATH"]
    assert enhance["qwen"]["path"] == stack_env["QWEN_MODEL_PATH"]


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
    assert posted.json() == {"job_id": job["id"], "status": "queued", "created": True}
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


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        ({"config": {"frame_num": 500}}, ["body", "config", "frame_num"], "1..121"),
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
