"""Trace replay: a recorded routing trace (trace.py) run offline against eviction policies
(LRU, LFU, the runtime's hybrid, and Belady's optimum, also limited to seeing the current / next
token), to measure how far the runtime's policy is from what foreknowledge would give.
"""

from __future__ import annotations

import math

from ..errors import EdgeDSError
from .budget import parse_budget
from .policy import POLICIES, ExpertKey, Policy
from .trace import Step, Trace


class Belady(Policy):
    """Evicts the key used again furthest in the future (never again first): the optimum for
    a cache that must hold each step's experts. Needs the trace, so only replay has it.

    With `horizon` it sees only the routing of the current token and the next `horizon`
    tokens, and ranks keys not used within that window by `fallback` (an online policy): how
    much of the optimum needs foreknowledge of tokens that are not sampled yet."""

    name = "belady"

    def __init__(self, horizon: int | None = None, fallback: Policy | None = None):
        self.next_use: dict[ExpertKey, tuple[float, float]] = {}  # key -> (token, step index) of its next use
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


def _next_uses(steps: list[Step]) -> list[dict[ExpertKey, tuple[float, float]]]:
    """For each step, key -> (token, index) of the next step using it ((inf, inf) if none)."""
    after: dict[ExpertKey, tuple[float, float]] = {}
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
    resident: set[ExpertKey] = set()
    hits = misses = 0
    for i, step in enumerate(steps):
        need = [(step.layer, e) for e in step.experts]
        if len(need) > slots:
            raise EdgeDSError(f"a step needs {len(need)} experts at once but the budget holds only {slots}")
        missing = [k for k in need if k not in resident]
        hits += len(need) - len(missing)
        misses += len(missing)
        if hints:
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
    nbytes = parse_budget(budget, trace.routed_bytes, what="budget")
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
