"""Speed options on the tiny WAN and VACE, in process: each loads and generates, the step
cache skips work but stays close, turbo runs its own steps without guidance, and what the
CPU cannot run is refused naming the setting (the worker-start refusal: test_speed_worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.jobs.model import Job, parse_job
from worker.settings import Settings

SIZE = "256x256"
#: A tight First Block Cache threshold for the tiny model over 10 steps: it skips one
#: step's tail blocks (its first-block change is ~0.04-0.06 per step) and stays close.
TIGHT_THRESHOLD = 0.04
#: How close the cached video must stay to the uncached one, dB.
MIN_PSNR_DB = 30.0


def pipelines_with(tiny_wan: Path, tiny_vace: Path | None = None, **options: object):
    from worker.generation import Pipelines

    return Pipelines(
        Settings(_env_file=None, wan_model_path=tiny_wan, wan_vace_model_path=tiny_vace,
                 device="cpu", **options)
    )  # fmt: skip


def a_job(job_type: str = "video_high", **config: object) -> Job:
    frames = 5 if job_type.startswith("video") else 1
    config = {"resolution": SIZE, "frame_num": frames, "num_inference_steps": 2} | config
    return parse_job({"id": "job-1", "type": job_type, "prompt": "a red fox", "user_id": "u1",
                      "config": {k: v for k, v in config.items() if v is not None}})  # fmt: skip


def run(pipelines, job: Job, *, references: dict | None = None, steps: list | None = None):
    """Generate as the GPU child does: the job as it runs (turbo or not), then the pipeline."""
    from worker.generation import generate, speed

    job = speed.as_run(job, pipelines.settings)
    on_step = None if steps is None else (lambda done, total: steps.append(done))
    return generate(pipelines, job, seed=5, references=references or {}, on_step=on_step).frames


def count_calls(module) -> list[int]:
    """One entry per forward call of `module` that really runs (a cached block does not)."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def plain(tiny_wan: Path):
    """The tiny WAN with every speed option off (diffusers' defaults)."""
    return pipelines_with(tiny_wan)


@pytest.fixture(scope="module")
def with_lora(tiny_wan: Path, tiny_wan_lora: Path):
    return pipelines_with(tiny_wan, wan_distill_lora=tiny_wan_lora, turbo_steps=3)


# --- each setting loads and generates ----------------------------------------------------


def _backend_of_every_attention(pipe) -> set[str]:
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    return {str(getattr(p._attention_backend, "value", p._attention_backend)) for p in processors}


APPLIED = {
    "attention_backend=native": (
        {"attention_backend": "native"},
        lambda pipe: _backend_of_every_attention(pipe) == {"native"},
    ),
    "attention_backend=_native_math": (
        {"attention_backend": "_native_math"},
        lambda pipe: _backend_of_every_attention(pipe) == {"_native_math"},
    ),
    "wan_cache=first_block": (
        {"wan_cache": "first_block"},
        lambda pipe: type(pipe.transformer._cache_config).__name__ == "FirstBlockCacheConfig",
    ),
    "wan_cache=taylorseer": (
        {"wan_cache": "taylorseer"},
        lambda pipe: type(pipe.transformer._cache_config).__name__ == "TaylorSeerCacheConfig",
    ),
    "vae_tiling=true": ({"vae_tiling": True}, lambda pipe: pipe.vae.use_tiling),
}


@pytest.mark.parametrize("name", APPLIED)
def test_each_speed_setting_is_applied_and_generates_videos_and_images(
    name: str, tiny_wan: Path
) -> None:
    # Given the tiny WAN loaded with one speed setting
    options, applied = APPLIED[name]
    pipelines = pipelines_with(tiny_wan, **options)

    # When a video and an image job run
    steps: list[int] = []
    video = run(pipelines, a_job("video_high"), steps=steps)
    image = run(pipelines, a_job("image_high"))

    # Then the option is in force and both come out whole, every step reported
    assert applied(pipelines.t2v)
    assert video.shape == (5, 256, 256, 3) and image.shape == (1, 256, 256, 3)
    assert steps == [1, 2]


def test_torch_compile_blocks_compiles_each_repeated_block_once(tiny_wan: Path) -> None:
    # Given TORCH_COMPILE=blocks (a real compiled call costs ~50 s on this CPU: bench/gpu.py)
    pipelines = pipelines_with(tiny_wan, torch_compile="blocks")

    # When text to video and video to video (the same transformer) are made
    t2v, v2v = pipelines.t2v, pipelines.v2v

    # Then every transformer block is compiled, and nothing else
    assert v2v.transformer is t2v.transformer
    compiled = [
        m for m in t2v.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None
    ]
    assert compiled == list(t2v.transformer.blocks)


