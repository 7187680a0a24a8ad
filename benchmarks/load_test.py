"""Load test of `edge-ds serve` on the shipped model, loopback only: concurrent clients mixing
valid, streaming, malformed and oversized requests, beside connections that stall mid-request.

    python benchmarks/load_test.py --clients 256 --stalled 1000            # one run of this checkout
    python benchmarks/load_test.py --matrix --compare-ref 081fbe2 --ref HEAD   # the README table, before/after

Each run starts a fresh `edge-ds serve --port 0` (this checkout, or a git worktree of --compare-ref),
then:
- `--stalled` connections that each send part of a request (nothing, half the headers, or the
  headers and half the body) and then nothing more, opened before the clients and kept at that
  number to the end (one the server closes is counted and opened again);
- `--clients` threads that start together and each send `--requests` requests, one connection
  each, drawn (seeded) from: chat, streamed chat, completion (max_tokens 4), GET /v1/models,
  GET /health, malformed bodies (bad JSON, wrong types, unknown fields), oversized ones (a declared
  64 MiB body, a 2 MB prompt);
- a probe (its own process) that GETs /health every 0.1 s throughout, and a sampler of the server's /proc/PID/status
  (threads, VmRSS, VmHWM) every 0.05 s (Linux; elsewhere those columns say n/a).
Everything is bounded: --duration seconds for the clients to start their requests, REQUEST_TIMEOUT per
request. It reports answers by class: 2xx, 4xx (429 apart), 429 and 503 that carry Retry-After (the
server saying "busy, retry": deliberate, counted apart from failures), other 5xx, and connection
failures (no HTTP answer: reset, refused, closed, timed out), p50/p99 latency of answered requests,
the worst /health latency, and the server's thread and RSS high-water marks.

The script raises its own open-file limit (soft, up to the hard limit): a thousand stalled
connections need more descriptors than the usual 1024 (256 on macOS). The server inherits it.
Needs no dev extra.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 120.0  # seconds one client request may take, queueing included, before it counts as failed
HEALTH_EVERY = 0.1  # seconds between /health probes
HEALTH_TIMEOUT = 10.0  # a probe slower than this is a failure
SAMPLE_EVERY = 0.05  # seconds between reads of the server's /proc/PID/status
START_TIMEOUT = 120.0  # seconds for the server to load and answer /health
MAX_TOKENS = 4
PROBE = """
import http.client, sys, time
port, every, timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
while True:
    t = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
    except (OSError, http.client.HTTPException):
        ok = False
    print(f"{time.monotonic() - t:.4f} {int(ok)}", flush=True)
    time.sleep(every)
"""
MATRIX = [(32, 0), (128, 0), (256, 0), (256, 1000)]  # (clients, stalled): the README table
CHAT = [{"role": "user", "content": "And God said, Let there be light."}]
# kind -> weight in the clients' mix
MIX = {"chat": 25, "stream": 15, "completion": 10, "models": 10, "health": 5, "malformed": 20, "oversized": 15}
MALFORMED = [b'{"messages": [', b"not json", b'{"messages": "hi"}', b'{"prompt": "x", "temperature": "hot"}',
             b'{"prompt": "x", "max_tokens": -3}', b'{"prompt": "x", "bogus_field": 1}', b"[1, 2, 3]",
             b'{"messages": [{"role": "wizard", "content": "x"}]}']
STALLS = [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty",
          b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
          b"Content-Length: 200\r\n\r\n{\"prompt\": \"In the beginning"]


def raise_open_files() -> int:
    """Raises this process's soft open-file limit to the hard limit (POSIX); returns the soft limit."""
    try:
        import resource
    except ImportError:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (hard, 65536, 16384, 4096):
        if want == resource.RLIM_INFINITY or want <= soft or (hard != resource.RLIM_INFINITY and want > hard):
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):  # macOS: at most kern.maxfilesperproc
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the server under test -------------------------------------------------------------------

class ServerProcess:
    """`edge-ds serve --port 0` from a checkout (its own edge_ds first on the path), until stop()."""

    def __init__(self, checkout: Path, extra: list[str]):
        self.checkout = checkout
        env = dict(os.environ, PYTHONPATH=str(checkout), NO_PROXY="*", PYTHONUNBUFFERED="1")
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_ds.cli", "serve", "--port", "0", *extra], cwd=checkout,
                                     env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = self._wait_ready()

    def _wait_ready(self) -> int:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line[0] if line else "")
        if not m:
            self.stop()
            self.log.seek(0)
            raise SystemExit(f"the server in {self.checkout} did not start:\n{self.log.read().decode()[-3000:]}")
        return int(m.group(1))

    def status(self) -> dict[str, int]:
        """Threads, VmRSS and VmHWM (kB) from /proc/PID/status; {} where there is no /proc."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, v in re.findall(r"^(Threads|VmRSS|VmHWM):\s+(.+)$", text, re.M)}

    def stop(self) -> str:
        """Stops the server (SIGINT, then kill) and returns the end of its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]


