"""The status page over HTTP: Ray's token or 401, the cookie login, loopback, the JSON snapshot."""

from __future__ import annotations

import http.client
import json
import math
from urllib.parse import urlsplit

import pytest

from cluster.service.status_page import COOKIE, StatusPage

TOKEN = "tok-3f9a1c77e2b84d0e"


def _snapshot() -> dict:
    return {
        "engine": {"started_at": 1.0, "model": "tiny", "tp": 1, "ray_address": "", "home": ""},
        "workers": [{"rank": 0, "node": "n", "device": "cpu", "name": "x", "memory_bytes": 1}],
        "tasks": [{"id": "t1", "state": "running", "prefill_done": 3, "prefill_total": 8,
                   "decode_tokens_per_s": math.nan, "ttft_s": math.inf}],
        "throughput": [],
        "counters": {"bytes_spilled": 0},
    }  # fmt: skip


def _get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture
def page():
    p = StatusPage(_snapshot, token=TOKEN)
    p.start()
    yield p
    p.stop()


def test_everything_is_refused_without_the_token(page):
    for path in ("/", "/index.html", "/api/snapshot", "/api/task?id=t1", "/nope"):
        code, headers, body = _get(page.url, path)
        assert code == 401, (path, code)
        assert b"Ray's token" in body and "bearer" in headers["www-authenticate"].lower()
        assert b"tilerun" in body and b"workers" not in body
    bad = [
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Cookie": f"{COOKIE}=wrong"},
        {"Cookie": f"other={TOKEN}"},
    ]
    for h in bad:
        assert _get(page.url, "/api/snapshot", h)[0] == 401, h
    assert _get(page.url, "/?token=wrong")[0] == 401


def test_bearer_header_and_rays_header_are_accepted(page):
    for name in ("Authorization", "X-Ray-Authorization"):
        code, headers, body = _get(page.url, "/api/snapshot", {name: f"Bearer {TOKEN}"})
        assert code == 200 and headers["content-type"] == "application/json"
        snap = json.loads(body)  # strict JSON: NaN and inf became null
        assert snap["workers"][0]["device"] == "cpu"
        assert (
            snap["tasks"][0]["decode_tokens_per_s"] is None and snap["tasks"][0]["ttft_s"] is None
        )
    code, headers, body = _get(page.url, "/", {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and b"<title>tilerun status</title>" in body
    # No external assets: nothing is loaded from another origin, and the CSP forbids it.
    assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
    assert b"https://" not in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert _get(page.url, "/nope", {"Authorization": f"Bearer {TOKEN}"})[0] == 404


def test_query_token_sets_an_httponly_cookie_and_drops_the_token_from_the_url(page):
    code, headers, _ = _get(page.url, f"/?token={TOKEN}")
    assert code == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};")
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attr in cookie
    code, _, body = _get(page.url, "/api/snapshot", {"Cookie": f"a=b; {COOKIE}={TOKEN}"})
    assert code == 200 and json.loads(body)["engine"]["model"] == "tiny"


def test_a_failing_snapshot_is_a_503_with_the_reason():
    def broken() -> dict:
        raise RuntimeError("engine actor died")

    with StatusPage(broken, token=TOKEN) as p:
        code, _, body = _get(p.url, "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
    assert code == 503 and "engine actor died" in json.loads(body)["error"]


def test_a_task_with_its_text_by_id_and_404_or_503_otherwise():
    def task(task_id: str) -> dict | None:
        if task_id == "boom":
            raise RuntimeError("store locked")
        return (
            {"id": "t1", "state": "running", "text": "<b>once</b> upon"}
            if task_id == "t1"
            else None
        )

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with StatusPage(_snapshot, token=TOKEN, task_fn=task) as p:
        code, headers, body = _get(p.url, "/api/task?id=t1", auth)
        assert code == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"id": "t1", "state": "running", "text": "<b>once</b> upon"}
        code, _, body = _get(p.url, "/api/task?id=t9", auth)
        assert code == 404 and json.loads(body)["error"] == "no task 't9'"
        assert _get(p.url, "/api/task", auth)[0] == 404
        code, _, body = _get(p.url, "/api/task?id=boom", auth)
        assert code == 503 and "store locked" in json.loads(body)["error"]
    with StatusPage(_snapshot, token=TOKEN) as p:  # a page without tasks to show
        assert _get(p.url, "/api/task?id=t1", auth)[0] == 404


def test_binds_loopback_unless_configured(monkeypatch):
    monkeypatch.delenv("TILERUN_STATUS_HOST", raising=False)
    with StatusPage(_snapshot, token=TOKEN) as p:
        assert p.url.startswith("http://127.0.0.1:")
        assert p._server.server_address[0] == "127.0.0.1"
    monkeypatch.setenv("TILERUN_STATUS_HOST", "localhost")
    with StatusPage(_snapshot, token=TOKEN) as p:
        assert p.url.startswith("http://localhost:")
        assert p._server.server_address[0] == "127.0.0.1"
        assert _get(p.url, "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_empty_token_is_refused():
    with pytest.raises(ValueError, match="token is empty"):
        StatusPage(_snapshot, token="  ")


@pytest.mark.slow
@pytest.mark.ray
def test_default_token_is_the_one_rays_servers_accept(ray_cluster):
    """``token=None`` takes Ray's token: the value Ray's own validator accepts, from Ray's file."""
    from ray._private.authentication.authentication_constants import (
        AUTHENTICATION_TOKEN_COOKIE_NAME,
    )
    from ray._raylet import validate_authentication_token

    from cluster.service.ray_token import _from_env_or_file, ray_auth_token

    token = ray_auth_token()
    assert validate_authentication_token(f"Bearer {token}")
    assert not validate_authentication_token(f"Bearer {token}0")
    assert _from_env_or_file() == token  # RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    assert COOKIE == AUTHENTICATION_TOKEN_COOKIE_NAME  # a login to Ray's dashboard serves both
    with StatusPage(lambda: {"workers": []}) as p:
        assert _get(p.url, "/api/snapshot", {"Authorization": f"Bearer {token}"})[0] == 200
        assert _get(p.url, "/api/snapshot")[0] == 401


@pytest.mark.slow
def test_token_sources_in_rays_order_and_the_error_without_one(tmp_path):
    """Ray's token sources in Ray's order; with none, one clear line and no unguarded page."""
    import os
    import subprocess
    import sys

    code = (
        "from cluster.service.status_page import StatusPage\n"
        "from scheduler.errors import TilerunError\n"
        "try:\n"
        "    print('TOKEN', StatusPage(dict)._token)\n"
        "except TilerunError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)

    def run(extra: dict) -> str:
        r = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = run({})
    assert out.startswith("ERROR no Ray authentication token found"), out
    assert "ray get-auth-token --generate" in out
    out = run({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert out.startswith(f"ERROR RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'} cannot be read"), out
    # Ray's order: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("homeTok\n")
    (tmp_path / "tok").write_text("fileTok")
    assert run({}) == "TOKEN homeTok\n"
    assert run({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "TOKEN fileTok\n"
    both = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok"), "RAY_AUTH_TOKEN": "envTok"}
    assert run(both) == "TOKEN envTok\n"