# --- the step cache on every pipeline ----------------------------------------------------

CACHES = ("first_block", "mag", "taylorseer")
#: A threshold so high that every step a residual cache may skip is skipped.
SKIP_ALL = 10.0
#: Steps of the cache jobs; image to image runs the last int(4 x 0.5) = 2 of them.
CACHE_STEPS, I2I_STEPS = 4, 2
#: A skipped step on unchanged input must give what computing it gives, to float rounding;
#: calls of the same input (every cache skips at least one of five).
EXACT, SAME_INPUT_CALLS = 1e-3, 5
#: The source image of the reference and image-to-image jobs, by role.
SOURCE = {"single": Image.new("RGB", (256, 256), (200, 40, 40))}
#: A job through each pipeline the generation child holds.
MODE_JOBS = {
    "t2v": a_job("image_high", num_inference_steps=CACHE_STEPS),
    "vace": a_job("image_high", image="https://example.com/a.png",
                  num_inference_steps=CACHE_STEPS),
    "v2v": a_job("image_high", image="https://example.com/a.png", pipeline="img2img",
                 denoise_strength=0.5, num_inference_steps=CACHE_STEPS),
}  # fmt: skip


@pytest.fixture(scope="module")
def cached(tiny_wan: Path, tiny_vace: Path):
    """The tiny WAN and VACE with one WAN_CACHE each (made on first use, kept for the module)."""
    made: dict[str, object] = {}

    def with_cache(cache: str):
        if cache not in made:
            threshold = None if cache == "taylorseer" else SKIP_ALL
            made[cache] = pipelines_with(tiny_wan, tiny_vace, wan_cache=cache,
                                         wan_cache_threshold=threshold)  # fmt: skip
        return made[cache]

    return with_cache


def pass_states(transformer) -> set[str]:
    """The names of the cache states the transformer's hooks hold: one per guidance pass."""
    from diffusers.hooks.hooks import StateManager

    return {
        name
        for module in transformer.modules()
        for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values()
        for manager in vars(hook).values()
        if isinstance(manager, StateManager)
        for name in manager._state_cache
    }


@pytest.mark.parametrize("mode", MODE_JOBS)
@pytest.mark.parametrize("cache", CACHES)
def test_each_cache_runs_through_every_pipeline_or_not_at_all_and_provenance_says_which(
    cached, cache: str, mode: str
) -> None:
    from worker.generation import generate
    from worker.generation.provenance import describe

    # Given the tiny WAN and VACE with WAN_CACHE set
    pipelines = cached(cache)
    job = MODE_JOBS[mode]

    # When a job runs through the pipeline of this mode (the cache's states looked at after
    # each step: the pipeline clears them when it returns)
    transformer = getattr(pipelines, mode).transformer
    states: list[set[str]] = []
    references = {} if mode == "t2v" else SOURCE

    def note_states(done: int, total: int) -> None:
        states.append(pass_states(transformer))

    generated = generate(pipelines, job, seed=5, references=references, on_step=note_states)
    provenance = describe(pipelines, job, seed=5, wan_task=generated.metadata["wan_task"],
                          settings=pipelines.settings)  # fmt: skip

    # Then it came out whole, and either the cache ran with each guidance pass on a state of
    # its own, set for the steps this pipeline runs, or it did not run and the provenance
    # says why: VACE takes no cache that adds back a residual
    assert generated.frames.shape == (1, 256, 256, 3)
    if mode == "vace" and cache != "taylorseer":
        assert provenance["step_cache"] == {
            "ran": "none",
            "reason": f"VACE runs without {cache}: its control hints, added between the "
            "transformer's blocks, would be counted twice on a skipped step",
        }
        assert not transformer.is_cache_enabled
        return
    steps = I2I_STEPS if mode == "v2v" else CACHE_STEPS
    assert provenance["step_cache"] == {"ran": cache, "steps": steps}
    assert states == [{"cond", "uncond"}] * steps
    if cache == "mag":
        assert transformer._cache_config.num_inference_steps == steps


def test_mag_cache_runs_on_ratios_measured_on_the_weights_and_image_to_image_on_their_tail(
    cached,
) -> None:
    from worker.generation import generate

    # Given WAN_CACHE=mag: its magnitude ratios are measured on the loaded weights
    pipelines = cached("mag")
    transformer = pipelines.t2v.transformer

    # When a text-to-video job and an image-to-image job of as many steps run
    generate(pipelines, MODE_JOBS["t2v"], seed=5, references={})
    text_ratios = transformer._cache_config.mag_ratios.tolist()
    generate(pipelines, MODE_JOBS["v2v"], seed=5, references=SOURCE)
    i2i_ratios = transformer._cache_config.mag_ratios.tolist()

    # Then the ratios are measured ones, and image to image, which runs the last steps of
    # the same schedule, runs on the last of them
    assert len(text_ratios) == CACHE_STEPS and set(text_ratios) != {1.0}
    assert i2i_ratios == text_ratios[-I2I_STEPS:]


