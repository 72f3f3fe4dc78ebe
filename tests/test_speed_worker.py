"""Speed options as an operator meets them: a real GPU worker (on the tiny WAN) warms up
before its first job, reports its options in every result and in /health, and refuses at
start an option this CPU cannot run.

One stack of its own (Redis DB 5) runs with WARMUP=1, First Block Cache and a distilled
LoRA; the refusal starts a lone GPU worker on DB 9.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import JOB_TIMEOUT_S, api_url, auth, new_job
from worker.local.platform import LocalPlatform, queue_body
from worker.local.stack import LocalStack, RedisServer, free_port, wait_until

QUEUE = "speed_queue"
#: Steps of a turbo job on this stack.
TURBO_STEPS = 2
#: What the log of the generation worker says when its pool child is warm.
WARM = "warm-up done"


def db(redis_server: RedisServer, number: int) -> str:
    return redis_server.url.removesuffix("/0") + f"/{number}"


@pytest.fixture(scope="module")
def speed_env(
    stack_env: dict[str, str], redis_server: RedisServer, tiny_wan_lora: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    root = tmp_path_factory.mktemp("speed")
    return stack_env | {
        "REDIS_URL": db(redis_server, 5),
        "PLATFORM_QUEUE": QUEUE,
        "API_PORT": str(free_port()),
        "SPOOL_DIR": str(root / "spool"),
        "OUTPUT_DIR": str(root / "outputs"),
        "WARMUP": "1",
        "WAN_CACHE": "first_block",
        "WAN_DISTILL_LORA": str(tiny_wan_lora),
        "TURBO_STEPS": str(TURBO_STEPS),
    }


@pytest.fixture(scope="module")
def speed_stack(
    speed_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    client = redis.Redis.from_url(speed_env["REDIS_URL"])
    client.flushdb()
    names = ("gpu+enhance", "cpu", "bridge", "api")
    with LocalStack(speed_env, log_dir=tmp_path_factory.mktemp("speed-logs"), names=names) as s:
        yield s
    client.flushdb()


def expected_options(lora: Path) -> dict:
    return {
        "attention_backend": "native",  # `auto` on CPU
        "torch_compile": "off",
        "cache": "first_block",
        "cache_threshold": 0.05,  # diffusers' default
        "vae_tiling": False,
        "offload": "none",
        "quantize": "none",
        "turbo_checkpoint": lora.name,
        "turbo_steps": TURBO_STEPS,
    }


def gpu_models(env: dict[str, str]) -> dict:
    details = httpx.get(f"{api_url(env)}/health/details", headers=auth(), timeout=10)
    workers = details.json()["workers"]
    return next((node["models"] for name, node in workers.items() if name.startswith("gpu@")), {})


def warm_model(env: dict[str, str]) -> dict:
    """The generation worker's WAN model as /health shows it, once it shows it: a worker
    that misses the one-second broadcast on a loaded machine is left out of one answer."""
    seen: dict = {}

    def shown() -> bool:
        seen.update(gpu_models(env))
        return "wan_t2v" in seen

    wait_until(shown, timeout_s=JOB_TIMEOUT_S, what="the warm model in /health")
    return seen["wan_t2v"]


def test_with_warmup_the_model_is_loaded_and_has_generated_before_the_first_job(
    speed_stack: LocalStack, speed_env: dict[str, str], platform: LocalPlatform,
    tiny_wan_lora: Path,
) -> None:  # fmt: skip
    # Given a GPU worker started with WARMUP=1 and no job sent yet
    # Then /health shows the model loaded, with its options, before any job
    assert warm_model(speed_env)["speed_options"] == expected_options(tiny_wan_lora)

    # When the first job comes
    job = new_job("video_high")
    redis.Redis.from_url(speed_env["REDIS_URL"]).rpush(QUEUE, queue_body(job))
    assert platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body["status"] == "completed"

    # Then the log says: loaded once, one warm-up generation (and a turbo one), then the job
    log = speed_stack.log("gpu+enhance")
    assert log.count("WAN pipeline loaded") == 1
    assert "ran image_high, image_fast (turbo)" in log
    assert log.index("WAN pipeline loaded") < log.index(WARM) < log.index(job["id"])


def test_a_result_and_health_report_the_options_in_force_and_turbo(
    speed_stack: LocalStack, speed_env: dict[str, str], platform: LocalPlatform,
    tiny_wan_lora: Path,
) -> None:  # fmt: skip
    # Given a fast job that names no steps, on a worker with a distilled LoRA
    job = new_job("video_fast")
    del job["config"]["num_inference_steps"]
    redis.Redis.from_url(speed_env["REDIS_URL"]).rpush(QUEUE, queue_body(job))

    # When it completes
    body = platform.wait_for_final(job["id"], timeout_s=JOB_TIMEOUT_S).body

    # Then its provenance says turbo, which checkpoint, its steps and guidance, that the
    # step cache did not run and why, and the options in force; /health says the same options
    assert body["status"] == "completed"
    provenance = body["metadata"]["provenance"]
    assert provenance["step_cache"] == {
        "ran": "none",
        "reason": "a turbo job's few distilled steps leave nothing to reuse",
    }
    assert provenance["turbo"] is True
    assert provenance["turbo_checkpoint"] == tiny_wan_lora.name
    assert (provenance["steps"], provenance["guidance"]) == (TURBO_STEPS, 1.0)
    assert provenance["speed_options"] == expected_options(tiny_wan_lora)
    assert warm_model(speed_env)["speed_options"] == expected_options(tiny_wan_lora)


def test_a_gpu_worker_refuses_to_start_with_an_option_this_cpu_cannot_run(
    stack_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given a GPU worker told to quantise to fp8 and to use flash attention on a CPU machine
    env = stack_env | {"REDIS_URL": db(redis_server, 9), "QUANTIZE": "fp8",
                       "ATTENTION_BACKEND": "flash"}  # fmt: skip
    lone = LocalStack(env, log_dir=tmp_path_factory.mktemp("refusal-logs"), names=("gpu",))

    # When it starts, Then it exits at once (EX_CONFIG) naming each setting
    with pytest.raises(RuntimeError, match="gpu exited with 78") as refused:
        with lone:
            pass
    message = str(refused.value)
    assert "the GPU worker cannot start: ATTENTION_BACKEND=flash needs a CUDA GPU" in message
    assert "QUANTIZE=fp8 needs a CUDA GPU" in message
