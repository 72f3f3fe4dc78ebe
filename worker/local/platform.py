"""A real HTTP stand-in for the Supabase platform (CONTRACT.md sections 3 and 4).

Signed URLs (what the job page links a result by) work as Supabase Storage's: `POST
/storage/v1/object/sign/{bucket}/{path}` with the service key answers a `signedURL` path
that a browser GETs without any key until it expires.

The demo and the tests point SUPABASE_URL at `LocalPlatform.url`, so the worker's real HTTP
code (supabase-py, httpx) is exercised end to end: auth headers, multipart uploads,
callback signatures and retries on platform errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from worker.jobs.records import FINAL_STATUSES


def queue_body(job: dict[str, Any], *, shape: str = "object") -> str:
    """A job as the platform's queue-job function RPUSHes it: an object, or `["<object>"]`."""
    return json.dumps(job) if shape == "object" else json.dumps([json.dumps(job)])


@dataclass(frozen=True)
class Upload:
    """One stored object. `content_type` is the file's own type (the part's, if multipart)."""

    bucket: str
    path: str
    content_type: str
    data: bytes
    upsert: bool
    headers: dict[str, str]  # lower-case names, as received


@dataclass(frozen=True)
class Callback:
    """One accepted job-callback; `raw` is kept to check exactly what was signed."""

    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]  # lower-case names, as received


@dataclass
class _Faults:
    """Injected failures still to serve for one endpoint, and how many were served."""

    remaining: int = 0
    status: int = 503
    served: int = 0

    def take(self) -> int | None:
        """The status to fail this request with, or None to handle it normally."""
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        self.served += 1
        return self.status


def _storage_error(status: int, error: str, message: str) -> JSONResponse:
    """Errors shaped like Supabase Storage's, which storage3 parses into StorageApiError."""
    body = {"statusCode": str(status), "error": error, "message": message}
    return JSONResponse(body, status_code=status)


