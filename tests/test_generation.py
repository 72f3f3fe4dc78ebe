"""Generation as the GPU child runs it: tiny WAN and VACE models loaded with from_pretrained."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.errors import ModelNotConfigured
from worker.jobs.model import parse_job
from worker.settings import Settings

SIZE = 256


@pytest.fixture(scope="module")
def pipelines(tiny_wan: Path, tiny_vace: Path):
    from worker.generation import Pipelines

    return Pipelines(
        Settings(
            _env_file=None, wan_model_path=tiny_wan, wan_vace_model_path=tiny_vace, device="cpu"
        )
    )


def job(frames: int = 5, metadata: dict | None = None, **config: object):
    config = {"resolution": "256x320", "frame_num": frames, "num_inference_steps": 2} | config
    return parse_job(
        {"id": "job-1", "type": "video_fast" if frames > 1 else "image_fast", "prompt": "a red fox",
         "user_id": "user-1", "metadata": metadata or {}, "config": config}
    )  # fmt: skip


def picture(seed: int, width: int = 256, height: int = 320) -> Image.Image:
    """A smooth random colour field: different seeds give clearly different pictures."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)


def run(pipelines, a_job, seed: int = 3, **options):
    from worker.generation import generate

    return generate(
        pipelines, a_job, seed=seed, references=options.pop("references", {}), **options
    )


def test_frames_come_back_as_uint8_of_the_requested_shape(pipelines) -> None:
    steps = []
    generated = run(pipelines, job(), on_step=lambda done, total: steps.append(done))

    assert generated.frames.dtype == np.uint8
    assert generated.frames.shape == (5, 320, 256, 3)
    assert steps == [1, 2]
    assert generated.metadata == {"wan_task": "t2v-1.3B", "reference_mode": "none"}


def test_the_seed_decides_the_frames_and_the_shift_changes_them(pipelines) -> None:
    first = run(pipelines, job(), seed=11).frames
    again = run(pipelines, job(), seed=11).frames
    other_seed = run(pipelines, job(), seed=12).frames
    other_shift = run(pipelines, job(sample_shift=2.0), seed=11).frames

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, other_shift)


@pytest.mark.parametrize(
    ("path", "message"),
    [(None, "WAN_MODEL_PATH is not set"), (Path("/nonexistent"), "holds no diffusers model")],
)
def test_a_missing_model_names_the_variable_to_set(path: Path | None, message: str) -> None:
    from worker.generation import load_t2v

    with pytest.raises(ModelNotConfigured, match=message):
        load_t2v(Settings(_env_file=None, wan_model_path=path, device="cpu"))


def test_a_missing_vace_model_names_its_variable(tiny_wan: Path) -> None:
    from worker.generation import Pipelines

    bare = Pipelines(Settings(_env_file=None, wan_model_path=tiny_wan, device="cpu"))
    with pytest.raises(ModelNotConfigured, match="WAN_VACE_MODEL_PATH is not set"):
        bare.vace  # noqa: B018 (the property loads)


# --- One set of shared parts -----------------------------------------------------------


def test_all_pipelines_share_one_text_encoder_tokenizer_and_vae(pipelines) -> None:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    t2v, vace, v2v = pipelines.t2v, pipelines.vace, pipelines.v2v

    assert pipelines.loaded() == ["t2v", "vace", "v2v"]
    for pipe in (vace, v2v):
        assert pipe.text_encoder is t2v.text_encoder
        assert pipe.tokenizer is t2v.tokenizer
        assert pipe.vae is t2v.vae
    assert v2v.transformer is t2v.transformer
    assert vace.transformer is not t2v.transformer  # VACE has its own weights
    # and no stray copy anywhere in this process (the tiny models of this module only)
    gc.collect()
    kinds = [type(o) for o in gc.get_objects()]
    assert kinds.count(AutoencoderKLWan) == 1
    assert kinds.count(UMT5EncoderModel) == 1


def test_pipelines_load_once_and_on_first_use(tiny_wan: Path, tiny_vace: Path) -> None:
    from worker.generation import Pipelines

    fresh = Pipelines(
        Settings(
            _env_file=None, wan_model_path=tiny_wan, wan_vace_model_path=tiny_vace, device="cpu"
        )
    )
    assert fresh.loaded() == []
    assert fresh.v2v is fresh.v2v
    assert fresh.loaded() == ["t2v", "v2v"]


# --- Reference frames (VACE) ------------------------------------------------------------


def test_vace_conditions_place_the_frames_and_keep_only_them() -> None:
    from worker.generation.modes import vace_conditions

    start, end, single = picture(1), picture(2), picture(3)
    conditions, used = vace_conditions(
        {"start": start, "end": end, "single": single}, frames=5, width=256, height=320
    )
    video, mask = conditions["video"], conditions["mask"]
    assert video[0] is start and video[-1] is end
    assert all(np.asarray(frame).max() == 128 == np.asarray(frame).min() for frame in video[1:-1])
    assert [np.asarray(m).max() for m in mask] == [0, 255, 255, 255, 0]
    assert conditions["reference_images"] == [single]
    assert used == ["start", "end", "single"]