@pytest.mark.parametrize("name", ["t2v", "vace"])
@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_runs_where_a_skipped_step_gives_what_computing_it_gives_and_nowhere_else(
    cached, cache: str, name: str
) -> None:
    import torch

    from worker.generation import speed

    # Given a transformer of the worker, and one input given again and again (nothing
    # changes, so a skipped step has nothing to approximate)
    pipelines = cached(cache)
    transformer = getattr(pipelines, name).transformer
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    noise = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 1, 16, 16, generator=noise),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=noise),
        "return_dict": False,
    }
    if name == "vace":
        inputs["control_hidden_states"] = torch.randn(1, 96, 1, 16, 16, generator=noise)
    with torch.no_grad():
        computed = transformer(**inputs)[0]
    calls = SAME_INPUT_CALLS
    runs = speed.step_cache(pipelines.settings, MODE_JOBS[name], transformer, steps=calls)["ran"]

    # When WAN_CACHE is armed on it (by hand where the worker does not run it), each call
    # in the pipeline's `cond` context (MagCache with ratios of 1: nothing changes)
    config = speed.cache_config(pipelines.settings, steps=calls, mag_ratios=[1.0] * calls)
    transformer.enable_cache(config)
    last_ffn = count_calls(transformer.blocks[-1].ffn.net[0])
    with torch.no_grad(), transformer.cache_context("cond"):
        errors = [(transformer(**inputs)[0] - computed).abs().max().item() for _ in range(calls)]
    transformer.disable_cache()

    # Then the cache skipped work, and it reproduced the computed output exactly where the
    # worker runs it (and not where it does not: VACE's hints counted twice)
    assert len(last_ffn) < calls
    assert (max(errors) < EXACT) == (runs == cache), errors


def test_cache_hooks_armed_per_job_on_compiled_blocks_compile_nothing_after_the_first_jobs(
    tiny_wan: Path,
) -> None:
    """The step cache is re-armed for every job: new hooks wrap the compiled blocks' forward.
    Dynamo must not take them for new code and compile again (past its recompile limit it
    would fall back to eager for good). Inductor compiling the blocks on this CPU is the
    cost: ~45 s of CPU time cold, ~20 s with inductor's on-disk cache warm, so it runs one
    cache, First Block Cache (the one README recommends); `mag` and `taylorseer` compiled
    nothing per job either, measured with dynamo's eager backend. Per-job pass names, say,
    would compile again every job."""
    from torch._dynamo.utils import counters

    # Given TORCH_COMPILE=blocks and First Block Cache, and one text-to-video and one
    # image-to-image job run once (the blocks compile for their shapes and paths)
    pipelines = pipelines_with(tiny_wan, torch_compile="blocks", wan_cache="first_block")
    jobs = [(MODE_JOBS["t2v"], {}), (MODE_JOBS["v2v"], SOURCE)]
    for job, references in jobs:
        run(pipelines, job, references=references)
    compiled = counters["frames"]["total"]
    assert compiled > 0

    # When the same jobs run again, their cache hooks armed anew
    for job, references in jobs:
        run(pipelines, job, references=references)

    # Then dynamo compiled nothing more
    assert counters["frames"]["total"] == compiled


# --- what the CPU cannot run is refused, naming the setting -------------------------------


@pytest.mark.parametrize(
    ("options", "cuda", "message"),
    [
        ({"quantize": "fp8"}, False, "QUANTIZE=fp8 needs a CUDA GPU"),
        ({"attention_backend": "flash"}, False, "ATTENTION_BACKEND=flash needs a CUDA GPU"),
        ({"attention_backend": "_flash_3"}, False, "ATTENTION_BACKEND=_flash_3 needs a CUDA"),
        ({"attention_backend": "flash"}, True, "ATTENTION_BACKEND=flash: Flash Attention"),
        ({"attention_backend": "fastest"}, False, "ATTENTION_BACKEND=fastest is not a diffusers"),
        ({"offload": "model"}, False, "OFFLOAD=model moves weights between CPU and GPU"),
        ({"offload": "group"}, False, "OFFLOAD=group moves weights between CPU and GPU"),
        ({"wan_distill_lora": Path("/nonexistent.safetensors")}, False, "WAN_DISTILL_LORA: "),
        ({"wan_turbo_model_path": Path("/nonexistent")}, False, "WAN_TURBO_MODEL_PATH: no "),
    ],
)
def test_an_option_the_device_cannot_run_is_refused_naming_the_setting(
    options: dict, cuda: bool, message: str
) -> None:
    from worker.generation import speed

    refused = speed.refusals(Settings(_env_file=None, **options), cuda=cuda)

    assert len(refused) == 1 and refused[0].startswith(message)


