"""A local OpenAI-compatible HTTP server over one loaded model, standard library only.

    server = make_server(edge_ds.load(), "127.0.0.1", 8080)   # then server.serve_forever(),
    server.start()                                            # or serve it from a thread

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Under load: one loop thread (the one in serve_forever) accepts connections and reads every
request, headers and body, without blocking (selectors), so a connection that stalls holds a
socket and its buffer but no thread, and is closed when its read time runs out. It answers
GET /health itself, so /health never waits for a thread or the model. A complete request goes to
a bounded pool of handler threads; generations run on one model thread (MLX is best driven from
one thread): one at a time in arrival order, or with max_concurrency N up to N decoding as one batch
(batching.py). Every bound (open
connections, handler threads, queued generations, read and idle time) is a field of `Limits`;
past a bound the server answers 503 or 429 with Retry-After instead of resetting or hanging.
The server keeps one prompt cache, so a request that extends the previous one (the next turn of
a chat) prefills only the new tokens.

Chat requests may carry tools (rendered by the model's chat template; the model's tool-call output
is parsed by tool_calls.py into OpenAI tool_calls, streamed as argument deltas), a chat answer's
<think> part is sent as reasoning_content (reasoning.py), and both endpoints give logprobs (the model's
distribution, computed only for requests that ask). With an API key every request but /health must
carry it (`Authorization: Bearer`), compared in constant time.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import hmac
import io
import json
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ContextLengthError, EdgeDSError
from .openai_schema import (Reply, RequestError, Result, chat_logprobs, check_fields, check_prompt_size,
                            completion_logprobs, parse_body, parse_logprobs, parse_messages, parse_options,
                            parse_prompt, parse_stream, parse_tools)
from .reasoning import THINK_END, THINK_START, ReasoningSplitter, opens_thinking
from .tool_calls import ToolCall, ToolCallParser

if TYPE_CHECKING:  # only for annotations: the CLI imports this module for Limits, and must load no MLX
    from .api import LanguageModel

MAX_BODY_BYTES = 32 * 1024 * 1024
# A generous bound on the characters one token stands for (typically about 4): a prompt of more than
# this many per token of context cannot fit, and is refused before tokenizing (seconds at megabytes).
MAX_CHARS_PER_TOKEN = 32
POLL_SECONDS = 0.2  # how often a waiting request checks whether its client went away


@dataclass(frozen=True)
class Limits:
    """The server's bounds under load, in one place (`edge-ds serve` exposes the first and third).

    The defaults fit local use: a few hundred clients plus a thousand idle or stalled connections
    cost sockets and small buffers, not threads. Tests pass small values to reach each bound cheaply.
    """

    # Open connections served (reading, handled or idle between keep-alive requests). Past it, up to
    # `overflow_connections` more are accepted only to be answered (503 with Retry-After, or /health)
    # and closed; past that, the server stops accepting until one closes, and new connections wait
    # in the kernel's listen backlog (then its SYN retries): late, never reset by us.
    max_connections: int = 2048
    overflow_connections: int = 256
    # Generation requests queued or running; past it, 429 with Retry-After. A local model answers one
    # at a time: the 128th in line already waits minutes on a real model.
    max_queued: int = 128
    # Threads that run complete requests (each generation request holds one while it waits its turn):
    # more than max_queued, so that a full queue still leaves threads to answer everything else.
    handler_threads: int = 160
    listen_backlog: int = 1024  # the kernel's accept queue (capped by somaxconn; http.server's was 5)
    request_timeout: float = 10.0  # seconds to send a whole request (headers and body); then 408, closed
    idle_timeout: float = 15.0  # seconds a keep-alive connection may sit between requests; then closed
    send_timeout: float = 60.0  # seconds a client may take to accept what we write before it is dropped
    max_header_bytes: int = 32 * 1024  # request line and headers; past it, 431
    # Request bodies held in memory at once (each is also bounded by MAX_BODY_BYTES); past it, 503.
    max_buffered_bytes: int = 8 * MAX_BODY_BYTES
    retry_after: int = 1  # seconds, the Retry-After of a 503 or 429 answered because a bound is full
    # Seconds an answered-and-closing connection is read (and discarded) before it is closed, so that
    # a request the client is still sending does not turn our close into a reset; also how long a
    # connection past max_connections may take to send its request line before it is answered 503.
    linger: float = 1.0

    @classmethod
    def sized(cls, max_connections: int, max_queued: int) -> "Limits":
        """The defaults with these two bounds, keeping as many handler threads beyond the queue."""
        return cls(max_connections=max_connections, max_queued=max_queued,
                   handler_threads=max_queued + cls.handler_threads - cls.max_queued)


# --- the model thread ------------------------------------------------------------------

@dataclass
class Job:
    """One generation request; the model thread answers on `events`:
    ("text", (str, [TokenLogprob])) * then ("done", Result) or ("error", RequestError). The
    logprob entries sent with a piece are those of the tokens whose text has begun by its end."""

    prompt: str | list[dict] | list[int]
    chat_template: bool
    options: dict
    tools: list[dict] | None = None  # for the chat template's `tools`
    prefix: str = ""  # text after the generation prompt that the answer continues (a forced tool call)
    opens_thinking: bool = False  # set before the first event: the prompt leaves the answer in a <think> block
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

    def __init__(self, lm: LanguageModel, prompt_cache: bool = True, log: Callable[[str], None] | None = None,
                 max_queued: int = Limits.max_queued, retry_after: int = Limits.retry_after):
        self.lm = lm
        self.prompt_cache = prompt_cache
        self.max_queued = max_queued
        self.retry_after = retry_after
        self.last: Result | None = None  # the last finished job's result
        self._log = log
        self._cache = None  # made on the model thread
        self._jobs: list[Job] = []  # submitted and not yet finished, the running one first
        self._closed = False
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, job: Job) -> None:
        """Queues the job; raises Busy (429) when max_queued jobs are already queued or running."""
        with self._lock:
            self._enqueue(job)
        model_thread().submit(lambda: self._run(job))

    def _enqueue(self, job: Job) -> None:
        """Adds the job under the lock held by the caller; raises Busy (429) past max_queued."""
        if self._closed:
            raise _stopped()
        if len(self._jobs) >= self.max_queued:
            raise Busy(f"the server is busy: {len(self._jobs)} generation requests are queued or running "
                       f"(the limit is {self.max_queued}); retry after {self.retry_after} s",
                       status=429, code="queue_full", retry_after=self.retry_after)
        self._jobs.append(job)
        self._idle.clear()

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
            ids = lm.encode_prompt(job.prompt, job.chat_template, tools=job.tools)
            if job.prefix:
                ids = ids + lm.tokenizer.encode(job.prefix, add_bos=False)
            job.opens_thinking = _opens_thinking(lm, job, ids)
            encoded = True
            if self.prompt_cache and self._cache is None:
                self._cache = lm.new_cache()
            stream = lm.stream(ids, cache=self._cache if self.prompt_cache else None, **opts)
            self._finish(stream, job)
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

    def _finish(self, stream: Any, job: Job) -> None:
        """Sends a generation's stream to its client, then its result (kept as `last`, logged)."""
        result = _send_stream(stream, job)
        self.last = result
        job.events.put(("done", result))
        if self._log:
            self._log(_summary(result))


