"""Cancel and retry through real workers, by HTTP and by `celery -A tasks jobs ...`.

A stack of its own on Redis database 8 (one worker on `gpu,enhance`, the media worker and
the HTTP API), so the dead letters and the job list hold only this module's jobs, and a job
that runs keeps the next one queued (one pool child for enhance and generate).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, api_url, auth, new_job, pauses
from tests.test_metrics import scrape
from worker.errors import JobCancelled
from worker.jobs import dead_letters
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.model import parse_job
from worker.jobs.records import STAGES, JobRecord, JobRecords
from worker.local.platform import LocalPlatform
from worker.local.stack import ROOT, LocalStack, free_port, wait_until
from worker.settings import Settings

#: Denoising steps of a job meant to be cancelled, each paused for PACE_S (`LONG`), so it
#: runs past any cancel (a `celery ... cancel` takes seconds to start) on any machine.
LONG_STEPS = 100
LONG = "long-"
PACE_S = 0.3


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    db = stack_env["REDIS_URL"].removesuffix("/0") + "/8"
    return stack_env | {
        "REDIS_URL": db,
        "PLATFORM_REDIS_URL": db,
        "API_PORT": str(free_port()),
        "SPOOL_DIR": str(tmp_path_factory.mktemp("control-spool")),
        "WAN_TEST_FAULT": pauses(LONG, PACE_S, range(1, LONG_STEPS)),
    }


@pytest.fixture(scope="module")
def control_stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushdb()
    log_dir = tmp_path_factory.mktemp("control-logs")
    with LocalStack(env, log_dir=log_dir, names=("gpu+enhance", "cpu", "api")):
        yield
    client.flushdb()


@pytest.fixture
def client(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["REDIS_URL"])


def long_job() -> dict[str, Any]:
    job = new_job("video_fast", id=f"{LONG}{uuid.uuid4()}")
    job["config"] |= {"num_inference_steps": LONG_STEPS}
    return job


def post(env: dict[str, str], job: dict[str, Any]) -> None:
    response = httpx.post(f"{api_url(env)}/jobs", json=job, headers=auth(), timeout=10)
    assert response.status_code == 202, response.text


def api(env: dict[str, str], job_id: str, action: str, **body: Any) -> httpx.Response:
    url = f"{api_url(env)}/jobs/{job_id}/{action}"
    return httpx.post(url, json=body or None, headers=auth(), timeout=10)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`celery -A tasks jobs ...` as an operator types it, against this module's Redis."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "jobs", *args],
        cwd=ROOT, env=env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def record(client: redis.Redis, job_id: str) -> JobRecord:
    return JobRecords(client, ttl_s=3600).get(job_id)


def wait_for_step(client: redis.Redis, job_id: str) -> None:
    wait_until(
        lambda: (record(client, job_id).value("progress") or {}).get("step", 0) >= 1,
        timeout_s=JOB_TIMEOUT_S,
        what=f"a denoising step of {job_id}",
    )


def uploads_of(platform: LocalPlatform, job_id: str) -> list[str]:
    return [upload.path for upload in platform.uploads if job_id in upload.path]


def statuses(platform: LocalPlatform, job_id: str) -> list[str]:
    return [callback.body["status"] for callback in platform.callbacks_for(job_id)]


def test_a_step_hook_that_raises_stops_the_pipeline_before_the_vae_decode(
    tiny_wan: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers' cancel relies on this: the generate task's step hook raises JobCancelled.
    from worker.generation import Pipelines, generate

    pipelines = Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))
    vae = pipelines.t2v.vae
    decodes = []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *a, **kw: decodes.append(1) or decode(*a, **kw))
    job = parse_job(new_job("video_fast") | {"id": "job-1"})
    steps: list[int] = []

    def cancel_at_2(done: int, total: int) -> None:
        steps.append(done)
        if done == 2:
            raise JobCancelled("job job-1 was cancelled")

    generate(pipelines, job.model_copy(update={"steps": 1}), seed=1, references={})
    assert decodes == [1]  # a run to the end decodes once
    with pytest.raises(JobCancelled):
        generate(pipelines, job.model_copy(update={"steps": 4}), seed=1, references={},
                 on_step=cancel_at_2)  # fmt: skip
    assert steps == [1, 2] and decodes == [1]


@pytest.mark.parametrize("by", ["cli", "api"])
def test_a_job_cancelled_mid_denoise_stops_before_the_vae_decode(
    control_stack: None,
    env: dict[str, str],
    client: redis.Redis,
    platform: LocalPlatform,
    by: str,
) -> None:
    # Given a job in the middle of its denoising loop
    job = long_job()
    post(env, job)
    wait_for_step(client, job["id"])

    # When it is cancelled
    if by == "cli":
        done = cli(env, "cancel", job["id"])
        assert done.returncode == 0, done.stderr
        assert "will stop at its next step" in done.stdout
    else:
        response = api(env, job["id"], "cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "processing"

    # Then the platform hears `cancelled` once, after `processing`, and no file arrives
    final = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body
    assert final["status"] == "cancelled" and final["assets"] == []
    assert final["metadata"]["cancelled_stage"] == "generate"
    assert 1 <= final["metadata"]["progress"]["step"] < LONG_STEPS
    assert statuses(platform, job["id"]) == ["processing", "cancelled"]
    assert uploads_of(platform, job["id"]) == []
    # And the pipeline never returned frames: no VAE decode, nothing written to the spool
    stopped = record(client, job["id"])
    assert stopped.status == "cancelled"
    assert "generation" not in stopped.fields and "finished:generate" not in stopped.fields
    assert not (Path(env["SPOOL_DIR"]) / job["id"]).exists()


def test_a_queued_job_is_cancelled_at_once_never_starts_and_can_be_retried(
    control_stack: None,
    env: dict[str, str],
    client: redis.Redis,
    platform: LocalPlatform,
) -> None:
    # Given a job queued behind a running one (the one pool child is busy)
    running, queued = long_job(), new_job("image_fast")
    cancellations = ("wan_cancellations_total", ())
    before = scrape(env).get(cancellations, 0)
    post(env, running)
    wait_for_step(client, running["id"])
    post(env, queued)

    # When the queued one is cancelled
    response = api(env, queued["id"], "cancel")

    # Then its `cancelled` callback comes at once, while the job ahead still runs
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    final = platform.wait_for_final(queued["id"], timeout_s=JOB_TIMEOUT_S).body
    assert final["status"] == "cancelled"
    assert final["metadata"]["cancelled_stage"] == "queued"
    assert record(client, running["id"]).status == "processing"
    # And once its stage comes up (the job ahead cancelled too), it stops before any work
    assert cli(env, "cancel", running["id"]).returncode == 0
    wait_until(
        lambda: "started:enhance" in record(client, queued["id"]).fields,
        timeout_s=JOB_TIMEOUT_S,
        what="the queued job's first stage comes up",
    )
    wait_until(
        lambda: (
            record(client, running["id"]).status == "cancelled"
            and "finished:enhance" not in record(client, queued["id"]).fields
        ),
        timeout_s=JOB_TIMEOUT_S,
        what="both jobs stop",
    )
    assert statuses(platform, queued["id"]) == ["cancelled"]
    assert "started:generate" not in record(client, queued["id"]).fields
    assert uploads_of(platform, queued["id"]) == []
    # (the running job's cancellation is counted just after its record says cancelled)
    wait_until(lambda: scrape(env).get(cancellations) == before + 2, timeout_s=JOB_TIMEOUT_S,
               what="both cancellations counted")  # fmt: skip

    # When the cancelled job is sent again, it runs to the end
    retried = api(env, queued["id"], "retry")
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    done = platform.wait_for_callback(queued["id"], "completed", timeout_s=JOB_TIMEOUT_S).body
    assert done["assets"][0]["url"] == f"user-1/{queued['id']}/0.png"
    assert statuses(platform, queued["id"]) == ["cancelled", "processing", "completed"]
    # And a completed job can be neither cancelled nor retried without force
    wait_until(
        lambda: record(client, queued["id"]).status == "completed",
        timeout_s=JOB_TIMEOUT_S,
        what="record",
    )
    assert api(env, queued["id"], "cancel").status_code == 409
    refused = api(env, queued["id"], "retry")
    assert refused.status_code == 409 and "completed" in refused.json()["detail"]
    assert api(env, "no-such-job", "cancel").status_code == 404


def test_the_jobs_cli_lists_shows_retries_and_keeps_the_dead_letters(
    control_stack: None,
    env: dict[str, str],
    client: redis.Redis,
    platform: LocalPlatform,
) -> None:
    # Given a job that failed for good (storage refused its upload with a 400) and was
    # dead-lettered
    job = new_job("image_fast")
    platform.fail_next_uploads(1, status=400)
    post(env, job)
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "failed"
    # (the record says `failed` before the callback; the callback task notes it just after)
    wait_until(lambda: "callback_sent:failed" in record(client, job["id"]).fields,
               timeout_s=JOB_TIMEOUT_S, what="record")  # fmt: skip
    DeadLetters(client).add(job["id"])

    # list: newest first, filtered by status, limited
    newest = json.loads(cli(env, "list", "--limit", "1", "--json").stdout)
    failed = json.loads(cli(env, "list", "--status", "failed", "--json").stdout)
    completed = json.loads(cli(env, "list", "--status", "completed", "--json").stdout)
    assert [row["job_id"] for row in newest] == [job["id"]]
    assert newest[0]["status"] == "failed" and "HTTP 400" in newest[0]["error"]
    assert [row["job_id"] for row in failed] == [job["id"]]
    assert job["id"] not in {row["job_id"] for row in completed}
    # show: the stage that failed, deliveries per stage, the callbacks the platform took
    shown = json.loads(cli(env, "show", job["id"], "--json").stdout)
    assert shown["error"]["stage"] == "upload" and shown["error"]["type"] == "DeliveryRejected"
    assert shown["attempts"] == dict.fromkeys(STAGES, 1)  # `callback`: the failed one
    assert set(shown["callbacks"]) == {"processing", "failed"}
    table = cli(env, "show", job["id"]).stdout
    assert job["id"] in table and "DeliveryRejected" in table and "upload" in table
    # dead: the dead letters with what their records say
    [dead] = json.loads(cli(env, "dead", "--json").stdout)
    assert dead["job_id"] == job["id"] and dead["status"] == "failed" and dead["dead_at"] > 0

    # retry: from the stage the spool still allows (generate), and the job completes
    retried = cli(env, "retry", job["id"])
    assert retried.returncode == 0, retried.stderr
    assert "sent again from generate" in retried.stdout
    completed_body = platform.wait_for_callback(job["id"], "completed", timeout_s=JOB_TIMEOUT_S)
    assert platform.upload_at("workspace-temp", completed_body.body["assets"][0]["url"])
    wait_until(lambda: record(client, job["id"]).status == "completed", timeout_s=JOB_TIMEOUT_S,
               what="record")  # fmt: skip
    shown = json.loads(cli(env, "show", job["id"], "--json").stdout)
    assert shown["retries"] == 1 and shown["error"] is None
    assert shown["attempts"] == dict.fromkeys(STAGES, 1)  # counted afresh from generate
    assert json.loads(cli(env, "dead", "--json").stdout) == []

    # exit codes: 2 refused (a completed job), 1 no such job
    assert cli(env, "retry", job["id"]).returncode == 2
    refused = cli(env, "cancel", job["id"], "--json")
    assert refused.returncode == 2 and json.loads(refused.stdout)["outcome"] == "refused"
    assert cli(env, "show", "no-such-job").returncode == 1
    assert cli(env, "retry", "no-such-job").returncode == 1

    # purge-dead: entries dead longer than the given time, then all
    client.zadd(dead_letters.KEY, {"dead-two-days": time.time() - 2 * 86_400})
    DeadLetters(client).add("dead-just-now")
    purged = cli(env, "purge-dead", "--older-than", "1d", "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert [row["job_id"] for row in json.loads(cli(env, "dead", "--json").stdout)] == [
        "dead-just-now"
    ]
    assert "1 dead letter purged" in cli(env, "purge-dead").stdout
    assert DeadLetters(client).list() == []
