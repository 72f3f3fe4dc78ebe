"""Graceful shutdown: on SIGTERM a worker lets its running job finish for up to
SHUTDOWN_GRACE_S, then hands the job back to the queue and exits.

Celery's warm shutdown (SIGTERM) alone waits for running tasks without end, until the
platform's own grace runs out and SIGKILL comes (RunPod's pod stop, `docker stop`): the job
then waits for the broker's visibility timeout and counts as a delivery of a dead worker.
Here, once the grace has passed, the main process releases each running stage's lease,
noting `handed_back:<stage>` (the next start counts no delivery), and cancels the running
requests as Celery's cold shutdown does: the pool child is terminated and the message,
never acknowledged, goes back to the queue when the worker closes its broker connection.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import celeryd_after_setup, worker_shutting_down
from celery.worker import state

from worker.jobs.records import get_records, lease_owner
from worker.settings import get_settings

log = logging.getLogger(__name__)

#: This process's worker (the WorkController), once it is set up.
_worker: dict[str, Any] = {}


@celeryd_after_setup.connect
def remember_worker(instance: Any, **_: Any) -> None:
    _worker["controller"] = instance


@worker_shutting_down.connect
def hand_back_after_grace(how: str, **_: Any) -> None:
    """Sent in the main process when SIGTERM starts the warm shutdown."""
    controller = _worker.get("controller")
    if how != "Warm" or controller is None:
        return
    grace_s = get_settings().shutdown_grace_s
    log.warning("warm shutdown: running jobs have %g s to finish (SHUTDOWN_GRACE_S)", grace_s)
    timer = threading.Timer(grace_s, hand_back, args=(controller,))
    timer.daemon = True  # a worker whose jobs finished in time exits without waiting for it
    timer.start()


def hand_back(controller: Any) -> None:
    """Give every running job back to the queue: release its lease, stop its pool child."""
    records = get_records()
    for request in tuple(state.active_requests):
        stage = getattr(request.task, "stage", "")
        if stage and request.args and request.worker_pid:
            job_id = str(request.args[0])
            owner = lease_owner(request.worker_pid)
            records.release_stage(job_id, stage, owner=owner, note="handed_back")
            log.warning("job=%s stage %s handed back to the queue: SHUTDOWN_GRACE_S ran out",
                        job_id, stage)  # fmt: skip
    controller.consumer.cancel_active_requests()
