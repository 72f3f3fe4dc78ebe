"""Prompt enhancement as plain functions: prompts, output hygiene, the cache, the tiny Qwen.

The model is the tiny Qwen2 built offline and loaded with `from_pretrained`, on the CPU;
the cache is a real Redis. Jobs through real workers are in test_enhanced_jobs.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import torch

from enhancement import Enhancer
from enhancement.cache import EnhancementCache
from enhancement.model import QwenModel, Sampling
from enhancement.output import RejectedOutput, clean_continuation
from enhancement.prompts import ANSWER_LABEL, completion_prompt
from worker.jobs.model import PROMPT_MAX_CHARS
from worker.local.stack import RedisServer, wait_until
from worker.local.tiny_qwen import ENHANCED_TEXT, make_tiny_qwen
from worker.model_files import model_revision

SAMPLING = Sampling(
    temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=120
)


# -- the completion prompt ---------------------------------------------------------------


def test_the_completion_prompt_ends_with_the_idea_and_an_open_answer() -> None:
    prompt = completion_prompt("a  cat\nsleeps", content="video", quality="fast")

    assert prompt.endswith(f"Idea: a cat sleeps\n{ANSWER_LABEL}")
    assert "<|im_start|>" not in prompt  # a base model: no chat template


def test_video_and_image_prompts_ask_for_different_things() -> None:
    video = completion_prompt("x", content="video", quality="fast")
    image = completion_prompt("x", content="image", quality="fast")

    assert "motion" in video and "camera" in video
    assert "composition" in image and "lighting" in image
    assert completion_prompt("x", content="video", quality="high") != video


# -- output hygiene ----------------------------------------------------------------------


def test_only_the_first_paragraph_of_the_continuation_is_kept() -> None:
    text = " A fox runs through snow,\n golden light.\n\nIdea: a cat\nPrompt: a cat sleeps"

    assert clean_continuation(text, original="a fox") == "A fox runs through snow, golden light."


@pytest.mark.parametrize("heading", ["Idea: a cat", "Prompt: again", "## Notes", "Style:"])
def test_an_echoed_heading_ends_the_prompt(heading: str) -> None:
    text = f" A fox runs through the snow at dawn.\n{heading}\nmore text"

    assert clean_continuation(text, original="a fox") == "A fox runs through the snow at dawn."


def test_a_long_continuation_is_trimmed_at_a_word_to_the_prompt_limit() -> None:
    text = " " + "snowy " * 600

    cleaned = clean_continuation(text, original="a fox")

    assert len(cleaned) <= PROMPT_MAX_CHARS
    assert cleaned.endswith("snowy")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("\n\nIdea: something else", "empty"),
        (" short", "under the minimum"),
        (" A fox, in snow.", "unchanged"),
        (" A fox runs \x00 through snow", "non-printable"),
        (" A fox runs \ufffd through snow", "non-printable"),
    ],
)
def test_unusable_continuations_are_rejected_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(RejectedOutput, match=why):
        clean_continuation(text, original="a fox, in snow")


# -- the cache key -----------------------------------------------------------------------


def test_the_cache_key_changes_with_every_part_of_the_request() -> None:
    base = {"content": "video", "quality": "fast", "revision": "r1", "sampling": SAMPLING}
    key = EnhancementCache.key("a fox", **base)

    assert EnhancementCache.key("a fox", **base) == key
    assert EnhancementCache.key("a cat", **base) != key
    for name, other in [
        ("content", "image"),
        ("quality", "high"),
        ("revision", "r2"),
        ("sampling", Sampling(0.8, 0.9, 40, 1.1, 120)),
    ]:
        assert EnhancementCache.key("a fox", **(base | {name: other})) != key, name


def test_a_changed_model_directory_gets_a_new_revision(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    before = model_revision(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weights")

    assert model_revision(tmp_path) != before


# -- the tiny model through the enhancer -------------------------------------------------


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory: pytest.TempPathFactory) -> redis.Redis:
    server = RedisServer(tmp_path_factory.mktemp("enhance-redis")).start()
    yield redis.Redis.from_url(server.url)
    server.stop()


def qwen(path: Path, **options: float) -> QwenModel:
    return QwenModel(path, device=torch.device("cpu"), dtype=torch.float32, **options)


def enhancer(model: QwenModel | None, client: redis.Redis, *, deadline_s: float = 30) -> Enhancer:
    cache = EnhancementCache(client, ttl_s=60)
    return Enhancer(model, cache=cache, sampling=SAMPLING, deadline_s=deadline_s)


def test_the_tiny_qwen_writes_its_known_text_as_the_enhanced_prompt(
    tiny_qwen: Path, cache_redis: redis.Redis
) -> None:
    result = enhancer(qwen(tiny_qwen), cache_redis).enhance(
        "a fox in the snow", content="video", quality="high"
    )

    assert result.applied and result.prompt == ENHANCED_TEXT
    assert result.metadata() == {
        "enhancement_applied": True,
        "enhanced_prompt": ENHANCED_TEXT,
        "original_prompt": "a fox in the snow",
        "enhancement_model": tiny_qwen.name,
        "enhancement_seconds": round(result.seconds, 3),
        "enhancement_cached": False,
    }


def test_a_repeated_request_is_answered_from_the_cache_without_generating(
    tiny_qwen: Path, cache_redis: redis.Redis
) -> None:
    model = qwen(tiny_qwen)
    subject = enhancer(model, cache_redis)
    first = subject.enhance("an owl at night", content="image", quality="fast")
    calls = []
    model.complete = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]

    second = subject.enhance("an owl at night", content="image", quality="fast")

    assert not first.cached and second.cached
    assert second.prompt == first.prompt and calls == []


def test_no_model_path_falls_back_with_no_model(cache_redis: redis.Redis) -> None:
    result = enhancer(None, cache_redis).enhance("a fox", content="video", quality="fast")

    assert result.prompt == "a fox"
    assert result.metadata()["enhancement_fallback_reason"] == "no_model"


def test_a_deadline_far_below_the_generation_time_falls_back_with_timeout(
    tiny_qwen: Path, cache_redis: redis.Redis
) -> None:
    model = qwen(tiny_qwen)
    model.complete("warm up", sampling=SAMPLING, deadline_s=30)  # load outside the deadline
    started = time.perf_counter()

    result = enhancer(model, cache_redis, deadline_s=0.001).enhance(
        "a deer in the woods", content="video", quality="fast"
    )

    assert result.fallback_reason == "timeout" and result.prompt == "a deer in the woods"
    assert time.perf_counter() - started < 5  # loose: the overshoot is measured in bench/


def test_an_unusable_continuation_falls_back_with_rejected_output(
    tmp_path: Path, cache_redis: redis.Redis
) -> None:
    terse = make_tiny_qwen(tmp_path / "terse-qwen", continuation="ok.")

    result = enhancer(qwen(terse), cache_redis).enhance("a fox", content="video", quality="fast")

    assert result.fallback_reason == "rejected_output" and result.prompt == "a fox"
    assert "under the minimum" in (result.detail or "")


def test_an_idle_model_is_unloaded_and_loaded_again_on_the_next_request(
    tiny_qwen: Path,
) -> None:
    changes: list[bool] = []
    model = qwen(tiny_qwen, idle_unload_s=0.3, on_change=changes.append)

    # (read from `changes`, not `model.loaded`: an idle 0.3 s can pass before a look at it)
    model.complete("first", sampling=SAMPLING, deadline_s=30)
    wait_until(lambda: changes == [True, False], timeout_s=30, what="idle unload")
    model.complete("second", sampling=SAMPLING, deadline_s=30)

    assert changes[:3] == [True, False, True]
