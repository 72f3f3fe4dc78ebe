"""Generation as the GPU child runs it: the tiny WAN model loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.errors import ModelNotConfigured, UnsupportedMode
from worker.jobs import parse_job
from worker.settings import Settings


@pytest.fixture(scope="module")
def pipe(tiny_wan: Path):
    from worker.generation import load_t2v

    return load_t2v(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))


def job(**config: object):
    return parse_job(
        {"id": "job-1", "type": "video_fast", "prompt": "a red fox", "user_id": "user-1",
         "config": {"resolution": "256x320", "frame_num": 5, "num_inference_steps": 2} | config}
    )  # fmt: skip


def test_frames_come_back_as_uint8_of_the_requested_shape(pipe) -> None:
    from worker.generation import generate_frames

    steps = []
    frames = generate_frames(pipe, job(), seed=3, on_step=lambda done, total: steps.append(done))

    assert frames.dtype == np.uint8
    assert frames.shape == (5, 320, 256, 3)
    assert steps == [1, 2]


def test_the_seed_decides_the_frames_and_the_shift_changes_them(pipe) -> None:
    from worker.generation import generate_frames

    first = generate_frames(pipe, job(), seed=11)
    again = generate_frames(pipe, job(), seed=11)
    other_seed = generate_frames(pipe, job(), seed=12)
    other_shift = generate_frames(pipe, job(sample_shift=2.0), seed=11)

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, other_shift)


def test_a_reference_job_is_refused_clearly(pipe) -> None:
    from worker.generation import generate_frames

    reference = job(image="https://example.com/ref.png")

    with pytest.raises(UnsupportedMode, match="reference_mode 'single'"):
        generate_frames(pipe, reference, seed=1)


@pytest.mark.parametrize(
    ("path", "message"),
    [(None, "WAN_MODEL_PATH is not set"), (Path("/nonexistent"), "holds no diffusers model")],
)
def test_a_missing_model_names_the_variable_to_set(path: Path | None, message: str) -> None:
    from worker.generation import load_t2v

    with pytest.raises(ModelNotConfigured, match=message):
        load_t2v(Settings(_env_file=None, wan_model_path=path, device="cpu"))
