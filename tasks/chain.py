"""One job's chain; task ids derive from the job id so Flower and the CLI can find them."""

from __future__ import annotations

from celery import chain
from celery.canvas import Signature

from tasks.enhance import enhance
from tasks.generate import generate
from tasks.media import callback, encode, thumbnail, upload
from worker.records import STAGES, stage_task_id

#: The stage tasks in chain order, by the names records use.
STAGE_TASKS = {
    task.stage: task for task in (enhance, generate, encode, thumbnail, upload, callback)
}


def build_chain(
    job_id: str, *, from_stage: str = STAGES[0], run: int = 0, priority: int | None = None
) -> Signature:
    """`enhance -> generate -> encode -> thumbnail -> upload -> callback`, or its tail from
    `from_stage` for a retry; routes in celeryconfig. The generate message carries the
    job's `priority` step (worker/lanes.py), whichever stage sends it; None: kombu's 0."""
    stages = STAGES[STAGES.index(from_stage) :]
    return chain(
        STAGE_TASKS[stage]
        .si(job_id)
        .set(
            task_id=stage_task_id(job_id, stage, run),
            **({"priority": priority} if stage == "generate" and priority is not None else {}),
        )
        for stage in stages
    )
