"""Which waiting image jobs join a batch (`worker.flow.batching.choose`), on jobs as the
worker reads them in take order: compatible ones only, the lane kept honest, fair share."""

from __future__ import annotations

from worker.flow.batching import Waiting, choose
from worker.jobs.model import Job, parse_job

PROMOTE_AFTER_S = 600.0


def job(job_id: str, *, user: str = "a", job_type: str = "image_fast", **config: object) -> Job:
    config = {"resolution": "480x832"} | config
    return parse_job({"id": job_id, "user_id": user, "type": job_type, "prompt": job_id,
                      "config": config})  # fmt: skip


def waiting(*jobs: Job, waited_s: float = 1.0) -> list[Waiting]:
    return [Waiting(each, waited_s) for each in jobs]


def ids(jobs: list[Job]) -> list[str]:
    return [each.id for each in jobs]


def test_compatible_images_join_in_take_order_up_to_the_batch_size() -> None:
    head, *rest = (job(f"j{i}", user=f"u{i}", seed=i) for i in range(6))
    assert ids(choose(head, waiting(*rest), max_size=4, promote_after_s=PROMOTE_AFTER_S)) == [
        "j1", "j2", "j3"
    ]  # fmt: skip


def test_other_sizes_steps_types_and_reference_jobs_are_not_batched_together() -> None:
    head = job("head")
    others = [
        job("other-size", user="b", resolution="832x480"),
        job("other-steps", user="c", num_inference_steps=10),
        job("video", user="d", job_type="video_fast"),
        job("high", user="e", job_type="image_high"),
        job("reference", user="f", image="https://example.com/a.png"),
        job("same", user="g"),
    ]
    assert ids(choose(head, waiting(*others), max_size=4, promote_after_s=PROMOTE_AFTER_S)) == [
        "same"
    ]
    assert choose(job("v", job_type="video_fast"), waiting(job("x", user="b")), max_size=4,
                  promote_after_s=PROMOTE_AFTER_S) == []  # fmt: skip


def test_an_overdue_incompatible_image_is_never_passed_over() -> None:
    head = job("head")
    young = [Waiting(job("other-size", user="b", resolution="832x480"), 1.0),
             Waiting(job("same", user="c"), 1.0)]  # fmt: skip
    assert ids(choose(head, young, max_size=4, promote_after_s=PROMOTE_AFTER_S)) == ["same"]
    overdue = [Waiting(young[0].job, PROMOTE_AFTER_S + 1), young[1]]
    assert choose(head, overdue, max_size=4, promote_after_s=PROMOTE_AFTER_S) == []


def test_fair_share_one_user_has_half_a_batch_while_another_waits() -> None:
    a_jobs = [job(f"a{i}", user="a") for i in range(8)]
    b_job = job("b0", user="b")
    # Fair share sends B's first job at A's first step: it is taken right after A's first.
    order = waiting(a_jobs[1], b_job, *a_jobs[2:])
    first = choose(a_jobs[0], order, max_size=4, promote_after_s=PROMOTE_AFTER_S)
    assert "b0" in ids(first) and len(first) == 3
    # However late B's job is in the order, A takes at most half while it waits.
    late = waiting(*a_jobs[1:], b_job)
    assert ids(choose(a_jobs[0], late, max_size=4, promote_after_s=PROMOTE_AFTER_S)) == [
        "a1", "b0", "a2"
    ]  # fmt: skip
    # With nobody else waiting, one user fills the batch.
    alone = choose(a_jobs[0], waiting(*a_jobs[1:]), max_size=4, promote_after_s=PROMOTE_AFTER_S)
    assert ids(alone) == ["a1", "a2", "a3"]


def test_a_batch_of_one_takes_nobody() -> None:
    assert choose(job("h"), waiting(job("x", user="b")), max_size=1, promote_after_s=1.0) == []
