"""Image jobs generated together: the generation worker that starts an image job takes
compatible waiting ones with it into one pipeline call (IMAGE_BATCH_MAX, IMAGE_BATCH_WAIT_MS).

`worker.flow.batching` chooses them in take order, `batch_claims` claims each on its
record (its generate stage starts here, under this process's lease, renewed while the batch
runs). Each stays its own job: its own seed (the pixels it would get alone), prompt (the
enhanced one), progress events, `processing` callback, stage timings, record (`batch_id`
and `batch_size` in its metadata and provenance), frames in this host's spool, and its own
generate message, which skips the finished stage and carries its chain on to its media
stages. A job cancelled in the batch loses its result and gets its `cancelled` callback;
the others complete. A batch that fails lets its claimed jobs go: each runs alone when its
message comes (the head fails as a lone job would). Out of GPU memory, the claimed jobs go
back the same way and the head runs alone, at lower presets if it must.
"""

from __future__ import annotations

import secrets
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch
from celery.utils.log import get_task_logger

from media import spool
from tasks.base import leased
from tasks.chain import SENDER
from tasks.generation_stage import (
    GenerateTask,
    progress_callback,
    record_generation,
    start_processing,
)
from worker import faults
from worker.errors import JobCancelled
from worker.flow.batch_claims import WaitingJob, claim, waiting_in_take_order
from worker.flow.batching import Waiting, batchable, choose
from worker.flow.callback import notify_processing
from worker.flow.job_control import finish_cancelled, send_final_callback
from worker.flow.lanes import leave_waiting
from worker.generation import generate_images, gpu_memory, speed
from worker.generation.fallback import Produced
from worker.jobs.model import SEED_MAX, Job
from worker.jobs.records import JobRecords
from worker.observe.metrics import BATCH_SIZE, IMAGES_PER_SECOND, Metrics
from worker.observe.progress import Progress
from worker.settings import Settings

log = get_task_logger(__name__)

#: IMAGE_BATCH_MAX where it is unset: on CUDA, four 480x832 images per call; a CPU gains
#: nothing from batching.
CUDA_BATCH_MAX = 4
#: How often a batch that waits for more images (IMAGE_BATCH_WAIT_MS) looks again, seconds.
WAIT_POLL_S = 0.05


@dataclass
class Member:
    """One job of a running batch."""

    job: Job
    seed: int
    progress: Progress
    #: The head: the job whose own message started the batch (its task does its stage
    #: bookkeeping); the others were claimed.
    head: bool = False


def batch_max(settings: Settings, device: torch.device) -> int:
    if settings.image_batch_max is not None:
        return settings.image_batch_max
    return CUDA_BATCH_MAX if device.type == "cuda" else 1


def run_with_waiting(
    task: GenerateTask,
    settings: Settings,
    records: JobRecords,
    head: Job,
    *,
    seed: int,
    progress: Progress,
) -> bool:
    """Generate `head` with the compatible images waiting, if any are; False (nothing done)
    when it runs alone."""
    max_size = batch_max(settings, task.pipelines.device)
    if max_size <= 1 or not batchable(head):
        return False
    batch_id = f"batch-{uuid.uuid4().hex[:12]}"
    with ExitStack() as leases:
        taken = _take(settings, records, head, batch_id, max_size)
        for waiting in taken:  # held and renewed while the batch runs, let go however it ends
            leases.enter_context(leased(records, waiting.job.id, "generate",
                                        settings.stage_lease_s, run=waiting.run,
                                        fence_writes=False))  # fmt: skip
        partners = [member for waiting in taken
                    if (member := _start(settings, records, waiting)) is not None]  # fmt: skip
        if not partners:
            return False
        members = [Member(head, seed, progress, head=True), *partners]
        log.info("job=%s batch %s: with %s", head.id, batch_id,
                 ", ".join(member.job.id for member in partners))  # fmt: skip
        try:
            made = _generate(task, settings, records, members)
        except torch.OutOfMemoryError as e:
            log.warning("job=%s batch %s out of GPU memory (%s): each job runs alone",
                        head.id, batch_id, e)  # fmt: skip
            gpu_memory.free()
            return False
        _finish(task, settings, records, members, made, batch_id)
    return True


