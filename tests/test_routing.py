"""Each stage lands on its own queue only: the GPU never runs x264, the media worker never WAN,
and a job's spool stages go to the media queue of the host whose spool holds its frames."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import sent_job_ids
from worker.errors import FramesMissing
from worker.jobs.records import JobRecords, get_records
from worker.local.stack import RedisServer
from worker.settings import get_settings

QUEUE_OF_STAGE = {
    "enhance": "enhance",
    "generate": "gpu",
    "encode": "cpu",
    "thumbnail": "cpu",
    "upload": "cpu",
    "callback": "cpu",
}
SPOOL_STAGES = ("encode", "thumbnail", "upload")
QUEUES = ("gpu", "enhance", "cpu", "cpu.host-a", "cpu.host-b")


@pytest.fixture
def records(
    idle_broker: redis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[JobRecords]:
    """This process's job records in the idle broker's database, where the router reads them;
    this process runs as host-a."""
    monkeypatch.setenv("REDIS_URL", redis_server.url.removesuffix("/0") + "/1")
    monkeypatch.setenv("WORKER_HOST", "host-a")
    get_settings.cache_clear()
    get_records.cache_clear()
    yield get_records()
    get_settings.cache_clear()
    get_records.cache_clear()


def send(stage: str, job_id: str) -> dict[str, list[str]]:
    """Send one stage of a job, as the stage before it does; what waits on each queue."""
    from tasks import app

    # Every queue is declared and bound, as the workers do at start
    with app.connection_for_write() as connection:
        for queue in app.amqp.queues.values():
            queue(connection.default_channel).declare()
    app.tasks[f"wan.{stage}"].apply_async((job_id,), task_id=f"{job_id}:{stage}")
    return {queue: sent_job_ids(get_records().redis, queue) for queue in QUEUES}


@pytest.mark.parametrize("stage", QUEUE_OF_STAGE)
def test_a_stage_is_sent_to_its_queue_and_no_other(records: JobRecords, stage: str) -> None:
    # Given a job with no frames anywhere yet
    waiting = send(stage, "job-1")

    expected = {queue: [] for queue in QUEUES} | {QUEUE_OF_STAGE[stage]: ["job-1"]}
    assert waiting == expected


@pytest.mark.parametrize("stage", QUEUE_OF_STAGE)
def test_a_spool_stage_goes_to_the_host_holding_the_frames_and_the_callback_to_any(
    records: JobRecords, stage: str
) -> None:
    # Given a job whose frames host-b generated into its spool
    records.update("job-1", generation={"frames_path": "/spool/job-1/frames.npy", "host": "host-b"})

    # When a stage of it is sent (the chain's next stage, or an operator's retry from it)
    waiting = send(stage, "job-1")

    # Then encode, thumbnail and upload wait on host-b's media queue only; the rest as before
    queue = "cpu.host-b" if stage in SPOOL_STAGES else QUEUE_OF_STAGE[stage]
    assert waiting == {name: [] for name in QUEUES} | {queue: ["job-1"]}


def test_a_media_stage_finding_no_frames_in_its_spool_fails_naming_both_hosts(
    records: JobRecords, tmp_path: Path
) -> None:
    from tasks.media import _frames

    # Given a job whose frames host-b wrote, and are not here (or were freed since)
    frames = tmp_path / "job-1" / "frames.npy"
    records.update("job-1", generation={"frames_path": str(frames), "host": "host-b"})

    # When a media stage on host-a reads them, then it fails saying where they were
    with pytest.raises(FramesMissing) as failed:
        _frames("job-1")
    assert str(failed.value) == (
        f"the frames of job job-1 are not in the spool of host host-a ({frames}); "
        "they were written by host host-b: retry the job from generate"
    )


def test_the_chain_has_the_six_stages_in_order_with_ids_from_the_job() -> None:
    from tasks import build_chain

    tasks = build_chain("job-1").tasks

    assert [t.task for t in tasks] == [f"wan.{stage}" for stage in QUEUE_OF_STAGE]
    assert [t.options["task_id"] for t in tasks] == [f"job-1:{stage}" for stage in QUEUE_OF_STAGE]


def test_each_stage_is_sent_by_the_name_of_its_own_task() -> None:
    from tasks import app
    from tasks.chain import STAGE_TASK_NAMES

    # The chain and the final callbacks are sent by task name (tasks/chain.py): each name
    # must be a registered task, and the task of the stage it is sent for
    assert {stage: app.tasks[name].stage for stage, name in STAGE_TASK_NAMES.items()} == {
        stage: stage for stage in STAGE_TASK_NAMES
    }
