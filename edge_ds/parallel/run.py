"""Ranks in lockstep: rank 0 drives, the other ranks follow.

Rank 0 owns the terminal, the HTTP server and the sampling; the model's forward must run on every
rank with the same tokens (each MoE layer's all_sum needs all of them). So rank 0's backend is a
Driver: before each forward it sends the call (which cache, the cache's offset, the token ids) to
the followers with two all_sums (a fixed header, then the ids; the followers contribute zeros),
and each follower replays it on its own mirror of that cache. Sampled tokens reach the followers
as the next call's ids, so every rank agrees on every token without a shared seed.

Faults: MLX's ring backend raises "[ring] connection to a peer was lost" within milliseconds when
a peer's process dies (its sockets close); that becomes one ParallelError naming the rank (and
host). A peer that hangs without closing its sockets would block a collective forever, so a
watchdog ends the process when one forward has waited longer than TIMEOUT seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref

import mlx.core as mx
import numpy as np

from ..cache import PromptCache
from .plan import ParallelError, describe

RUN, STOP = 1, 2
HEADER = 8  # int32: op, cache id, cache offset, batch, length, freed cache ids, spare, spare
TIMEOUT = float(os.environ.get("EDGE_DS_PARALLEL_TIMEOUT", "300"))  # seconds one forward may wait on peers
FATAL = False  # set by `python -m edge_ds`: a lost rank ends the process (chat/serve would go on otherwise)


def peers(rank: int, size: int) -> str:
    """The ranks a ring rank talks to, in words (a ring rank only sees its two neighbours)."""
    others = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    return " or ".join(describe(r) for r in others)


class Link:
    """Collectives of one rank, with a clear error and a watchdog."""

    def __init__(self, group: mx.distributed.Group, timeout: float = TIMEOUT):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.timeout = timeout
        self.dead: str | None = None
        self._since: float | None = None  # when the current guarded wait began
        self._what = ""
        threading.Thread(target=self._watch, name="edge-ds-watchdog", daemon=True).start()

    def eval(self, *arrays: mx.array, guarded: bool = True, what: str = "a forward") -> None:
        """mx.eval, turning a lost peer into ParallelError; guarded waits are bounded by the watchdog."""
        if self.dead:
            raise ParallelError(self.dead)
        if guarded:
            self._since, self._what = time.monotonic(), what
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            if "[ring]" not in str(e) and "peer" not in str(e):
                raise
            self.fail(f"rank {self.rank}: lost the connection to {peers(self.rank, self.size)} during {what} "
                      f"(that rank stopped or its host is unreachable): {e}")
        finally:
            self._since = None

    def fail(self, message: str) -> None:
        self.dead = message
        if FATAL:
            print(f"edge-ds: {message}", file=sys.stderr, flush=True)
            os._exit(1)
        raise ParallelError(message)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                print(f"edge-ds: rank {self.rank}: no answer from {peers(self.rank, self.size)} for "
                      f"{self.timeout:.0f} s during {self._what} (EDGE_DS_PARALLEL_TIMEOUT); stopping",
                      file=sys.stderr, flush=True)
                os._exit(1)

    def share(self, values: np.ndarray | None, n: int, what: str, guarded: bool = True) -> np.ndarray:
        """Rank 0's int32 [n] values on every rank (an all_sum to which the others add zeros)."""
        x = mx.array(values.astype(np.int32)) if values is not None else mx.zeros((n,), mx.int32)
        y = mx.distributed.all_sum(x, group=self.group)
        self.eval(y, guarded=guarded, what=what)
        return np.array(y)


class Driver:
    """Rank 0's backend (backend.Backend): each call runs on every rank."""

    def __init__(self, inner, link: Link, mode: str):
        self.inner = inner
        self.link = link
        self.mode = mode
        self.name = inner.name
        self.config = inner.config
        self.device = f"{inner.device}, rank 0 of {link.size} ({mode} parallel)"
        self.experts = inner.experts
        self.bytes_read = getattr(inner, "bytes_read", {})
        self._ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next = 1
        self._freed: list[int] = []  # ids of caches rank 0 dropped: the followers drop theirs
        self.freed_sent = 0  # cache ids the followers were told to drop so far
        self._stopped = False
        self._lock = threading.Lock()

    def _cache_id(self, cache: PromptCache) -> int:
        cid = self._ids.get(cache)
        if cid is None:
            cid, self._next = self._next, self._next + 1
            self._ids[cache] = cid
            weakref.finalize(cache, self._freed.append, cid)
        return cid

    def __call__(self, tokens: mx.array, cache: PromptCache | None = None) -> mx.array:
        """tokens [B, L] -> logits, computed on every rank; evaluated before returning, because
        each follower evaluates its whole forward and the collectives must pair up in order."""
        with self._lock:
            if self._stopped:
                raise ParallelError("rank 0: the parallel run was stopped")
            B, L = tokens.shape
            cid = self._cache_id(cache) if cache is not None else 0
            offset = cache.offset if cache is not None else 0
            # Drained in place: the finalizers registered so far append to this very list.
            freed = self._freed[:]
            del self._freed[:len(freed)]
            self.freed_sent += len(freed)
            self.link.share(np.array([RUN, cid, offset, B, L, len(freed), 0, 0]), HEADER, "sending a step")
            ids = np.array(tokens).astype(np.int64).reshape(-1)
            self.link.share(np.concatenate([np.array(freed, np.int64), ids]), len(freed) + ids.size, "sending tokens")
            out = self.inner(tokens, cache)
            self.link.eval(out, what="a forward")
            return out

    def make_cache(self) -> PromptCache:
        return self.inner.make_cache()

    def reset_peak_memory(self) -> None:
        self.inner.reset_peak_memory()

    def peak_memory_bytes(self) -> int:
        return self.inner.peak_memory_bytes()

    def close(self) -> None:
        """Tells the followers to exit (at most once; a dead peer is not an error here)."""
        with self._lock:
            if self._stopped or self.link.dead:
                return
            self._stopped = True
            try:
                self.link.share(np.array([STOP, 0, 0, 0, 0, 0, 0, 0]), HEADER, "stopping")
            except Exception:  # noqa: BLE001 - the run is over either way
                pass


def follow(backend, link: Link) -> None:
    """A follower's loop: replays rank 0's calls on this rank's share of the model until STOP."""
    caches: dict[int, PromptCache] = {}
    while True:
        # Waiting for rank 0 is not guarded: it may wait on a user (chat, serve) for any time.
        op, cid, offset, B, L, nfreed = link.share(None, HEADER, "waiting for rank 0", guarded=False)[:6].tolist()
        if op == STOP:
            return
        if op != RUN:
            link.fail(f"rank {link.rank}: a message from rank 0 it does not understand (op {op})")
        payload = link.share(None, nfreed + B * L, "receiving tokens")
        for f in payload[:nfreed].tolist():
            caches.pop(f, None)
        cache = None
        if cid:
            cache = caches.get(cid)
            if cache is None:
                cache = caches[cid] = backend.make_cache()
            # The most any layer holds: under pipeline parallelism this rank's first layers stay empty.
            held = max((c.offset for c in cache), default=0)
            if held < offset:
                link.fail(f"rank {link.rank}: its cache {cid} holds {held} tokens, rank 0's {offset} "
                          "(a cache restored from a file on rank 0 only cannot be followed)")
            if held > offset:
                for c in cache:
                    c.rewind(held - offset)
        out = backend(mx.array(payload[nfreed:].reshape(B, L).astype(np.int32)), cache)
        link.eval(out, what="a forward")
