"""Routing traces: record which experts each token chose in each layer, and replay a trace
offline against eviction policies (LRU, LFU, the runtime's hybrid, Belady's optimum).

A trace is JSON lines: a header {"edge_ds_trace": 1, "layers", "num_experts", "top_k",
"expert_bytes", ...}, then one line per MoE call {"t": first token, "layer", "prefill",
"experts": [[e, ...] per token]}. A layer that splits its experts over several calls writes
several lines; reading merges them per (token, layer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeDSError
from .experts.budget import parse_budget
from .experts.policy import POLICIES, Policy

FORMAT = 1


class TraceRecorder:
    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        try:
            self._file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise EdgeDSError(f"{self.path}: cannot write the trace: {e.strerror or e}") from None
        self._write(dict(edge_ds_trace=FORMAT, **header))

    @classmethod
    def for_cache(cls, path: str | Path, cache, model_dir: Path) -> "TraceRecorder":
        store = cache.store
        return cls(path, dict(model=str(model_dir), layers=list(store.layers), num_experts=store.num_experts,
                              top_k=store.cfg.num_experts_per_tok, expert_bytes=store.expert_bytes))

    def record(self, layer: int, t: int, experts: np.ndarray, prefill: bool,
               hints: dict[int, np.ndarray] | None = None) -> None:
        """experts [N, k]: token t + i chose experts[i] in `layer`; hints: later layer -> [N, k]
        experts its router picks on this layer's input (the runtime's lookahead)."""
        r = {"t": int(t), "layer": int(layer), "prefill": bool(prefill), "experts": experts.tolist()}
        if hints:
            r["hints"] = {str(m): g.tolist() for m, g in hints.items()}
        self._write(r)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class Step:
    t: int  # token
    layer: int
    experts: tuple[int, ...]
    prefill: bool
    hints: dict[int, tuple[int, ...]] | None = None  # later layer -> predicted experts (lookahead)


@dataclass
class Trace:
    header: dict
    steps: list[Step]

    @property
    def expert_bytes(self) -> int:
        return int(self.header["expert_bytes"])

    @property
    def routed_bytes(self) -> int:
        return self.expert_bytes * int(self.header["num_experts"]) * len(self.header["layers"])


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EdgeDSError(f"{path}: cannot read the trace: {e.strerror or e}") from None
    try:
        header = json.loads(lines[0]) if lines else {}
        if header.get("edge_ds_trace") != FORMAT:
            raise ValueError("no edge_ds_trace header")
        merged: dict[tuple[int, int], Step] = {}
        for n, line in enumerate(lines[1:], start=2):
            r = json.loads(line)
            for i, row in enumerate(r["experts"]):
                key = (int(r["t"]) + i, int(r["layer"]))
                step = merged.setdefault(key, Step(key[0], key[1], (), bool(r["prefill"])))
                step.experts = tuple(sorted(set(step.experts) | {int(e) for e in row}))
                if "hints" in r and step.hints is None:
                    step.hints = {int(m): tuple(int(e) for e in g[i]) for m, g in r["hints"].items()}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise EdgeDSError(f"{path}: not an edge-ds routing trace ({e})") from None
    return Trace(header, list(merged.values()))


class Belady(Policy):
    """Evicts the key used again furthest in the future (never again first): the optimum for
    a cache that must hold each step's experts. Needs the trace, so only replay has it.

    With `horizon` it sees only the routing of the current token and the next `horizon`
    tokens, and ranks keys not used within that window by `fallback` (an online policy): how
    much of the optimum needs foreknowledge of tokens that are not sampled yet."""

    name = "belady"

    def __init__(self, horizon: int | None = None, fallback: Policy | None = None):
        self.next_use: dict = {}  # key -> (token, step index) of its next use
        self.horizon = horizon
        self.fallback = fallback
        self.t = 0  # the current token

    def access(self, key, t):
        self.t = t
        if self.fallback is not None:
            self.fallback.access(key, t)

    def evicted(self, key):
        if self.fallback is not None:
            self.fallback.evicted(key)

    def priority(self, key):
        t, i = self.next_use.get(key, (math.inf, math.inf))
        if self.horizon is None or t <= self.t + self.horizon:
            return (1, -i)  # known: the further away, the sooner evicted
        return (0, self.fallback.priority(key) if self.fallback else 0)  # beyond sight: evicted first


def _next_uses(steps: list[Step]) -> list[dict]:
    """For each step, key -> (token, index) of the next step using it ((inf, inf) if none)."""
    after: dict = {}
    out: list[dict] = [{}] * len(steps)
    for i in range(len(steps) - 1, -1, -1):
        keys = [(steps[i].layer, e) for e in steps[i].experts]
        out[i] = {k: after.get(k, (math.inf, math.inf)) for k in keys}
        for k in keys:
            after[k] = (steps[i].t, i)
    return out


def simulate(steps: list[Step], slots: int, policy: Policy, next_uses: list[dict] | None = None,
             hints: bool = True) -> dict:
    """Demand caching of `slots` experts under `policy`: each step's experts must all be resident.
    Policies that take hints get the lookahead recorded in the trace, as at run time."""
    resident: set = set()
    hits = misses = 0
    for i, step in enumerate(steps):
        need = [(step.layer, e) for e in step.experts]
        if len(need) > slots:
            raise EdgeDSError(f"a step needs {len(need)} experts at once but the budget holds only {slots}")
        missing = [k for k in need if k not in resident]
        hits += len(need) - len(missing)
        misses += len(missing)
        if hasattr(policy, "set_hints") and hints:
            order = sorted(step.hints or {})  # nearest later layer first, as the runtime ranks them
            policy.set_hints({(m, e): ahead for ahead in range(len(order) - 1, -1, -1)
                              for m in [order[ahead]] for e in step.hints[m]})
        if next_uses is not None:  # Belady: the future it may see, from this token on
            policy.t = step.t
            policy.next_use.update(next_uses[i])
        overflow = len(resident) + len(missing) - slots
        if overflow > 0:
            needed = set(need)
            for v in policy.victims([k for k in resident if k not in needed], overflow):
                resident.discard(v)
                policy.evicted(v)
        resident.update(missing)
        for k in need:
            policy.access(k, step.t)
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1)}


def replay(trace: Trace, budget: int | str, policies: tuple[str, ...] = ("lru", "lfu", "hybrid", "belady"),
           prefill: bool = False, half_life: float | None = None, hints: bool = True) -> dict:
    """Hit rates of each policy on the trace with `budget` (bytes, "512MiB" or "25%") of experts.
    By default only decode steps are replayed: the runtime streams prefill past the cache.
    "belady-H" is Belady seeing only the current token and the next H tokens (hybrid beyond)."""
    nbytes = parse_budget(budget, trace.routed_bytes, what="--budget")
    slots = nbytes // trace.expert_bytes
    steps = [s for s in trace.steps if prefill or not s.prefill]
    results = {"slots": slots, "budget_bytes": slots * trace.expert_bytes, "steps": len(steps)}
    for name in policies:
        if name == "belady" or (name.startswith("belady-") and name[7:].isdigit()):
            horizon = int(name[7:]) if name != "belady" else None
            results[name] = simulate(steps, slots, Belady(horizon, POLICIES["hybrid"]()), _next_uses(steps))
            continue
        if name not in POLICIES:
            raise EdgeDSError(f"unknown policy {name!r} (choose from {', '.join([*POLICIES, 'belady', 'belady-H'])})")
        options = {"half_life": half_life} if name == "hybrid" and half_life else {}
        results[name] = simulate(steps, slots, POLICIES[name](**options), hints=hints)
    return results