@pytest.mark.parametrize(
    ("mode", "metadata"),
    [
        ("single", {"reference_image_url": "https://x.test/a.png"}),
        ("start", {"start_reference_url": "https://x.test/a.png"}),
        ("end", {"end_reference_url": "https://x.test/a.png"}),
    ],
)
def test_a_different_reference_gives_different_frames_with_the_same_seed(
    pipelines, mode: str, metadata: dict
) -> None:
    reference_job = job(9, metadata)
    role = mode
    a = run(pipelines, reference_job, references={role: picture(1)})
    b = run(pipelines, reference_job, references={role: picture(2)})
    again = run(pipelines, reference_job, references={role: picture(1)})

    assert a.metadata["wan_task"] == "vace-1.3B" and a.metadata["reference_mode"] == mode
    assert a.frames.shape == (9, 320, 256, 3)
    assert np.array_equal(a.frames, again.frames)
    assert not np.array_equal(a.frames, b.frames)


def test_start_and_end_put_the_reference_in_different_places(pipelines) -> None:
    image = picture(1)
    start = run(pipelines, job(9, {"start_reference_url": "u"}), references={"start": image})
    end = run(pipelines, job(9, {"end_reference_url": "u"}), references={"end": image})
    assert not np.array_equal(start.frames, end.frames)


def test_a_fallback_runs_text_only_and_says_why(pipelines) -> None:
    a_job = job(5, {"start_reference_url": "https://x.test/a.png"})
    generated = run(pipelines, a_job, fallback_reason="start reference: HTTP 404")
    text_only = run(pipelines, job(5))

    assert np.array_equal(generated.frames, text_only.frames)
    assert generated.metadata == {
        "wan_task": "t2v-1.3B",
        "reference_mode": "none",
        "reference_fallback": True,
        "reference_fallback_reason": "start reference: HTTP 404",
        "reference_mode_requested": "start",
    }


# --- Image to image (video to video) ---------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5], ids=["image", "video"])
def test_image_to_image_strength_changes_the_output_and_the_steps_run(
    pipelines, frames: int
) -> None:
    source = {"single": picture(1)}

    def i2i(strength: float):
        steps: list[tuple[int, int]] = []
        a_job = job(frames, {"reference_image_url": "u", "denoise_strength": strength},
                    num_inference_steps=10)  # fmt: skip
        generated = run(pipelines, a_job, references=source, on_step=lambda *s: steps.append(s))
        return generated, steps

    low, low_steps = i2i(0.3)
    high, high_steps = i2i(0.9)

    assert low.frames.shape == (frames, 320, 256, 3)
    assert not np.array_equal(low.frames, high.frames)
    assert [done for done, _ in low_steps] == [1, 2, 3]
    assert [done for done, _ in high_steps] == list(range(1, 10))
    assert low.metadata == {
        "wan_task": "v2v-1.3B",
        "reference_mode": "single",
        "references_used": ["single"],
        "denoise_strength": 0.3,
        "denoise_steps": 3,
    }


def test_image_to_image_depends_on_its_source(pipelines) -> None:
    a_job = job(1, {"reference_image_url": "u"}, pipeline="img2img")
    a = run(pipelines, a_job, references={"single": picture(1)})
    b = run(pipelines, a_job, references={"single": picture(2)})
    assert not np.array_equal(a.frames, b.frames)


def test_a_strength_under_one_step_still_runs_one_and_says_so(pipelines) -> None:
    steps = []
    a_job = job(1, {"reference_image_url": "u", "exact_copy_mode": True})
    generated = run(
        pipelines, a_job, references={"single": picture(1)}, on_step=lambda *s: steps.append(s)
    )
    assert len(steps) == 1
    assert generated.metadata["denoise_strength"] == 0.05
    assert "one step was run" in generated.metadata["denoise_note"]


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "frame"), [("start", 0), ("end", -1)])
def test_with_real_weights_the_kept_frame_is_closer_to_its_reference(mode: str, frame: int) -> None:
    # Needs Wan2.1-T2V-1.3B and Wan2.1-VACE-1.3B (WAN_MODEL_PATH, WAN_VACE_MODEL_PATH) and a
    # GPU: random-weight models cannot reproduce an image, so CI on CPU skips this.
    import os

    import torch

    if not torch.cuda.is_available() or not os.environ.get("WAN_VACE_MODEL_PATH"):
        pytest.skip("needs CUDA and real WAN_MODEL_PATH / WAN_VACE_MODEL_PATH weights")
    from worker.generation import Pipelines

    real = Pipelines(Settings(_env_file=None))
    reference, other = picture(1, 480, 832), picture(2, 480, 832)
    a_job = parse_job(
        {"id": "gpu-1", "type": "video_fast", "prompt": "a calm landscape", "user_id": "u",
         "metadata": {f"{mode}_reference_url": "u"},
         "config": {"frame_num": 17, "num_inference_steps": 25}}
    )  # fmt: skip

    kept = run(real, a_job, references={mode: reference}).frames[frame].astype(float)

    def distance(image: Image.Image) -> float:
        return float(np.mean((kept - np.asarray(image, dtype=float)) ** 2))

    assert distance(reference) < distance(other)
