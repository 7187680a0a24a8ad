"""The latent KV cache: per layer, per token, [normalised c_kv, roped k_pe] and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .errors import EdgeDSError

CACHE_FORMAT = "edge-ds-prompt-cache-v1"


class LatentCache:
    """One layer's latent rows [B, 1, T, kv_lora + rope], grown in steps to avoid a copy per token."""

    step = 256

    def __init__(self):
        self.latent: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, new: mx.array) -> mx.array:
        """Appends new rows [B, 1, L, D] and returns all rows so far [B, 1, offset, D]."""
        B, _, L, D = new.shape
        end = self.offset + L
        if self.latent is None or end > self.latent.shape[2] or self.latent.shape[0] != B:
            capacity = ((end + self.step - 1) // self.step) * self.step
            grown = mx.zeros((B, 1, capacity, D), new.dtype)
            if self.latent is not None and self.offset:
                grown[:, :, : self.offset] = self.latent[:, :, : self.offset]
            self.latent = grown
        self.latent[:, :, self.offset : end] = new
        self.offset = end
        return self.latent[:, :, :end]

    def rewind(self, n: int) -> None:
        """Forgets the last n tokens (rows past offset are simply overwritten later)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self) -> mx.array | None:
        return None if self.latent is None else self.latent[:, :, : self.offset]

    @property
    def nbytes(self) -> int:
        s = self.state
        return 0 if s is None else s.nbytes


class PromptCache:
    """The latent caches of all layers plus the token ids they hold.

    A backend that keeps its latents elsewhere passes its own `layer` factory: the objects need
    offset, rewind(n), state (an MLX array or None) and nbytes, as LatentCache has."""

    def __init__(self, num_layers: int, layer: Callable[[], "LatentCache"] = lambda: LatentCache()):
        self.layers = [layer() for _ in range(num_layers)]
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def __getitem__(self, i: int) -> LatentCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __bool__(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def rewind(self, n: int) -> None:
        n = min(n, self.offset)
        for c in self.layers:
            c.rewind(n)
        if n:
            del self.tokens[-n:]

    def reuse_prefix(self, tokens: list[int]) -> int:
        """Rewinds to the longest common prefix with `tokens` and returns its length.

        At least one token is always left to prefill, so the model produces fresh logits.
        """
        if any(c.offset != len(self.tokens) for c in self.layers):
            self.rewind(self.offset)  # interrupted mid-step: nothing in it can be trusted
            self.tokens.clear()
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        self.rewind(len(self.tokens) - common)
        return common

    def save(self, path: str | Path, model_fingerprint: str = "") -> None:
        arrays = {f"layer.{i}": c.state for i, c in enumerate(self.layers) if c.state is not None}
        meta = {"format": CACHE_FORMAT, "num_layers": str(len(self.layers)),
                "tokens": json.dumps(self.tokens), "model": model_fingerprint}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, num_layers: int, model_fingerprint: str = "") -> "PromptCache":
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
            raise EdgeDSError(f"{path}: not a readable prompt cache ({e})") from None
        if meta.get("format") != CACHE_FORMAT:
            raise EdgeDSError(f"{path}: not an edge-ds prompt cache")
        if int(meta.get("num_layers", -1)) != num_layers or (
                model_fingerprint and meta.get("model") and meta["model"] != model_fingerprint):
            raise EdgeDSError(f"{path}: the prompt cache was made with a different model")
        cache = cls(num_layers)
        cache.tokens = json.loads(meta["tokens"])
        for i, c in enumerate(cache.layers):
            if f"layer.{i}" in arrays:
                c.update_and_fetch(arrays[f"layer.{i}"])
            if c.offset != len(cache.tokens):
                raise EdgeDSError(f"{path}: layer {i} holds {c.offset} tokens, expected {len(cache.tokens)}")
        return cache

