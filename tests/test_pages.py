"""The job page and the fleet page, as people open them: Debian's headless Chromium
(Playwright) against the real API of two simulated hosts.

The hosts run on Redis database 9 of their own: each has its own WORKER_HOST and spool, a
worker on `gpu,enhance` and a media worker; host A also runs the bridge and the HTTP API.
Previews come every PREVIEW_EVERY_S=0.2 s here, and the page's job pauses after its first
steps (WAN_TEST_FAULT), so the browser sees several previews on any machine; `busy-` jobs
hold a generation worker at step 1 for HOLD_S, so the fleet test (the last, it leaves both
held) has a job waiting in its lane. Chromium starts once for the module.
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
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import JobRecords
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, free_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed"
)

HOSTS = ("host-a", "host-b")
QUEUE = "wan_queue_pages"
#: Jobs with this id prefix pause after each of their first denoising steps.
SHOWN = "shown-"
STEPS = 8
#: Jobs with this id prefix hold their generation worker after step 1 for HOLD_S seconds.
BUSY = "busy-"
HOLD_S = 120
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
        "WAN_TEST_FAULT": f"{pauses(SHOWN, 0.8, range(1, STEPS))};{pauses(BUSY, HOLD_S, [1])}",
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


def test_the_fleet_page_shows_both_hosts_workers_at_work_a_waiting_job_and_a_failed_jobs_error(
    api: str, browser, platform: LocalPlatform, envs: dict[str, dict[str, str]]
) -> None:
    client = redis.Redis.from_url(envs["host-a"]["REDIS_URL"])
    records = JobRecords(client, ttl_s=600)
    # Given a job that failed (a reference job on hosts without VACE), also dead-lettered
    failed = new_job("image_fast", metadata={"reference_image_url": "https://example.com/a.png"})
    post_job(api, failed)
    assert platform.wait_for_final(failed["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "failed"
    DeadLetters(client).add(failed["id"])
    # and both generation workers held mid-denoise by a job each, and a third job waiting
    busy = [new_job("video_fast", id=f"{BUSY}{uuid.uuid4()}") for _ in HOSTS]
    for job in busy:
        post_job(api, job)

    def generating(job_id: str) -> bool:
        return bool((records.get(job_id).value("progress") or {}).get("step"))

    wait_until(lambda: all(generating(job["id"]) for job in busy), timeout_s=JOB_TIMEOUT_S,
               what="both generation workers mid-denoise")  # fmt: skip
    waiting = new_job("image_fast")
    post_job(api, waiting)
    wait_until(
        lambda: 'wan_lane_waiting_jobs{lane="image"} 1.0' in httpx.get(f"{api}/metrics").text,
        timeout_s=JOB_TIMEOUT_S, what="the job waiting in the image lane",
    )  # fmt: skip
    wait_until(
        lambda: len(httpx.get(f"{api}/health/details", headers=auth()).json()["workers"]) == 4,
        timeout_s=JOB_TIMEOUT_S, what="the survey seeing both hosts' workers",
    )  # fmt: skip

    # When the on-call engineer opens the fleet page, and the waiting job's link
    refused = httpx.get(f"{api}/ui/", auth=("oncall", "not-the-key"), timeout=10)
    context = browser.new_context(http_credentials={"username": "oncall", "password": API_KEY})
    page = context.new_page()
    opened = page.goto(f"{api}/ui/")
    workers = dict(page.locator("#hosts tr.worker").evaluate_all(
        "rows => rows.map(row => [row.dataset.node, row.innerText])"
    ))  # fmt: skip
    lane = page.inner_text("#lanes tr[data-lane=image]")
    failed_row = page.inner_text(f"#jobs tr[data-job-id='{failed['id']}']")
    dead_row = page.inner_text(f"#dead tr[data-job-id='{failed['id']}']")
    page.screenshot(path=str(ARTIFACTS / "fleet-page.png"), full_page=True)
    page.click(f"#lanes a:has-text('{waiting['id']}')")
    job_page = page.inner_text("main")
    context.close()

    # Then it lists each host's workers, each generation worker at work on its held job
    assert refused.status_code == 401 and opened is not None and opened.status == 200
    assert set(workers) == {f"{name}@{host}" for name in ("gpu", "cpu") for host in HOSTS}
    held = {job["id"] for job in busy}
    on_gpus = {job_id for node, text in workers.items() if node.startswith("gpu@")
               for job_id in held if job_id in text}  # fmt: skip
    assert on_gpus == held
    assert all("generate" in workers[f"gpu@{host}"] for host in HOSTS)
    # the waiting job in the image lane, the failed job's error in the jobs and dead letters
    assert waiting["id"] in lane and lane.split()[:2] == ["image", "1"]
    for row in (failed_row, dead_row):
        assert "WAN_VACE_MODEL_PATH is not set" in row
    assert "failed" in failed_row
    # and its link opens the waiting job's page
    assert waiting["id"] in job_page and waiting["prompt"] in job_page
