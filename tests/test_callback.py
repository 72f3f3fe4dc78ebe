"""Only a 2xx answer is a delivered callback; the record never says more than happened.

post_callback against the local platform over real HTTP, and the callback stage run in
this process (`apply`) against the private Redis, with the settings it reads from the
environment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import CALLBACK_BEARER, SERVICE_KEY, new_job
from worker.errors import DeliveryFailed, DeliveryRejected, TransientError
from worker.flow.callback import CallbackGate, post_callback, processing_body, sends_service_key
from worker.jobs.model import parse_job
from worker.jobs.records import JobRecords, get_records
from worker.local.platform import LocalPlatform
from worker.local.stack import RedisServer, wait_until
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


# --- The service-role key goes to the Supabase project's own origin only -----------------


@pytest.mark.parametrize(
    ("supabase_url", "callback_url", "same"),
    [
        ("https://abc.supabase.co", "https://abc.supabase.co/functions/v1/job-callback", True),
        ("https://abc.supabase.co/", "https://ABC.supabase.co:443/functions/v1/x", True),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/functions/v1/job-callback", True),
        ("https://abc.supabase.co", "https://hooks.example.com/job-callback", False),
        ("https://abc.supabase.co", "http://abc.supabase.co/functions/v1/job-callback", False),
        ("https://abc.supabase.co", "https://abc.supabase.co:8443/job-callback", False),
        ("https://abc.supabase.co", "https://abc.supabase.co.evil.com/job-callback", False),
        ("https://abc.supabase.co", "https://user@evil.com/abc.supabase.co", False),
        ("http://127.0.0.1:8000", "http://localhost:8000/functions/v1/job-callback", False),
        (None, "https://hooks.example.com/job-callback", False),
    ],
)  # fmt: skip
def test_only_supabase_urls_own_origin_gets_the_service_key(
    supabase_url: str | None, callback_url: str, same: bool
) -> None:
    settings = Settings(
        _env_file=None, supabase_url=supabase_url, callback_url=callback_url,
        supabase_service_key=SERVICE_KEY,
    )  # fmt: skip

    assert sends_service_key(settings) is same


@pytest.mark.parametrize(
    ("where", "bearer", "authorization"),
    [
        ("supabase", CALLBACK_BEARER, f"Bearer {SERVICE_KEY}"),
        ("other", None, None),
        ("other", CALLBACK_BEARER, f"Bearer {CALLBACK_BEARER}"),
    ],
    ids=["supabase-origin", "other-origin-signature-alone", "other-origin-callback-bearer"],
)
def test_a_callback_carries_the_service_key_to_supabases_origin_and_never_elsewhere(
    platform: LocalPlatform, platform_with_bearer: LocalPlatform,
    where: str, bearer: str | None, authorization: str | None,
) -> None:  # fmt: skip
    # Given the local platform reached by its own address (SUPABASE_URL's origin) or by
    # another name, with or without CALLBACK_BEARER
    receiver = platform if bearer is None else platform_with_bearer
    callback_url = None if where == "supabase" else receiver.other_origin_callback_url
    settings = Settings(
        _env_file=None, **{k.lower(): v for k, v in receiver.worker_env().items()},
        callback_url=callback_url, callback_bearer=bearer,
    )  # fmt: skip
    body = processing_body(f"job-{where}-{bearer is not None}")

    # When a callback is posted
    post_callback(settings, body)

    # Then it arrives signed, with the service key only on Supabase's own origin
    [arrived] = receiver.callbacks_for(body["job_id"])
    assert arrived.headers.get("authorization") == authorization
    assert arrived.headers["x-callback-signature"].startswith("sha256=")


# --- No processing callback after the final one (CallbackGate) on the private Redis -------


@pytest.fixture
def gate_records(redis_server: RedisServer) -> JobRecords:
    return JobRecords(redis.Redis.from_url(redis_server.url), ttl_s=60)


def created_job(records: JobRecords) -> str:
    job = parse_job(new_job("image_fast"))
    records.create(job, payload="{}")
    return job.id


def test_a_final_callback_waits_for_the_processing_callback_in_flight(
    gate_records: JobRecords,
) -> None:
    # Given a progress callback in flight (its POST not yet answered)
    job_id = created_job(gate_records)
    gate = CallbackGate(gate_records, Settings(_env_file=None))
    sent: list[str] = []
    answered = threading.Event()

    def progress_callback() -> None:
        with gate.processing(job_id) as allowed:
            assert allowed
            answered.wait(timeout=30)
            sent.append("processing")

    def final_callback() -> None:
        gate.close(job_id)
        sent.append("final")

    in_flight = threading.Thread(target=progress_callback)
    in_flight.start()
    gate_key = gate.key(job_id)
    wait_until(lambda: gate_records.redis.hlen(gate_key) == 1, timeout_s=10, what="in flight")

    # When the final callback comes, and only then the progress callback's answer
    final = threading.Thread(target=final_callback)
    final.start()
    wait_until(lambda: gate_records.redis.hexists(gate_key, "closed"), timeout_s=10,
               what="the gate closes")  # fmt: skip
    answered.set()
    in_flight.join(timeout=10)
    final.join(timeout=10)

    # Then the final one went out after it, and no later one may start
    assert sent == ["processing", "final"]
    with gate.processing(job_id) as allowed:
        assert not allowed


@pytest.mark.parametrize("ending", ["cancel requested", "failed", "newer run"])
def test_no_processing_callback_starts_once_the_job_is_ending(
    gate_records: JobRecords, ending: str
) -> None:
    job_id = created_job(gate_records)
    gate = CallbackGate(gate_records, Settings(_env_file=None))
    fields = {
        "cancel requested": {"cancel_requested_at": "1"},
        "failed": {"status": "failed"},
        "newer run": {"retries": "1"},
    }[ending]
    gate_records.write(job_id, **fields)

    with gate.processing(job_id, run=0) as allowed:
        assert not allowed


def test_a_new_run_opens_the_gate_its_last_final_callback_closed(
    gate_records: JobRecords,
) -> None:
    job_id = created_job(gate_records)
    gate = CallbackGate(gate_records, Settings(_env_file=None))
    gate.close(job_id)  # run 0 was cancelled

    gate_records.write(job_id, retries="1")  # an operator's retry

    with gate.processing(job_id, run=1) as allowed:
        assert allowed
    with gate.processing(job_id, run=0) as allowed:
        assert not allowed


def test_a_processing_callback_whose_worker_died_holds_the_final_back_only_for_its_lease(
    gate_records: JobRecords,
) -> None:
    # Given a processing callback marked in flight by a worker that died mid-POST (never
    # ends); its lease is two callback timeouts: 0.2 s here
    job_id = created_job(gate_records)
    gate = CallbackGate(gate_records, Settings(_env_file=None, callback_timeout_s=0.1))
    died = gate.processing(job_id)
    assert died.__enter__()

    # When the final callback comes, it goes out once the lease lapsed
    final = threading.Thread(target=gate.close, args=(job_id,), daemon=True)
    final.start()
    final.join(timeout=10)
    assert not final.is_alive()