def _take(
    settings: Settings, records: JobRecords, head: Job, batch_id: str, max_size: int
) -> list[WaitingJob]:
    """Claim the waiting images `choose` picks, looking again until IMAGE_BATCH_WAIT_MS has
    passed while the batch is not full."""
    deadline = time.monotonic() + settings.image_batch_wait_ms / 1000
    taken: dict[str, WaitingJob] = {}
    while True:
        waiting = [w for w in waiting_in_take_order(records)
                   if w.batch in (None, batch_id)]  # fmt: skip
        as_run = {w.job.id: speed.as_run(w.job.model_copy(update={"prompt": w.prompt}), settings)
                  for w in waiting}  # fmt: skip
        chosen = choose(head, [Waiting(as_run[w.job.id], w.waited_s) for w in waiting],
                        max_size=max_size, promote_after_s=settings.promote_after_s)  # fmt: skip
        by_id = {w.job.id: w for w in waiting}
        for job in chosen:
            full = len(taken) + 1 >= max_size  # a later look may choose others than before
            if not full and job.id not in taken and claim(
                records, by_id[job.id], batch_id=batch_id, lease_s=settings.stage_lease_s,
                host=settings.worker_host,
            ):  # fmt: skip
                taken[job.id] = replace(by_id[job.id], job=job)  # as it runs
        if len(taken) + 1 >= max_size or time.monotonic() >= deadline:
            return list(taken.values())
        time.sleep(WAIT_POLL_S)


def _start(settings: Settings, records: JobRecords, waiting: WaitingJob) -> Member | None:
    """What a claimed job's stage start and generate task would do before denoising: it
    leaves its lane, gets its seed, turns `processing`; None if a cancel came first."""
    job = waiting.job
    leave_waiting(records, settings, job.id)
    seed = records.get(job.id).value("seed")
    if seed is None:
        seed = job.seed if job.seed is not None else secrets.randbelow(SEED_MAX + 1)
        records.update(job.id, seed=seed)
    if not start_processing(records, job.id):
        return None  # its canceller sent the callback; its own message finds it cancelled
    progress = Progress(records, job.id, notify=progress_callback(settings, job.id, waiting.run),
                        notify_every_s=settings.progress_callback_every_s)  # fmt: skip
    progress.stage_started("generate")
    notify_processing(settings, job.id, run=waiting.run)
    return Member(job, seed, progress)


def _cancelled(records: JobRecords, members: list[Member]) -> set[str]:
    with records.redis.pipeline(transaction=False) as pipe:
        for member in members:
            pipe.hexists(records.key(member.job.id), "cancel_requested_at")
        found = pipe.execute()
    return {member.job.id for member, yes in zip(members, found, strict=True) if yes}


def _generate(
    task: GenerateTask, settings: Settings, records: JobRecords, members: list[Member]
) -> list[Produced]:
    """One pipeline call for every member; each gets its own step events. It stops only
    when every member is cancelled."""
    jobs = [member.job for member in members]

    def step_done(done: int, total: int) -> None:
        for member in members:
            member.progress.step("generate", done, total)
        for member in members:
            faults.hit(faults.step_point(done), member.job.id, preset=member.job.quality)
        if len(_cancelled(records, members)) == len(members):
            raise JobCancelled(f"every job of the batch of job {jobs[0].id} was cancelled")

    started = time.perf_counter()
    generated = generate_images(task.pipelines, jobs, [member.seed for member in members],
                                on_step=step_done)  # fmt: skip
    metrics = Metrics(records.redis)
    metrics.observe(BATCH_SIZE, len(members))
    metrics.set(IMAGES_PER_SECOND, len(members) / (time.perf_counter() - started),
                task.request.hostname)  # fmt: skip
    return [Produced(each, member.job) for each, member in zip(generated, members, strict=True)]


def _finish(
    task: GenerateTask,
    settings: Settings,
    records: JobRecords,
    members: list[Member],
    made: list[Produced],
    batch_id: str,
) -> None:
    """Each member's result into its record, or, cancelled meanwhile, dropped with its
    `cancelled` callback (the head's task reports its own: JobCancelled)."""
    task.note_loaded(settings, task.request.hostname)
    peak_mib = gpu_memory.report(Metrics(records.redis), task.request.hostname)
    cancelled = _cancelled(records, members)
    batch = {"batch_id": batch_id, "batch_size": len(members)}
    for member, produced in zip(members, made, strict=True):
        job_id = member.job.id
        if job_id in cancelled:
            if not member.head and finish_cancelled(records, job_id, stage="generate"):
                spool.remove_job(settings.spool_dir, job_id)
                send_final_callback(job_id, "cancelled", sender=SENDER, records=records)
            continue
        record_generation(task, settings, records, produced, seed=member.seed,
                          peak_mib=peak_mib, batch=batch)  # fmt: skip
        if not member.head:
            records.stage_finished(job_id, "generate")
            member.progress.stage_finished("generate")
    if members[0].job.id in cancelled:
        raise JobCancelled(f"job {members[0].job.id} was cancelled")
