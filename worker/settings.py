"""The one settings object: every knob an operator turns is an environment variable here.

The names are the deployment interface of DESIGN.md; keep them.
"""

from __future__ import annotations

import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Field names whose values are secrets: shown as set/unset, never printed.
SECRET_FIELDS = (
    "supabase_service_key", "job_callback_secret", "callback_bearer", "wan_worker_api_key",
    "redis_password", "redis_sentinel_password", "ui_basic_auth",
)  # fmt: skip
#: Field names holding URLs that may carry credentials (`redis://:password@host`).
URL_FIELDS = ("redis_url", "platform_redis_url", "supabase_url", "callback_url", "public_url")


def mask_url_credentials(url: str) -> str:
    """The URL with any user name and password replaced by `***`, for printing; each URL of
    a `;` list (`sentinel://...;sentinel://...`) on its own."""
    if ";" in url:
        return ";".join(mask_url_credentials(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


#: `<stage>_soft_limit_s`: the setting of a stage's soft time limit.
SOFT_LIMIT_SUFFIX = "_soft_limit_s"


#: What WORKER_HOST may be: it becomes part of queue names (`cpu.<host>`), Redis keys and
#: Celery node names, so a plain host label or dotted hostname, nothing else.
WORKER_HOST_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def soft_limit_setting(stage: str) -> str:
    """The environment variable holding a stage's soft time limit, as an operator writes it."""
    return f"{stage}{SOFT_LIMIT_SUFFIX}".upper()


class Settings(BaseSettings):
    """Effective configuration, read once per process from the environment and `.env`."""

    model_config = SettingsConfigDict(env_file=".env", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: This host's name in its media queue (`cpu.<host>`), the bridge's processing list,
    #: the workers' node names (`gpu@<host>`) and job records; unique per host, shared by
    #: every process of one host (they share its spool). Default: the machine's hostname.
    worker_host: str = Field(default_factory=socket.gethostname)
    platform_redis_url: str | None = None
    platform_queue: str = "wan_queue"
    #: Redis Sentinel (worker/connections.py): the sentinels' `host:port`, comma list. Set,
    #: every client of REDIS_URL's Redis asks them for the master of REDIS_MASTER_NAME and
    #: uses REDIS_URL's database; REDIS_URL's host and port are not used. (Or: REDIS_URL as
    #: `sentinel://host:port;sentinel://host:port/0` URLs.)
    redis_sentinels: str = ""
    redis_master_name: str = "mymaster"
    #: The password of REDIS_URL's data nodes (AUTH), in place of one inside REDIS_URL.
    redis_password: SecretStr | None = None
    #: The sentinels' own password (their `requirepass`), for every Sentinel set.
    redis_sentinel_password: SecretStr | None = None
    #: With Sentinel, how long the writes the platform relies on (a job taken off its list,
    #: a stage completed, a final status) wait for one replica to have them, milliseconds
    #: (`WAIT 1`); 0: never wait.
    redis_wait_replica_ms: int = Field(default=500, ge=0)

    wan_model_path: Path | None = None
    wan_vace_model_path: Path | None = None
    qwen_model_path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    storage_backend: Literal["local", "supabase"] = "local"
    output_dir: Path = Path("./outputs")
    spool_dir: Path = Path("./spool")

    #: Spool directories older than this whose job is not running are swept away, seconds.
    spool_orphan_age_s: float = 6 * 3600
    #: How often each media (cpu queue) worker sweeps the spool for orphans, seconds.
    spool_sweep_interval_s: float = 600

    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    callback_url: str | None = None
    job_callback_secret: SecretStr | None = None
    #: The Bearer token of callbacks to a CALLBACK_URL outside SUPABASE_URL's origin, which
    #: never get the service-role key; unset: those carry the HMAC signature alone.
    callback_bearer: SecretStr | None = None
    #: Seconds one callback POST may take before it counts as a timeout (then retried).
    callback_timeout_s: float = 10.0
    #: How long uploads and final callbacks keep retrying after their first attempt, seconds.
    delivery_retry_window_s: float = 3600

    wan_worker_api_key: SecretStr | None = None
    api_host: str = "0.0.0.0"
    api_port: int = 7860
    public_url: str | None = None
    #: The longest one `GET /jobs/{id}/events` stream lasts, seconds; the client's EventSource
    #: then reconnects and starts again from a snapshot.
    event_stream_max_s: PositiveFloat = 3600
    #: How long a watch token (the job page's `?token=`) is good for, seconds.
    ui_token_ttl_s: PositiveInt = 7200
    #: `user:password` of the fleet page (`GET /ui/`; without a `:`, the password of any user
    #: name); unset: any user name with WAN_WORKER_API_KEY as the password.
    ui_basic_auth: SecretStr | None = None
    #: Origins (comma list, e.g. `https://app.example.com`) whose pages may read a job's event
    #: stream, preview and result with its watch token from their own script (CORS, GET
    #: only, no cookies); empty: none (embedding the job page needs none).
    ui_allowed_origins: str = ""
    runpod_pod_id: str | None = None
    #: Hosts (or addresses) whose references may be private, e.g. an internal CDN: comma list.
    reference_allowed_hosts: str = ""
    #: Deadline of one reference download, seconds.
    reference_timeout_s: float = 30.0
    #: Retries of a reference download that failed transiently, before text-only generation.
    reference_retries: int = 4

    #: How long a job record lives in Redis after its last update, seconds.
    job_record_ttl_s: int = 7 * 24 * 3600
    #: How long a dispatcher's claim on a job id keeps other dispatchers off it, seconds:
    #: claim to send takes milliseconds, so a claim this old is a dead dispatcher's, and the
    #: bridge that kept the same job's item takes it over and sends it.
    claim_lease_s: PositiveFloat = 300

    #: Deliveries of one stage (its worker died, the broker handed it out again) before the
    #: job fails and is dead-lettered; Celery's own retries of network stages do not count.
    max_deliveries: int = 3
    #: How long a running stage's lease in the job record lasts without renewal, seconds;
    #: renewed every third of it. A duplicate delivery waits while the lease is live.
    stage_lease_s: float = 60.0
    #: After how long a job whose running stage's owner is gone (its lease not renewed: the
    #: worker killed whole, the host lost), or whose media stages wait on a host with no
    #: live media worker, runs again elsewhere, seconds. The media workers' lost-job sweep
    #: (tasks/worker_steps.py) sends it again; at least STAGE_LEASE_S.
    lost_job_timeout_s: PositiveFloat = 300
    #: After how long Redis hands out an unacknowledged task message again, seconds
    #: (its worker died whole); unset: twice the longest hard time limit. Only the backstop
    #: of LOST_JOB_TIMEOUT_S (a job lost while no media worker sweeps anywhere): the
    #: sweep sends a lost job again long before, and the old message, if it ever comes back,
    #: is skipped (`superseded`, see `JobRecords.begin_stage`).
    broker_visibility_timeout_s: int | None = None
    #: On SIGTERM, how long a worker lets its running job finish before it hands the job
    #: back to the queue and exits, seconds (keep it below the platform's stop grace).
    shutdown_grace_s: float = 60.0

    #: Images ahead of videos: each waits at most for the generation in progress.
    priority_lanes: bool = True
    #: A user's n-th waiting job goes behind every other user's first (order within one
    #: user stays FIFO).
    fair_share: bool = True
    #: A job waiting for generation longer than this goes ahead of every lane, seconds (no
    #: video starves behind a stream of images). Checked every tenth of it (1-30 s).
    promote_after_s: PositiveFloat = 600

    #: Image jobs (text only, one frame) a generation worker runs in one pipeline call: it
    #: takes compatible waiting ones beside the one it starts. Unset: 4 on CUDA, 1 on a CPU.
    image_batch_max: PositiveInt | None = None
    #: How long a batch that is not full waits for more compatible images, milliseconds.
    image_batch_wait_ms: NonNegativeFloat = 0

    def promote_sweep_interval_s(self) -> float:
        """How often each generation worker looks for jobs to promote, seconds."""
        return max(1.0, min(30.0, self.promote_after_s / 10))

    #: Send `processing` callbacks with `metadata.progress` while generating (throttled).
    progress_callbacks: bool = False
    #: ... at most one per 10 % of the job and per this many seconds.
    progress_callback_every_s: float = 5.0
    #: A live preview of the forming image every this many seconds of denoising, and at
    #: the last step; 0: none.
    preview_every_s: NonNegativeFloat = 1.0
    #: The preview's longest edge, pixels.
    preview_max_px: int = Field(default=256, ge=16, le=1024)

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

    #: Soft time limit of each stage, seconds: past it the stage stops and the job fails
    #: naming the stage and the limit (enhance falls back to the user's prompt instead).
    enhance_soft_limit_s: PositiveFloat = 120
    generate_soft_limit_s: PositiveFloat = 1_800
    encode_soft_limit_s: PositiveFloat = 300
    thumbnail_soft_limit_s: PositiveFloat = 60
    upload_soft_limit_s: PositiveFloat = 300
    callback_soft_limit_s: PositiveFloat = 60
    #: Seconds between a stage's soft limit and its hard one, where the pool child is killed
    #: (a stage that did not stop at the soft limit, e.g. inside one long CUDA kernel).
    hard_limit_grace_s: PositiveFloat = 60

    def stage_time_limits(self) -> dict[str, tuple[float, float]]:
        """(soft, hard) time limit of each stage, seconds; hard is always above soft."""
        stages = [name for name in type(self).model_fields if name.endswith(SOFT_LIMIT_SUFFIX)]
        return {
            name.removesuffix(SOFT_LIMIT_SUFFIX): (
                getattr(self, name),
                getattr(self, name) + self.hard_limit_grace_s,
            )
            for name in stages
        }

    # --- Long videos by continuation (CONTRACT.md section 7; worker/generation/windows.py).
    #: Frames one window makes (normalised down to 4n+1): a job longer than this runs as
    #: windows, each after the first continuing from the last frames of the one before.
    continuation_window_frames: int = Field(default=81, ge=5, le=121)
    #: Frames of the video so far each later window starts from, kept (normalised down to
    #: 4n+1; a long job fails naming it unless it is below the window).
    continuation_overlap_frames: int = Field(default=5, ge=1, le=121)
    #: Noise on the kept frames' conditioning, Wan2GP's scale 0..150 (against a blurred seam).
    continuation_overlap_noise: float = Field(default=20, ge=0, le=150)
    #: How far each window's colours are moved to the first window's (Lab mean and deviation).
    continuation_color_match: float = Field(default=1.0, ge=0, le=1)
    #: Frames cross-faded at each seam (at most the overlap); 0: the seam is a clean cut.
    continuation_blend_frames: int = Field(default=0, ge=0, le=121)

    # --- Speed on real GPUs: worker/generation/speed.py applies these once per loaded model;
    # --- an option the device cannot run stops the GPU worker at start (README "On a GPU host").
    #: diffusers attention backend: `auto` (the fastest installed: flash 3 or 2, else PyTorch's
    #: SDPA; `native` on CPU), `native`, `flash`, `_flash_3`, `sage`, `_native_cudnn`, ...
    attention_backend: str = "auto"
    #: `blocks`: torch.compile each repeated transformer block (regional compilation, short
    #: compile); `off`: eager.
    torch_compile: Literal["off", "blocks"] = "off"
    #: Step cache: reuse the transformer's work between steps where it changes little.
    wan_cache: Literal["none", "first_block", "mag", "taylorseer"] = "none"
    #: The cache's threshold (higher: faster, further from uncached); unset: diffusers' default
    #: (first_block 0.05, mag 0.06). TaylorSeer has none and ignores it.
    wan_cache_threshold: float | None = Field(default=None, gt=0)
    #: A step- and CFG-distilled LoRA (diffusers' Wan LoRA format) for the `*_fast` types.
    wan_distill_lora: Path | None = None
    #: ... or a distilled transformer in diffusers format (a folder with config.json).
    wan_turbo_model_path: Path | None = None
    #: Steps of a turbo job (guidance 1.0: one transformer pass per step).
    turbo_steps: int = Field(default=4, ge=1, le=100)
    #: Decode the VAE in tiles: less peak memory for long or large videos, a little slower.
    vae_tiling: bool = False
    #: `model`: whole models move to the GPU when used; `group`: blocks stream in (CUDA only).
    offload: Literal["none", "model", "group"] = "none"
    #: `fp8`: torchao float8 weights and activations for the transformer (CUDA, Ada or newer).
    quantize: Literal["none", "fp8"] = "none"
    #: Run one small generation after load, before the first job (loads and compiles).
    warmup: bool = False

    def speed_options_to_check(self) -> bool:
        """Whether a speed option is set that the device or a file may refuse. Only then does
        the GPU worker's main process import torch at start, to check it before the fork."""
        return (
            self.attention_backend not in ("auto", "native")
            or self.offload != "none"
            or self.quantize != "none"
            or self.wan_distill_lora is not None
            or self.wan_turbo_model_path is not None
        )

    @field_validator(*SECRET_FIELDS)
    @classmethod
    def _blank_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        """`KEY=` in an env file reads as an empty secret: it means not set, everywhere (an
        empty API key compared equal to a missing Authorization header and opened the API)."""
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("worker_host")
    @classmethod
    def _safe_worker_host(cls, value: str) -> str:
        if not WORKER_HOST_PATTERN.fullmatch(value):
            raise ValueError(
                f"WORKER_HOST {value!r} cannot name a queue: 1-64 letters, digits, '.', '-' "
                "or '_', starting with a letter or digit"
            )
        return value

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

    @model_validator(mode="after")
    def _lost_job_timeout_outlasts_the_lease(self) -> Settings:
        """A lease is renewed every third of STAGE_LEASE_S: a shorter timeout would call a
        healthy stage lost between two renewals."""
        if self.lost_job_timeout_s < self.stage_lease_s:
            raise ValueError(
                f"LOST_JOB_TIMEOUT_S={self.lost_job_timeout_s:g} must be at least "
                f"STAGE_LEASE_S={self.stage_lease_s:g}"
            )
        return self

    def lost_job_sweep_interval_s(self) -> float:
        """How often each media worker sweeps for lost jobs: a fifth of LOST_JOB_TIMEOUT_S,
        at most a minute, so a lost job runs again at most a fifth later than its timeout."""
        return min(self.lost_job_timeout_s / 5, 60.0)

    @model_validator(mode="after")
    def _one_turbo_checkpoint(self) -> Settings:
        """The fast types have one distilled checkpoint: a LoRA or a transformer."""
        if self.wan_distill_lora is not None and self.wan_turbo_model_path is not None:
            raise ValueError("set WAN_DISTILL_LORA or WAN_TURBO_MODEL_PATH, not both")
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
