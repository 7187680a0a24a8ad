"""The server's bounds under load (edge_ds.server.Limits), each reached cheaply with small limits:
connections past the limit are answered 503 with Retry-After (never reset), a stalled request is
answered 408 and closed, an idle keep-alive connection is closed, a full generation queue is
answered 429, stalled connections hold no thread, and /health answers through all of it.
benchmarks/load_test.py measures the same at hundreds of clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
from typing import Iterator

import pytest

import edge_ds
from edge_ds.server import POLL_SECONDS, Limits, Server, make_server, model_thread

WAIT = 10.0  # seconds a test waits for something that takes milliseconds, so a busy machine cannot flake it
COMPLETION = json.dumps({"prompt": "In the beginning", "max_tokens": 2, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def lm():
    return edge_ds.load()


@contextlib.contextmanager
def serving(lm, **limits) -> Iterator[Server]:
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, limits=Limits(**limits))
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


@contextlib.contextmanager
def model_thread_held() -> Iterator[threading.Event]:
    """Keeps the process's model thread busy until the event is set (or the block ends), so that
    generation requests stay queued for as long as a test needs."""
    gate = threading.Event()
    model_thread().submit(lambda: gate.wait(60))
    try:
        yield gate
    finally:
        gate.set()


def ask(srv: Server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request on a fresh connection; a reset raises."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=WAIT)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def stalled(srv: Server, n: int, data: bytes = b"") -> list[socket.socket]:
    """n connections that send `data` (maybe nothing) and then nothing more."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", srv.server_port), timeout=WAIT)
        if data:
            s.sendall(data)
        socks.append(s)
    return socks


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout or reset raises)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_connections_past_the_limit_are_answered_503_with_retry_after_not_reset(lm):
    with serving(lm, max_connections=4, overflow_connections=16, request_timeout=60) as srv:
        held = stalled(srv, 4, b"GET /v1/mod")  # the limit, taken by requests that never finish
        try:
            for _ in range(8):  # each past the limit: a whole answer, then end-of-file
                status, headers, body = ask(srv, "POST", "/v1/completions", COMPLETION)
                assert status == 503, body
                assert headers["Retry-After"] == "1" and headers["Connection"] == "close"
                assert body["error"]["type"] == "server_error" and body["error"]["code"] == "server_busy"
                assert "4 connections are open (the limit)" in body["error"]["message"]
            assert ask(srv, "GET", "/health")[:3:2] == (200, {"status": "ok", "model": "edge-ds-tiny"})
        finally:
            for s in held:
                s.close()
        # The slots come back as the held connections close.
        wait_until(lambda: ask(srv, "POST", "/v1/completions", COMPLETION)[0] == 200,
                   "a request once the held connections closed")


def test_past_every_bound_connections_wait_their_turn_and_are_answered_not_reset(lm):
    """More connections than max_connections + overflow_connections: the rest wait in the listen
    backlog until a slot frees, then are answered."""
    answers: list = []
    with serving(lm, max_connections=2, overflow_connections=1, request_timeout=60, linger=0.2) as srv:
        held = stalled(srv, 2, b"GET /v1/mod")
        try:
            asking = [threading.Thread(target=lambda: answers.append(ask(srv, "GET", "/v1/models")[0]))
                      for _ in range(6)]
            for t in asking:
                t.start()
            for t in asking:
                t.join(WAIT)
        finally:
            for s in held:
                s.close()
    assert answers == [503] * 6


@pytest.mark.parametrize("data", [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                  b'{"prompt": "In the'])
def test_a_stalled_request_is_answered_408_and_closed(lm, data):
    with serving(lm, request_timeout=0.5) as srv:
        start = time.monotonic()  # before connecting: the server's read time starts at its accept, after this
        (sock,) = stalled(srv, 1, data)
        with sock:
            answer = read_to_end(sock)  # returns only when the server closes the connection
            took = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, answer
        assert json.loads(body)["error"]["message"] == "the request was not received in 0.5 s"
        assert 0.5 <= took < WAIT  # not before its time
        assert ask(srv, "GET", "/v1/models")[0] == 200  # the server goes on


def test_silent_and_idle_keep_alive_connections_are_closed(lm):
    with serving(lm, request_timeout=0.5, idle_timeout=0.5) as srv:
        (silent,) = stalled(srv, 1)
        with silent:
            assert read_to_end(silent) == b""  # nothing was asked: closed without an answer
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=WAIT) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            first = http.client.HTTPResponse(sock)
            first.begin()
            assert first.status == 200 and not first.will_close and json.loads(first.read())["data"]  # kept alive
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a second request on it is answered
            answer = read_to_end(sock)  # ... and then the idle connection is closed
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "ok", "model": "edge-ds-tiny"}')


