"""Lost jobs: a running job whose worker or host is gone runs again elsewhere within
LOST_JOB_TIMEOUT_S, not after Redis's visibility timeout (an hour or more).

A job is lost when, for LOST_JOB_TIMEOUT_S:
- the lease of its running stage has not been renewed (the stage's owner was killed whole,
  or its host died): a live run renews it every third of STAGE_LEASE_S, however long the
  stage takes, so a healthy long generation is never lost;
- or its next media stage waits on `cpu.<host>` of a host with no live media worker (the
  host died after its generation, or between two media stages): nothing else consumes
  that queue, and the frames are gone with the host.

A lost job is sent again with fresh task ids (a new run, `retries` + 1), from generate when
its frames were on the lost host, else from its stage. The resend is one atomic step on the
record (`JobRecords.resend_lost`), so of several hosts sweeping at once one resends; it
counts a delivery of the restart stage, so MAX_DELIVERIES still caps a job that kills every
host it runs on. The old message, if Redis ever hands it out again, is skipped as
`superseded` before it does anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.errors import TooManyDeliveries
from worker.flow.job_control import RUNNING_STATUSES, give_up, run_again_fields, send_final_callback
from worker.flow.sender import Sender
from worker.jobs.records import SPOOL_STAGES, STAGES, JobRecord, JobRecords

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LostJob:
    """A job to send again, and why."""

    job_id: str
    #: The stage whose run is lost (the running stage, or the media stage no one consumes).
    stage: str
    #: Where the new run starts: generate if the frames were on the lost host.
    restart: str
    #: Who is gone: the lease owner (`hostname:pid`) or the host whose media queue it is.
    owner: str
    #: The WORKER_HOST that ran the stage or holds the frames ('' for an unsent resend).
    host: str
    #: Seconds since the owner last gave a sign of life.
    silent_s: float


def restart_stage(stage: str) -> str:
    """Media stages read frames from the spool of the host that made them: a new run on
    another host makes them again."""
    return "generate" if stage in SPOOL_STAGES else stage


def lost_stage(
    record: JobRecord,
    *,
    now: float,
    timeout_s: float,
    lease_s: float,
    media_hosts: dict[str, float],
) -> LostJob | None:
    """Whether this record's job is lost at `now` (Redis time), and where it runs again."""
    fields = record.fields
    stage = fields.get("stage", "")
    if record.status not in RUNNING_STATUSES:
        return None
    if stage == "" and "resend_pending" in fields:
        return _unsent_resend(record, now=now, timeout_s=timeout_s)
    if stage not in STAGES:
        return None  # not started yet: waiting in a queue is not lost
    owner = fields.get(f"lease:{stage}")
    if owner is not None:
        lease_until = float(fields[f"lease_until:{stage}"])
        renewed = lease_until - lease_s  # the last renewal (or the start) of the lease
        if now < max(lease_until, renewed + timeout_s):
            return None
        host = fields.get(f"host:{stage}", "")
        return LostJob(record.job_id, stage, restart_stage(stage), owner, host, now - renewed)
    media = _waiting_media_stage(fields, stage)
    frames_host = (record.value("generation") or {}).get("host")
    if media is None or frames_host is None:
        return None
    last_seen = media_hosts.get(frames_host, 0.0)
    waiting_since = max(float(fields.get(f"{k}:{stage}", 0)) for k in ("started", "finished"))
    silent_s = now - max(last_seen, waiting_since)
    if silent_s < timeout_s:
        return None
    return LostJob(record.job_id, media, "generate", f"cpu.{frames_host}", frames_host, silent_s)


def _unsent_resend(record: JobRecord, *, now: float, timeout_s: float) -> LostJob | None:
    """A resend claimed on the record whose chain its sweeper never noted as sent (it died,
    or Redis went away in between): sent again once that is LOST_JOB_TIMEOUT_S old. Had the
    chain gone out after all, its messages are superseded by the new run's."""
    fields = record.fields
    silent_s = now - float(fields["resend_pending"])
    if silent_s < timeout_s:
        return None
    restart = fields["retried_from"]
    return LostJob(record.job_id, restart, restart, "an unsent resend", "", silent_s)


def _waiting_media_stage(fields: dict[str, str], stage: str) -> str | None:
    """The media stage the job waits for with no run holding it: the next one after a
    finished stage, or a media stage that let go of its lease to retry later."""
    if f"finished:{stage}" not in fields:
        return stage if stage in SPOOL_STAGES else None
    later = STAGES[STAGES.index(stage) + 1 :]
    return later[0] if later and later[0] in SPOOL_STAGES else None


class LostJobSweep:
    """Finds lost jobs and sends them again through `sender`; one pass per call of `sweep`."""

    def __init__(
        self,
        records: JobRecords,
        *,
        sender: Sender,
        timeout_s: float,
        lease_s: float,
        max_deliveries: int,
    ) -> None:
        self.records = records
        self.sender = sender
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.max_deliveries = max_deliveries

    def find(self) -> list[tuple[JobRecord, LostJob]]:
        """Every lost job now, with its record as read."""
        now = self.records.now()
        media_hosts = self.records.media_hosts()
        found = []
        for record, _ in self.records.active():  # not every record: see ACTIVE_KEY
            lost = lost_stage(record, now=now, timeout_s=self.timeout_s, lease_s=self.lease_s,
                              media_hosts=media_hosts)  # fmt: skip
            if lost is not None:
                found.append((record, lost))
        return found

    def sweep(self) -> list[LostJob]:
        """Send every lost job again that no other sweeper took first; those sent."""
        sent = []
        for record, lost in self.find():
            if self.resend(record, lost):
                sent.append(lost)
        return sent

    def resend(self, record: JobRecord, lost: LostJob) -> bool:
        """Claim the resend on the record, then send the chain (or fail a job out of
        deliveries); False if another sweeper, or the job itself, moved on first."""
        forget = [f for f in run_again_fields(record, lost.restart) if f != "cancel_requested_at"]
        outcome, deliveries = self.records.resend_lost(
            record, stage=lost.stage, restart=lost.restart, forget=forget,
            max_deliveries=self.max_deliveries,
        )  # fmt: skip
        if outcome == "gone":
            return False
        on_host = f" on host {lost.host}" if lost.host else ""
        why = (
            f"job={lost.job_id} lost at stage {lost.stage}: {lost.owner}{on_host} "
            f"silent for {lost.silent_s:.0f} s (LOST_JOB_TIMEOUT_S={self.timeout_s:g})"
        )
        if outcome == "too_many":
            error = TooManyDeliveries.of(lost.restart, deliveries, self.max_deliveries)
            log.error("%s; not sent again: %s", why, error)
            self.records.fail(lost.job_id, stage=lost.restart, error=error)
            give_up(self.records, lost.job_id)
            send_final_callback(lost.job_id, "failed", sender=self.sender, records=self.records)
            return True
        run = int(record.fields.get("retries", "0")) + 1
        log.warning("%s; sent again from %s (run %d, delivery %d)", why, lost.restart, run,
                    deliveries)  # fmt: skip
        self.sender.chain(lost.job_id, from_stage=lost.restart, run=run)
        self.records.resend_sent(lost.job_id)
        return True