def _opens_thinking(lm: LanguageModel, job: Job, ids: list[int]) -> bool:
    """A chat prompt whose template left the answer inside a <think> block (R1, V3.1 thinking)."""
    return job.chat_template and not isinstance(job.prompt, str) and opens_thinking(
        lm.tokenizer.decode(ids[-8:], skip_special=False))


def _send_stream(stream: Any, job: Job) -> Result:
    """Runs a TextStream to its end, putting ("text", (piece, logprob entries)) on the job's events;
    returns its Result. The entries sent with a piece are those of the tokens whose text has begun."""
    chunks = iter(stream)
    cancelled = False
    sent = 0  # logprob entries handed out
    for chunk in chunks:
        if job.cancelled.is_set():
            cancelled = True
            chunks.close()  # stops the decode loop between tokens
            break
        end = sent
        while end < len(stream.logprobs) and stream.logprobs[end].offset < len(stream.text):
            end += 1
        job.events.put(("text", (chunk, stream.logprobs[sent:end])))
        sent = end
    if not cancelled and sent < len(stream.logprobs):  # tokens that added no text at the end
        job.events.put(("text", ("", stream.logprobs[sent:])))
    stats = stream.stats
    return Result(stats.prompt_tokens, stats.generation_tokens,
                  "cancelled" if cancelled or stats.finish_reason == "cancelled" else stats.finish_reason,
                  stats.prefilled_tokens, stats.prompt_tps, stats.generation_tps)


def _summary(r: Result) -> str:
    return (f"prompt {r.prompt_tokens} tokens ({r.prefilled_tokens} prefilled, {r.prompt_tps:.1f} tok/s), "
            f"{r.completion_tokens} generated ({r.generation_tps:.1f} tok/s), {r.finish_reason}")


