"""Each stage lands on its own queue only: the GPU never runs x264, the media worker never WAN."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import sent_job_ids

QUEUE_OF_STAGE = {
    "enhance": "enhance",
    "generate": "gpu",
    "encode": "cpu",
    "thumbnail": "cpu",
    "upload": "cpu",
    "callback": "cpu",
}


@pytest.mark.parametrize("stage", QUEUE_OF_STAGE)
def test_a_stage_is_sent_to_its_queue_and_no_other(idle_broker: redis.Redis, stage: str) -> None:
    from tasks import app

    # Given every queue is declared and bound, as the three workers do at start
    with app.connection_for_write() as connection:
        for queue in app.amqp.queues.values():
            queue(connection.default_channel).declare()

    app.tasks[f"wan.{stage}"].apply_async(("job-1",), task_id=f"job-1:{stage}")

    waiting = {queue: sent_job_ids(idle_broker, queue) for queue in ("gpu", "enhance", "cpu")}
    expected = {queue: [] for queue in waiting} | {QUEUE_OF_STAGE[stage]: ["job-1"]}
    assert waiting == expected


def test_the_chain_has_the_six_stages_in_order_with_ids_from_the_job() -> None:
    from tasks import build_chain

    tasks = build_chain("job-1").tasks

    assert [t.task for t in tasks] == [f"wan.{stage}" for stage in QUEUE_OF_STAGE]
    assert [t.options["task_id"] for t in tasks] == [f"job-1:{stage}" for stage in QUEUE_OF_STAGE]
