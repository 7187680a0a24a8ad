"""Concurrent streaming clients against `edge-ds serve`: aggregate generated tok/s and time to first
token, queued (--max-concurrency 1) against batched (--max-concurrency N).

    python benchmarks/serve_batching.py [--model DIR] [--backend mlx|onnx] [--clients 1 4 16] [--max-tokens 64]
                                        [--repeat N] [--json OUT]

Each configuration starts a fresh server (a subprocess, so clients and server do not share a GIL);
the clients start together, each streaming one completion (greedy, a different prompt each) over
its own connection. tok/s: all clients' completion tokens / wall time from the first request to
the last [DONE]. TTFT: request sent to the first text chunk, median and worst over the clients.
--repeat N runs each configuration N times on the same server and reports the run of median tok/s
(a shared machine's noise; the runs are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["In the beginning", "And the LORD spake unto Moses, saying,", "Blessed are the meek", "Thou shalt",
           "And God said, Let there be light", "Jesus wept.", "The LORD is my shepherd", "Vanity of vanities",
           "Honour thy father and thy mother", "Ask, and it shall be given you", "Love thy neighbour",
           "The earth is the LORD's", "Let every thing that hath breath", "For God so loved the world",
           "Train up a child", "A soft answer turneth away wrath"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, backend: str | None, concurrency: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edge_ds.cli", "serve", "--port", str(port), "--max-concurrency", str(concurrency)]
    if model:
        cmd += ["--model", model]
    if backend:
        cmd += ["--backend", backend]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, NO_PROXY="*"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return p, url
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {p.stderr.read() if p.stderr else ''}")
            time.sleep(0.2)


def one(url: str, prompt: str, max_tokens: int, t0: float, out: dict) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - t0
    out.update(ttft=first, tokens=tokens, end=time.perf_counter())


def run(url: str, clients: int, max_tokens: int) -> dict:
    results = [dict() for _ in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(url, PROMPTS[i % len(PROMPTS)], max_tokens, t0, results[i]))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "tokens": sum(r["tokens"] for r in results), "wall_s": round(wall, 2),
            "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_median_s": round(statistics.median(ttfts), 2), "ttft_max_s": round(max(ttfts), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="mlx")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for clients in args.clients:
        for mode, concurrency in (("queued", 1), ("batched", clients)):
            if mode == "batched" and clients == 1:
                continue
            p, url = start(args.model, args.backend, concurrency)
            try:
                run(url, 1, 4)  # warm-up
                runs = sorted((run(url, clients, args.max_tokens) for _ in range(args.repeat)),
                              key=lambda r: r["tok_s"])
                row = {"mode": mode, "backend": args.backend, **runs[len(runs) // 2],
                       "tok_s_runs": [r["tok_s"] for r in runs]}
            finally:
                p.terminate()
                p.wait(30)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
