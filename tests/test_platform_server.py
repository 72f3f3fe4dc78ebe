"""The fake platform must accept what the real client sends and refuse what the platform does.

Uploads go through the real supabase-py client, so a passing test here means the worker's
own supabase-py calls will meet the same behaviour as in production.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from storage3.exceptions import StorageApiError
from supabase import create_client

from worker.local.platform import LocalPlatform
from worker.local.stack import free_port

SERVICE_KEY = "test-service-key"
SECRET = "test-callback-secret"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
def platform() -> Iterator[LocalPlatform]:
    with LocalPlatform(service_key=SERVICE_KEY, callback_secret=SECRET) as fake:
        yield fake


def upload_png(url: str, key: str, path: str, upsert: str = "true") -> None:
    client = create_client(url, key)
    client.storage.from_("workspace-temp").upload(
        path, PNG, file_options={"content-type": "image/png", "upsert": upsert}
    )


def post_callback(
    platform: LocalPlatform,
    body: dict[str, Any],
    *,
    secret: str = SECRET,
    key: str = SERVICE_KEY,
) -> httpx.Response:
    raw = json.dumps(body).encode()
    signature = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-Callback-Signature": f"sha256={signature}",
    }
    return httpx.post(f"{platform.url}/functions/v1/job-callback", content=raw, headers=headers)


def test_supabase_py_upload_is_recorded(platform: LocalPlatform) -> None:
    upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png")

    upload = platform.upload_at("workspace-temp", "u1/j1/0.png")
    assert upload is not None
    assert upload.data == PNG
    assert upload.content_type == "image/png"
    assert upload.upsert is True
    assert upload.headers["content-type"].startswith("multipart/form-data")


def test_raw_body_upload_uses_request_content_type(platform: LocalPlatform) -> None:
    response = httpx.post(
        f"{platform.url}/storage/v1/object/workspace-temp/u1/j1/0.mp4",
        content=b"mp4 bytes",
        headers={
            "Authorization": f"Bearer {SERVICE_KEY}",
            "Content-Type": "video/mp4",
            "x-upsert": "true",
        },
    )

    assert response.status_code == 200
    assert response.json()["Key"] == "workspace-temp/u1/j1/0.mp4"
    upload = platform.upload_at("workspace-temp", "u1/j1/0.mp4")
    assert upload is not None
    assert (upload.content_type, upload.data, upload.upsert) == ("video/mp4", b"mp4 bytes", True)


def test_upload_with_wrong_key_is_refused(platform: LocalPlatform) -> None:
    with pytest.raises(StorageApiError) as excinfo:
        upload_png(platform.url, "wrong-key", "u1/j1/0.png")

    assert excinfo.value.status == "401"
    assert platform.uploads == []


def test_overwrite_needs_upsert(platform: LocalPlatform) -> None:
    upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png", upsert="false")
    upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png", upsert="true")

    with pytest.raises(StorageApiError) as excinfo:
        upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png", upsert="false")
    assert excinfo.value.status == "409"


def test_fail_next_uploads(platform: LocalPlatform) -> None:
    platform.fail_next_uploads(1, status=500)

    with pytest.raises(StorageApiError):
        upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png")
    upload_png(platform.url, SERVICE_KEY, "u1/j1/0.png")

    assert platform.rejected_uploads == 1
    assert len(platform.uploads) == 1


def test_signed_callback_is_recorded(platform: LocalPlatform) -> None:
    body = {"job_id": "j1", "status": "processing", "assets": []}

    response = post_callback(platform, body)

    assert response.status_code == 200
    assert response.json() == {"success": True}
    [callback] = platform.callbacks_for("j1")
    assert callback.body == body
    assert callback.raw == json.dumps(body).encode()
    assert callback.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("secret", "key"), [("wrong-secret", SERVICE_KEY), (SECRET, "wrong-key")])
def test_bad_signature_or_key_is_refused(platform: LocalPlatform, secret: str, key: str) -> None:
    response = post_callback(platform, {"job_id": "j1", "status": "failed"}, secret=secret, key=key)

    assert response.status_code == 401
    assert platform.callbacks == []


def test_missing_signature_is_refused(platform: LocalPlatform) -> None:
    response = httpx.post(
        f"{platform.url}/functions/v1/job-callback",
        json={"job_id": "j1", "status": "failed"},
        headers={"Authorization": f"Bearer {SERVICE_KEY}"},
    )

    assert response.status_code == 401
    assert platform.callbacks == []


def test_fail_next_callbacks(platform: LocalPlatform) -> None:
    platform.fail_next_callbacks(2)
    body = {"job_id": "j1", "status": "completed"}

    statuses = [post_callback(platform, body).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert platform.rejected_callbacks == 2
    assert len(platform.callbacks_for("j1")) == 1


def test_wait_for_callback_wakes_on_arrival(platform: LocalPlatform) -> None:
    body = {"job_id": "j1", "status": "completed"}
    sender = threading.Timer(0.2, post_callback, args=(platform, body))
    sender.start()

    callback = platform.wait_for_callback("j1", "completed", timeout_s=5)

    sender.join()
    assert callback.body == body


def test_wait_for_callback_times_out_listing_what_arrived(platform: LocalPlatform) -> None:
    post_callback(platform, {"job_id": "j1", "status": "processing"})

    with pytest.raises(AssertionError, match="'status': 'processing'"):
        platform.wait_for_callback("j1", "completed", timeout_s=0.2)


def test_update_worker_url_is_recorded_only_for_a_worker_whose_health_answers(
    platform: LocalPlatform,
) -> None:
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    worker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    url = f"{platform.url}/functions/v1/update-worker-url"
    healthy = {"worker_url": f"http://127.0.0.1:{worker.server_address[1]}"}
    silent = {"worker_url": f"http://127.0.0.1:{free_port()}"}
    key = {"Authorization": f"Bearer {SERVICE_KEY}"}
    before = len(platform.worker_url_updates)
    try:
        refused = httpx.post(url, json=healthy, headers={"Authorization": "Bearer wrong"})
        unhealthy = httpx.post(url, json=silent, headers=key, timeout=10)
        accepted = httpx.post(url, json=healthy, headers=key, timeout=10)
    finally:
        worker.shutdown()

    assert (refused.status_code, unhealthy.status_code, accepted.status_code) == (401, 400, 200)
    assert platform.worker_url_updates[before:] == [healthy]
