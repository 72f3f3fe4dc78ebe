"""Watch tokens: a browser's key to one job's stream, preview and page, and nothing else."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import API_KEY, JOB_TIMEOUT_S, api_url, auth, new_job
from worker.api import watch
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, free_port

JOB = "3f1c2a9e-5b7d-4c1e-9a2b-7d4e5f6a7b8c"


def altered_tokens(token: str) -> list[str]:
    """The token with each one of its characters changed (expiry and signature alike)."""
    return [
        token[:i] + ("1" if char != "1" else "2") + token[i + 1 :]
        for i, char in enumerate(token)
        if char != "."
    ]


def test_a_token_is_good_for_its_job_until_it_expires() -> None:
    token = watch.issue(API_KEY, JOB, ttl_s=60, now=1_000)

    assert watch.valid(API_KEY, JOB, token, now=1_059)
    assert watch.expires_at(token) == 1_060
    assert not watch.valid(API_KEY, JOB, token, now=1_060)  # expired
    assert not watch.valid(API_KEY, "another-job", token, now=1_000)
    assert not watch.valid("another-key-of-16-chars", JOB, token, now=1_000)
    assert not any(watch.valid(API_KEY, JOB, t, now=1_000) for t in altered_tokens(token))
    assert not any(watch.valid(API_KEY, JOB, t, now=1_000) for t in ("", ".", "1060.", "x.y"))


@pytest.fixture(scope="module")
def posted(stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform) -> dict:
    """A job posted over HTTP, run to its end; its answer, with the watch token."""
    job = new_job("image_fast")
    answer = httpx.post(f"{api_url(stack_env)}/jobs", json=job, headers=auth(), timeout=10)
    assert answer.status_code == 202
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    return answer.json()


def test_post_jobs_answers_a_token_that_opens_the_jobs_stream(
    posted: dict, stack_env: dict[str, str]
) -> None:
    url = f"{api_url(stack_env)}/jobs/{posted['job_id']}/events"

    with httpx.stream("GET", url, params={"token": posted["watch_token"]}, timeout=30) as answer:
        body = answer.read().decode()

    assert answer.status_code == 200
    assert "event: snapshot" in body and "event: final" in body


def test_watch_token_endpoint_needs_the_key_and_issues_a_working_token(
    posted: dict, stack_env: dict[str, str]
) -> None:
    base, job_id = api_url(stack_env), posted["job_id"]

    refused = httpx.post(f"{base}/jobs/{job_id}/watch-token", timeout=10)
    issued = httpx.post(f"{base}/jobs/{job_id}/watch-token", headers=auth(), timeout=10).json()
    events = httpx.get(f"{base}/jobs/{job_id}/events", params={"token": issued["watch_token"]},
                       timeout=30)  # fmt: skip

    assert refused.status_code == 401
    assert issued["page_url"] == f"/ui/jobs/{job_id}?token={issued['watch_token']}"
    assert issued["expires_at"] == pytest.approx(time.time() + 7200, abs=60)  # UI_TOKEN_TTL_S
    assert events.status_code == 200


@pytest.mark.parametrize("path", ["/events", "/preview"])
def test_an_expired_other_jobs_or_altered_token_gets_401_and_nothing_streamed(
    posted: dict, stack_env: dict[str, str], path: str
) -> None:
    base, job_id = api_url(stack_env), posted["job_id"]
    other = httpx.post(f"{base}/jobs/{JOB}/watch-token", headers=auth(), timeout=10).json()
    expired = watch.issue(API_KEY, job_id, ttl_s=-1)
    one_byte_off = altered_tokens(posted["watch_token"])[-1]

    for token in (expired, other["watch_token"], one_byte_off):
        answer = httpx.get(f"{base}/jobs/{job_id}{path}", params={"token": token}, timeout=10)

        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"detail": "wrong or expired watch token for this job"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/{id}"),
        ("POST", "/jobs/{id}/cancel"),
        ("POST", "/jobs/{id}/retry"),
        ("POST", "/jobs/{id}/watch-token"),
        ("GET", "/health/details"),
        ("GET", "/debug/env"),
        ("POST", "/enhance"),
    ],
)
def test_a_watch_token_opens_nothing_but_watching(
    posted: dict, stack_env: dict[str, str], method: str, path: str
) -> None:
    url = api_url(stack_env) + path.format(id=posted["job_id"])

    answer = httpx.request(method, url, params={"token": posted["watch_token"]},
                           json={"prompt": "a fox"}, timeout=10)  # fmt: skip

    assert answer.status_code == 401


def test_an_allowed_origins_script_may_read_the_stream_with_a_token_and_no_other_origin(
    posted: dict, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given an API that lets the frontend's origin read (UI_ALLOWED_ORIGINS)
    frontend = "https://app.example.com"
    env = stack_env | {"API_PORT": str(free_port()), "UI_ALLOWED_ORIGINS": f"{frontend}, "}
    api = LocalStack(env, log_dir=tmp_path_factory.mktemp("cors-api"), names=("api",))
    url = f"http://127.0.0.1:{env['API_PORT']}/jobs/{posted['job_id']}/events"
    token = {"token": posted["watch_token"]}
    try:
        api.start(timeout_s=60)
        # When the frontend's script, and another site's, open the job's stream
        allowed = httpx.get(url, params=token, headers={"Origin": frontend}, timeout=30)
        other = httpx.get(url, params=token, headers={"Origin": "https://evil.example"},
                          timeout=30)  # fmt: skip
        asks_post = {"Origin": frontend, "Access-Control-Request-Method": "POST"}
        preflight = httpx.options(url, headers=asks_post, timeout=10)
    finally:
        api.stop()

    # Then the browser lets the frontend read it, the other site not; and only GET is allowed
    assert allowed.headers["access-control-allow-origin"] == frontend
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in other.headers
    assert preflight.status_code == 400