# --- traffic ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer
    seconds: float
    retry_after: bool = False
    error: str = ""


def one_request(port: int, kind: str, rng: random.Random) -> Outcome:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    json_type = {"Content-Type": "application/json"}
    try:
        if kind in ("models", "health"):
            conn.request("GET", "/v1/models" if kind == "models" else "/health")
        elif kind == "chat":
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"messages": CHAT, "max_tokens": MAX_TOKENS, "seed": rng.randrange(1000)}), json_type)
        elif kind == "stream":
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"messages": CHAT, "max_tokens": MAX_TOKENS, "stream": True}), json_type)
        elif kind == "completion":
            conn.request("POST", "/v1/completions", json.dumps(
                {"prompt": "In the beginning", "max_tokens": MAX_TOKENS, "temperature": 0}), json_type)
        elif kind == "malformed":
            conn.request("POST", rng.choice(["/v1/chat/completions", "/v1/completions"]), rng.choice(MALFORMED),
                         json_type)
        elif rng.random() < 0.5:  # oversized: a declared 64 MiB body, of which nothing is sent
            conn.putrequest("POST", "/v1/completions")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(64 * 1024 * 1024))
            conn.endheaders()
        else:  # oversized: a 2 MB prompt, far past the context
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "And " * 500_000, "max_tokens": 1}),
                         json_type)
        r = conn.getresponse()
        body = r.read()
        if kind == "stream" and r.status == 200 and not body.rstrip().endswith(b"data: [DONE]"):
            return Outcome(kind, None, time.monotonic() - start, error="stream cut short")
        return Outcome(kind, r.status, time.monotonic() - start, retry_after=r.getheader("Retry-After") is not None)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(kind, None, time.monotonic() - start, error=type(e).__name__)
    finally:
        conn.close()


class Stalled(threading.Thread):
    """Keeps `n` connections open, each with part of a request sent; counts the ones the server
    closes (and opens another in each one's place) until stop."""

    def __init__(self, port: int, n: int):
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.opened = self.closed_by_server = self.answered_408 = self.connect_failures = 0
        self.ready = threading.Event()
        self._halt = threading.Event()
        self._sel = selectors.DefaultSelector()

    def _open(self, i: int) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            if STALLS[i % len(STALLS)]:
                s.sendall(STALLS[i % len(STALLS)])
            s.setblocking(False)
        except OSError:
            self.connect_failures += 1
            return
        self.opened += 1
        self._sel.register(s, selectors.EVENT_READ, i)

    def run(self) -> None:
        for i in range(self.n):
            if self._halt.is_set():
                break
            self._open(i)
        self.ready.set()
        while not self._halt.is_set():
            for key, _ in self._sel.select(0.2):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    self.answered_408 += 1
                if data and not data.startswith(b"HTTP/1.1 408"):
                    continue  # the rest of an answer: wait for the close
                if not data or data.startswith(b"HTTP/1.1 408"):
                    self.closed_by_server += 1
                    self._sel.unregister(s)
                    s.close()
                    if not self._halt.is_set():
                        self._open(key.data)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()


@dataclass
class Result:
    server: str
    clients: int
    stalled: int
    requests: int = 0
    ok: int = 0
    client_errors: int = 0  # 4xx other than 429
    busy_429: int = 0
    busy_503: int = 0  # 503 with Retry-After
    server_errors: int = 0  # other 5xx
    failures: int = 0
    failure_kinds: dict = field(default_factory=dict)
    p50: float = 0.0
    p99: float = 0.0
    wall: float = 0.0
    health_probes: int = 0
    health_worst: float = 0.0
    health_failures: int = 0
    threads_max: int | None = None
    rss_max_mb: float | None = None
    stalled_opened: int = 0
    stalled_closed_by_server: int = 0
    stalled_408: int = 0
    stalled_connect_failures: int = 0


