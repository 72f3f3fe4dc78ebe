"""Only a 2xx answer is a delivered callback; the record never says more than happened.

post_callback against the local platform over real HTTP, and the callback stage run in
this process (`apply`) against the private Redis, with the settings it reads from the
environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import new_job
from worker.callback import post_callback, processing_body
from worker.errors import DeliveryFailed, DeliveryRejected, TransientError
from worker.jobs import parse_job
from worker.local.platform import LocalPlatform
from worker.local.stack import RedisServer
from worker.records import get_records
from worker.settings import Settings, get_settings


def settings_for(platform: LocalPlatform) -> Settings:
    return Settings(_env_file=None, **{k.lower(): v for k, v in platform.worker_env().items()})


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_a_delivered_callback(platform: LocalPlatform, status: int) -> None:
    platform.fail_next_callbacks(1, status=status)

    with pytest.raises(DeliveryRejected, match=f"HTTP {status}, not retried"):
        post_callback(settings_for(platform), processing_body("job-redirected"))


def test_a_503_is_worth_retrying_and_says_only_what_happened(platform: LocalPlatform) -> None:
    platform.fail_next_callbacks(1, status=503)

    with pytest.raises(TransientError) as caught:
        post_callback(settings_for(platform), processing_body("job-503"))

    assert str(caught.value) == "callback processing for job job-503: HTTP 503"


def test_without_a_callback_url_nothing_is_sent_and_it_says_why() -> None:
    settings = Settings(_env_file=None, callback_url=None, supabase_url=None)

    with pytest.raises(DeliveryFailed, match="neither CALLBACK_URL nor SUPABASE_URL is set"):
        post_callback(settings, processing_body("job-nowhere"))


@pytest.fixture
def no_callback_url(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, tmp_path: Path
) -> Iterator[None]:
    """This process's settings: the private Redis, and no callback URL at all."""
    for name in ("CALLBACK_URL", "SUPABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    get_settings.cache_clear()
    get_records.cache_clear()
    yield
    get_settings.cache_clear()
    get_records.cache_clear()


def test_a_final_callback_never_sent_is_recorded_as_undelivered_keeping_the_jobs_error(
    no_callback_url: None,
) -> None:
    from tasks.media import callback

    # Given a job that failed in generation
    records = get_records()
    job = parse_job(new_job("image_fast"))
    records.create(job, payload="{}")
    records.fail(job.id, stage="generate", error=RuntimeError("the GPU caught fire"))

    # When its failed callback runs with no callback URL configured
    result = callback.apply(args=(job.id, "failed"))

    # Then nothing counts as sent, the record says the delivery failed and why, and the
    # job's own error and stage are still what the on-call engineer needs
    assert result.failed()
    record = records.get(job.id)
    assert "final_callback" not in record.fields
    assert record.status == "delivery_failed"
    assert record.fields["delivery_error_stage"] == "callback"
    assert "CALLBACK_URL" in record.fields["delivery_error"]
    assert record.fields["error"] == "the GPU caught fire"
    assert record.fields["error_stage"] == "generate"
    assert record.fields["error_type"] == "RuntimeError"