class LocalPlatform:
    """Supabase Storage upload + the job-callback and update-worker-url edge functions.

    Runs uvicorn in a daemon thread on 127.0.0.1 and a free port. Handlers run on the
    server thread, tests read from theirs, so all recorded state is guarded by `_cond`.

    Addressed as `localhost` (`other_origin_callback_url`), its job-callback endpoint stands
    for a callback receiver outside the Supabase project's origin: it takes the signature
    with `Authorization: Bearer {callback_bearer}`, or with no Authorization header when
    `callback_bearer` is None, and refuses the service-role key, which must never go there.
    """

    def __init__(
        self,
        *,
        service_key: str | None = None,
        callback_secret: str | None = None,
        callback_bearer: str | None = None,
    ) -> None:
        service_key = service_key or secrets.token_hex(16)
        callback_secret = callback_secret or secrets.token_hex(16)
        self.service_key = service_key
        self.callback_secret = callback_secret
        self.callback_bearer = callback_bearer
        self._cond = threading.Condition()
        self._uploads: dict[tuple[str, str], Upload] = {}
        #: Signed URL token -> (bucket, path, expiry on this process's clock).
        self._signed: dict[str, tuple[str, str, float]] = {}
        self._callbacks: list[Callback] = []
        self._refused_callbacks: list[dict[str, Any]] = []
        self._worker_url_updates: list[dict[str, Any]] = []
        self._upload_faults = _Faults()
        self._callback_faults = _Faults()
        self._registration_faults = _Faults()
        self._upload_hold: threading.Event | None = None
        self._held_uploads = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        #: The same endpoint on another origin (another host name, the same server).
        self.other_origin_callback_url = (
            f"http://localhost:{self._socket.getsockname()[1]}/functions/v1/job-callback"
        )
        config = uvicorn.Config(self._build_app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:  # uvicorn offers no event to wait on
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("LocalPlatform server failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def worker_env(self) -> dict[str, str]:
        """What the workers need to reach this platform; CALLBACK_URL follows SUPABASE_URL."""
        return {
            "SUPABASE_URL": self.url,
            "SUPABASE_SERVICE_KEY": self.service_key,
            "JOB_CALLBACK_SECRET": self.callback_secret,
        }

    # -- fault injection ---------------------------------------------------------------

    def fail_next_uploads(self, n: int, status: int = 503) -> None:
        """The next n upload requests answer `status` before any checks and store nothing."""
        with self._cond:
            self._upload_faults.remaining, self._upload_faults.status = n, status

    def fail_next_callbacks(self, n: int, status: int = 503) -> None:
        """The next n callback requests answer `status` before any checks, unrecorded."""
        with self._cond:
            self._callback_faults.remaining, self._callback_faults.status = n, status

    def hold_uploads(self) -> threading.Event:
        """Keep every upload request open, unanswered, until the returned event is set: a
        test catches a worker mid-upload (`wait_for_held_upload`), then releases them."""
        released = threading.Event()
        with self._cond:
            self._upload_hold, self._held_uploads = released, 0
        return released

    def wait_for_held_upload(self, timeout_s: float = 10.0) -> None:
        """Block until an upload request is being held by `hold_uploads`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held_uploads > 0, timeout=timeout_s):
                raise AssertionError(f"no upload request arrived within {timeout_s}s")

    def fail_next_registrations(self, n: int, status: int = 503) -> None:
        """The next n update-worker-url requests answer `status` before any checks."""
        with self._cond:
            self._registration_faults.remaining, self._registration_faults.status = n, status

    @property
    def rejected_registrations(self) -> int:
        """Registration requests answered with an injected failure."""
        with self._cond:
            return self._registration_faults.served

    @property
    def rejected_uploads(self) -> int:
        """Upload requests answered with an injected failure."""
        with self._cond:
            return self._upload_faults.served

    @property
    def rejected_callbacks(self) -> int:
        """Callback requests answered with an injected failure."""
        with self._cond:
            return self._callback_faults.served

    def rejected_callbacks_for(self, job_id: str) -> list[str]:
        """Statuses of this job's callbacks answered with an injected failure, in order."""
        with self._cond:
            return [b.get("status") for b in self._refused_callbacks if b.get("job_id") == job_id]

    # -- inspection --------------------------------------------------------------------

    @property
    def uploads(self) -> list[Upload]:
        with self._cond:
            return list(self._uploads.values())

    @property
    def callbacks(self) -> list[Callback]:
        """Accepted callbacks in arrival order."""
        with self._cond:
            return list(self._callbacks)

    @property
    def worker_url_updates(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._worker_url_updates)

    def upload_at(self, bucket: str, path: str) -> Upload | None:
        with self._cond:
            return self._uploads.get((bucket, path))

    def callbacks_for(self, job_id: str) -> list[Callback]:
        with self._cond:
            return [c for c in self._callbacks if c.body.get("job_id") == job_id]

    def wait_for_callback(self, job_id: str, status: str, timeout_s: float = 10.0) -> Callback:
        """Block until a callback for `job_id` with `status` has arrived, and return it."""
        return self._wait_for(job_id, frozenset({status}), timeout_s)

    def wait_for_final(self, job_id: str, timeout_s: float = 10.0) -> Callback:
        """Block until the job's final callback (completed, failed or cancelled) has arrived."""
        return self._wait_for(job_id, FINAL_STATUSES, timeout_s)

    def _wait_for(self, job_id: str, statuses: frozenset[str], timeout_s: float) -> Callback:
        def find() -> Callback | None:  # called by wait_for with the lock held
            return next(
                (
                    c
                    for c in self._callbacks
                    if c.body.get("job_id") == job_id and c.body.get("status") in statuses
                ),
                None,
            )

        with self._cond:
            found = self._cond.wait_for(find, timeout=timeout_s)
            if found is None:
                got = [c.body for c in self._callbacks if c.body.get("job_id") == job_id]
                raise AssertionError(
                    f"no callback job_id={job_id!r} status in {sorted(statuses)} within "
                    f"{timeout_s}s; received for this job: {got}"
                )
            return found

    # -- HTTP --------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        expected = f"Bearer {self.service_key}"
        return hmac.compare_digest(request.headers.get("authorization", ""), expected)

    def _callback_authorized(self, request: Request) -> bool:
        """The service key on the Supabase origin; elsewhere `callback_bearer`, or nothing."""
        if request.headers.get("host") == self.url.removeprefix("http://"):
            return self._authorized(request)
        expected = f"Bearer {self.callback_bearer}" if self.callback_bearer else ""
        return hmac.compare_digest(request.headers.get("authorization", ""), expected)

    def _take_fault(self, faults: _Faults) -> int | None:
        with self._cond:
            return faults.take()

    @staticmethod
    async def _json_object(request: Request) -> dict[str, Any] | None:
        """The body as a JSON object, or None if it is not one (the caller answers 400)."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        # Before the upload route, which would take `sign` for a bucket.
        @app.post("/storage/v1/object/sign/{bucket}/{path:path}")
        async def sign(bucket: str, path: str, request: Request) -> JSONResponse:
            if not self._authorized(request):
                return _storage_error(401, "Unauthorized", "invalid service key")
            body = await self._json_object(request)
            if body is None or not str(body.get("expiresIn", "")).isdigit():
                return _storage_error(400, "InvalidRequest", "expiresIn is required")
            with self._cond:
                if (bucket, path) not in self._uploads:
                    return _storage_error(404, "not_found", "Object not found")
                token = secrets.token_urlsafe(16)
                self._signed[token] = (bucket, path, time.time() + int(body["expiresIn"]))
            return JSONResponse({"signedURL": f"/object/sign/{bucket}/{path}?token={token}"})

        @app.get("/storage/v1/object/sign/{bucket}/{path:path}")
        async def signed(bucket: str, path: str, token: str = "") -> Response:
            with self._cond:
                granted = self._signed.get(token)
                upload = self._uploads.get((bucket, path))
            if granted is None or granted[:2] != (bucket, path) or granted[2] < time.time():
                return _storage_error(400, "InvalidJWT", "invalid or expired signature")
            if upload is None:
                return _storage_error(404, "not_found", "Object not found")
            return Response(upload.data, media_type=upload.content_type)

        @app.post("/storage/v1/object/{bucket}/{path:path}")
        async def upload(bucket: str, path: str, request: Request) -> JSONResponse:
            if (released := self._upload_hold) is not None and not released.is_set():
                with self._cond:
                    self._held_uploads += 1
                    self._cond.notify_all()
                while not released.is_set():  # the server's loop goes on serving others
                    await asyncio.sleep(0.05)
            if (status := self._take_fault(self._upload_faults)) is not None:
                return _storage_error(status, "InjectedFailure", "injected by the test")
            if not self._authorized(request):
                return _storage_error(401, "Unauthorized", "invalid service key")
            content_type = request.headers.get("content-type", "")
            try:
                if content_type.startswith("multipart/form-data"):
                    part = (await request.form()).get("file")
                    if not isinstance(part, UploadFile):
                        return _storage_error(400, "InvalidRequest", "no 'file' part")
                    content_type, data = part.content_type or "", await part.read()
                else:
                    data = await request.body()
            except ClientDisconnect:  # e.g. a held upload whose worker was killed meanwhile
                return _storage_error(499, "ClientClosed", "the client went away mid-upload")
            upsert = request.headers.get("x-upsert", "false").lower() == "true"
            with self._cond:
                if (bucket, path) in self._uploads and not upsert:
                    # Real Storage refuses to overwrite without x-upsert: true.
                    return _storage_error(409, "Duplicate", "The resource already exists")
                self._uploads[(bucket, path)] = Upload(
                    bucket, path, content_type, data, upsert, dict(request.headers)
                )
                self._cond.notify_all()
            return JSONResponse({"Key": f"{bucket}/{path}", "Id": str(uuid.uuid4())})

        @app.post("/functions/v1/job-callback")
        async def job_callback(request: Request) -> JSONResponse:
            if (status := self._take_fault(self._callback_faults)) is not None:
                refused = await self._json_object(request)
                with self._cond:
                    self._refused_callbacks.append(refused or {})
                return JSONResponse({"error": "injected by the test"}, status_code=status)
            if not self._callback_authorized(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            raw = await request.body()
            digest = hmac.new(self.callback_secret.encode(), raw, hashlib.sha256).hexdigest()
            signature = request.headers.get("x-callback-signature", "")
            if not hmac.compare_digest(signature, f"sha256={digest}"):
                return JSONResponse({"error": "Invalid signature"}, status_code=401)
            body = await self._json_object(request)
            if body is None:
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            with self._cond:
                self._callbacks.append(Callback(body, raw, dict(request.headers)))
                self._cond.notify_all()
            return JSONResponse({"success": True})

        @app.post("/functions/v1/update-worker-url")
        async def update_worker_url(request: Request) -> JSONResponse:
            if (status := self._take_fault(self._registration_faults)) is not None:
                return JSONResponse({"error": "injected by the test"}, status_code=status)
            if not self._authorized(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            body = await self._json_object(request)
            if body is None:
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            # As the platform does: accept only a worker whose /health answers within 5 s.
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    health = await client.get(f"{body.get('worker_url')}/health")
            except (httpx.HTTPError, ValueError) as e:
                return JSONResponse({"error": f"worker health check failed: {e}"}, 400)
            if health.status_code != 200:
                return JSONResponse({"error": f"worker health {health.status_code}"}, 400)
            with self._cond:
                self._worker_url_updates.append(body)
                self._cond.notify_all()
            return JSONResponse({"success": True})

        return app
