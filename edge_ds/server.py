"""A local OpenAI-compatible HTTP server over one loaded model, standard library only.

    server = make_server(edge_ds.load(), "127.0.0.1", 8080)   # then server.serve_forever(),
    server.start()                                            # or serve it from a thread

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
HTTP requests are handled on their own threads; generations run one at a time, in arrival order,
on one model thread (a model holds one cache, and MLX is best driven from one thread). The
server keeps one prompt cache, so a request that extends the previous one (the next turn of a
chat) prefills only the new tokens.
"""

from __future__ import annotations

import json
import queue
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from .api import LanguageModel
from .errors import ContextLengthError, EdgeDSError
from .openai_schema import (Reply, RequestError, Result, check_fields, check_prompt_size, parse_body,
                            parse_messages, parse_options, parse_prompt, parse_stream)

MAX_BODY_BYTES = 32 * 1024 * 1024
# A generous bound on the characters one token stands for (typically about 4): a prompt of more than
# this many per token of context cannot fit, and is refused before tokenizing (seconds at megabytes).
MAX_CHARS_PER_TOKEN = 32
POLL_SECONDS = 0.2  # how often a waiting request checks whether its client went away


# --- the model thread ------------------------------------------------------------------

@dataclass
class Job:
    """One generation request; the model thread answers on `events`:
    ("text", str)* then ("done", Result) or ("error", RequestError)."""

    prompt: str | list[dict] | list[int]
    chat_template: bool
    options: dict
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _ModelThread:
    """The process's one thread for model work, shared by every server in the process and never
    ended: MLX is best driven from one thread, and its per-thread streams then live as long as
    the process (api.py frees a thread's streams when it ends; this one does not end)."""

    def __init__(self):
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._run, name="edge-ds-model", daemon=True).start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._calls.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._calls.get()
            try:
                fn()
            except BaseException:  # fn reports its own errors; this thread must survive anything
                traceback.print_exc(file=sys.stderr)


_model_thread: _ModelThread | None = None
_model_thread_lock = threading.Lock()


def model_thread() -> _ModelThread:
    global _model_thread
    with _model_thread_lock:
        if _model_thread is None:
            _model_thread = _ModelThread()
        return _model_thread


class ModelWorker:
    """Runs one server's jobs on the model thread, in arrival order, and keeps its prompt cache."""

    def __init__(self, lm: LanguageModel, prompt_cache: bool = True, log: Callable[[str], None] | None = None):
        self.lm = lm
        self.prompt_cache = prompt_cache
        self.last: Result | None = None  # the last finished job's result
        self._log = log
        self._cache = None  # made on the model thread
        self._jobs: list[Job] = []  # submitted and not yet finished, the running one first
        self._closed = False
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise _stopped()
            self._jobs.append(job)
            self._idle.clear()
        model_thread().submit(lambda: self._run(job))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no job is queued or running."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels the running and queued jobs and waits (up to timeout) until the running one stops."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled.set()
            job.events.put(("error", _stopped()))  # read only by a client still waiting in the queue
        self.wait_idle(timeout)

    def _run(self, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                self._generate(job)
        finally:
            with self._lock:
                self._jobs.remove(job)
                if not self._jobs:
                    self._idle.set()

    def _generate(self, job: Job) -> None:
        lm = self.lm
        opts = dict(job.options)
        encoded = False
        try:
            ids = lm.encode_prompt(job.prompt, job.chat_template)
            encoded = True
            if self.prompt_cache and self._cache is None:
                self._cache = lm.new_cache()
            stream = lm.stream(ids, cache=self._cache if self.prompt_cache else None, **opts)
            chunks = iter(stream)
            cancelled = False
            for chunk in chunks:
                if job.cancelled.is_set():
                    cancelled = True
                    chunks.close()  # stops the decode loop between tokens
                    break
                job.events.put(("text", chunk))
            stats = stream.stats
            result = Result(stats.prompt_tokens, stats.generation_tokens,
                            "cancelled" if cancelled else stats.finish_reason, stats.prefilled_tokens,
                            stats.prompt_tps, stats.generation_tps)
            self.last = result
            job.events.put(("done", result))
            if self._log:
                self._log(f"prompt {result.prompt_tokens} tokens ({result.prefilled_tokens} prefilled, "
                          f"{result.prompt_tps:.1f} tok/s), {result.completion_tokens} generated "
                          f"({result.generation_tps:.1f} tok/s), {result.finish_reason}")
        except EdgeDSError as e:
            over = isinstance(e, ContextLengthError)
            if over or not encoded:  # the request's fault: its prompt
                job.events.put(("error", RequestError(str(e), "messages" if job.chat_template else "prompt",
                                                      code="context_length_exceeded" if over else None)))
            else:  # the model's files or the runtime (a corrupt expert slice, ...): ours
                self._cache = None
                job.events.put(("error", RequestError(str(e), status=500, kind="server_error")))
        except Exception as e:  # a bug: tell the client in one line, keep the traceback here
            traceback.print_exc(file=sys.stderr)
            self._cache = None  # it may hold a half-run step
            job.events.put(("error", RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                                  kind="server_error")))