class BatchWorker(ModelWorker):
    """Runs up to max_concurrency jobs' decode steps as one batch (batching.BatchEngine) on the model
    thread; more wait in arrival order (up to max_queued in all). Each admitted job's text (detokenizing,
    stop strings, logprob offsets) is made on a thread of its own from the tokens the engine sends."""

    def __init__(self, lm: LanguageModel, max_concurrency: int, log: Callable[[str], None] | None = None,
                 max_queued: int = Limits.max_queued, retry_after: int = Limits.retry_after):
        super().__init__(lm, prompt_cache=False, log=log, max_queued=max_queued, retry_after=retry_after)
        from .batching import BatchEngine
        self.max_concurrency = max_concurrency
        self._engine = BatchEngine(lm, max_concurrency)
        self._incoming: list[Job] = []
        self._looping = False

    def submit(self, job: Job) -> None:
        with self._lock:
            self._enqueue(job)
            self._incoming.append(job)
            start = not self._looping
            self._looping = True
        if start:
            model_thread().submit(self._loop)

    def _done(self, job: Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
            if not self._jobs:
                self._idle.set()

    def _loop(self) -> None:
        """On the model thread while there is work: admit new jobs, then one engine step."""
        from .api import _on_mlx_thread
        _on_mlx_thread()
        engine = self._engine
        while True:
            with self._lock:
                new, self._incoming = self._incoming, []
                if not new and not engine.busy:
                    self._looping = False
                    return
            for job in new:
                self._admit(job)
            try:
                engine.step()
            except Exception as e:  # a corrupt expert slice, or a bug: every request in the batch ends
                if not isinstance(e, EdgeDSError):
                    traceback.print_exc(file=sys.stderr)
                engine.fail(e)

    def _admit(self, job: Job) -> None:
        """Encodes the job's prompt and hands it to the engine, with a thread that makes its text."""
        from .batching import Row, token_source
        from .options import SamplingOptions
        from .sampling import make_sampler, seed as set_seed

        lm = self.lm
        try:
            if job.cancelled.is_set():
                raise _stopped()
            ids = lm.encode_prompt(job.prompt, job.chat_template, tools=job.tools)
            if job.prefix:
                ids = ids + lm.tokenizer.encode(job.prefix, add_bos=False)
            job.opens_thinking = _opens_thinking(lm, job, ids)
            o = job.options
            opts = SamplingOptions(max_tokens=o["max_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                                   top_k=o["top_k"], min_p=o["min_p"], repetition_penalty=o["repetition_penalty"],
                                   seed=o["seed"], stop=o["stop"])
            limit = lm.config.max_position_embeddings
            max_tokens = opts.max_tokens if opts.max_tokens is not None else max(1, limit - len(ids))
            if len(ids) + max_tokens > limit:
                raise ContextLengthError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                         f"model's max_position_embeddings ({limit})")
        except RequestError as e:
            job.events.put(("error", e))
            self._done(job)
            return
        except EdgeDSError as e:
            over = isinstance(e, ContextLengthError)
            job.events.put(("error", RequestError(str(e), "messages" if job.chat_template else "prompt",
                                                  code="context_length_exceeded" if over else None)))
            self._done(job)
            return
        try:
            lm.check_ids(ids)  # a tokenizer of another model would make the model read past its embedding
        except EdgeDSError as e:  # the model directory's fault, not the request's (as in ModelWorker)
            job.events.put(("error", RequestError(str(e), status=500, kind="server_error")))
            self._done(job)
            return
        set_seed(opts.seed)
        row = Row(ids=ids, sampler=make_sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p),
                  max_tokens=max_tokens, penalty=opts.repetition_penalty,
                  penalty_context=opts.repetition_context_size, logprobs=o.get("logprobs"),
                  eos=set(lm.tokenizer.eos_ids), out=queue.Queue(), cancelled=job.cancelled)
        self._engine.add(row)
        threading.Thread(target=self._text, args=(job, row, ids, opts, max_tokens, token_source),
                         name="edge-ds-text", daemon=True).start()

    def _text(self, job: Job, row: Any, ids: list[int], opts: Any, max_tokens: int, token_source: Any) -> None:
        from dataclasses import replace

        from .api import TextStream
        try:
            stream = TextStream(iter(()), row.stats)
            o = job.options
            stream._chunks = self.lm._chunks(
                ids, None, row.sampler, replace(opts, max_tokens=max_tokens), row.stats, stream.tokens,
                job.cancelled, o.get("logprobs"), stream.logprobs, frozenset(o.get("keep_special", ())),
                source=token_source(row.out, lambda: None, POLL_SECONDS))
            self._finish(stream, job)
        except EdgeDSError as e:
            job.events.put(("error", RequestError(str(e), status=500, kind="server_error")))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            job.events.put(("error", RequestError(f"internal error: {type(e).__name__}: {e}", status=500,
                                                  kind="server_error")))
        finally:
            job.cancelled.set()  # the engine drops the row (a stop string ended the text before max_tokens)
            self._done(job)


# --- HTTP --------------------------------------------------------------------------------

class ClientGone(Exception):
    pass


class Busy(RequestError):
    """A bound is full (the generation queue, held request bodies, open connections): answered with
    Retry-After, so OpenAI clients wait and retry."""

    def __init__(self, message: str, status: int, code: str, retry_after: int):
        super().__init__(message, status=status, code=code,
                         kind="rate_limit_error" if status == 429 else "server_error")
        self.retry_after = retry_after


def _stopped() -> RequestError:
    # A job is cancelled only when its client left or the server is closing: this is the latter.
    return RequestError("the server stopped before the generation finished", status=503, kind="server_error")


