"""One job's chain; task ids derive from the job id so Flower and the CLI can find them."""

from __future__ import annotations

from celery import chain
from celery.canvas import Signature

from tasks.enhance import enhance
from tasks.generate import generate
from tasks.media import callback, encode, thumbnail, upload


def stage_task_id(job_id: str, stage: str) -> str:
    return f"{job_id}:{stage}"


def build_chain(job_id: str) -> Signature:
    """`enhance -> generate -> encode -> thumbnail -> upload -> callback`; see celeryconfig."""
    stages = (enhance, generate, encode, thumbnail, upload, callback)
    return chain(task.si(job_id).set(task_id=stage_task_id(job_id, task.stage)) for task in stages)
