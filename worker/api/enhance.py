"""POST /enhance: the frontend's interactive prompt rewrite, through the `enhance` queue.

The answer always carries a usable prompt: the rewrite, or the user's own with the reason
(`enhancement_fallback_reason`) when Qwen is missing, too slow, busy or wrote nothing usable.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from celery.exceptions import TimeoutError as ResultTimeout
from fastapi import APIRouter, Depends, HTTPException, status
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field

from worker.api.auth import Authorized
from worker.jobs.model import PROMPT_MAX_CHARS, JobType
from worker.settings import Settings, get_settings

router = APIRouter(dependencies=[Authorized], tags=["enhance"])

#: The rewrite's task (tasks/enhance.py), sent by name: the API imports no task, and no
#: model library comes with one.
ENHANCE_PROMPT_TASK = "wan.enhance_prompt"


#: One character that is not white space as str.strip() sees it, spelled out: `\S` means
#: another set in a client's (ECMA) regex engine, which counts U+001C..U+001F as text and
#: U+FEFF as space, so a schema-valid prompt of U+001F three times was refused with 422.
NOT_SPACE = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class EnhanceRequest(BaseModel):
    # Python's `re` here, and a pattern that means the same in the schema's readers.
    model_config = ConfigDict(regex_engine="python-re")

    #: Some text: not only white space (the pattern), at most the job prompt limit.
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS, pattern=NOT_SPACE)
    #: The one enhancement model this worker runs (Qwen 2.5-7B Base).
    model: Literal["qwen_base"] = "qwen_base"
    #: Picks the prompt style (video or image) and length (fast or high).
    job_type: JobType = JobType.video_fast


class EnhanceResponse(BaseModel):
    """CONTRACT.md section 6, plus why a prompt came back unchanged."""

    success: bool
    enhanced_prompt: str
    original_prompt: str
    enhancement_source: Literal["qwen_base", "fallback"]
    processing_time: float
    model: Literal["qwen_base"]
    enhancement_applied: bool
    worker: Literal["wan"] = "wan"
    enhancement_cached: bool = False
    enhancement_fallback_reason: str | None = None
    enhancement_fallback_detail: str | None = None


@router.post("/enhance", responses={503: {"description": "Redis unreachable"}})
def enhance(
    request: EnhanceRequest, settings: Annotated[Settings, Depends(get_settings)]
) -> EnhanceResponse:
    from tasks.app import app  # the Celery app, only once a request comes

    started = time.perf_counter()
    wait_s = settings.enhance_timeout_s + settings.enhance_queue_wait_s
    asked = (request.prompt, request.job_type.content_type, request.job_type.quality)
    try:
        pending = app.signature(ENHANCE_PROMPT_TASK, asked).apply_async(
            expires=wait_s,  # not started by then: dropped, never run for nobody
        )
        answer = pending.get(timeout=wait_s)
    except ResultTimeout:
        answer = {
            "prompt": request.prompt,
            "enhancement_applied": False,
            "enhancement_fallback_reason": "timeout",
            "enhancement_fallback_detail": f"no answer from the enhance queue in {wait_s:g} s",
        }
    except OperationalError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Redis unreachable: {e}") from e
    applied = bool(answer["enhancement_applied"])
    return EnhanceResponse(
        success=applied,
        enhanced_prompt=answer["prompt"],
        original_prompt=request.prompt,
        enhancement_source="qwen_base" if applied else "fallback",
        processing_time=round(time.perf_counter() - started, 3),
        model=request.model,
        enhancement_applied=applied,
        enhancement_cached=bool(answer.get("enhancement_cached")),
        enhancement_fallback_reason=answer.get("enhancement_fallback_reason"),
        enhancement_fallback_detail=answer.get("enhancement_fallback_detail"),
    )