class _SocketWriter(io.BufferedIOBase):
    """wfile for a handler: every write is sent whole (sendall), under the socket's send timeout."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


class Handler(BaseHTTPRequestHandler):
    """Answers one request that the server's loop has already read whole (`raw`: request line,
    headers and body), writing to the connection; the loop keeps the connection between requests."""

    protocol_version = "HTTP/1.1"  # keep-alive for JSON answers; streams close the connection
    server_version = "edge-ds"
    sys_version = ""
    server: "Server"

    routes = {"/health": ("GET",), "/v1/models": ("GET",), "/v1/chat/completions": ("POST",),
              "/v1/completions": ("POST",)}

    def __init__(self, sock: socket.socket, client_address: Any, server: "Server", raw: bytes):
        self._raw = raw
        super().__init__(sock, client_address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._raw)
        self.wfile = _SocketWriter(self.connection)

    def handle(self) -> None:
        self.close_connection = True  # parse_request sets it from the request's version and headers
        self.handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # the loop sent "100 Continue" before reading the body, if one was still to come

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
        path = _route(self.path)
        self._body_read = False
        model_path = path.startswith("/v1/models/")
        try:
            if path != "/health":  # health checkers carry no key (and the loop answers most of them)
                self.server.authorize(self.headers.get("Authorization"))
            allowed = ("GET",) if model_path else self.routes.get(path)
            if allowed is None:
                raise RequestError(f"unknown path: {method} {path}", status=404, code="not_found")
            if method not in allowed:
                raise RequestError(f"{path} takes {', '.join(allowed)}, not {method}", status=405,
                                   code="method_not_allowed")
            if model_path:
                self._model(path[len("/v1/models/"):])
            elif path == "/health":  # the loop answers GET /health itself, unless it comes with a body
                self._send_json(200, self.server.health())
            elif path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
            else:
                self._completion(chat=path == "/v1/chat/completions")
        except RequestError as e:
            if not self._body_read and (self.headers.get("Content-Length", "0") != "0"
                                        or "Transfer-Encoding" in self.headers):
                self.close_connection = True  # an unread body would be taken for the next request
            try:
                self._send_json(e.status, e.body(), _retry_headers(e))
            except OSError:  # the client left without reading the answer, or stopped reading it
                self.close_connection = True
        except (ClientGone, OSError):
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
        if "Transfer-Encoding" in self.headers:
            raise RequestError("chunked request bodies are not supported; send a Content-Length header",
                               status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a request body needs a Content-Length header", status=411)
        n = _content_length(length)
        if n is None:
            raise RequestError(f"Content-Length is not a number: {length!r}")
        if n > MAX_BODY_BYTES:
            raise RequestError(f"request body of {n} bytes is over the limit of {MAX_BODY_BYTES}", status=413)
        raw = self.rfile.read(n)  # in memory: the loop read the whole body before handing the request over
        if len(raw) < n:  # cannot happen while the loop and this agree on the framing; never parse a part
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
        options["logprobs"] = parse_logprobs(body, chat)
        tools = parse_tools(body) if chat else None
        stream, include_usage = parse_stream(body)
        parser, prefix = None, ""
        if tools is not None:
            fmt = lm.tokenizer.tool_format
            if fmt is None:
                raise RequestError("'tools': this model writes no tool-call format that edge-ds reads (it reads "
                                   "DeepSeek V3/R1/V3.1/V3.2/V4's and Kimi-K2's, found from the chat template and "
                                   "vocabulary)", "tools")
            if not lm.tokenizer.renders_tools:
                raise RequestError("'tools': this model's chat template does not render tools (it reads no "
                                   "'tools' variable, as DeepSeek V3/R1's published template does not); put a "
                                   "template that does in the model directory as chat_template.jinja", "tools")
            if tools.choice != "auto":  # "required" or a named function: the answer starts inside a call
                prefix = fmt.forced_prefix(tools.name)
            parser = ToolCallParser(fmt, tools.parallel, prefix, incremental=stream)
            options["keep_special"] = fmt.tokens  # the tool-call markers are special tokens; others stay out
        if chat:  # <think> and </think>, where they are special tokens, must reach the reasoning splitter
            think = tuple(t for t in (THINK_START, THINK_END)
                          if (i := lm.tokenizer.token_id(t)) is not None and lm.tokenizer.is_special(i))
            if think:
                options["keep_special"] = tuple(options.get("keep_special", ())) + think
        job = Job(prompt, chat_template=chat, options=options, tools=tools.tools if tools else None, prefix=prefix)
        self.server.worker.submit(job)  # Busy (429) when the queue is full
        try:
            events = self._events(job)
            kind, value = next(events)
            if kind == "error":
                raise value
            reply = Reply(self.server.model_id, self.server.fingerprint, chat)
            splitter = ReasoningSplitter(job.opens_thinking) if chat else None
            out = _Output(reply, parser, options["logprobs"] is not None, lm.tokenizer.token_bytes, splitter)
            if stream:
                self._stream(out, kind, value, events, include_usage)
            else:
                while kind == "text":
                    out.add(*value)
                    kind, value = next(events)
                if kind == "error":
                    raise value
                if value.finish_reason == "cancelled":
                    raise _stopped()
                self._send_json(200, out.whole(value))
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
            if hasattr(select, "poll"):  # select() fails past descriptor 1023, which a busy server reaches
                poll = select.poll()
                poll.register(self.connection, select.POLLIN)
                readable = bool(poll.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, out: "_Output", kind: str, value: Any, events: Iterator, include_usage: bool) -> None:
        self.close_connection = True  # the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        reply = out.reply
        try:
            if reply.chat:
                self._event(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
            while kind == "text":
                for delta, logprobs in out.add(*value):
                    self._event(reply.chunk(delta, None, include_usage, logprobs))
                kind, value = next(events)
            if kind == "done" and value.finish_reason == "cancelled":
                kind, value = "error", _stopped()
            if kind == "error":  # after the headers: an error event, as OpenAI sends
                self._event(value.body())
                return
            for delta, logprobs in out.finish():
                self._event(reply.chunk(delta, None, include_usage, logprobs))
            self._event(reply.chunk("", out.finish_reason(value), include_usage, out.rest_logprobs()))
            if include_usage:
                self._event(reply.usage_chunk(value))
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client went away or stopped reading for send_timeout
            raise ClientGone() from None

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class _Output:
    """Turns a job's text pieces into what one response says: reasoning (chat: the <think> part),
    content (through the tool-call parser when the request has tools), tool calls, and logprobs,
    whole or as stream deltas."""

    def __init__(self, reply: Reply, parser: ToolCallParser | None, logprobs: bool,
                 token_bytes: Callable[[int], bytes], splitter: ReasoningSplitter | None = None):
        self.reply, self.parser, self.logprobs, self._bytes = reply, parser, logprobs, token_bytes
        self.splitter = splitter
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCall] = []  # their arguments complete once the text has ended
        self.entries: list = []  # every logprob entry
        self._unsent: list = []  # those not yet sent with a stream delta

    def _format(self, entries: list) -> dict | None:
        if not self.logprobs:
            return None
        return (chat_logprobs if self.reply.chat else completion_logprobs)(entries, self._bytes)

    def _deltas(self, events: list) -> list[tuple[str | dict, dict | None]]:
        out = []
        for kind, value in events:
            if kind == "content":
                self.text.append(value)
                delta: str | dict = value
            elif kind == "reasoning":
                self.reasoning.append(value)
                delta = {"reasoning_content": value}
            elif kind == "arguments":  # more of an open call's arguments
                index, more = value
                delta = {"tool_calls": [{"index": index, "function": {"arguments": more}}]}
            else:  # "call" (whole) or "call_begin" (its id and name; arguments follow)
                delta = {"tool_calls": [value.to_openai(len(self.calls))]}
                self.calls.append(value)
            out.append((delta, self._format(self._unsent)))
            self._unsent = []
        return out

    def _parse(self, events: list[tuple[str, str]]) -> list[tuple[str, object]]:
        """Content through the tool-call parser; reasoning as it is."""
        if self.parser is None:
            return events
        out: list[tuple[str, object]] = []
        for kind, text in events:
            out += self.parser.feed(text) if kind == "content" else [(kind, text)]
        return out

    def add(self, piece: str, entries: list) -> list[tuple[str | dict, dict | None]]:
        """Feeds a piece of text and its tokens' logprob entries; returns the stream deltas it makes."""
        self.entries += entries
        self._unsent += entries
        events = self.splitter.feed(piece) if self.splitter else ([("content", piece)] if piece else [])
        return self._deltas(self._parse(events))

    def finish(self) -> list[tuple[str | dict, dict | None]]:
        events = self._parse(self.splitter.finish()) if self.splitter else []
        if self.parser:
            events += self.parser.finish()
        return self._deltas(events)

    def rest_logprobs(self) -> dict | None:
        """The logprobs not yet sent, for the stream's last chunk (None when there are none)."""
        rest, self._unsent = self._unsent, []
        return self._format(rest) if rest else None

    def finish_reason(self, r: Result) -> str:
        return "tool_calls" if self.calls and r.finish_reason in ("stop", "length") else r.finish_reason

    def whole(self, r: Result) -> dict:
        self.finish()
        r = Result(r.prompt_tokens, r.completion_tokens, self.finish_reason(r), r.prefilled_tokens,
                   r.prompt_tps, r.generation_tps)
        return self.reply.whole("".join(self.text), r, self._format(self.entries),
                                [c.to_openai() for c in self.calls] or None,
                                "".join(self.reasoning) if self.reasoning else None)


