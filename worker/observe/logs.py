"""Log lines: one JSON object per line for log collectors, or text for a terminal.

`LOG_FORMAT` chooses (`json`, `text`; default: text on a terminal, JSON otherwise). Every
line logged while a task of a job runs carries `job_id`, `stage`, `task_id` and `worker`:
Celery's `task_prerun` signal puts them in a context variable, and a filter copies them
onto each record. Celery's own lines about a task (received, succeeded, retry) name it by
task id `{job_id}:{stage}`, so the same filter reads the job from there.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from worker.jobs.model import SAFE_ID
from worker.jobs.records import JobRecord
from worker.settings import Settings

#: The job a task of this process is working on, for every log line it writes.
job_context: ContextVar[dict[str, str] | None] = ContextVar("job_context", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s"


@contextmanager
def job_scope(**fields: str) -> Iterator[None]:
    """Lines logged inside carry these fields (the bridge, for the item it handles)."""
    token = job_context.set(fields)
    try:
        yield
    finally:
        job_context.reset(token)


def job_summary(record: JobRecord, status: str) -> dict[str, Any]:
    """The one line per finished job an operator greps for: what ran, how long, how big."""
    generation = record.value("generation") or {}
    output = record.value("output") or {}
    enhancement = record.value("enhancement") or {}
    return {
        "status": status,
        "job_type": record.fields.get("job_type"),
        "stage_seconds": record.stage_seconds(),
        "file_size_bytes": output.get("file_size_bytes"),
        "resolution": f"{generation['width']}x{generation['height']}" if generation else None,
        "frame_num": generation.get("frame_num"),
        "fps": output.get("fps"),
        "reference_mode": (generation.get("metadata") or {}).get("reference_mode"),
        "enhancement_applied": enhancement.get("enhancement_applied"),
        "peak_gpu_memory_mib": generation.get("peak_gpu_memory_mib"),
        "error_stage": record.fields.get("error_stage"),
    }


def context_of_task(task_id: str | None) -> dict[str, str]:
    """`job_id` and `stage` from a task id `{job_id}:{stage}[...]`; empty for other ids."""
    if not task_id or ":" not in task_id:
        return {}
    job_id, stage = task_id.split(":")[:2]
    return {"job_id": job_id, "stage": stage} if SAFE_ID.fullmatch(job_id) else {}


class JobContext(logging.Filter):
    """Copies the current job's fields onto each record (never over fields it already has)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(job_context.get() or {})
        if not fields and isinstance(record.args, dict):  # Celery: "Task %(name)s[%(id)s] ..."
            fields = context_of_task(record.args.get("id"))
        for name, value in fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        job_id = fields.get("job_id")
        record.job = f" [job={job_id} {fields.get('stage', '')}]" if job_id else ""
        return True


class _Json(JsonFormatter):
    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, message: dict
    ) -> None:
        super().add_fields(log_record, record, message)
        log_record.pop("job", None)  # the text format's rendering of the context
        log_record.pop("color_message", None)  # uvicorn's copy of the message with ANSI codes


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return _Json(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
    return logging.Formatter(TEXT_FORMAT)


def resolved_format(settings: Settings) -> str:
    """LOG_FORMAT, or text when a person watches the terminal and JSON when a program does."""
    if settings.log_format is not None:
        return settings.log_format
    return "text" if sys.stderr.isatty() else "json"


def apply(logger: logging.Logger, settings: Settings) -> None:
    """Give every handler of `logger` the chosen format and the job context."""
    chosen = formatter(resolved_format(settings))
    for handler in logger.handlers:
        handler.setFormatter(chosen)
        if not any(isinstance(f, JobContext) for f in handler.filters):
            handler.addFilter(JobContext())


def configure(settings: Settings, *, level: int = logging.INFO) -> None:
    """The root logger of a `python -m worker ...` process: one stderr handler, our format."""
    logging.basicConfig(level=level, force=True)
    apply(logging.getLogger(), settings)
