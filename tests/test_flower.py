"""Flower, as the on-call engineer opens it: our tasks by stage name, with the job id.

Flower runs with basic auth (as README recommends) against the session stack's Redis; a
real headless Chromium (Debian's, driven by Playwright) opens its tasks page.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, new_job, push
from worker.local.platform import LocalPlatform
from worker.local.stack import ROOT, LocalStack, free_port, wait_until

STAGES = ("wan.enhance", "wan.generate", "wan.encode", "wan.thumbnail", "wan.upload")
#: Where the browser's screenshot is kept after the run (ignored by git).
ARTIFACTS = ROOT / ".artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def flower(
    stack: LocalStack, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, tuple[str, str]]]:
    port = free_port()
    env = stack_env | {
        "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_PORT": str(port),
        "FLOWER_BASIC_AUTH": "oncall:flower-test-password",
    }
    process = LocalStack(env, log_dir=tmp_path_factory.mktemp("flower"), names=("flower",))
    process.start(timeout_s=60)
    yield f"http://127.0.0.1:{port}", ("oncall", "flower-test-password")
    process.stop()


@pytest.fixture(scope="module")
def finished_job(flower: tuple, platform: LocalPlatform, stack_env: dict[str, str]) -> str:
    """A job run while Flower listens to the workers' events."""
    job = new_job("image_fast")
    push(redis.Redis.from_url(stack_env["REDIS_URL"]), job)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    return job["id"]


def test_flower_refuses_without_its_password(flower: tuple) -> None:
    url, _ = flower

    assert httpx.get(f"{url}/api/tasks", timeout=10).status_code == 401


def test_flowers_api_lists_every_stage_of_a_job_by_name_and_job_id(
    flower: tuple, finished_job: str
) -> None:
    url, credentials = flower

    def tasks() -> dict:
        return httpx.get(f"{url}/api/tasks", auth=credentials, timeout=10).json()

    wait_until(lambda: f"{finished_job}:upload" in tasks(), timeout_s=30, what="Flower saw the job")
    ours = {task_id: task for task_id, task in tasks().items() if task_id.startswith(finished_job)}

    assert {task["name"] for task in ours.values()} >= set(STAGES)
    for task_id, task in ours.items():
        assert task_id == f"{finished_job}:{task['name'].removeprefix('wan.')}"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_a_browser_sees_our_stage_names_and_the_job_id_on_flowers_tasks_page(
    flower: tuple, finished_job: str
) -> None:
    from playwright.sync_api import sync_playwright

    url, (user, password) = flower
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "flower-tasks.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        page = browser.new_context(
            http_credentials={"username": user, "password": password}
        ).new_page()
        page.goto(f"{url}/tasks", wait_until="networkidle")
        page.wait_for_selector(f"text={finished_job}:generate", timeout=30_000)
        text = page.inner_text("body")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()

    assert all(stage in text for stage in STAGES)
    assert f"{finished_job}:generate" in text
    assert Path(screenshot).stat().st_size > 10_000
