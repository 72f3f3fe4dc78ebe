"""The job page and the fleet page, as people open them: Debian's headless Chromium
(Playwright) against the real API of two simulated hosts.

The hosts run on Redis database 9 of their own: each has its own WORKER_HOST and spool, a
worker on `gpu,enhance` and a media worker; host A also runs the bridge and the HTTP API.
Previews come every PREVIEW_EVERY_S=0.2 s here, and the page's job pauses after its first
steps (WAN_TEST_FAULT), so the browser sees several previews on any machine. Chromium starts
once for the module.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import (
    API_KEY,
    ARTIFACTS,
    CHROMIUM_ARGS,
    JOB_TIMEOUT_S,
    auth,
    host_stacks,
    new_job,
    pauses,
)
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed"
)

HOSTS = ("host-a", "host-b")
QUEUE = "wan_queue_pages"
#: Jobs with this id prefix pause after each of their first denoising steps.
SHOWN = "shown-"
STEPS = 8
#: Milliseconds a browser check waits for what it expects.
BROWSER_WAIT_MS = JOB_TIMEOUT_S * 1000


@pytest.fixture(scope="module")
def envs(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, str]]:
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/9"
    shared = {
        "REDIS_URL": db,
        "PLATFORM_REDIS_URL": db,
        "PLATFORM_QUEUE": QUEUE,
        "PREVIEW_EVERY_S": "0.2",
        "WAN_TEST_FAULT": pauses(SHOWN, 0.5, range(1, STEPS)),
        "API_PORT": str(free_port()),
    }
    return {
        host: stack_env
        | shared
        | {"WORKER_HOST": host, "SPOOL_DIR": str(tmp_path_factory.mktemp(f"spool-{host}"))}
        for host in HOSTS
    }


@pytest.fixture(scope="module")
def api(envs: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Both hosts' workers, and host A's bridge and API (its URL)."""
    client = redis.Redis.from_url(envs["host-a"]["REDIS_URL"])
    client.flushdb()
    api = LocalStack(envs["host-a"], log_dir=tmp_path_factory.mktemp("logs-api"), names=("api",))
    try:
        with host_stacks(envs, tmp_path_factory, bridge_on="host-a"):
            api.start()
            yield f"http://127.0.0.1:{envs['host-a']['API_PORT']}"
    finally:
        api.stop()
        client.flushdb()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def post_job(api: str, job: dict) -> str:
    """POST the job; its watch token."""
    answer = httpx.post(f"{api}/jobs", json=job, headers=auth(), timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["watch_token"]


def test_the_job_page_shows_previews_changing_then_the_bar_at_100_and_the_loaded_video(
    api: str, browser, platform: LocalPlatform
) -> None:
    # Given a video job of 9 frames at 16 fps, posted over HTTP with its watch token
    job = new_job("video_fast", id=f"{SHOWN}{uuid.uuid4()}")
    job["config"]["num_inference_steps"] = STEPS
    token = post_job(api, job)
    previews: list[bytes] = []

    # When a browser opens its page while it runs
    page = browser.new_page()
    page.on("response", lambda r: previews.append(r.body()) if "/preview?" in r.url else None)
    opened = page.goto(f"{api}/ui/jobs/{job['id']}?token={token}")
    page.wait_for_function("document.getElementById('bar').value === 100",
                           timeout=BROWSER_WAIT_MS)  # fmt: skip
    page.wait_for_function("document.getElementById('result-video').readyState >= 2",
                           timeout=BROWSER_WAIT_MS)  # fmt: skip
    page.wait_for_function("document.getElementById('thumbnail').naturalWidth > 0",
                           timeout=BROWSER_WAIT_MS)  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "job-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    video = page.eval_on_selector("#result-video", "v => [v.duration, v.videoWidth]")
    text = page.inner_text("main")
    page.close()

    # Then the page showed the job, previews that changed as it denoised, the bar at 100 %,
    # a video that loaded (9 frames / 16 fps) and the thumbnail
    assert opened is not None and opened.status == 200
    assert "video_fast" in text and job["prompt"] in text and "completed" in text
    assert len(set(previews)) >= 2, f"{len(previews)} previews, {len(set(previews))} different"
    assert all(body[:4] == b"RIFF" and body[8:12] == b"WEBP" for body in previews)
    assert video[0] == pytest.approx(9 / 16, abs=0.1) and video[1] == 256
    assert "100.0 %" in text
    assert Path(screenshot).stat().st_size > 5_000
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"


def test_with_a_wrong_token_the_page_is_401_and_its_stream_sends_nothing(api: str, browser) -> None:
    # Given a job, and a token of another job
    job = new_job("image_fast")
    post_job(api, job)
    other = httpx.post(f"{api}/jobs/{uuid.uuid4()}/watch-token", headers=auth(), timeout=10)
    wrong = other.json()["watch_token"]

    # When a browser opens the job's page with it, and a client its stream
    page = browser.new_page()
    opened = page.goto(f"{api}/ui/jobs/{job['id']}?token={wrong}")
    body = page.content()
    page.close()
    with httpx.stream("GET", f"{api}/jobs/{job['id']}/events", params={"token": wrong},
                      timeout=10) as stream:  # fmt: skip
        streamed = stream.read()

    # Then both are refused, and nothing of the job shows
    assert opened is not None and opened.status == 401
    assert job["prompt"] not in body
    assert stream.status_code == 401 and b"data:" not in streamed
    assert API_KEY not in body
