"""Which waiting image jobs join the image job a generation worker starts: one pipeline call
for several images (a GPU step over four 480x832 frames costs little more than over one).

Pure: the caller reads the waiting jobs in the order the worker would take them (the GPU
queue's priority lists, step 0 first, each oldest first), as each would run (`speed.as_run`),
and claims the chosen ones on their records (`batch_claims`). The rules:
- only text-only one-frame jobs batch (`batchable`), and only with jobs that run the same
  call (`batch_key`): size, steps, guidance, shift, turbo, quality preset; each keeps its
  own prompt, negative prompt and seed;
- the lane stays honest: the walk passes over a younger incompatible image (it runs next,
  in its own batch) but stops at one that has waited longer than PROMOTE_AFTER_S;
- fair share: while another user's compatible job waits unchosen, one user has at most
  half the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from worker.jobs.model import Job


@dataclass(frozen=True)
class Waiting:
    """A job waiting for generation, as it would run, and for how long it has waited."""

    job: Job
    waited_s: float


def batchable(job: Job) -> bool:
    """An image from text alone: the call that takes a list of prompts and generators."""
    return not job.type.is_video and job.frames == 1 and job.reference_mode == "none"


def batch_key(job: Job) -> tuple:
    """What one pipeline call runs once for all its images."""
    return (job.width, job.height, job.steps, job.guidance, job.shift, job.turbo, job.quality)


def choose(
    head: Job, waiting: Sequence[Waiting], *, max_size: int, promote_after_s: float
) -> list[Job]:
    """The jobs to generate with `head` (not counting it), in take order."""
    if max_size <= 1 or not batchable(head):
        return []
    key = batch_key(head)
    candidates = []
    for each in waiting:
        if each.job.id == head.id or each.job.type.is_video:
            continue  # the other lane is not passed over: it has its own steps
        if batchable(each.job) and batch_key(each.job) == key:
            candidates.append(each.job)
        elif each.waited_s > promote_after_s:
            break  # an overdue image is never passed over
    half = max(1, max_size // 2)
    counts = Counter({head.user_id: 1})
    chosen: list[Job] = []
    while len(chosen) + 1 < max_size:
        users = {job.user_id for job in candidates}
        pick = next((job for job in candidates
                     if counts[job.user_id] < half or users == {job.user_id}), None)  # fmt: skip
        if pick is None:
            break
        chosen.append(pick)
        candidates.remove(pick)
        counts[pick.user_id] += 1
    return chosen
