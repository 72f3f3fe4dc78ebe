"""What sends a job's messages, as the code that moves jobs sees it: handed in, never imported.

The bridge, dispatch, cancel and retry, the outbox of final callbacks and the lost-job and
swallowed-message sweeps send chains and final callbacks, but never import `tasks` (the
Celery task objects, and through them the stages' heavy imports): whoever makes them hands
them a `Sender`. Production's is `tasks.chain.SENDER`, which sends by task name.
"""

from __future__ import annotations

from typing import Protocol


class Sender(Protocol):
    def chain(
        self, job_id: str, *, from_stage: str = ..., run: int = 0, priority: int | None = None
    ) -> None:
        """Send the job's chain from `from_stage` (default: the first stage) as run `run`;
        the generate message carries the `priority` step (worker/flow/lanes.py), None: kombu's 0."""

    def final_callback(self, job_id: str, status: str, *, task_id: str) -> None:
        """Queue the job's final callback of `status` on the media workers as task `task_id`
        (worker/flow/outbox.py sends it, once the record says it is due)."""
