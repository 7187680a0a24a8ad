"""Continuous batching for the server (`edge-ds serve --max-concurrency N`): the decode steps of up
to N requests run as one batch over latent caches of different lengths; requests join and leave
between steps, and newcomers' prompts are prefilled one chunk's worth of tokens per step so the others
keep decoding.

How rows of different lengths share one forward pass without any change to the model (a backend's
`batch_rows()` object, or MlxRows for the MLX backend, holds the batch's caches):
  * MLX (MlxRows): each layer's cache is a _RowsCache: latent rows [B, 1, capacity, D] right-padded,
    with every row's own length; its `offset` is the array of those lengths, which MLA hands to RoPE
    (mx.fast.rope takes one offset per batch row, bit-identical to one row at a time), so every
    row's new token is rotated at its own position, and a mask [B, 1, 1, T] hides, for each row, the
    columns past its length (the padding);
  * ONNX (backends/onnx.py OnnxRows): the exported graph already takes position_ids [B, 1] and an
    attention_mask [B, T] per row, so rows are left-padded (each row's latents end at the last
    column), the mask is 0 on each row's padding and each row's position is its own length;
  * a newcomer is prefilled alone, on an ordinary cache (exactly as a lone request would be), then
    its rows are copied into the batch; a row that ends is cut out. Copies happen only when the
    batch changes, not per step.
Sampling, the repetition penalty and logprobs run per row on that row's logits, so each request
keeps its own options. Greedy answers equal those of the request run alone (the tests hold 8
concurrent requests of different lengths to it, on both backends); sampled ones draw from MLX's one
global random stream in batch order, so a seed does not reproduce a lone run.

The MLX backend batches models whose every layer is MLA over a latent cache (DeepSeek V2/V3/R1/V3.1,
Kimi-K2, Moonlight, and V3.2, whose indexer takes each row's padding mask; not V4's compressed
caches); the ONNX backend
batches exports whose onnx.json lists per-row position_ids and attention_mask. `supported()` says
why not otherwise, and the server then queues as before.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import mlx.core as mx
import numpy as np

from .cache import LatentCache, PromptCache
from .generate import PREFILL_STEP, GenerationStats, TokenLogprob, prefill_chunk, token_logprob
from .sampling import Sampler, apply_repetition_penalty


class Rows(Protocol):
    """The caches of the rows decoding together (MlxRows; a backend's batch_rows())."""

    def join(self, cache: PromptCache) -> None:
        """Appends a row: a lone request's cache, prefilled (one copy)."""

    def decode(self, tokens: list[int]) -> mx.array:
        """One token per row at each row's own position; returns logits [B, vocab]."""

    def keep(self, index: list[int]) -> None:
        """Keeps only these rows, in this order (one copy)."""


def supported(lm: Any) -> str | None:
    """None when `lm` can decode in batches here, else why not (in words)."""
    backend = lm.backend
    why_not = getattr(backend, "why_not_batched", None)
    if why_not is not None:  # a backend that holds its own batch (batch_rows)
        return why_not()
    if getattr(backend, "name", "") != "mlx":
        return f"the {getattr(backend, 'name', '?')} backend decodes one request at a time"
    if not hasattr(backend, "model"):  # --parallel's driver: every forward call must reach every rank
        return "this backend runs its forward calls itself (--parallel), not through a model to batch"
    cache = backend.make_cache()
    if not isinstance(cache, PromptCache) or not all(type(c) is LatentCache for c in cache):
        return ("this model's caches are not latent caches (DeepSeek-V4: a sliding window and entries pooled "
                "every m tokens, which each row would reach at its own step; its attention takes one offset)")
    return None


def make_rows(backend: Any) -> Rows:
    """The batch's caches for `backend` (one that supported() accepts)."""
    own = getattr(backend, "batch_rows", None)
    return own() if own is not None else MlxRows(backend.model)


class _RowsCache:
    """One layer's latent rows of a batch, right-padded: row b holds lengths[b] valid columns."""

    step = 256

    def __init__(self, latent: mx.array, lengths: list[int]):
        self.latent = latent  # [B, 1, capacity, D]
        self.lengths = list(lengths)

    @property
    def offset(self) -> mx.array:
        """Each row's position for its next token (MLA passes it to RoPE)."""
        return mx.array(self.lengths, dtype=mx.int32)

    def update_and_fetch(self, new: mx.array) -> mx.array:
        """Writes each row's one new latent row [B, 1, 1, D] at its own length; returns [B, 1, T, D]."""
        B = new.shape[0]
        end = max(self.lengths) + 1
        if end > self.latent.shape[2]:
            grow = ((end + self.step - 1) // self.step) * self.step - self.latent.shape[2]
            self.latent = mx.concatenate(
                [self.latent, mx.zeros((B, 1, grow, self.latent.shape[3]), self.latent.dtype)], axis=2)
        self.latent[mx.arange(B), 0, mx.array(self.lengths)] = new[:, 0, 0]
        self.lengths = [n + 1 for n in self.lengths]
        return self.latent[:, :, :end]


class MlxRows:
    """The MLX model's batch: one _RowsCache per layer, a padding mask per step."""

    def __init__(self, model: Any):
        self.model = model
        self._caches: list[_RowsCache] | None = None

    def join(self, cache: PromptCache) -> None:
        single = [c.latent[:, :, :c.offset] for c in cache]
        n = cache[0].offset
        if self._caches is None:
            self._caches = [_RowsCache(lat, [n]) for lat in single]
            return
        for rc, lat in zip(self._caches, single):
            cap = max(rc.latent.shape[2], lat.shape[2])
            pad = lambda a: a if a.shape[2] == cap else mx.concatenate(  # noqa: E731
                [a, mx.zeros((a.shape[0], 1, cap - a.shape[2], a.shape[3]), a.dtype)], axis=2)
            rc.latent = mx.concatenate([pad(rc.latent), pad(lat.astype(rc.latent.dtype))], axis=0)
            rc.lengths.append(n)
        mx.eval([rc.latent for rc in self._caches])

    def decode(self, tokens: list[int]) -> mx.array:
        caches = self._caches
        lengths = caches[0].lengths
        T = max(lengths) + 1
        cols = mx.arange(T)[None, :]
        valid = cols < (mx.array(lengths)[:, None] + 1)  # [B, T]: a row's own columns and its new one
        mask = mx.where(valid, 0.0, -mx.inf).astype(caches[0].latent.dtype)[:, None, None, :]
        return self.model(mx.array([[t] for t in tokens]), cache=caches, mask=mask, last_only=True)[:, -1, :]

    def keep(self, index: list[int]) -> None:
        if not index:
            self._caches = None
            return
        rows = mx.array(index)
        for rc in self._caches:
            rc.latent = rc.latent[rows]
            rc.lengths = [rc.lengths[b] for b in index]
        mx.eval([rc.latent for rc in self._caches])


@dataclass
class Row:
    """One request in the batch (or being prefilled)."""

    ids: list[int]  # the prompt
    sampler: Sampler
    max_tokens: int
    penalty: float | None
    penalty_context: int
    logprobs: int | None
    eos: set[int]
    out: queue.Queue  # (token, TokenLogprob | None) per generated token, then None
    cancelled: threading.Event
    on_done: Callable[[], None] = lambda: None  # called once, when the row leaves the engine
    stats: GenerationStats = field(default_factory=GenerationStats)
    cache: PromptCache | None = None  # during prefill
    done_prefill: int = 0
    history: list[int] = field(default_factory=list)
    last: int = -1  # the token to feed next
    generated: int = 0
    start: float = 0.0
    first: float = 0.0
    penalised: mx.array | None = None  # the last step's logits after the penalty (what logprobs report)


class BatchEngine:
    """Decodes the rows it is given as one batch, on the caller's thread (the server's model thread):
    step() does one prefill chunk of the oldest newcomer and one batched decode step."""

    def __init__(self, lm: Any, max_rows: int, prefill_step: int = PREFILL_STEP):
        self.lm = lm
        self.backend = lm.backend
        self.max_rows = max_rows
        self.prefill_step = prefill_step
        self.waiting: list[Row] = []  # not yet prefilled, in arrival order
        self.rows: list[Row] = []  # decoding, in batch order
        self._rows: Rows | None = None  # the decoding rows' caches

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def add(self, row: Row) -> None:
        """Queues a request whose prompt and max_tokens fit the context (the caller checks)."""
        row.history = list(row.ids)
        row.start = time.perf_counter()
        row.stats.prompt_tokens = row.stats.prefilled_tokens = len(row.ids)
        self.waiting.append(row)

    def step(self) -> None:
        """Prefill of newcomers, oldest first, up to one chunk's worth of tokens (so several short
        prompts join in one step, and the others never wait more than one chunk), then one decode."""
        self._drop_finished()
        budget = self.prefill_step
        while self.waiting and len(self.rows) < self.max_rows:
            row = self.waiting[0]
            chunk = min(len(row.ids) - row.done_prefill, self._chunk(row))
            if chunk > budget:
                break
            self._prefill_chunk(row)
            budget -= chunk
            if row in self.waiting:  # a long prompt: its next chunk waits for the next step
                break
        if self.rows:
            self._decode()
        self._drop_finished()

    # --- prefill: alone, on an ordinary cache, one chunk per step ---

    def _chunk(self, row: Row) -> int:
        return prefill_chunk(self.backend.config, row.done_prefill, self.prefill_step)

    def _prefill_chunk(self, row: Row) -> None:
        if row.cancelled.is_set():
            self.waiting.remove(row)
            _finish(row)
            return
        if row.cache is None:
            row.cache = self.lm.backend.make_cache()
        todo, chunk = row.ids[row.done_prefill:], self._chunk(row)
        if len(todo) > chunk:
            self.backend(mx.array([todo[:chunk]]), cache=row.cache)  # as generate_tokens does
            mx.eval([c.state for c in row.cache])
            row.done_prefill += chunk
            return
        logits = self.backend(mx.array([todo]), cache=row.cache)[:, -1, :]
        row.cache.tokens.extend(row.ids)
        self.waiting.remove(row)
        token = self._sample(row, logits)
        mx.eval(token)
        row.first = time.perf_counter()
        row.stats.prompt_tps = len(row.ids) / max(row.first - row.start, 1e-9)
        self._emit(row, int(token.item()), logits)
        if not self._finished(row):
            self._join(row)
        else:
            _finish(row)

    def _join(self, row: Row) -> None:
        """Copies the newcomer's cache rows into the batch (one copy per join)."""
        if self._rows is None:
            self._rows = make_rows(self.backend)
        self._rows.join(row.cache)
        row.cache = None
        self.rows.append(row)

    # --- decode: every row one token, in one forward pass ---

    def _decode(self) -> None:
        logits = self._rows.decode([r.last for r in self.rows])
        picked = [self._sample(r, logits[b:b + 1]) for b, r in enumerate(self.rows)]
        mx.eval(picked)
        for b, (r, t) in enumerate(zip(self.rows, picked)):
            self._emit(r, int(t.item()), logits[b:b + 1])

    def _sample(self, row: Row, logits: mx.array) -> mx.array:
        if row.penalty and row.penalty != 1.0:
            logits = apply_repetition_penalty(logits, row.history, row.penalty, row.penalty_context)
        row.penalised = logits
        return row.sampler(logits)

    def _emit(self, row: Row, token: int, logits: mx.array) -> None:
        entry: TokenLogprob | None = None
        if row.logprobs is not None:
            entry = token_logprob(token, np.array(row.penalised[0].astype(mx.float32)), row.logprobs)
        row.history.append(token)
        row.last = token
        row.generated += 1
        s = row.stats
        s.generation_tokens = row.generated
        s.generation_tps = row.generated / max(time.perf_counter() - row.first, 1e-9)
        row.out.put((token, entry))

    def _finished(self, row: Row) -> bool:
        return row.cancelled.is_set() or row.generated >= row.max_tokens or row.last in row.eos

    def fail(self, error: BaseException) -> None:
        """Ends every request with `error` (the model failed mid-step: no cache can be trusted)."""
        for r in self.waiting + self.rows:
            r.out.put(error)
            r.on_done()
        self.waiting, self.rows, self._rows = [], [], None

    def _drop_finished(self) -> None:
        keep = [b for b, r in enumerate(self.rows) if not self._finished(r)]
        if len(keep) == len(self.rows):
            return
        for r in self.rows:
            if self._finished(r):
                _finish(r)
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self._rows = None
            return
        self._rows.keep(keep)  # one copy per leave


def _finish(row: Row) -> None:
    row.out.put(None)
    row.on_done()


def token_source(out: queue.Queue, poll: Callable[[], None], timeout: float) -> Callable[[list], Any]:
    """The token iterator a request's text pipeline (LanguageModel._chunks) reads, on its own thread:
    tokens from the engine's queue, each logprob entry appended to `raw` before its token; poll() is
    called while waiting (it raises to leave)."""

    def source(raw: list):
        while True:
            try:
                item = out.get(timeout=timeout)
            except queue.Empty:
                poll()
                continue
            if item is None:
                return
            if isinstance(item, BaseException):  # the engine failed: the request ends with its error
                raise item
            token, entry = item
            if entry is not None:
                raw.append(entry)
            yield token

    return source
