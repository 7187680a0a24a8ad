"""`--api-key`: every endpoint but /health needs `Authorization: Bearer KEY`; 401 in OpenAI's shape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import edge_ds
from edge_ds import server as server_mod
from edge_ds.errors import EdgeDSError
from edge_ds.server import make_server

KEY = "sk-local-test-key"
CHAT = {"messages": [{"role": "user", "content": "In the beginning"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def lm():
    return edge_ds.load()


@pytest.fixture(scope="module")
def server(lm):
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, api_key=KEY)
    srv.start()
    yield srv
    srv.close()


def call(url: str, path: str, body: dict | None = None, auth: str | None = None,
         method: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.mark.parametrize("path, body", [("/v1/models", None), ("/v1/models/edge-ds-tiny", None),
                                        ("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {"prompt": "In the beginning", "max_tokens": 2}),
                                        ("/v1/nothing", None)])  # an unknown path tells nothing without the key
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Bearer " + KEY[:-1], "Bearer " + KEY + "x",
                                  "Basic " + KEY, KEY, "Bearer ", "Bearer"])
def test_without_the_key_every_endpoint_is_401(server, path, body, auth):
    status, out, headers = call(server.url, path, body, auth)
    assert status == 401
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["code"] == "invalid_api_key" and out["error"]["type"] == "invalid_request_error"
    assert "API key" in out["error"]["message"] and KEY not in out["error"]["message"]
    assert headers.get("WWW-Authenticate") == "Bearer"


def test_with_the_key_everything_answers(server):
    for auth in ("Bearer " + KEY, "bearer " + KEY, "Bearer  " + KEY + " "):
        assert call(server.url, "/v1/models", auth=auth)[0] == 200
    status, out, _ = call(server.url, "/v1/chat/completions", CHAT, "Bearer " + KEY)
    assert status == 200 and out["choices"][0]["message"]["content"]
    assert call(server.url, "/v1/nothing", None, "Bearer " + KEY)[0] == 404


def test_health_needs_no_key(server):
    assert call(server.url, "/health")[:2] == (200, {"status": "ok", "model": "edge-ds-tiny"})
    assert call(server.url, "/health", auth="Bearer wrong")[0] == 200


def test_the_key_is_compared_in_constant_time(server, monkeypatch):
    seen = []

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    real = server_mod.hmac.compare_digest
    monkeypatch.setattr(server_mod.hmac, "compare_digest", spy)
    call(server.url, "/v1/models", auth="Bearer nope")
    call(server.url, "/v1/models", auth="Bearer " + KEY)
    # digests of equal length, whatever the length of what was sent
    assert len(seen) == 2 and all(len(a) == len(b) == 32 for a, b in seen)


def test_no_key_means_no_check_and_bad_keys_are_refused(lm):
    srv = make_server(lm, "127.0.0.1", 0, quiet=True)
    srv.start()
    try:
        assert call(srv.url, "/v1/models", auth="Bearer anything")[0] == 200
        assert call(srv.url, "/v1/models")[0] == 200
    finally:
        srv.close()
    for bad in ("", "two words", "tab\tkey", "ключ"):
        with pytest.raises(EdgeDSError, match="API key"):
            make_server(lm, "127.0.0.1", 0, quiet=True, api_key=bad)


def test_cli_takes_the_key_from_the_environment():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NO_PROXY="*", EDGE_DS_API_KEY=KEY)
    p = subprocess.Popen([sys.executable, "-m", "edge_ds.cli", "serve", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(url, "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                assert p.poll() is None and time.monotonic() < deadline, p.communicate()
                time.sleep(0.1)
        assert call(url, "/v1/models")[0] == 401
        assert call(url, "/v1/models", auth="Bearer " + KEY)[0] == 200
    finally:
        p.kill()
        p.communicate()


def test_chat_client_app_sends_the_key(server):
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "apps" / "chat_client.py"
    env = {k: v for k, v in os.environ.items() if k != "EDGE_DS_API_KEY"}
    args = [sys.executable, str(app), "--url", server.url, "--temperature", "0", "--max-tokens", "4"]
    without = subprocess.run(args, input="In the beginning\n/exit\n", capture_output=True, text=True,
                             timeout=60, env=env)
    assert "error: You didn't provide an API key" in without.stdout
    for extra, environ in ((["--api-key", KEY], env), ([], {**env, "EDGE_DS_API_KEY": KEY})):
        out = subprocess.run(args + extra, input="In the beginning\n/exit\n", capture_output=True, text=True,
                             timeout=60, env=environ)
        assert out.returncode == 0 and "error" not in out.stdout and out.stdout.strip(">\n "), out
