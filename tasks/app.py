"""The Celery app; every process (workers, bridge, flower) shares this one."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

from worker.observe.loaded_models import LoadedModels
from worker.records import get_records
from worker.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("wan")
app.config_from_object("celeryconfig")


@celeryd_after_setup.connect
def forget_models_of_previous_run(sender: str, **_: Any) -> None:
    """A (re)started worker holds no model yet, whatever its dead predecessor held."""
    LoadedModels(get_records().redis).clear(sender)


@celeryd_after_setup.connect
def warn_about_settings(instance: Any, **_: Any) -> None:
    """Say at start what will go wrong later, so the operator reads it before the first job."""
    settings = get_settings()
    queues = set(instance.app.amqp.queues.consume_from)
    if not settings.job_callback_secret:
        log.warning("JOB_CALLBACK_SECRET is not set: callbacks go out unsigned (the platform 401s)")
    if not settings.callback_url:
        log.warning("neither CALLBACK_URL nor SUPABASE_URL is set: no callback will be sent")
    if "gpu" in queues and settings.wan_model_path is None:
        log.error("WAN_MODEL_PATH is not set: every generation will fail until it points at "
                  "Wan2.1-T2V-1.3B in diffusers format")  # fmt: skip
    if "enhance" in queues and settings.qwen_model_path is None:
        log.warning("QWEN_MODEL_PATH is not set: enhanced job types run with the user's prompt "
                    "(enhancement_fallback_reason: no_model)")  # fmt: skip