def _route(target: str) -> str:
    """The path a request target names, as the routes spell it (no query, no trailing slash)."""
    return target.split("?", 1)[0].rstrip("/") or "/"


def _retry_headers(e: RequestError) -> dict[str, str]:
    """The headers an error answer carries: Retry-After for "busy", the auth scheme for a 401."""
    if e.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return {"Retry-After": str(e.retry_after)} if isinstance(e, Busy) else {}


_DIGITS = re.compile(r"[0-9]+")


def _content_length(value: str) -> int | None:
    """A Content-Length value as a number, or None: digits only (int() would take "+5", "1_0", " 5 ")."""
    value = value.strip()
    return int(value) if _DIGITS.fullmatch(value) and len(value) <= 20 else None


# --- the connection loop -----------------------------------------------------------------

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_READING, _HANDLED, _CLOSING, _GONE = "reading", "handled", "closing", "gone"
_ACCEPTS_PER_WAKE = 64  # connections accepted per readiness event, so reads are not starved by a flood
_TICK = 0.1  # seconds between deadline sweeps at most (and the loop's longest sleep)
FD_RESERVE = 128  # descriptors kept for the process (model files, pipes, the selector) when sizing the limit


class _Conn:
    """One client connection, owned by the loop while reading or closing, by a handler while handled."""

    __slots__ = ("sock", "address", "buf", "state", "deadline", "scanned", "head_end", "body", "reserved",
                 "over", "force_close", "idle")

    def __init__(self, sock: socket.socket, address: Any, deadline: float, over: bool):
        self.sock = sock
        self.address = address
        self.buf = bytearray()
        self.state = _READING
        self.deadline = deadline
        self.over = over  # accepted past max_connections: answered once, then closed
        self.idle = False  # between keep-alive requests, nothing of the next one received
        self.reserved = 0  # body bytes counted against max_buffered_bytes
        self._reset_request()

    def _reset_request(self) -> None:
        self.scanned = 0  # the buffer holds no end of headers before this offset
        self.head_end: int | None = None
        self.body = 0
        self.force_close = False


def _head_fields(head: bytes) -> tuple[list[str], dict[str, list[str]]]:
    """The request line's words and the headers (lower-case names, every value), leniently: the
    handler's own parser (http.server) judges the request; this only frames it."""
    text = head.decode("latin-1")
    lines = text.lstrip("\r\n").splitlines()
    words = lines[0].split() if lines else []
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return words, headers


def _keep_alive(version: str, headers: dict[str, list[str]]) -> bool:
    tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
    if "close" in tokens:
        return False
    return version == "HTTP/1.1" or "keep-alive" in tokens


