"""Image jobs in one pipeline call (`generate_images`), in process on the tiny WAN: each image
is the one its job makes alone, its own prompt and seed, up to floating-point noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.jobs.model import Job, parse_job
from worker.settings import Settings

#: The most a batched image's pixel may differ from the same job's image made alone (uint8):
#: batched matrix products sum in another order, nothing more.
MAX_PIXEL_DIFFERENCE = 2


def image_job(job_id: str, prompt: str, seed: int) -> Job:
    config = {"resolution": "256x256", "num_inference_steps": 3, "seed": seed}
    return parse_job({"id": job_id, "user_id": "u1", "type": "image_fast", "prompt": prompt,
                      "config": config})  # fmt: skip


def test_each_image_of_a_batch_is_the_one_its_job_makes_alone(tiny_wan: Path) -> None:
    from worker.generation import Pipelines, generate, generate_images

    pipelines = Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))
    jobs = [image_job("a", "a red fox", 7), image_job("b", "a blue city at night", 8),
            image_job("c", "a red fox", 9)]  # fmt: skip
    seeds = [7, 8, 9]
    batch = generate_images(pipelines, jobs, seeds)
    alone = [generate(pipelines, job, seed=seed, references={}).frames
             for job, seed in zip(jobs, seeds, strict=True)]  # fmt: skip
    for made, reference in zip(batch, alone, strict=True):
        assert made.frames.shape == reference.shape == (1, 256, 256, 3)
        difference = np.abs(made.frames.astype(int) - reference.astype(int)).max()
        assert difference <= MAX_PIXEL_DIFFERENCE, difference
        assert made.metadata["batch_size"] == 3
    # each its own: another prompt or another seed gives another image
    assert not np.array_equal(batch[0].frames, batch[1].frames)
    assert not np.array_equal(batch[0].frames, batch[2].frames)
