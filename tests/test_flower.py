"""Flower, as the on-call engineer opens it: our tasks by stage name, with the job id, each
finished one as succeeded or failed with its runtime.

Flower runs with basic auth (as README recommends) against the session stack's Redis; a
real headless Chromium (Debian's, driven by Playwright) opens its tasks page.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import states

from tests.conftest import ARTIFACTS, CHROMIUM_ARGS, JOB_TIMEOUT_S, new_job, push
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, free_port, wait_until

STAGES = ("wan.enhance", "wan.generate", "wan.encode", "wan.thumbnail", "wan.upload")
#: A runtime as Flower's tasks page shows it ("16.46 ms", "2.31 s", "1m 05s"); empty: none.
DURATION = re.compile(r"\d+\.\d\d m?s|(\d+h )?\d+m \d\ds")


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
    """A job run while Flower listens to the workers' events.

    Flower says it is ready before its event consumer is connected: a first job seen by
    Flower proves it listens, so the second is seen whole.
    """
    url, credentials = flower
    client = redis.Redis.from_url(stack_env["REDIS_URL"])

    def seen(job_id: str) -> bool:
        tasks = httpx.get(f"{url}/api/tasks", auth=credentials, timeout=10).json()
        return any(task_id.startswith(job_id) for task_id in tasks)

    for _ in range(5):  # warm-up jobs until Flower has seen one
        warm_up = new_job("image_fast")
        push(client, warm_up)
        platform.wait_for_final(warm_up["id"], timeout_s=JOB_TIMEOUT_S)
        try:
            wait_until(lambda w=warm_up["id"]: seen(w), timeout_s=5, what="Flower sees events")
            break
        except TimeoutError:
            continue
    job = new_job("image_fast")
    push(client, job)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    return job["id"]


@pytest.fixture(scope="module")
def failed_job(finished_job: str, platform: LocalPlatform, stack_env: dict[str, str]) -> str:
    """A job that fails in generation (a reference job on a stack without VACE), sent once
    Flower listens (after `finished_job`)."""
    job = new_job("image_fast") | {"metadata": {"reference_image_url": "https://example.com/a.png"}}
    push(redis.Redis.from_url(stack_env["REDIS_URL"]), job)
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "failed"
    return job["id"]


def tasks_of(flower: tuple, job_id: str) -> dict[str, dict]:
    """Flower's view of one job's tasks (`/api/tasks`), by task id."""
    url, credentials = flower
    tasks = httpx.get(f"{url}/api/tasks", auth=credentials, timeout=10).json()
    return {task_id: task for task_id, task in tasks.items() if task_id.startswith(job_id)}


def settled_tasks(flower: tuple, job_id: str, last_stage: str) -> dict[str, dict]:
    """The job's tasks once Flower has seen `last_stage` and every task in a final state
    (events arrive a moment after the callback), or as they are after 30 s."""

    def settled() -> bool:
        tasks = tasks_of(flower, job_id)
        return f"{job_id}:{last_stage}" in tasks and all(
            task["state"] in states.READY_STATES for task in tasks.values()
        )

    try:
        wait_until(settled, timeout_s=30, what=f"Flower saw every task of {job_id} finish")
    except TimeoutError:
        pass  # the assertions below say which state each task was left in
    return tasks_of(flower, job_id)


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


def test_flower_shows_a_completed_jobs_tasks_succeeded_and_a_failed_jobs_stage_failed(
    flower: tuple, finished_job: str, failed_job: str
) -> None:
    # Given a job that completed and one that failed in generation, each having reported
    # its progress (task-progress events) as it ran

    # When Flower has seen their last tasks
    completed = settled_tasks(flower, finished_job, "upload")
    failed = settled_tasks(flower, failed_job, "generate")

    # Then every task of the completed job succeeded, with its runtime, and the failed
    # job's generation failed naming why: none is left in PROGRESS
    assert {task_id: task["state"] for task_id, task in completed.items()} == dict.fromkeys(
        completed, states.SUCCESS
    )
    assert all(task["runtime"] > 0 for task in completed.values())
    generate = failed[f"{failed_job}:generate"]
    assert generate["state"] == states.FAILURE
    assert "WAN_VACE_MODEL_PATH is not set" in generate["exception"]
    assert {task["state"] for task in failed.values()} <= {states.SUCCESS, states.FAILURE}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_a_browser_sees_our_stage_names_the_job_id_and_final_states_on_flowers_tasks_page(
    flower: tuple, finished_job: str, failed_job: str
) -> None:
    from playwright.sync_api import Page, sync_playwright

    url, (user, password) = flower
    settled_tasks(flower, finished_job, "upload")
    settled_tasks(flower, failed_job, "generate")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "flower-tasks.png"

    def rows_after_filter(page: Page, label: str, task_id: str) -> list[dict[str, str]]:
        """The rows the state filter `label` shows, once `task_id` is among them, by column."""
        page.get_by_role("button", name=label, exact=True).click()
        page.wait_for_selector(f"#tasks-table tbody tr:has-text('{task_id}')", timeout=30_000)
        columns = page.locator("#tasks-table thead th").evaluate_all(
            "cells => cells.map(cell => cell.dataset.column)"
        )
        cells = page.locator("#tasks-table tbody tr").evaluate_all(
            "rows => rows.map(row => [...row.cells].map(cell => cell.innerText.trim()))"
        )
        return [dict(zip(columns, row, strict=True)) for row in cells]

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
        succeeded = rows_after_filter(page, "Succeeded", f"{finished_job}:generate")
        failed = rows_after_filter(page, "Failed", f"{failed_job}:generate")
        browser.close()

    assert all(stage in text for stage in STAGES)
    assert f"{finished_job}:generate" in text
    assert Path(screenshot).stat().st_size > 10_000
    # The on-call engineer's Succeeded filter lists every stage of the completed job, each
    # with its runtime; the Failed filter lists the failed job's generation
    completed = [row for row in succeeded if row["uuid"].startswith(finished_job)]
    assert {row["name"] for row in completed} >= set(STAGES)
    assert all(row["state"] == states.SUCCESS for row in completed)
    assert all(DURATION.fullmatch(row["runtime"]) for row in completed)
    assert [row["uuid"] for row in failed if row["uuid"].startswith(failed_job)] == [
        f"{failed_job}:generate"
    ]
    assert {row["state"] for row in failed} == {states.FAILURE}