def _response(status: int, obj: dict, headers: dict[str, str], close: bool) -> bytes:
    """A whole small response, for the loop to send without a handler thread."""
    data = json.dumps(obj, ensure_ascii=False).encode()
    reason = BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: {Handler.server_version}",
             f"Date: {email.utils.formatdate(usegmt=True)}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class _Pool:
    """At most `size` handler threads, started as work arrives and kept until close()."""

    def __init__(self, size: int, run: Callable[..., None]):
        self._size = size
        self._run = run
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._pending = 0

    def submit(self, *args: Any) -> None:
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and self._threads < self._size:
                try:
                    threading.Thread(target=self._work_loop, name=f"edge-ds-http-{self._threads + 1}",
                                     daemon=True).start()
                    self._threads += 1
                except RuntimeError:  # the system has no thread to give: the running ones take it in turn
                    pass
        self._work.put(args)

    def close(self) -> None:
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            args = self._work.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            if args is None:
                return
            try:
                self._run(*args)
            except BaseException:  # _run reports its own errors; the thread must go on serving
                traceback.print_exc(file=sys.stderr)


def open_file_limit() -> int | None:
    """The process's soft limit on open files, or None where there is none to read (not POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(wanted: int) -> int | None:
    """Raises the soft open-file limit toward `wanted` (up to the hard limit); returns the new soft limit.
    macOS starts processes at 256 and many Linux systems at 1024: fewer than the connections we hold."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return open_file_limit()
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # macOS refuses past kern.maxfilesperproc even under an unlimited hard limit
        pass
    return open_file_limit()


