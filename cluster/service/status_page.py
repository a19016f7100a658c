"""The tilerun status page: one self-contained HTML page, ``/api/snapshot`` and ``/api/task``,
behind Ray's token.

``StatusPage(snapshot_fn, task_fn).start()`` serves, from a thread of the calling process (the
engine actor in the service), the page in :mod:`cluster.service.status_html`, the JSON of
``snapshot_fn()``, and ``/api/task?id=ID``: ``task_fn(ID)``, one task with its text so far (the
page shows it under the tables for ``URL#task=ID``; a task's id in the table links there).
Every request must carry Ray's authentication token, as Ray's dashboard requires: an
``Authorization: Bearer <token>`` (or ``X-Ray-Authorization``) header, or the cookie Ray's
dashboard uses. A browser opens ``URL?token=<token>`` once: the page checks it, sets the cookie
(HttpOnly, SameSite=Strict) and redirects to the URL without the token. Anything else gets 401.
It binds to loopback unless told otherwise (``host=`` or ``TILERUN_STATUS_HOST``).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from cluster.service.ray_token import ray_auth_token
from cluster.service.status_html import PAGE

log = logging.getLogger(__name__)

# Ray's dashboard cookie name: one login (on either page of the same host) serves both.
COOKIE = "ray-authentication-token"
COOKIE_MAX_AGE_S = 30 * 24 * 3600  # as Ray's dashboard
# No external assets can load even if a snapshot string tried to inject one.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class StatusPage:
    """Serve the status page over ``snapshot_fn`` (a dict in the service's snapshot schema).

    ``token=None`` takes Ray's token (:func:`cluster.service.ray_token.ray_auth_token`);
    ``host=None`` takes ``TILERUN_STATUS_HOST``, else 127.0.0.1; ``port=0`` picks a free port.
    ``snapshot_fn`` is called from the server's request threads, once per page refresh;
    ``task_fn(task_id)`` (optional) likewise while a task is shown: a dict with at least ``id``,
    ``state`` and ``text``, or None for an unknown id.
    """

    def __init__(
        self,
        snapshot_fn: Callable[[], dict],
        host: str | None = None,
        port: int = 0,
        token: str | None = None,
        task_fn: Callable[[str], dict | None] | None = None,
    ) -> None:
        self.snapshot_fn = snapshot_fn
        self.task_fn = task_fn
        self.host = host or os.environ.get("TILERUN_STATUS_HOST") or "127.0.0.1"
        self.port = port
        self._token = (token if token is not None else ray_auth_token()).strip()
        if not self._token:
            raise ValueError("StatusPage token is empty; pass Ray's token or token=None")
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("StatusPage.start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._server.server_address[1]}/"

    @property
    def login_url(self) -> str:
        """The URL with the token, for a browser's first visit (it holds the secret: do not log)."""
        return f"{self.url}?token={quote(self._token, safe='')}"

    def start(self) -> str:
        """Bind and serve from a daemon thread; returns the page's URL (without the token)."""
        if self._server is not None:
            return self.url
        server_cls = _V6Server if ":" in self.host else _Server
        self._server = server_cls((self.host, self.port), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tilerun-status-page", daemon=True
        )
        self._thread.start()
        log.info("tilerun status page at %s (Ray's token required)", self.url)
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> StatusPage:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- authentication ----------------------------------------------------------------------
    def token_ok(self, presented: str | None) -> bool:
        """Constant-time comparison with the expected token (no early exit on the first byte)."""
        if not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


def _handler_for(page: StatusPage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tilerun-status"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if "token" in query:
                # A browser's login: check, keep it in an HttpOnly cookie, drop it from the URL.
                if not page.token_ok(query["token"][0]):
                    return self._unauthorized()
                self.send_response(303)
                self.send_header("Location", parts.path or "/")
                self.send_header(
                    "Set-Cookie",
                    f"{COOKIE}={quote(page._token, safe='')}; Path=/; HttpOnly; "
                    f"SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}",
                )
                self._common_headers()
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if not page.token_ok(self._presented_token()):
                return self._unauthorized()
            if parts.path in ("/", "/index.html"):
                return self._send(200, "text/html; charset=utf-8", PAGE.encode())
            if parts.path == "/api/snapshot":
                try:
                    body = json.dumps(_finite(page.snapshot_fn()), default=str)
                except Exception as e:  # the page shows why, and keeps polling
                    log.warning("status page snapshot failed: %s", e)
                    body, code = json.dumps({"error": f"{type(e).__name__}: {e}"}), 503
                else:
                    code = 200
                return self._send(code, "application/json", body.encode())
            if parts.path == "/api/task":
                return self._task(query.get("id", [""])[0])
            return self._send(404, "text/plain; charset=utf-8", b"404 not found\n")

        def _task(self, task_id: str) -> None:
            try:
                view = page.task_fn(task_id) if page.task_fn and task_id else None
            except Exception as e:  # noqa: BLE001 - the page shows why, and keeps polling
                log.warning("status page task %r failed: %s", task_id, e)
                body = json.dumps({"error": f"{type(e).__name__}: {e}"})
                return self._send(503, "application/json", body.encode())
            if view is None:
                body = json.dumps({"error": f"no task {task_id!r}"})
                return self._send(404, "application/json", body.encode())
            return self._send(200, "application/json", json.dumps(_finite(view)).encode())

        def _presented_token(self) -> str | None:
            for name in ("Authorization", "X-Ray-Authorization"):
                value = self.headers.get(name, "")
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return token
            for cookie_header in self.headers.get_all("Cookie") or []:
                for item in cookie_header.split(";"):
                    key, _, value = item.strip().partition("=")
                    if key == COOKIE and value:
                        return unquote(value)
            return None

        def _unauthorized(self) -> None:
            body = (
                b"401 Unauthorized: the tilerun status page needs Ray's token. Open "
                b"URL?token=$(ray get-auth-token) in a browser, or send "
                b"'Authorization: Bearer <token>'.\n"
            )
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="tilerun"')
            self._common_headers()
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self._common_headers()
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _common_headers(self) -> None:
            for k, v in _SECURITY_HEADERS.items():
                self.send_header(k, v)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("status page: " + fmt, *args)

    return Handler


def _finite(x):
    """The snapshot with NaN/inf as null: browsers' JSON.parse rejects them."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
