"""`edge-ds serve`: the OpenAI-compatible server on the shipped model, checked against the Python API."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

import edge_ds
from edge_ds.errors import EdgeDSError
from edge_ds.openai_schema import CHAT_FIELDS, COMPLETION_FIELDS
from edge_ds.server import make_server

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Thou art a scribe."},
        {"role": "user", "content": "In the beginning God created the heaven and the earth."},
        {"role": "assistant", "content": "And the earth was without form, and void."},
        {"role": "user", "content": "And God said, Let there be light."}]
PROMPT = "And the LORD spake unto Moses, saying,"


@pytest.fixture(scope="module")
def lm():
    return edge_ds.load()


@pytest.fixture(scope="module")
def server(lm):
    srv = make_server(lm, "127.0.0.1", 0, quiet=True)
    srv.start()
    yield srv
    srv.close()


def request(server, path: str, body=None, method: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events(server, path: str, body: dict) -> list:
    """The data of every server-sent event of a streamed request ("[DONE]" as a string)."""
    req = urllib.request.Request(server.url + path, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    out = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if line:
                assert line.startswith("data: ")
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(server):
    assert request(server, "/health") == (200, {"status": "ok", "model": "edge-ds-tiny"})
    status, body = request(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["edge-ds-tiny"] and body["data"][0]["object"] == "model"
    assert request(server, "/v1/models/edge-ds-tiny")[1]["id"] == "edge-ds-tiny"


def test_chat_completion_equals_the_api(server, lm):
    gen = lm.generate(CHAT, max_tokens=24, temperature=0.0)
    status, body = request(server, "/v1/chat/completions",
                           {"model": "edge-ds-tiny", "messages": CHAT, "max_tokens": 24, "temperature": 0})
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "edge-ds-tiny" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": gen.text} and gen.text.strip()
    assert choice["finish_reason"] == gen.stats.finish_reason
    prompt_tokens = len(lm.tokenizer.encode_chat(CHAT))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": gen.stats.generation_tokens,
                             "total_tokens": prompt_tokens + gen.stats.generation_tokens}


def test_completion_equals_the_api(server, lm):
    gen = lm.generate(PROMPT, max_tokens=20, temperature=0.0, chat_template=False)
    status, body = request(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == gen.text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(lm.tokenizer.encode(PROMPT))
    ids = lm.tokenizer.encode(PROMPT)  # token ids work as the prompt too
    assert request(server, "/v1/completions",
                   {"prompt": ids, "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"] == gen.text


def test_streamed_chat_concatenates_to_the_same_text(server, lm):
    gen = lm.generate(CHAT, max_tokens=24, temperature=0.0)
    evs = events(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 24, "temperature": 0,
                                                   "stream_options": {"include_usage": True}})
    assert evs[-1] == "[DONE]"
    chunks, usage = evs[:-2], evs[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == gen.text
    assert sum(bool(p) for p in pieces) >= gen.stats.generation_tokens // 2  # token by token, not one blob
    assert chunks[-1]["choices"][0]["finish_reason"] == gen.stats.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == gen.stats.generation_tokens


def test_streamed_completion(server, lm):
    gen = lm.generate(PROMPT, max_tokens=16, temperature=0.0, chat_template=False)
    evs = events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert evs[-1] == "[DONE]" and all("usage" not in e for e in evs[:-1])
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == gen.text
    assert evs[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text_before_it(server, lm):
    full = lm.generate(CHAT, max_tokens=24, temperature=0.0).text
    stop = full.split()[3]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        body = {"messages": CHAT, "max_tokens": 24, "temperature": 0, "stop": [stop, "never seen"]}
        if stream:
            evs = events(server, "/v1/chat/completions", body)
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs[:-1])
            finish = evs[-2]["choices"][0]["finish_reason"]
        else:
            choice = request(server, "/v1/chat/completions", body)[1]["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        assert (text, finish) == (cut, "stop")
    choice = request(server, "/v1/chat/completions", {**body, "stop": stop, "stream": False})[1]["choices"][0]
    assert choice["message"]["content"] == cut


def test_max_tokens_gives_length(server):
    for field in ("max_tokens", "max_completion_tokens"):
        status, body = request(server, "/v1/completions", {"prompt": PROMPT, field: 3, "temperature": 0})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": True}, "logprobs"),  # the legacy field is a count
    ("/v1/completions", {"prompt": PROMPT, "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),  # the shipped model's template renders no tools
    ("/v1/chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"type": "function",
                              "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt"),
    ("/v1/chat/completions", {"messages": CHAT, "temprature": 0.5}, "temprature"),  # misspelt: not ignored
    ("/v1/chat/completions", {"messages": CHAT, "prompt": PROMPT}, "prompt"),  # the other endpoint's field
    ("/v1/completions", {"prompt": PROMPT, "messages": CHAT}, "messages"),
    ("/v1/completions", {"prompt": PROMPT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "seed": 2 ** 64}, "seed"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"messages": CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"messages": CHAT, "modalities": ["text", "audio"]}, "modalities"),
])
def test_bad_requests_are_400_naming_the_field(server, path, body, param):
    status, out = request(server, path, body)
    assert status == 400
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
    if param:
        assert param.split("[")[0] in out["error"]["message"]
    assert "Traceback" not in out["error"]["message"]


def test_unknown_fields_are_refused_as_openai_does(server):
    status, out = request(server, "/v1/completions", {"prompt": PROMPT, "foo": 1})
    assert status == 400 and out["error"]["message"] == "Unrecognized request argument supplied: foo"
    status, out = request(server, "/v1/completions", {"prompt": PROMPT, "foo": 1, "bar": 2})
    assert status == 400 and out["error"]["message"] == "Unrecognized request arguments supplied: foo, bar"


def test_every_openai_field_is_accepted(server):
    """Each field of OpenAI's API reference (and our extensions), with a value this server can honour."""
    shared = {"model": "gpt-4o", "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0, "top_p": 1, "n": 1,
              "stream": False, "stream_options": None, "stop": None, "presence_penalty": 0, "frequency_penalty": 0,
              "logit_bias": {}, "seed": 7, "user": "u1", "top_k": 0, "min_p": 0, "repetition_penalty": 1.0}
    chat = {**shared, "messages": CHAT, "logprobs": False, "top_logprobs": None,
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
            "functions": [], "function_call": "auto", "modalities": ["text"], "audio": None,
            "prediction": {"type": "content", "content": "light"}, "reasoning_effort": "low", "verbosity": "low",
            "web_search_options": None, "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
            "safety_identifier": "s1", "prompt_cache_key": "k1", "prompt_cache_retention": "in_memory"}
    completion = {**shared, "prompt": PROMPT, "logprobs": None, "suffix": None, "echo": False, "best_of": 1}
    assert set(chat) == CHAT_FIELDS and set(completion) == COMPLETION_FIELDS
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        status, out = request(server, path, body)
        assert status == 200, out
        assert out["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("path, param", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_oversized_prompt_is_refused_before_tokenizing(server, lm, monkeypatch, path, param):
    calls = []
    for name in ("encode", "encode_chat"):
        def counted(*args, _encode=getattr(lm.tokenizer, name), **kw):
            calls.append(args)
            return _encode(*args, **kw)
        monkeypatch.setattr(lm.tokenizer, name, counted)
    limit = lm.config.max_position_embeddings * 32  # characters: 32 per token of context, generously
    for text in ("And God said, " * (limit // 14 + 1), "x" * 17_000_000):  # just over the limit; 17 MB
        prompt = {"prompt": text} if param == "prompt" else {"messages": [*CHAT, {"role": "user", "content": text}]}
        data = json.dumps(prompt).encode()
        start = time.monotonic()
        status, out = request(server, path, data)
        assert time.monotonic() - start < 1.0
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        assert out["error"]["param"] == param and f"limit of {limit}" in out["error"]["message"]
    assert calls == []


def test_over_long_prompt_is_400_with_the_runtime_message(server, lm):
    limit = lm.config.max_position_embeddings
    status, out = request(server, "/v1/completions", {"prompt": "And God said, " * limit})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert "max_position_embeddings" in out["error"]["message"]
    status, out = request(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": limit})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"


def test_corrupt_model_file_mid_generation_is_500(tmp_path):
    """A broken expert slice is the server's fault, not the request's: 500, naming the file."""
    import shutil

    import mlx.core as mx

    from edge_ds.experts.store import ExpertStore
    from edge_ds.loading import load_model
    from edge_ds.resources import default_model_path

    path = tmp_path / "model"
    shutil.copytree(default_model_path(), path)
    store = ExpertStore(path, load_model(path, routed_experts=False).config, mx.float32)
    for t in [store.tensors[l]["up_proj.scales"] for l in store.layers]:
        for e in range(store.num_experts):
            with open(t.paths[e], "r+b") as fh:
                fh.seek(t.offsets[e])
                fh.write(b"\xff" * t.nbytes)  # NaN scales
    store.close()
    srv = make_server(edge_ds.load(path, expert_budget="25%"), "127.0.0.1", 0, quiet=True)
    srv.start()
    try:
        status, body = request(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    finally:
        srv.close()
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "corrupt" in body["error"]["message"] and ".safetensors" in body["error"]["message"]


def test_unknown_path_and_method(server):
    status, out = request(server, "/v1/nothing", {"a": 1})
    assert status == 404 and out["error"]["code"] == "not_found"
    assert request(server, "/v1/chat/completions")[0] == 405  # GET
    assert request(server, "/v1/models/other-model")[0] == 404


def test_concurrent_requests_both_complete(server, lm):
    jobs = [{"messages": CHAT, "max_tokens": 20, "temperature": 0},
            {"messages": [{"role": "user", "content": "Blessed are the meek"}], "max_tokens": 20, "temperature": 0}]
    want = [lm.generate(j["messages"], max_tokens=20, temperature=0.0).text for j in jobs]
    got: list = [None, None]

    def run(i: int) -> None:
        got[i] = request(server, "/v1/chat/completions", jobs[i])[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_next_turn_reuses_the_prompt_cache(server, lm):
    first = request(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0})[1]
    turn = CHAT + [first["choices"][0]["message"], {"role": "user", "content": "And there was light."}]
    status, body = request(server, "/v1/chat/completions", {"messages": turn, "max_tokens": 16, "temperature": 0})
    last = server.worker.last
    assert status == 200 and last.prompt_tokens == body["usage"]["prompt_tokens"]
    assert last.prefilled_tokens < last.prompt_tokens - first["usage"]["prompt_tokens"] // 2
    assert body["choices"][0]["message"]["content"] == lm.generate(turn, max_tokens=16, temperature=0.0).text


def test_client_disconnect_stops_generation(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        while not reader.readline().startswith(b"data: "):  # headers, then the first token
            pass
        reader.close()
    assert server.worker.wait_idle(10)
    assert server.worker.last.finish_reason == "cancelled" and server.worker.last.completion_tokens < 900
    status, body = request(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_chat_client_app_talks_to_the_server(server, lm):
    turns = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    out = subprocess.run([sys.executable, str(ROOT / "apps" / "chat_client.py"), "--url", server.url + "/v1",
                          "--temperature", "0", "--max-tokens", "12"],
                         input="\n".join(turns) + "\n/exit\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    history: list = []
    for line in turns:  # each reply continues the conversation the client keeps
        history.append({"role": "user", "content": line})
        reply = lm.generate(list(history), max_tokens=12, temperature=0.0).text
        assert reply.strip() and reply in out.stdout
        history.append({"role": "assistant", "content": reply})


def test_the_http_client_app_imports_nothing_from_edge_ds():
    """chat_client.py talks to the server over HTTP only (desktop_chat.py embeds edge-ds on purpose:
    test_layering.py holds it to the public API)."""
    for path in [ROOT / "apps" / "chat_client.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("edge_ds", "converters") for n in names), path


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_ds.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, NO_PROXY="*"), **kw)


def test_cli_serve_help():
    p = _cli("serve", "--help")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    for option in ("--model", "--host", "--port", "--expert-budget", "--backend"):
        assert option in out


@contextlib.contextmanager
def _cli_server() -> Iterator[tuple[subprocess.Popen, int]]:
    """`edge-ds serve` on a free port, once it answers /health; killed if still running at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _cli("serve", "--port", str(port))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert p.poll() is None and time.monotonic() < deadline, p.communicate()
                time.sleep(0.1)
        yield p, port
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_cli_serve_answers_and_exits_on_sigint():
    with _cli_server() as (p, port):
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert out.strip() == f"edge-ds serve: edge-ds-tiny at http://127.0.0.1:{port}/v1 (Ctrl-C stops)"


def test_client_leaving_mid_body_leaves_no_traceback():
    with _cli_server() as (p, port):
        for reset in (False, True):  # closed (FIN), then reset (RST), 10 of 1000 bytes sent
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        status, body = request(SimpleNamespace(url=f"http://127.0.0.1:{port}"), "/v1/completions",
                               {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err


def test_busy_port_or_bad_host_is_one_error(lm):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for host, port, reason in (("127.0.0.1", port, "Address already in use"),
                                   ("192.0.2.1", 8080, ""), ("127.0.0.1", 70000, "")):
            with pytest.raises(EdgeDSError) as e:
                make_server(lm, host, port, quiet=True)
            assert str(e.value).startswith(f"cannot listen on {host}:{port} ({reason}"), e.value
            shown = "".join(traceback.format_exception(e.value))
            assert shown.count("Traceback") == 1 and "AttributeError" not in shown, shown


def test_cli_serve_on_a_busy_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = _cli("serve", "--port", str(port))
        try:
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 1 and out == ""
    assert err.splitlines() == [f"edge-ds: error: cannot listen on 127.0.0.1:{port} (Address already in use)"]


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"temperature": 1' + b"0" * 5000 + b"}",
                                 b'{"messages": [], "temperature": 1' + b"0" * 400 + b"}"])
def test_hostile_bodies_are_400_not_500(server, raw):
    """Deep nesting and integers past Python's digit limit or a float's range: one clear 400."""
    status, body = request(server, "/v1/chat/completions", raw)
    assert status == 400, body
    assert "Traceback" not in body["error"]["message"]
