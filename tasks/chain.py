"""One job's messages: its chain and its final callbacks, sent by task name.

By name (`app.signature("wan.generate", ...)`, routed by celeryconfig), not through the task
objects: a process that only sends (the bridge, the API, the CLI) imports no stage task, and
nothing here imports one, so no module of `tasks` or `worker` imports this one back in a
circle. `SENDER` is what the code that moves jobs (worker/flow/sender.py) is handed. Task ids
derive from the job id so Flower and the CLI can find them.
"""

from __future__ import annotations

from celery import chain
from celery.canvas import Signature

from tasks.app import app
from worker.jobs.records import STAGES, stage_task_id

#: The stage tasks' names (`@app.task(name=...)` in tasks/enhance.py, generate.py, media.py),
#: by the stage names records use, in chain order.
STAGE_TASK_NAMES = {stage: f"wan.{stage}" for stage in STAGES}


def build_chain(
    job_id: str, *, from_stage: str = STAGES[0], run: int = 0, priority: int | None = None
) -> Signature:
    """`enhance -> generate -> encode -> thumbnail -> upload -> callback`, or its tail from
    `from_stage` for a retry; routes in celeryconfig. The generate message carries the
    job's `priority` step (worker/flow/lanes.py), whichever stage sends it; None: kombu's 0."""
    stages = STAGES[STAGES.index(from_stage) :]
    return chain(
        app.signature(STAGE_TASK_NAMES[stage], (job_id,), immutable=True).set(
            task_id=stage_task_id(job_id, stage, run),
            **({"priority": priority} if stage == "generate" and priority is not None else {}),
        )
        for stage in stages
    )


class CelerySender:
    """The `Sender` (worker/flow/sender.py) of every process: messages on this app's broker."""

    def chain(
        self, job_id: str, *, from_stage: str = STAGES[0], run: int = 0, priority: int | None = None
    ) -> None:
        build_chain(job_id, from_stage=from_stage, run=run, priority=priority).apply_async()

    def final_callback(self, job_id: str, status: str, *, task_id: str) -> None:
        app.signature(STAGE_TASK_NAMES["callback"], (job_id, status)).apply_async(task_id=task_id)


SENDER = CelerySender()
