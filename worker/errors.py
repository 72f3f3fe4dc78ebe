"""A small error tree, sorted by how the system reacts to each error."""

from __future__ import annotations


class JobError(Exception):
    """Base of the project's own errors."""


class TransientError(JobError):
    """Network trouble, 429 or 5xx: retried with backoff."""


class InvalidJob(JobError):
    """Bad input: the job fails at once with a message naming the field; never retried."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedMode(JobError):
    """The job asks for a mode this worker cannot run: it fails, naming what is missing."""


class ModelNotConfigured(JobError):
    """A model path setting is unset or points nowhere."""


class MediaCheckFailed(JobError):
    """A produced file is not what it claims to be: never uploaded."""


class ReferenceUnusable(JobError):
    """A reference image refused, missing or undecodable for good: the job runs text-only."""


class JobCancelled(JobError):
    """The job was cancelled: it stops where it is and reports `cancelled`; never retried."""


class RunSuperseded(JobError):
    """This run of a stage no longer owns its job (the job was sent again as a new run, or
    the stage's lease was taken over while this host was cut off): it stops, writing and
    reporting nothing (worker/jobs/fencing.py)."""


class StageTimedOut(JobError):
    """A stage ran past its soft time limit: the job fails naming the stage, limit and setting."""


class FramesMissing(JobError):
    """A media stage found no frames in this host's spool (freed, or written on another
    host): the job fails naming both hosts; a retry from generate makes them again."""


class OutOfGpuMemory(JobError):
    """Generation ran out of GPU memory at every preset it was allowed to try."""


class TooManyDeliveries(JobError):
    """A stage whose worker died under it MAX_DELIVERIES times (a poison job): failed and
    dead-lettered instead of killing every worker that takes it."""

    @classmethod
    def of(cls, stage: str, deliveries: int, max_deliveries: int) -> TooManyDeliveries:
        """Built from its message alone, so Celery can pickle it back and forth."""
        return cls(
            f"{stage} was delivered {deliveries} times (MAX_DELIVERIES={max_deliveries}): "
            "its worker died each time"
        )


class DeliveryRejected(JobError):
    """The platform refused a request for good (a 3xx or a 4xx other than 429)."""


class DeliveryFailed(JobError):
    """An upload or callback given up: nowhere configured to send it, or still failing when
    DELIVERY_RETRY_WINDOW_S ran out."""


def error_for_status(status: int, what: str) -> JobError:
    """The reaction to a non-2xx answer: 429 and 5xx are retried, other codes are final.

    The text says what happened, not what comes next: the same error ends up in the record
    when its retries run out.
    """
    if status == 429 or status >= 500:
        return TransientError(f"{what}: HTTP {status}")
    return DeliveryRejected(f"{what}: HTTP {status}, not retried")