def test_a_full_generation_queue_is_answered_429_and_health_still_answers(lm):
    results: list = []
    with serving(lm, max_queued=1, handler_threads=4) as srv, model_thread_held() as gate:
        waiting = threading.Thread(target=lambda: results.append(ask(srv, "POST", "/v1/completions", COMPLETION)))
        waiting.start()
        wait_until(lambda: not srv.worker.wait_idle(0), "the first request queued")
        status, headers, body = ask(srv, "POST", "/v1/chat/completions",
                                    json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode())
        assert status == 429 and headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "queue_full"
        assert body["error"]["message"] == ("the server is busy: 1 generation requests are queued or running "
                                            "(the limit is 1); retry after 1 s")
        assert ask(srv, "GET", "/health")[0] == 200  # not behind the queue
        assert ask(srv, "GET", "/v1/models")[0] == 200  # nor are requests that need no model
        gate.set()
        waiting.join(WAIT)
    assert results and results[0][0] == 200, results  # the queued one was answered once its turn came


def test_health_answers_while_connections_threads_and_queue_are_all_taken(lm):
    results: list = []
    with serving(lm, max_connections=4, overflow_connections=4, handler_threads=2, max_queued=2,
                 request_timeout=60) as srv, model_thread_held() as gate:
        waiting = [threading.Thread(target=lambda: results.append(ask(srv, "POST", "/v1/completions", COMPLETION)))
                   for _ in range(2)]
        for t in waiting:  # both handler threads wait on the held model thread ...
            t.start()
        held = stalled(srv, 2, b"POST /v1/completions HTTP/1.1\r\n")  # ... and these take the other slots
        try:
            wait_until(lambda: not srv.worker.wait_idle(0), "the requests queued")
            for _ in range(3):
                start = time.monotonic()
                assert ask(srv, "GET", "/health")[0] == 200
                assert time.monotonic() - start < 5.0
            assert ask(srv, "GET", "/v1/models")[0] == 503  # everything else waits for a slot
        finally:
            gate.set()
            for t in waiting:
                t.join(WAIT)
            for s in held:
                s.close()
    assert [r[0] for r in results] == [200, 200], results


def test_stalled_connections_hold_no_thread(lm):
    with serving(lm, request_timeout=60) as srv:
        assert ask(srv, "GET", "/v1/models")[0] == 200  # the pool's first thread, started on demand
        before = threading.active_count()
        held = stalled(srv, 60, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        try:
            time.sleep(0.5)  # time for the server to take them all (a thread each, if it made threads)
            assert ask(srv, "GET", "/health")[0] == 200
            assert threading.active_count() - before <= 1, threading.enumerate()
        finally:
            for s in held:
                s.close()


def test_pipelined_requests_on_one_connection_are_answered_in_order(lm):
    """The loop reads ahead; what it read past one request is the start of the next."""
    with serving(lm) as srv, socket.create_connection(("127.0.0.1", srv.server_port), timeout=WAIT) as sock:
        post = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(COMPLETION) + COMPLETION)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post
                     + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_to_end(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)  # each answer's body runs into the next status line
    assert statuses == [b"200", b"200", b"200"], answer
    assert b'"text_completion"' in answer and answer.index(b'"status": "ok"') < answer.index(b'"text_completion"')


def test_a_generation_is_answered_on_a_descriptor_past_1023(lm):
    """A busy server's sockets get descriptors past select()'s 1024: waiting on one must still work
    (the client-gone check once cancelled every generation there)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file limit ({hard}) is under {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds: list[int] = []
    try:
        with serving(lm) as srv:
            while len(fds) < 1100:  # the next descriptors the server gets are past 1023
                fds.append(os.open(os.devnull, os.O_RDONLY))
            with model_thread_held() as gate:  # the request waits long enough to check on its client
                threading.Timer(4 * POLL_SECONDS, gate.set).start()
                status, _, body = ask(srv, "POST", "/v1/completions", COMPLETION)
            assert status == 200 and body["usage"]["completion_tokens"] == 2, body
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_loop_frames_requests_as_http_does(lm):
    """What the loop answers before a handler sees the request: 100 Continue, 431, conflicting lengths."""
    with serving(lm, max_header_bytes=1024) as srv:
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION))
            assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"  # curl waits for it before a large body
            sock.sendall(COMPLETION)
            assert b'"text_completion"' in read_to_end(sock)
        for head, status in ((b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n", b"431"),
                             (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
                              b"400")):
            with socket.create_connection(("127.0.0.1", srv.server_port), timeout=WAIT) as sock:
                sock.sendall(head)
                answer = read_to_end(sock)
            assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b"Connection: close" in answer, answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"] in (
                "request headers over the limit of 1024 bytes", "conflicting Content-Length headers")
