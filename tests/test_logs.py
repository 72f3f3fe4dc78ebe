"""Logs as the on-call engineer greps them: every line of a job in JSON with its job id."""

from __future__ import annotations

import json
import logging

import redis

from tests.conftest import JOB_TIMEOUT_S, new_job, push
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack, wait_until
from worker.observe import logs


def render(log_format: str, message: str, *args: object, **context: str) -> str:
    record = logging.LogRecord("worker.test", logging.INFO, __file__, 1, message, args, None)
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter(log_format))
    handler.addFilter(logs.JobContext())
    with logs.job_scope(**context) if context else logs.job_scope():
        handler.filter(record)
        return handler.format(record)


def test_a_json_line_carries_the_jobs_fields() -> None:
    line = json.loads(render("json", "stage %s started", "generate", job_id="j-1", stage="gen"))

    assert line["message"] == "stage generate started"
    assert (line["job_id"], line["stage"], line["level"]) == ("j-1", "gen", "INFO")
    assert "job" not in line


def test_celerys_own_lines_name_the_job_by_their_task_id() -> None:
    celery_args = {"name": "wan.encode", "id": "j-2:encode"}

    line = json.loads(render("json", "Task %(name)s[%(id)s] received", celery_args))

    assert (line["job_id"], line["stage"]) == ("j-2", "encode")


def test_a_task_of_no_job_logs_without_one() -> None:
    line = render("text", "enhancing a prompt", task_id="abc", worker="enhance@host")

    assert line.endswith("worker.test: enhancing a prompt")


def test_the_text_format_is_for_people() -> None:
    line = render("text", "stage started", job_id="j-3", stage="upload")

    assert "[job=j-3 upload]: stage started" in line


def test_every_line_of_a_job_is_json_with_its_job_id_and_one_summary_ends_it(
    stack: LocalStack, platform: LocalPlatform, platform_list: redis.Redis
) -> None:
    job = new_job("video_fast")
    push(platform_list, job)
    platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S)
    summary_line = f"job={job['id']} finished completed"
    wait_until(lambda: summary_line in stack.log("cpu"), timeout_s=JOB_TIMEOUT_S,
               what="the summary line")  # fmt: skip

    lines = [
        line
        for name in ("bridge", "enhance", "gpu", "cpu")
        for line in stack.log(name).splitlines()
        if job["id"] in line
    ]
    parsed = [json.loads(line) for line in lines]

    assert len(parsed) > 10
    assert all(entry["job_id"] == job["id"] for entry in parsed)
    stages = {entry.get("stage") for entry in parsed}
    assert {"bridge", "enhance", "generate", "encode", "thumbnail", "upload", "callback"} <= stages
    [summary] = [e["summary"] for e in parsed if "summary" in e]
    assert summary["status"] == "completed" and summary["job_type"] == "video_fast"
    assert summary["resolution"] == "256x256" and summary["frame_num"] == 9
    assert summary["fps"] == 16 and summary["file_size_bytes"] > 0
    assert set(summary["stage_seconds"]) >= {"generate", "encode", "upload"}
