"""ExpertCache: a fixed pool of preallocated expert slots under a byte budget.

One pool serves every MoE layer (all experts have one shape), so the policy weighs a hot
expert of layer 3 against a cold one of layer 7. For each tensor kind (gate_proj.weight,
gate_proj.scales, ...) the pool is one MLX array [slots, ...] allocated once; a miss preads
the expert's bytes straight into its slot through a numpy view of that memory, so nothing
is reallocated and the layer's gather_qmm reads the slots with slot indices.

MLX is lazy: an array built from a slot reads it when evaluated, not when built. So every
output computed from slots is held, with its slots, until it is known to be evaluated; a
held slot is never overwritten (when nothing else is free, the held outputs are evaluated
first). Prefill ("streaming" calls) may use only a small window of slots and inserts at the
lowest priority, so a long prompt cannot flush the decode working set.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import ml_dtypes
import mlx.core as mx
import numpy as np

from ..errors import EdgeDSError
from .policy import ExpertKey, Policy
from .stats import ExpertStats
from .store import ExpertStore, wait
from .trace import TraceRecorder


def writable_view(a: mx.array) -> np.ndarray:
    """A numpy array sharing `a`'s (evaluated, contiguous) memory."""
    if a.dtype == mx.bfloat16:
        u = a.view(mx.uint16)
        mx.eval(u)
        return np.array(u, copy=False).view(ml_dtypes.bfloat16)
    v = np.array(a, copy=False)
    if not (v.flags.writeable and v.flags.c_contiguous):
        raise RuntimeError("cache slots must be writable and contiguous")
    return v


