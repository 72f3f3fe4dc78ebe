"""Progress of one job, per stage and per denoising step, for everyone who watches it.

Each event goes out three ways: a Redis pub/sub message on `wan:progress:{job_id}` (the
API's Server-Sent Events stream), the job record's `progress` field (throttled; what a
late subscriber and GET /jobs/{id} read first), and, from inside a Celery task, the task's
custom `PROGRESS` state plus a `task-progress` event, so Flower shows it too. The event
carries the progress in one `progress` field: Celery's event state (and so Flower) sets every
field of an event as an attribute of its task, and a field named `event` replaced the
task's own `event` method, so the task never left PROGRESS when it succeeded or failed.

`percent` runs over the whole job: each stage owns a share (generation most of it) and
the denoising steps fill generation's share. `eta_seconds` comes from this job's own
measured step times; outside the denoising loop it is unknown (null).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from celery import Task

from worker.jobs.records import JobRecords

CHANNEL_PREFIX = "wan:progress:"
#: Share of the whole job per stage, in chain order; generation is nearly all of it.
STAGE_SHARES = {
    "enhance": 0.03,
    "generate": 0.85,
    "encode": 0.06,
    "thumbnail": 0.01,
    "upload": 0.04,
    "callback": 0.01,
}
#: The record's `progress` field is written at most this often (stage edges always).
RECORD_EVERY_S = 0.5
#: Progress callbacks to the platform: at most one per this many percent of the job.
CALLBACK_EVERY_PERCENT = 10.0

#: Posts a progress callback to the platform (best effort, must not block the GPU).
Notify = Callable[[dict[str, Any]], None]


def channel(job_id: str) -> str:
    return f"{CHANNEL_PREFIX}{job_id}"


def percent(stage: str, fraction: float) -> float:
    """Percent of the whole job done when `stage` is `fraction` done."""
    before = 0.0
    for name, share in STAGE_SHARES.items():
        if name == stage:
            return round(100 * (before + share * min(max(fraction, 0.0), 1.0)), 1)
        before += share
    return 0.0


class Progress:
    """Reports one job's progress; a reporter lives for one task run."""

    def __init__(
        self,
        records: JobRecords,
        job_id: str,
        *,
        task: Task | None = None,
        notify: Notify | None = None,
        notify_every_s: float = 5.0,
    ) -> None:
        self.records = records
        self.job_id = job_id
        self.task = task
        self.notify = notify
        self.notify_every_s = notify_every_s
        self._stage_started = time.monotonic()
        self._recorded_at = 0.0
        #: (percent, `at`) of the last callback: the spacing is measured on the timestamps
        #: the platform receives, so it holds there however long an event takes to publish.
        self._notified = (0.0, time.time())
        #: Why the step count started again (a run at a lower preset), on every later step.
        self._note: str | None = None
        #: Denoising steps reported since the stage (re)started: the ETA's mean step time.
        self._steps = 0

    def stage_started(self, stage: str) -> None:
        self._stage_started = time.monotonic()
        self._steps = 0
        self._emit({"event": "stage_started", "stage": stage, "percent": percent(stage, 0)})

    def step(self, stage: str, done: int, total: int, *, window: tuple[int, int] = (1, 1)) -> None:
        """After denoising step `done` of `total` of window `window[0]` of `window[1]` (a
        long video's, CONTRACT.md section 7; (1, 1) in one pass): percent over the whole
        job, the ETA from this run's mean step time (windows that ran before a resume do
        not count)."""
        number, windows = window
        self._steps += 1
        mean_step_s = (time.monotonic() - self._stage_started) / self._steps
        left = (windows - number) * total + total - done
        event = {
            "event": "step",
            "stage": stage,
            "step": done,
            "total_steps": total,
            "window": number,
            "windows": windows,
            "percent": percent(stage, ((number - 1) * total + done) / (windows * total)),
            "eta_seconds": round(mean_step_s * left, 2),
        }
        if self._note is not None:
            event["note"] = self._note
        sent = self._emit(event, edge=done == total)
        last_percent, last_at = self._notified
        due = (
            event["percent"] - last_percent >= CALLBACK_EVERY_PERCENT
            and sent["at"] - last_at >= self.notify_every_s
        )
        if self.notify is not None and due:
            self._notified = (event["percent"], sent["at"])
            self.notify({k: v for k, v in sent.items() if k != "event"})

    def stage_restarted(self, stage: str, note: str) -> None:
        """The stage runs again from its first step: the count and the ETA start over, and
        every later event says why, so a percent going back does not read as a fault."""
        self._note = note
        self._stage_started = time.monotonic()
        self._steps = 0
        self._emit({"event": "stage_restarted", "stage": stage, "percent": percent(stage, 0),
                    "note": note})  # fmt: skip

    def stage_finished(self, stage: str) -> None:
        self._emit({"event": "stage_finished", "stage": stage, "percent": percent(stage, 1)})

    def final(self, status: str) -> None:
        """The job's final status: the last event of its stream."""
        done = 100.0 if status == "completed" else None
        self._emit({"event": "final", "status": status, "percent": done})

    def _emit(self, event: dict[str, Any], *, edge: bool = True) -> dict[str, Any]:
        """Publish, record (throttled) and report to Celery; returns what was sent."""
        event = {"job_id": self.job_id, "eta_seconds": None, **event, "at": time.time()}
        self.records.redis.publish(channel(self.job_id), json.dumps(event))
        if edge or time.monotonic() - self._recorded_at >= RECORD_EVERY_S:
            self.records.update(self.job_id, progress=event)
            self._recorded_at = time.monotonic()
        if self.task is not None and self.task.request.id:
            self.task.update_state(state="PROGRESS", meta=event)
            self.task.send_event("task-progress", progress=event)
        return event
