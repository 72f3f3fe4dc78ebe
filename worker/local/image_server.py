"""A small HTTP server for reference images on a loopback address, with a request log.

The demo serves its reference image from here (allow-listed in REFERENCE_ALLOWED_HOSTS);
the tests and the benchmark serve good, hostile and broken answers from it, and read its
log to prove that a refused address never received a request.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


@dataclass(frozen=True)
class Route:
    """One answer: a body with a content type, or a redirect; `length` False omits it."""

    body: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    location: str | None = None
    length: bool = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that hangs up (at its byte cap, say) is expected, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ImageServer:
    """Serves `routes` on `host` (any 127.0.0.0/8 address) and a free port, in a thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []  # paths, in arrival order
        #: Status codes to answer the next requests of a path with, before its route.
        self._faults: dict[str, list[int]] = {}
        #: Paths whose requests wait, unanswered, until their event is set (`hold`).
        self._holds: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                route, fault = server._take(self.path)
                if (held := server._holds.get(self.path)) is not None:
                    held.wait()
                if fault is not None:
                    route = Route(status=fault, body=b"try later", content_type="text/plain")
                if route is None:
                    route = Route(status=404, body=b"not found", content_type="text/plain")
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.location is not None:
                    self.send_header("Location", route.location)
                if route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:  # the body ends when the connection closes
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                try:
                    self.wfile.write(route.body)
                except ConnectionError:
                    pass  # the client stopped reading at its byte cap

            def log_message(self, *args: object) -> None:
                pass

        self._server = _Server((host, 0), Handler)
        self.host = host
        self.port = self._server.server_address[1]
        self.base_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _take(self, path: str) -> tuple[Route | None, int | None]:
        with self._lock:
            self.requests.append(path)
            pending = self._faults.get(path) or []
            return self.routes.get(path), (pending.pop(0) if pending else None)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def add(self, path: str, route: Route) -> str:
        """Serve `route` at `path`; returns its URL."""
        self.routes[path] = route
        return self.url(path)

    def fail_next(self, path: str, statuses: list[int]) -> None:
        """Answer the next requests of `path` with these statuses (e.g. 503s), then normally."""
        with self._lock:
            self._faults[path] = list(statuses)

    def hold(self, path: str) -> threading.Event:
        """Keep every request of `path` open, unanswered, until the returned event is set: a
        test catches a worker mid-download (`requests_for`), then releases it."""
        released = threading.Event()
        with self._lock:
            self._holds[path] = released
        return released

    def requests_for(self, path: str) -> int:
        with self._lock:
            return self.requests.count(path)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
