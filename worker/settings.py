"""The one settings object: every knob an operator turns is an environment variable here.

The names are the deployment interface of DESIGN.md; keep them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Field names whose values are secrets: shown as set/unset, never printed.
SECRET_FIELDS = ("supabase_service_key", "job_callback_secret", "wan_worker_api_key")
#: Field names holding URLs that may carry credentials (`redis://:password@host`).
URL_FIELDS = ("redis_url", "platform_redis_url", "supabase_url", "callback_url", "public_url")


def mask_url_credentials(url: str) -> str:
    """The URL with any user name and password replaced by `***`, for printing."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


class Settings(BaseSettings):
    """Effective configuration, read once per process from the environment and `.env`."""

    model_config = SettingsConfigDict(env_file=".env", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    platform_redis_url: str | None = None
    platform_queue: str = "wan_queue"

    wan_model_path: Path | None = None
    wan_vace_model_path: Path | None = None
    qwen_model_path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    storage_backend: Literal["local", "supabase"] = "local"
    output_dir: Path = Path("./outputs")
    spool_dir: Path = Path("./spool")

    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    callback_url: str | None = None
    job_callback_secret: SecretStr | None = None
    #: Seconds one callback POST may take before it counts as a timeout (then retried).
    callback_timeout_s: float = 10.0
    #: How long uploads and final callbacks keep retrying after their first attempt, seconds.
    delivery_retry_window_s: float = 3600

    wan_worker_api_key: SecretStr | None = None
    api_host: str = "0.0.0.0"
    api_port: int = 7860
    public_url: str | None = None
    runpod_pod_id: str | None = None
    #: Hosts (or addresses) whose references may be private, e.g. an internal CDN: comma list.
    reference_allowed_hosts: str = ""
    #: Deadline of one reference download, seconds.
    reference_timeout_s: float = 30.0
    #: Retries of a reference download that failed transiently, before text-only generation.
    reference_retries: int = 4

    #: How long a job record lives in Redis after its last update, seconds.
    job_record_ttl_s: int = 7 * 24 * 3600

    #: Send `processing` callbacks with `metadata.progress` while generating (throttled).
    progress_callbacks: bool = False
    #: ... at most one per 10 % of the job and per this many seconds.
    progress_callback_every_s: float = 5.0

    #: `json` (one object per line, with job_id) or `text`; unset: text on a terminal only.
    log_format: Literal["json", "text"] | None = None

    #: Deadline of one Qwen generation, seconds (transformers' `max_time`).
    enhance_timeout_s: float = 60.0
    #: How long `POST /enhance` waits for the enhance queue beyond the deadline (a model
    #: load, a job ahead on a shared worker), seconds; past it the answer is a fallback.
    enhance_queue_wait_s: float = 30.0
    enhance_max_new_tokens: int = 320
    enhance_temperature: float = 0.7
    enhance_top_p: float = 0.9
    enhance_top_k: int = 40
    enhance_repetition_penalty: float = 1.1
    #: How long an enhanced prompt is reused for the same request, seconds.
    enhance_cache_ttl_s: int = 7 * 24 * 3600
    #: Unload Qwen after this many idle seconds (0: keep it loaded).
    enhance_idle_unload_s: float = 0.0

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        """Fill the defaults that DESIGN.md derives from other settings."""
        derived: dict[str, str] = {}
        if self.platform_redis_url is None:
            derived["platform_redis_url"] = self.redis_url
        if self.callback_url is None and self.supabase_url:
            derived["callback_url"] = f"{self.supabase_url.rstrip('/')}/functions/v1/job-callback"
        if self.public_url is None and self.runpod_pod_id:
            derived["public_url"] = f"https://{self.runpod_pod_id}-7860.proxy.runpod.net"
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        return self

    def masked(self) -> dict[str, str]:
        """Every setting as text: secrets reduced to 'set' or 'unset', URL credentials masked."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                shown[name] = "set" if value else "unset"
            elif name in URL_FIELDS and value:
                shown[name] = mask_url_credentials(value)
            else:
                shown[name] = "" if value is None else str(value)
        return shown


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use (never at import)."""
    return Settings()
