"""Prompt enhancement on the `enhance` queue: the chain's stage and the API's `/enhance`.

Qwen lives in the enhancement worker's pool child, loaded on first use (after the fork),
never beside WAN unless a small box runs one worker on `-Q gpu,enhance`. A failed
enhancement never fails a job: it falls back to the user's prompt and says why.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from enhancement import Enhancement, Enhancer
from enhancement.cache import EnhancementCache
from enhancement.model import QwenModel, Sampling
from enhancement.prompts import Content, Quality
from tasks.app import app
from tasks.base import StageTask
from worker.jobs.model import Job
from worker.jobs.records import get_records
from worker.observe.loaded_models import LoadedModels
from worker.observe.metrics import ENHANCEMENT_FALLBACKS, Metrics
from worker.settings import get_settings

log = get_task_logger(__name__)


@cache
def enhancer_for(node: str) -> Enhancer:
    """This process's enhancer; its model loads on the first request that needs it."""
    settings = get_settings()
    redis = get_records().redis
    model = None
    if settings.qwen_model_path is not None:
        from worker.devices import resolve_device, resolve_dtype  # torch, in the child only

        device = resolve_device(settings)
        path = settings.qwen_model_path
        model = QwenModel(
            path,
            device=device,
            dtype=resolve_dtype(settings, device),
            idle_unload_s=settings.enhance_idle_unload_s,
            on_change=lambda loaded: LoadedModels(redis).note(
                node, "qwen", path=str(path), loaded=loaded
            ),
        )
    return Enhancer(
        model,
        cache=EnhancementCache(redis, ttl_s=settings.enhance_cache_ttl_s),
        sampling=Sampling(
            temperature=settings.enhance_temperature,
            top_p=settings.enhance_top_p,
            top_k=settings.enhance_top_k,
            repetition_penalty=settings.enhance_repetition_penalty,
            max_new_tokens=settings.enhance_max_new_tokens,
        ),
        deadline_s=settings.enhance_timeout_s,
    )


def enhance_safely(task: Task, prompt: str, *, content: Content, quality: Quality) -> Enhancement:
    """The enhancement, or a fallback for anything unexpected: this is the loop edge."""
    try:
        return enhancer_for(task.request.hostname).enhance(prompt, content=content, quality=quality)
    except SoftTimeLimitExceeded:
        return Enhancement.fallback(prompt, "timeout", "the enhance stage's time limit passed")
    except Exception as e:
        log.error("enhancement failed, the prompt is used as given", exc_info=True)
        return Enhancement.fallback(prompt, "error", f"{type(e).__name__}: {e}")


@app.task(base=StageTask, bind=True, name="wan.enhance", stage="enhance")
def enhance(self: StageTask, job_id: str) -> None:
    """Rewrite an enhanced type's prompt once; a redelivery reuses the recorded result."""
    records = get_records()
    record = records.get(job_id)
    job = record.job
    if not job.enhance or record.value("enhancement") is not None:
        return
    if job.segments:
        records.update(job_id, enhancement=enhance_segments(self, job))
        return
    result = enhance_safely(self, job.prompt, content=job.content_type, quality=job.type.quality)
    if result.applied:
        log.info("job=%s prompt enhanced by %s", job_id, result.model)
    else:
        Metrics(records.redis).count(ENHANCEMENT_FALLBACKS, result.fallback_reason or "")
        log.warning(
            "job=%s enhancement fell back (%s): %s", job_id, result.fallback_reason, result.detail
        )
    records.update(job_id, enhancement=result.metadata())


def enhance_segments(task: Task, job: Job) -> dict[str, Any]:
    """A storyboard's segments enhanced one by one, each as any prompt is (and cached so):
    the record's `enhancement` holds the prompts WAN receives, in order, and what happened
    to each. Once one runs out of time the rest keep their own prompts: the stage's time
    limit is for the whole storyboard."""
    results: list[Enhancement] = []
    for segment in job.segments:
        if results and results[-1].fallback_reason == "timeout":
            results.append(Enhancement.fallback(segment.prompt, "timeout",
                                                "an earlier segment ran out of time"))  # fmt: skip
            continue
        results.append(enhance_safely(task, segment.prompt, content="video",
                                      quality=job.type.quality))  # fmt: skip
    fell_back = [r for r in results if not r.applied]
    if fell_back:
        Metrics(get_records().redis).count(
            ENHANCEMENT_FALLBACKS, fell_back[0].fallback_reason or ""
        )
        log.warning("job=%s enhancement of %d of %d segments fell back (%s)", job.id,
                    len(fell_back), len(results), fell_back[0].fallback_reason)  # fmt: skip
    return {
        "enhancement_applied": not fell_back,
        "enhanced_segment_prompts": [result.prompt for result in results],
        "segment_enhancements": [result.metadata() for result in results],
    }


@app.task(bind=True, name="wan.enhance_prompt")
def enhance_prompt(self: Task, prompt: str, content: Content, quality: Quality) -> dict[str, Any]:
    """`POST /enhance`: the same enhancement, answered to the API through the result backend."""
    result = enhance_safely(self, prompt, content=content, quality=quality)
    return {"prompt": result.prompt, "seconds": result.seconds, **result.metadata()}