def run_load(checkout: Path, label: str, clients: int, stalled: int, requests: int, duration: float,
             seed: int, extra: list[str]) -> Result:
    server = ServerProcess(checkout, extra)
    res = Result(label, clients, stalled)
    stop = threading.Event()
    samples: list[dict[str, int]] = []
    probes: list[tuple[float, bool]] = []

    def sample() -> None:
        while not stop.is_set():
            if s := server.status():
                samples.append(s)
            time.sleep(SAMPLE_EVERY)

    # The probe runs in its own process: in this one, 256 client threads would delay it for the GIL.
    prober = subprocess.Popen([sys.executable, "-c", PROBE, str(server.port), str(HEALTH_EVERY), str(HEALTH_TIMEOUT)],
                              stdout=subprocess.PIPE, text=True)

    def probe() -> None:
        for line in prober.stdout:
            seconds, ok = line.split()
            probes.append((float(seconds), ok == "1"))

    watchers = [threading.Thread(target=f, daemon=True) for f in (sample, probe)]
    for w in watchers:
        w.start()
    stall = Stalled(server.port, stalled)
    stall.start()
    stall.ready.wait(120)

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    kinds, weights = list(MIX), list(MIX.values())

    def client(c: int) -> None:
        rng = random.Random(seed * 1_000_003 + c)
        barrier.wait()
        ends = time.monotonic() + duration
        for _ in range(requests):
            if time.monotonic() >= ends:
                break
            out = one_request(server.port, rng.choices(kinds, weights)[0], rng)
            with lock:
                outcomes.append(out)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + REQUEST_TIMEOUT + 10)
    res.wall = time.monotonic() - start
    stall.stop()
    stop.set()
    prober.terminate()
    prober.wait()
    for w in watchers:
        w.join(HEALTH_TIMEOUT + 1)
    final = server.status()
    log = server.stop()

    res.requests = len(outcomes)
    for o in outcomes:
        if o.status is None:
            res.failures += 1
            res.failure_kinds[o.error] = res.failure_kinds.get(o.error, 0) + 1
        elif o.status == 429:
            res.busy_429 += 1
        elif o.status == 503 and o.retry_after:
            res.busy_503 += 1
        elif o.status >= 500:
            res.server_errors += 1
        elif o.status >= 400:
            res.client_errors += 1
        else:
            res.ok += 1
    answered = sorted(o.seconds for o in outcomes if o.status is not None)
    if answered:
        res.p50 = statistics.median(answered)
        res.p99 = answered[min(len(answered) - 1, int(0.99 * len(answered)))]
    res.health_probes = len(probes)
    res.health_worst = max((t for t, _ in probes), default=0.0)
    res.health_failures = sum(not ok for _, ok in probes)
    if samples:
        res.threads_max = max(s.get("Threads", 0) for s in samples)
        res.rss_max_mb = max([s.get("VmRSS", 0) for s in samples] + [final.get("VmHWM", 0)]) / 1024
    res.stalled_opened, res.stalled_closed_by_server = stall.opened, stall.closed_by_server
    res.stalled_408, res.stalled_connect_failures = stall.answered_408, stall.connect_failures
    if "Traceback" in log:
        print(f"[{label}] the server's stderr holds a traceback:\n{log}", file=sys.stderr)
    return res


# --- the report ------------------------------------------------------------------------------

HEADER = ("| server | clients | stalled | requests | 2xx | 4xx | 429 busy | 503 busy | other 5xx | conn. failures "
          "| p50 s | p99 s | /health worst s (failed) | threads max | RSS max MB | stalled closed by server |")


def row(r: Result) -> str:
    na = "n/a"
    fails = f"{r.failures}" + (f" ({', '.join(f'{k} {v}' for k, v in r.failure_kinds.items())})" if r.failures else "")
    stalled = (f"{r.stalled_closed_by_server} ({r.stalled_408} with 408)" if r.stalled else "-") + \
        (f", {r.stalled_connect_failures} could not connect" if r.stalled_connect_failures else "")
    return (f"| {r.server} | {r.clients} | {r.stalled} | {r.requests} | {r.ok} | {r.client_errors} | {r.busy_429} "
            f"| {r.busy_503} | {r.server_errors} | {fails} | {r.p50:.2f} | {r.p99:.2f} "
            f"| {r.health_worst:.2f} ({r.health_failures}) | {r.threads_max if r.threads_max else na} "
            f"| {f'{r.rss_max_mb:.0f}' if r.rss_max_mb else na} | {stalled} |")


def worktree(ref: str) -> Path:
    """A git worktree of `ref` (made once, under the temporary directory)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"edge-ds-load-{sha}"
    if not (path / "edge_ds" / "server.py").is_file():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True,
                       capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=256, help="concurrent clients (default 256)")
    ap.add_argument("--stalled", type=int, default=1000, help="connections that stall mid-request (default 1000)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds in which clients start requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matrix", action="store_true",
                    help="the README table: " + ", ".join(f"{c} clients + {s} stalled" for c, s in MATRIX))
    ap.add_argument("--compare-ref", metavar="REF", help="also run the server of this git commit (a worktree)")
    ap.add_argument("--ref", metavar="REF", help="run this git commit (a worktree) instead of the working tree")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="an `edge-ds serve` argument for the server under test (not the --compare-ref one), "
                         "e.g. --serve-arg=--max-connections=1024")
    ap.add_argument("--out", type=Path, help="write every result as JSON here too")
    args = ap.parse_args()

    nofile = raise_open_files()
    print(f"open-file limit (soft) raised to {nofile}", file=sys.stderr)
    servers = [(f"before ({args.compare_ref})", worktree(args.compare_ref), [])] if args.compare_ref else []
    label = ("after" if args.compare_ref else "this checkout") + (f" ({args.ref})" if args.ref else "")
    servers.append((" ".join([label, *args.serve_arg]), worktree(args.ref) if args.ref else ROOT, args.serve_arg))
    scenarios = MATRIX if args.matrix else [(args.clients, args.stalled)]
    results = []
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for clients, stalled in scenarios:
        for label, checkout, extra in servers:
            r = run_load(checkout, label, clients, stalled, args.requests, args.duration, args.seed, extra)
            results.append(r)
            print(row(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
