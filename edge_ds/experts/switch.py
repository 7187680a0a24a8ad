"""LazySwitchGLU: the routed experts of one MoE layer, computed from ExpertCache slots.

It stands in for models.moe.SwitchGLU (same call: x [N, D], indices [N, k] -> [N, k, D]) and
runs SwitchGLU's own code on cache stacks, so results are bit-identical to the resident model:
  - decode-sized calls (< moe.SORT_PAIRS pairs): SwitchGLU.gather_ffn over the cache pool with slot
    indices instead of expert indices, the same gather call shape, so each (token, expert)
    pair is computed the same way;
  - prefill-sized calls: pairs sorted by expert exactly as SwitchGLU sorts them; each group of
    experts ("wave") gets a compact stack of its slots in expert order and monotone local
    indices, so SwitchGLU's sorted path (per-expert matmuls on the CPU) sees the same rows of
    each expert in the same order.
A call needs more experts than fit at once only when the budget is small (prefill); it then
runs in waves that reuse the slots, each evaluated before its slots are refilled.

The router's choice must be known on the host to read the right experts, so each call
evaluates `indices` (one synchronisation per MoE layer; see benchmarks/experts.py for its cost).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..layout import EXPERT_PROJS, QUANT_PARTS
from ..models.layers import PREFILL_ROWS, QuantizedExpertLinear
from ..models.moe import SORT_PAIRS, SwitchGLU
from .slots import ExpertCache
# The dense prefill path unpacks a wave's experts to float: cap that transient (the resident
# model unpacks a whole layer), so prefill memory stays near the budget.
DENSE_WAVE_BYTES = 16 << 20


class LazySwitchGLU:
    """Routed experts of MoE layer `layer`, read on demand into `cache`; x [N, D], indices [N, k] -> [N, k, D]."""

    def __init__(self, layer: int, cache: ExpertCache, quant: dict[str, dict | None],
                 lookahead: list[tuple[int, nn.Module]] = ()):
        self.layer = layer
        self.cache = cache
        self.lookahead = list(lookahead)  # (layer, router) of the next MoE layers, nearest first
        # A SwitchGLU whose projections are pointed at cache stacks for each call, so the
        # arithmetic is models.moe's own (its weights are never evaluated: no memory).
        cfg = cache.store.cfg
        self.glu = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, 1, cfg.swiglu_limit)
        for proj in EXPERT_PROJS:
            q = quant[proj]
            if q is not None:
                setattr(self.glu, proj, QuantizedExpertLinear(q["group_size"], q["bits"], q["mode"]))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        cache = self.cache
        N, k = indices.shape
        streaming = N >= PREFILL_ROWS  # prefill streams past the cache
        first = cache.begin(self.layer, x, N, streaming)
        guesses = []
        if first and not streaming:
            # The next layers' routers on this layer's input guess what this token needs next
            # (most often right one layer ahead: README, Lazy expert loading): those experts are
            # not evicted now, and with prefetch the nearest layer's guesses are read ahead.
            guesses = [gate(x)[0] for _, gate in self.lookahead]  # each [N, k]
            mx.eval(indices, *guesses)
            guesses = [np.array(g) for g in guesses]
            hints = {}
            for ahead in range(len(guesses) - 1, -1, -1):  # nearest last, so it wins
                hints.update({(self.lookahead[ahead][0], int(e)): ahead for e in guesses[ahead].flat})
            cache.set_hints(hints)
        else:
            mx.eval(indices)
        idx = np.array(indices)  # [N, k]
        if cache.recorder is not None:
            hints = {m: g for (m, _), g in zip(self.lookahead, guesses)}
            cache.recorder.record(self.layer, cache.tokens - N, idx, streaming, hints)
        if indices.size >= SORT_PAIRS:
            y = self._sorted(x, indices, idx, streaming)
        else:
            y = self._unsorted(x, idx, streaming)
        if guesses and cache.prefetch_enabled:
            cache.prefetch(self.lookahead[0][0], sorted(set(guesses[0].ravel().tolist())))
        return y

    def _unsorted(self, x: mx.array, idx: np.ndarray, streaming: bool) -> mx.array:
        N, k = idx.shape
        remaining = sorted(set(idx.ravel().tolist()))
        got = self.cache.acquire(self.layer, remaining, streaming)
        if len(got) == len(remaining):  # the usual case: one gather over the pool
            table = np.zeros(self.cache.store.num_experts, np.uint32)
            table[[e for e, _ in got]] = [s for _, s in got]
            slots = table[idx]  # [N, k]
            y = self._bind(self.cache.arrays).gather_ffn(x[:, None, None, :], mx.array(slots))  # [N, k, 1, D]
            self.cache.hold(y, [s for _, s in got])
            return y.squeeze(-2)
        # Waves: each computes its pairs, one row per pair, as the broadcast gather would.
        flat = idx.ravel()
        outs, positions = [], []
        while True:
            table = dict(got)
            pos = np.flatnonzero(np.isin(flat, list(table)))
            slots = np.array([table[e] for e in flat[pos]], np.uint32)
            xs = x[mx.array(pos // k)][:, None, :]  # [P, 1, D]
            y = self._bind(self.cache.arrays).gather_ffn(xs, mx.array(slots))  # [P, 1, D]
            self.cache.hold(y, [s for _, s in got])
            outs.append(y)
            positions.append(pos)
            remaining = remaining[len(got):]
            if not remaining:
                break
            got = self.cache.acquire(self.layer, remaining, streaming)
        inv = np.argsort(np.concatenate(positions))
        return mx.concatenate(outs)[mx.array(inv)].reshape(N, k, -1)

    def _sorted(self, x: mx.array, indices: mx.array, idx: np.ndarray, streaming: bool) -> mx.array:
        N, k = idx.shape
        order = mx.argsort(indices.flatten())  # the same ops as SwitchGLU, so the same order
        inv = mx.argsort(order)
        order_np = np.array(order)
        experts_sorted = idx.ravel()[order_np]  # [N * k], ascending
        xs = x[:, None, None, :].flatten(0, -3)[order // k]  # [N * k, 1, D]
        limit = None
        if mx.default_device() == mx.cpu:  # SwitchGLU unpacks each expert to float on the CPU: bound a wave's share
            cfg = self.cache.store.cfg
            unpacked = 3 * cfg.hidden_size * cfg.moe_intermediate_size * x.dtype.size  # one expert, float
            limit = max(1, DENSE_WAVE_BYTES // unpacked)
        remaining = np.unique(experts_sorted).tolist()
        outs, start = [], 0
        while remaining:
            got = self.cache.acquire(self.layer, remaining, streaming, limit)
            wave = np.array([e for e, _ in got])
            slots = [s for _, s in got]
            end = int(np.searchsorted(experts_sorted, wave[-1], side="right"))
            local = mx.array(np.searchsorted(wave, experts_sorted[start:end]).astype(np.uint32))  # monotone
            pick = mx.array(np.array(slots, np.uint32))
            glu = self._bind({key: mx.take(a, pick, axis=0) for key, a in self.cache.arrays.items()})  # [w, ...]
            y = glu.sorted_ffn(xs[start:end], local)  # [pairs, 1, D], as SwitchGLU's sorted path
            start, remaining = end, remaining[len(got):]
            if remaining or outs:
                mx.eval(y)  # one wave's unpacked weights at a time, not the whole layer's
            else:
                self.cache.hold(y, slots)
            outs.append(y)
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        return y[inv].reshape(N, k, -1)

    def _bind(self, arrays: dict[str, mx.array]) -> SwitchGLU:
        """The shell SwitchGLU with its projections reading `arrays` (key -> [n, ...] stack)."""
        for proj in EXPERT_PROJS:
            lin = getattr(self.glu, proj)
            for kind in QUANT_PARTS:
                a = arrays.get(f"{proj}.{kind}")
                if a is not None:
                    lin[kind] = a
        return self.glu