# --- HTTP --------------------------------------------------------------------------------

class ClientGone(Exception):
    pass


def _stopped() -> RequestError:
    # A job is cancelled only when its client left or the server is closing: this is the latter.
    return RequestError("the server stopped before the generation finished", status=503, kind="server_error")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; streams close the connection
    disable_nagle_algorithm = True  # each streamed token is a small write: send it now
    timeout = 300  # seconds a connection may sit idle (keep-alive) or stall before it is dropped
    server_version = "edge-ds"
    sys_version = ""
    server: "Server"

    routes = {"/health": ("GET",), "/v1/models": ("GET",), "/v1/chat/completions": ("POST",),
              "/v1/completions": ("POST",)}

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (a malformed request line, headers too long): JSON, not HTML.
        self.close_connection = True
        self._send_json(code, RequestError(message or self.responses.get(code, ("error",))[0],
                                           status=code).body())

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._body_read = False
        model_path = path.startswith("/v1/models/")
        try:
            allowed = ("GET",) if model_path else self.routes.get(path)
            if allowed is None:
                raise RequestError(f"unknown path: {method} {path}", status=404, code="not_found")
            if method not in allowed:
                raise RequestError(f"{path} takes {', '.join(allowed)}, not {method}", status=405,
                                   code="method_not_allowed")
            if model_path:
                self._model(path[len("/v1/models/"):])
            elif path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_id})
            elif path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
            else:
                self._completion(chat=path == "/v1/chat/completions")
        except RequestError as e:
            if not self._body_read and (self.headers.get("Content-Length", "0") != "0"
                                        or "Transfer-Encoding" in self.headers):
                self.close_connection = True  # an unread body would be taken for the next request
            try:
                self._send_json(e.status, e.body())
            except ConnectionError:  # the client left without reading the answer
                self.close_connection = True
        except (ClientGone, ConnectionError):
            self.close_connection = True
        except Exception as e:  # a bug: one line to the client, the traceback to our stderr
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            try:
                self._send_json(500, RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                                  kind="server_error").body())
            except OSError:
                pass

    def _model(self, name: str) -> None:
        if name != self.server.model_id:
            raise RequestError(f"model {name!r} is not served here (this server has {self.server.model_id!r})",
                               "model", status=404, code="model_not_found")
        self._send_json(200, self.server.model_card())

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a request body needs a Content-Length header", status=411)
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"Content-Length is not a number: {length!r}") from None
        if n > MAX_BODY_BYTES:
            raise RequestError(f"request body of {n} bytes is over the limit of {MAX_BODY_BYTES}", status=413)
        try:
            raw = self.rfile.read(n)
        except OSError:  # reset by the client, or stalled past `timeout`
            raise ClientGone() from None
        if len(raw) < n:  # the client closed the connection before sending its whole body
            raise ClientGone()
        self._body_read = True
        return parse_body(raw)  # a JSON object, or one clear 400 (deep nesting and huge numbers included)

    def _completion(self, chat: bool) -> None:
        body = self._read_json()
        check_fields(body, chat)
        lm = self.server.worker.lm
        if chat:
            if "messages" not in body:
                raise RequestError("'messages' is required", "messages")
            if not lm.tokenizer.has_chat_template:
                raise RequestError("this model has no chat template; use /v1/completions", "messages")
            prompt: Any = parse_messages(body["messages"])
        else:
            if "prompt" not in body:
                raise RequestError("'prompt' is required", "prompt")
            prompt = parse_prompt(body["prompt"], lm.config.vocab_size)
        check_prompt_size(prompt, self.server.prompt_limit, lm.config.max_position_embeddings,
                          "messages" if chat else "prompt")
        options = parse_options(body)
        stream, include_usage = parse_stream(body)
        job = Job(prompt, chat_template=chat, options=options)
        self.server.worker.submit(job)
        try:
            events = self._events(job)
            kind, value = next(events)
            if kind == "error":
                raise value
            reply = Reply(self.server.model_id, self.server.fingerprint, chat)
            if stream:
                self._stream(reply, kind, value, events, include_usage)
            else:
                text = []
                while kind == "text":
                    text.append(value)
                    kind, value = next(events)
                if kind == "error":
                    raise value
                if value.finish_reason == "cancelled":
                    raise _stopped()
                self._send_json(200, reply.whole("".join(text), value))
        finally:
            job.cancelled.set()  # a no-op once the job is done; stops it if we leave early

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """The job's events; raises ClientGone (cancelling the job) if the client disconnects
        while waiting in the queue or during generation (checked every POLL_SECONDS)."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                kind, value = "", None
            if time.monotonic() - checked >= POLL_SECONDS:
                checked = time.monotonic()
                if self._client_gone():
                    job.cancelled.set()
                    raise ClientGone()
            if not kind:
                continue
            yield kind, value
            if kind != "text":
                return

    def _client_gone(self) -> bool:
        """True when the peer closed the connection (readable, and a peek reads nothing)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, reply: "Reply", kind: str, value: Any, events: Iterator, include_usage: bool) -> None:
        self.close_connection = True  # the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if reply.chat:
                self._event(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
            while kind == "text":
                self._event(reply.chunk(value, None, include_usage))
                kind, value = next(events)
            if kind == "done" and value.finish_reason == "cancelled":
                kind, value = "error", _stopped()
            if kind == "error":  # after the headers: an error event, as OpenAI sends
                self._event(value.body())
                return
            self._event(reply.chunk("", value.finish_reason, include_usage))
            if include_usage:
                self._event(reply.usage_chunk(value))
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client went away or stalled past `timeout`
            raise ClientGone() from None

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    """The HTTP server; `worker` runs the model. Use serve_forever() or start(), then close()."""

    daemon_threads = True  # a handler waiting on a slow client never blocks exit

    def __init__(self, address: tuple[str, int], lm: LanguageModel, model_id: str, prompt_cache: bool, quiet: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # Set before binding: a failed bind calls server_close(), which reads them.
        self.model_id = model_id
        self.quiet = quiet
        self.fingerprint = f"edge-ds-{lm.fingerprint}"
        self.prompt_limit = min(lm.config.max_position_embeddings * MAX_CHARS_PER_TOKEN, MAX_BODY_BYTES)
        self.worker = ModelWorker(lm, prompt_cache, log=None if quiet else self._log)
        self._serving = False
        self._thread: threading.Thread | None = None
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a bad DNS set-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def model_card(self) -> dict:
        config = self.worker.lm.path / "config.json"
        created = int(config.stat().st_mtime) if config.is_file() else 0
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": "edge-ds"}

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def start(self) -> threading.Thread:
        """Serves on a background thread (for apps that embed the server)."""
        self._thread = threading.Thread(target=self.serve_forever, name="edge-ds-http", daemon=True)
        self._thread.start()
        return self._thread

    def server_close(self) -> None:
        """Stops serving (from any thread), cancels generation and closes the socket."""
        if self._serving:
            self.shutdown()
        if self._thread is not None:
            self._thread.join()
        self.worker.stop()
        super().server_close()

    close = server_close

    def _log(self, line: str) -> None:
        sys.stderr.write(f"edge-ds serve: {line}\n")


def make_server(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None, *,
                prompt_cache: bool = True, quiet: bool = False) -> Server:
    """A server for the loaded model `lm` bound to host:port (port 0: any free port), not yet serving.

    model_id: the name /v1/models lists (default: the model directory's name); requests may name
    any model, the loaded one answers. prompt_cache=False prefills every prompt from scratch.
    """
    try:
        return Server((host, port), lm, model_id or lm.path.name, prompt_cache, quiet)
    except (OSError, OverflowError) as e:  # OverflowError: a port over 65535
        raise EdgeDSError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None, *,
          on_ready: Callable[[Server], None] | None = None, **options: Any) -> None:
    """Serves until Ctrl-C or SIGTERM, then stops generation and closes the socket."""
    server = make_server(lm, host, port, model_id, **options)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Also when started in the background by a shell (which ignores SIGINT there) or stopped
        # by a service manager (SIGTERM): both end the server the way Ctrl-C does.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