def test_the_defaults_are_refused_nowhere() -> None:
    from worker.generation import speed

    assert speed.refusals(Settings(_env_file=None), cuda=False) == []


# --- the step cache skips work and stays close -------------------------------------------


def test_the_first_block_cache_skips_blocks_and_stays_close_to_uncached(
    plain, tiny_wan: Path
) -> None:
    # Given the same 10-step job on the tiny WAN without and with First Block Cache
    cached = pipelines_with(tiny_wan, wan_cache="first_block", wan_cache_threshold=TIGHT_THRESHOLD)
    job = a_job(num_inference_steps=10)
    computed = {
        name: count_calls(pipelines.t2v.transformer.blocks[-1].ffn)
        for name, pipelines in (("plain", plain), ("cached", cached))
    }

    # When both run
    steps: list[int] = []
    uncached_frames = run(plain, job)
    cached_frames = run(cached, job, steps=steps)

    # Then the cache computed the last block fewer times, reported every step, and the
    # video stays close to the uncached one
    assert len(computed["cached"]) < len(computed["plain"]) == 20  # 10 steps x (cond, uncond)
    assert steps == list(range(1, 11))
    assert psnr_db(cached_frames, uncached_frames) >= MIN_PSNR_DB


# --- turbo -------------------------------------------------------------------------------


def test_a_distilled_lora_changes_the_fast_output_and_never_the_high_one(plain, with_lora) -> None:
    # Given the same pipelines with and without the distilled LoRA (loaded, never fused)
    fast = a_job("image_fast", num_inference_steps=None)
    high = a_job("image_high")

    # When a fast job (turbo) and a high job run on both
    turbo_frames = run(with_lora, fast)
    as_plain = run(plain, fast.model_copy(update={"steps": 3, "guidance": 1.0}))

    # Then the LoRA changed the fast result and left the high one as the base weights make it
    assert not np.array_equal(turbo_frames, as_plain)
    assert np.array_equal(run(with_lora, high), run(plain, high))


@pytest.mark.parametrize("job_type", ["video_fast", "image_fast"])
def test_a_turbo_fast_job_runs_turbo_steps_with_one_transformer_call_each(
    with_lora, job_type: str
) -> None:
    # Given a worker with a distilled LoRA and TURBO_STEPS=3, and a fast job naming no steps
    calls = count_calls(with_lora.t2v.transformer)
    steps: list[int] = []

    # When it runs
    run(with_lora, a_job(job_type, num_inference_steps=None), steps=steps)

    # Then it ran 3 steps, one transformer pass each (guidance 1.0: no negative branch)
    assert steps == [1, 2, 3]
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("job_type", "config"),
    [("video_high", {"num_inference_steps": 2}), ("video_fast", {"num_inference_steps": 2})],
    ids=["a high job", "a fast job naming its steps"],
)
def test_other_jobs_on_a_turbo_worker_run_their_own_steps_with_guidance(
    with_lora, job_type: str, config: dict
) -> None:
    calls = count_calls(with_lora.t2v.transformer)
    steps: list[int] = []

    run(with_lora, a_job(job_type, **config), steps=steps)

    assert steps == [1, 2]
    assert len(calls) == 4  # cond and uncond per step


def test_a_distilled_transformer_runs_the_fast_jobs_and_the_base_one_the_high_jobs(
    tiny_wan: Path, tmp_path: Path
) -> None:
    from worker.local.tiny_models import make_tiny_wan

    # Given WAN_TURBO_MODEL_PATH: a transformer of other weights, in diffusers format
    distilled = make_tiny_wan(tmp_path / "distilled", seed=1) / "transformer"
    pipelines = pipelines_with(tiny_wan, wan_turbo_model_path=distilled, turbo_steps=3)
    base_calls = count_calls(pipelines.t2v.transformer)
    turbo_calls = count_calls(pipelines.turbo)

    # When a fast job naming no steps and a high job run
    run(pipelines, a_job("image_fast", num_inference_steps=None))
    run(pipelines, a_job("image_high"))

    # Then the fast one ran 3 passes on the distilled transformer, the high one 2 x 2 on its own
    assert (len(turbo_calls), len(base_calls)) == (3, 4)