class ExpertCache:
    def __init__(self, store: ExpertStore, slots: int, policy: Policy, top_k: int, prefetch: bool = False):
        self.store = store
        self.slots = slots
        self.policy = policy
        self.prefetch_enabled = prefetch
        self.first_layer = store.layers[0]
        self.arrays: dict[str, mx.array] = {}  # key -> [slots, *one expert's shape]
        for key in store.keys:
            a = mx.zeros((slots, *store.shape(key)), dtype=store.mx_dtype(key))
            mx.eval(a)
            self.arrays[key] = a
        self.views = {key: writable_view(a) for key, a in self.arrays.items()}
        self.slot_of: dict[ExpertKey, int] = {}
        self.key_in: list[ExpertKey | None] = [None] * slots
        self.free: list[int] = list(range(slots - 1, -1, -1))
        self.low: set[int] = set()  # streamed or prefetched-but-unused entries: evicted first
        self.loading: dict[int, list[Future]] = {}  # slot -> prefetch reads in flight
        self.prefetched: set[int] = set()  # slots filled by a prefetch and not used yet
        self.held: list[tuple[mx.array, list[int]]] = []  # outputs that may still read these slots
        self.stream_window = max(min(slots, top_k), slots // 4)
        self.stats = ExpertStats(list(store.layers))
        self.tokens = 0  # tokens seen: the policy's clock
        self.recorder: TraceRecorder | None = None  # set when routing is being recorded
        self._group: tuple[int, object] | None = None

    # --- bookkeeping of calls ---------------------------------------------------------
    def begin(self, layer: int, x: mx.array, n_tokens: int, streaming: bool) -> bool:
        """Called by each layer's experts; returns True on the first call for this layer's input
        (a layer may split its experts over several calls with the same x)."""
        if self._group is not None and self._group[0] == layer and self._group[1] is x:
            return False
        self._group = (layer, x)
        self.release()  # outputs of earlier layers or passes: evaluated by now, or they are now
        if layer == self.first_layer:
            self.tokens += n_tokens
            if streaming:
                self.stats.prefill_tokens += n_tokens
            else:
                self.stats.decode_tokens += n_tokens
        return True

    def set_hints(self, hints: dict[ExpertKey, int]) -> None:
        """Predicted uses of the coming layers (key -> layers ahead), for policies that take them."""
        self.policy.set_hints(hints)

    def hold(self, out: mx.array, slots: list[int]) -> None:
        """`out` was computed lazily from `slots`: keep them until it is evaluated."""
        self.held.append((out, slots))

    def release(self) -> None:
        if self.held:
            mx.eval([o for o, _ in self.held])
            self.held.clear()

    def _pinned(self) -> set[int]:
        return {s for _, slots in self.held for s in slots}

    # --- residency --------------------------------------------------------------------
    def _victim_order(self, exclude: set[int], streaming: bool) -> list[int]:
        """Slots to fill, best first: free, then low-priority entries, then (limited to the
        stream window when streaming) the policy's choice among the rest."""
        free = [s for s in reversed(self.free) if s not in exclude]
        low = [s for s in self.low if s not in exclude]
        low = sorted(low, key=lambda s: self.policy.priority(self.key_in[s]))
        rest = [s for s in range(self.slots) if self.key_in[s] is not None and s not in self.low and s not in exclude]
        n = len(rest)
        if streaming:  # the window counts held slots too: waves reuse it rather than grow it
            n = max(0, min(n, self.stream_window - len(self.free) - len(self.low)))
        ranked = [self.slot_of[k] for k in self.policy.victims((self.key_in[s] for s in rest), n)] if n else []
        return free + low + ranked

    def _plan(self, layer: int, experts: list[int], streaming: bool, limit: int | None) -> list[tuple[int, int, bool]]:
        """The longest leading run of `experts` (at most `limit`) that fits now: [(expert, slot, is_miss)]."""
        order = None  # ranked only on the first miss: all-hit calls (the common case) skip it
        wave = []
        for e in experts[:limit]:
            slot = self.slot_of.get((layer, e))
            if slot is not None:
                wave.append((e, slot, False))
                continue
            if order is None:
                pinned = self._pinned()
                wanted = {self.slot_of[(layer, x)] for x in experts if (layer, x) in self.slot_of}
                # Slots still being prefetched into are left alone while others are free.
                order = iter(self._victim_order(pinned | wanted | set(self.loading), streaming))
            victim = next(order, None)
            if victim is None and self.loading:
                order = iter(self._victim_order(self._pinned() | wanted | {s for _, s, _ in wave}, streaming))
                victim = next(order, None)
            if victim is None:
                if not wave:
                    # Only slots holding experts needed later in this call are left: take one,
                    # those experts come back in a later wave.
                    later = self._victim_order(self._pinned(), streaming)
                    if later:
                        wave.append((e, later[0], True))
                break
            wave.append((e, victim, True))
        return wave

    def acquire(self, layer: int, experts: list[int], streaming: bool, limit: int | None = None) -> list[tuple[int, int]]:
        """Makes a leading run of `experts` (sorted, unique; at most `limit`) resident and returns
        [(expert, slot)] for it; call again with the rest. Misses are read before returning."""
        wave = self._plan(layer, experts, streaming, limit)
        if not wave:
            self.release()  # the held outputs are the only users of the remaining slots
            wave = self._plan(layer, experts, streaming, limit)
            if not wave:
                raise EdgeDSError("expert cache: no slot can be freed (the budget is below one expert)")
        for e, slot, miss in wave:  # prefetches still writing into these slots must land first
            if slot in self.loading:
                try:
                    wait(self.loading.pop(slot))
                except BaseException:
                    if not miss:  # the prefetched expert itself is unreadable
                        self._forget(slot)
                        raise
        t = self.tokens
        misses = []
        for e, slot, miss in wave:
            key = (layer, e)
            if miss:
                self._assign(slot, key)
                misses.append((layer, e, slot))
            if streaming:
                if miss:
                    self.low.add(slot)
                    self.stats.prefill_misses += 1
                else:
                    self.stats.prefill_hits += 1
            else:
                if not miss and slot in self.low:
                    self.low.discard(slot)
                    if slot in self.prefetched:
                        self.prefetched.discard(slot)
                        self.stats.prefetch_used += 1
                self.policy.access(key, t)
                if miss:
                    self.stats.misses[layer] += 1
                else:
                    self.stats.hits[layer] += 1
        if misses:
            self._load(misses, streaming)
        return [(e, slot) for e, slot, _ in wave]

    def _dests(self, slot: int) -> dict[str, np.ndarray]:
        return {key: v[slot] for key, v in self.views.items()}

    def _load(self, misses: list[tuple[int, int, int]], streaming: bool) -> None:
        start = time.perf_counter()
        try:
            self.store.read([(layer, e, self._dests(slot)) for layer, e, slot in misses])
        except BaseException:
            for layer, e, slot in misses:  # those slots hold partial data: forget them
                self._forget(slot)
            raise
        n = len(misses) * self.store.expert_bytes
        self.stats.read_seconds += time.perf_counter() - start
        self.stats.waited_bytes += n
        self.stats.bytes_read += n
        if not streaming:
            self.stats.decode_bytes_read += n

    def _assign(self, slot: int, key: ExpertKey) -> None:
        """Gives `slot` to `key`, evicting whatever it held (its bytes are read by the caller)."""
        old = self.key_in[slot]
        if old is not None:
            del self.slot_of[old]
            self.policy.evicted(old)
            self.stats.evictions += 1
        elif slot in self.free:
            self.free.remove(slot)
        self.low.discard(slot)
        self.prefetched.discard(slot)
        self.key_in[slot], self.slot_of[key] = key, slot

    def _forget(self, slot: int) -> None:
        key = self.key_in[slot]
        if key is not None:
            self.slot_of.pop(key, None)
            self.policy.evicted(key)
        self.key_in[slot] = None
        self.low.discard(slot)
        self.prefetched.discard(slot)
        if slot not in self.free:
            self.free.append(slot)

    # --- prefetch ---------------------------------------------------------------------
    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Starts reading `experts` of `layer` in the background into low-priority slots (a
        guess: the next layer's router on this layer's input). Never waits."""
        todo = [e for e in experts if (layer, e) not in self.slot_of]
        if not todo:
            return
        order = self._victim_order(self._pinned() | set(self.loading), streaming=False)
        for e, slot in zip(todo, order):
            self._assign(slot, (layer, e))
            self.low.add(slot)
            self.prefetched.add(slot)
            self.loading[slot] = self.store.submit(layer, e, self._dests(slot))
            self.stats.prefetch_issued += 1
            self.stats.bytes_read += self.store.expert_bytes

    # --- reporting --------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return (self.slots - len(self.free)) * self.store.expert_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.slots * self.store.expert_bytes

    def stats_dict(self) -> dict:
        d = self.stats.to_dict(self.resident_bytes, self.capacity_bytes, self.store.routed_bytes,
                               self.store.expert_bytes)
        d["slots"] = self.slots
        d["policy"] = self.policy.name
        d["prefetch"] = self.prefetch_enabled
        return d

    def close(self) -> None:
        for futures in self.loading.values():
            try:
                wait(futures)
            except Exception:
                pass
        self.loading.clear()
        self.store.close()