class Server(HTTPServer):
    """The HTTP server; `worker` runs the model. Use serve_forever() or start(), then close()."""

    def __init__(self, address: tuple[str, int], lm: LanguageModel, model_id: str, prompt_cache: bool,
                 quiet: bool, limits: Limits | None = None, api_key: str | None = None, max_concurrency: int = 1):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # Set before binding: a failed bind calls server_close(), which reads them.
        self.limits = limits = limits or Limits()
        self.model_id = model_id
        self.quiet = quiet
        if api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", api_key):  # a Bearer token's characters
            raise EdgeDSError("the API key must be a non-empty string of printable ASCII characters, no spaces")
        # Only a digest is kept: comparing digests takes the same time whatever the key's length.
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.fingerprint = f"edge-ds-{lm.fingerprint}"
        self.prompt_limit = min(lm.config.max_position_embeddings * MAX_CHARS_PER_TOKEN, MAX_BODY_BYTES)
        why_not = None
        if max_concurrency > 1:
            from .batching import supported
            why_not = supported(lm)
            if why_not and not quiet:
                self._log(f"--max-concurrency {max_concurrency}: not batching ({why_not}); one request at a time")
        if max_concurrency > 1 and why_not is None:
            self.worker: ModelWorker = BatchWorker(lm, max_concurrency, log=None if quiet else self._log,
                                                   max_queued=limits.max_queued, retry_after=limits.retry_after)
        else:
            self.worker = ModelWorker(lm, prompt_cache, log=None if quiet else self._log,
                                      max_queued=limits.max_queued, retry_after=limits.retry_after)
        self.request_queue_size = limits.listen_backlog
        self.max_connections, self.overflow_connections = self._fit_to_open_files(limits)
        self._pool = _Pool(limits.handler_threads, self._handle)
        self._returned: queue.SimpleQueue = queue.SimpleQueue()  # (conn, keep_alive) from handler threads
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: set[_Conn] = set()  # within max_connections: reading, handled or closing
        self._over: set[_Conn] = set()  # past it, being answered
        self._buffered = 0  # body bytes reserved by requests read or being read
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._serving = False
        self._full_said = False
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        super().__init__(address, Handler)

    def _fit_to_open_files(self, limits: Limits) -> tuple[int, int]:
        """max_connections and overflow_connections, cut to what the open-file limit lets us hold."""
        room = open_file_limit()
        if room is None:
            return limits.max_connections, limits.overflow_connections
        room = max(room - FD_RESERVE, 2)
        over = min(limits.overflow_connections, max(room // 8, 1))
        cut = min(limits.max_connections, room - over)
        if cut < limits.max_connections and not self.quiet:
            self._log(f"at most {cut} connections (the open-file limit is {open_file_limit()}; "
                      f"raise `ulimit -n` for {limits.max_connections})")
        return max(cut, 1), over

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a bad DNS set-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def authorize(self, header: str | None) -> None:
        """Raises a 401 RequestError unless the request carries the API key (when one is set), compared
        in constant time."""
        if self._key_digest is None:
            return
        scheme, _, given = (header or "").strip().partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise RequestError("You didn't provide an API key. Provide it in an Authorization header using "
                               "Bearer auth (Authorization: Bearer YOUR_KEY).", status=401, code="invalid_api_key")
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(digest, self._key_digest):
            raise RequestError("Incorrect API key provided.", status=401, code="invalid_api_key")

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    def model_card(self) -> dict:
        config = self.worker.lm.path / "config.json"
        created = int(config.stat().st_mtime) if config.is_file() else 0
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": "edge-ds"}

    # --- serving ---

    def serve_forever(self, poll_interval: float = _TICK) -> None:
        """Runs the connection loop until shutdown() (from another thread) or KeyboardInterrupt.
        A server that was shut down stays so (this returns at once)."""
        self._stopped.clear()
        self._serving = True
        sel = self._selector = selectors.DefaultSelector()
        accept_paused_until = 0.0
        swept = 0.0
        try:
            self.socket.setblocking(False)
            sel.register(self.socket, selectors.EVENT_READ, "accept")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                for key, _ in sel.select(min(poll_interval, _TICK)):
                    if key.data == "accept":
                        if self._accept():  # full, or out of descriptors: let some close first
                            sel.unregister(self.socket)
                            accept_paused_until = time.monotonic() + _TICK
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        self._guarded(self._readable, key.data)
                self._take_back()
                now = time.monotonic()
                if accept_paused_until and now >= accept_paused_until:
                    accept_paused_until = 0.0
                    sel.register(self.socket, selectors.EVENT_READ, "accept")
                if now - swept >= _TICK:
                    swept = now
                    self._sweep(now)
        finally:
            self._serving = False
            for conn in list(self._conns | self._over):
                if conn.state != _HANDLED:  # a handled one is closed by its handler thread
                    self._drop(conn)
            sel.close()
            self._selector = None
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops serve_forever (call from another thread) and waits until it has returned."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def start(self) -> threading.Thread:
        """Serves on a background thread (for apps that embed the server)."""
        self._stopped.clear()  # serving from now on: a close() right after this waits for the thread
        self._serving = True
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
        self._pool.close()
        self._take_back()  # connections handlers gave back after the loop ended
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    close = server_close

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):  # already awake (the pipe is full), or closed
            pass

    def _log(self, line: str) -> None:
        sys.stderr.write(f"edge-ds serve: {line}\n")

    # --- the loop's work (the loop thread only) ---

    def _guarded(self, step: Callable[[_Conn], None], conn: _Conn) -> None:
        """Runs one connection's step; a bug there drops that connection, never the loop (and the server)."""
        try:
            step(conn)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if conn.state != _HANDLED:
                self._drop(conn)

    def _accept(self) -> bool:
        """Accepts waiting connections; True when every bound is full or descriptors ran out (accepting
        must pause: closing a connection unread would reset it)."""
        now = time.monotonic()
        for _ in range(_ACCEPTS_PER_WAKE):
            if len(self._conns) >= self.max_connections and len(self._over) >= self.overflow_connections:
                return True
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return True
                continue  # ECONNABORTED and the like: that client is gone
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each streamed token: send now
            except OSError:
                pass
            if len(self._conns) < self.max_connections:
                conn = _Conn(sock, address, now + self.limits.request_timeout, over=False)
                self._conns.add(conn)
                self._full_said = False
            else:
                # Read its request line (briefly) to answer /health, and 503 to anything else.
                conn = _Conn(sock, address, now + self.limits.linger, over=True)
                self._over.add(conn)
                if not self._full_said and not self.quiet:
                    self._log(f"{self.max_connections} connections open (the limit): answering 503 to more")
                    self._full_said = True
            self._selector.register(sock, selectors.EVENT_READ, conn)
        return False

    def _full(self) -> Busy:
        return Busy(f"the server is busy: {self.max_connections} connections are open (the limit); "
                    f"retry after {self.limits.retry_after} s", status=503, code="server_busy",
                    retry_after=self.limits.retry_after)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:  # the client closed its side: nothing more can be answered
            self._drop(conn)
            return
        if conn.state == _CLOSING:
            return  # read and discarded, so that closing sends no reset
        if conn.idle:  # the first byte of the next request starts its read time
            conn.idle = False
            conn.deadline = time.monotonic() + self.limits.request_timeout
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Frames the buffered request: answers it here (/health, errors of framing, a full server)
        or hands it to a handler thread once its body is complete."""
        limits = self.limits
        while conn.state == _READING and conn.buf:
            if conn.head_end is None:
                m = _HEAD_END.search(conn.buf, max(conn.scanned - 3, 0))
                if m is None:
                    conn.scanned = len(conn.buf)
                    if len(conn.buf) > limits.max_header_bytes:
                        self._answer(conn, RequestError(f"request headers over the limit of "
                                                        f"{limits.max_header_bytes} bytes", status=431), True)
                    return
                if m.start() > limits.max_header_bytes:
                    self._answer(conn, RequestError(f"request headers over the limit of "
                                                    f"{limits.max_header_bytes} bytes", status=431), True)
                    return
                conn.head_end = m.end()
                words, headers = _head_fields(bytes(conn.buf[:m.start()]))
                method, target, version = (words + ["", "", ""])[:3] if len(words) == 3 else ("", "", "")
                lengths = {v for v in headers.get("content-length", [])}
                # /health, answered here: it waits for no thread and no model, even past the connection
                # limit (not logged per request: health checkers poll it every few seconds).
                if method in ("GET", "HEAD") and _route(target) == "/health" and not lengths - {"0"} \
                        and "transfer-encoding" not in headers:
                    close = conn.over or not _keep_alive(version, headers)
                    self._answer(conn, None, close, self.health(), head=method == "HEAD")
                    continue
                if conn.over:
                    self._answer(conn, self._full(), True)
                    return
                if "transfer-encoding" in headers:
                    conn.force_close = True  # the handler answers 411; what follows is not a request
                elif len(lengths) > 1:
                    self._answer(conn, RequestError("conflicting Content-Length headers"), True)
                    return
                elif lengths:
                    n = _content_length(next(iter(lengths)))
                    if n is None or n > MAX_BODY_BYTES:
                        conn.force_close = True  # the handler answers 400 or 413 without the body
                    elif n:
                        if self._buffered + n > limits.max_buffered_bytes:
                            self._answer(conn, Busy(f"the server is busy: {self._buffered} bytes of request "
                                                    f"bodies are held (the limit is {limits.max_buffered_bytes}); "
                                                    f"retry after {limits.retry_after} s", status=503,
                                                    code="server_busy", retry_after=limits.retry_after), True)
                            return
                        self._buffered += n
                        conn.reserved = n
                        conn.body = n
                        if len(conn.buf) - conn.head_end < n and any(
                                v.lower() == "100-continue" for v in headers.get("expect", [])):
                            self._send_now(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            end = conn.head_end + conn.body
            if len(conn.buf) < end:
                return
            raw = bytes(conn.buf[:end])
            del conn.buf[:end]
            conn.state = _HANDLED
            self._selector.unregister(conn.sock)
            self._pool.submit(conn, raw)
            return

    def _send_now(self, conn: _Conn, data: bytes) -> bool:
        """Sends a small answer without blocking; False (and the connection dropped) if it did not fit,
        which a connection that is not reading its answers has earned."""
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            self._drop(conn)
            return False
        return True

    def _answer(self, conn: _Conn, error: RequestError | None, close: bool, ok: dict | None = None,
                head: bool = False) -> None:
        """Answers the request at the head of the buffer from the loop; closes, or reads the next one."""
        now = time.monotonic()
        if error is not None:
            data = _response(error.status, error.body(), _retry_headers(error), close)
        else:
            data = _response(200, ok or {}, {}, close)
            if head:
                data = data[:data.index(b"\r\n\r\n") + 4]
        self._release(conn)
        if not self._send_now(conn, data):
            return
        if close:
            self._closing(conn, now)
            return
        del conn.buf[:conn.head_end]
        conn._reset_request()
        conn.idle = not conn.buf
        conn.deadline = now + (self.limits.idle_timeout if conn.idle else self.limits.request_timeout)

    def _closing(self, conn: _Conn, now: float) -> None:
        """Ends our side (the client reads everything sent, then end-of-file) and reads theirs for a
        moment before closing, so that unread bytes of theirs do not turn the close into a reset."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.state = _CLOSING
        conn.buf.clear()
        conn.deadline = now + self.limits.linger

    def _release(self, conn: _Conn) -> None:
        self._buffered -= conn.reserved
        conn.reserved = 0

    def _drop(self, conn: _Conn) -> None:
        self._release(conn)
        if conn.state not in (_HANDLED, _GONE) and self._selector is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.state = _GONE
        conn.sock.close()
        self._conns.discard(conn)
        self._over.discard(conn)

    def _sweep(self, now: float) -> None:
        """Closes connections past their deadline: a request not sent whole in request_timeout gets
        408, a keep-alive connection idle for idle_timeout and a closing one are closed quietly."""
        for conn in [c for c in self._conns | self._over if c.state != _HANDLED and c.deadline <= now]:
            self._guarded(self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        if conn.state == _CLOSING or conn.idle or (not conn.buf and not conn.over):
            self._drop(conn)
        elif conn.over:
            self._answer(conn, self._full(), True)
        else:
            self._answer(conn, RequestError(f"the request was not received in "
                                            f"{self.limits.request_timeout:g} s", status=408), True)

    def _take_back(self) -> None:
        """Connections whose request a handler answered: kept for the next request, or closed."""
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            self._release(conn)
            if not self._serving:
                conn.state = _GONE  # not registered with any selector
                self._drop(conn)
                continue
            self._guarded(lambda c: self._resume(c, keep), conn)

    def _resume(self, conn: _Conn, keep: bool) -> None:
        now = time.monotonic()
        try:
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):  # the socket failed under the handler
            conn.state = _GONE
            self._drop(conn)
            return
        conn.state = _READING
        if not keep or conn.force_close:
            self._closing(conn, now)
            return
        conn._reset_request()
        conn.idle = not conn.buf
        conn.deadline = now + (self.limits.idle_timeout if conn.idle else self.limits.request_timeout)
        self._advance(conn)  # a pipelined request may already be here

    # --- a handler thread's work ---

    def _handle(self, conn: _Conn, raw: bytes) -> None:
        keep = False
        try:
            conn.sock.settimeout(self.limits.send_timeout)  # blocking, for a handler's writes
            keep = not Handler(conn.sock, conn.address, self, raw).close_connection
        except OSError:  # the client left before the handler could start
            pass
        finally:
            if self._stopped.is_set():  # the loop has ended: nobody would take it back
                conn.sock.close()
            else:
                self._returned.put((conn, keep))
                self._wake()


def make_server(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None, *,
                prompt_cache: bool = True, quiet: bool = False, limits: Limits | None = None,
                api_key: str | None = None, max_concurrency: int = 1) -> Server:
    """A server for the loaded model `lm` bound to host:port (port 0: any free port), not yet serving.

    api_key: when given, every request but /health must carry `Authorization: Bearer <api_key>`
    (else 401, OpenAI's invalid_api_key error). max_concurrency > 1 decodes that many requests as one
    batch where the model allows it (batching.supported: MLX latent caches, V3.2 too; ONNX exports), with
    no prompt cache kept between requests; 1 runs them one at a time.
    model_id: the name /v1/models lists (default: the model directory's name); requests may name
    any model, the loaded one answers. prompt_cache=False prefills every prompt from scratch.
    limits: the bounds under load (default Limits()); max_connections is cut to fit the process's
    open-file limit (serve() raises that limit first; an app may call raise_open_file_limit).
    """
    try:
        return Server((host, port), lm, model_id or lm.path.name, prompt_cache, quiet, limits, api_key,
                      max_concurrency)
    except (OSError, OverflowError) as e:  # OverflowError: a port over 65535
        raise EdgeDSError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None, *,
          on_ready: Callable[[Server], None] | None = None, **options: Any) -> None:
    """Serves until Ctrl-C or SIGTERM, then stops generation and closes the socket."""
    limits = options.get("limits") or Limits()
    raise_open_file_limit(limits.max_connections + limits.overflow_connections + FD_RESERVE)
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
