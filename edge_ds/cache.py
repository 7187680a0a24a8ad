"""The latent KV cache: per layer, per token, [normalised c_kv, roped k_pe] and nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .checkpoint import SafetensorsFile
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

    def arrays(self) -> dict[str, mx.array]:
        """What save() writes for this layer (the file's `layer.{i}` tensor)."""
        return {} if self.state is None else {"": self.state}

    def restore(self, arrays: dict[str, mx.array], offset: int) -> None:
        if "" in arrays:
            self.update_and_fetch(arrays[""])


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
        """Forgets the last n tokens. A layer cache that cannot rewind exactly (DeepSeek-V4's pooled
        windows) goes back further (to where its last prefill ended, or to the start); the tokens
        kept are then those the layers still hold."""
        n = min(n, self.offset)
        for c in self.layers:
            c.rewind(n)
        del self.tokens[self.offset:]

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
        return self.offset

    def save(self, path: str | Path, model_fingerprint: str = "") -> None:
        """Writes the tokens and each layer's arrays (`layer.{i}`, or `layer.{i}.{name}` for a layer
        cache with several) to one safetensors file, atomically."""
        arrays = {f"layer.{i}" + (f".{name}" if name else ""): a
                  for i, c in enumerate(self.layers) for name, a in c.arrays().items()}
        meta = {"format": CACHE_FORMAT, "num_layers": str(len(self.layers)),
                "tokens": json.dumps(self.tokens), "model": model_fingerprint}
        path = Path(path)
        # Written beside it and renamed over it: a save that is killed leaves the old file whole.
        tmp = path.with_name(path.name + ".tmp.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, num_layers: int, model_fingerprint: str = "") -> "PromptCache":
        """A latent prompt cache saved by save(); see restore for other layer caches."""
        return cls(num_layers).restore(path, model_fingerprint)

    def restore(self, path: str | Path, model_fingerprint: str = "") -> "PromptCache":
        """Fills this empty cache (made by the model's make_cache) from a file save() wrote."""
        # Our own parser checks the whole header first: mx.load trusts it (a shape's element count
        # wraps around in its 32-bit arithmetic), and a cache file may come from anywhere.
        num_layers = len(self.layers)
        with SafetensorsFile(path) as f:
            meta, shapes = f.metadata, {name: (t.shape, t.dtype) for name, t in f.tensors.items()}
        if meta.get("format") != CACHE_FORMAT:
            raise EdgeDSError(f"{path}: not an edge-ds prompt cache")
        layers = meta.get("num_layers", "")
        if not (layers.isascii() and layers.isdigit() and int(layers) == num_layers) or (
                model_fingerprint and meta.get("model") and meta["model"] != model_fingerprint):
            raise EdgeDSError(f"{path}: the prompt cache was made with a different model")
        try:
            tokens = json.loads(meta.get("tokens", ""))
        except (ValueError, RecursionError):
            tokens = None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in tokens):
            raise EdgeDSError(f"{path}: metadata 'tokens' is not a JSON list of token ids")
        latent = isinstance(self.layers[0], LatentCache) if self.layers else True
        for i in range(num_layers if latent else 0):
            if f"layer.{i}" not in shapes:  # a layer holding no tokens is not saved
                if tokens:
                    raise EdgeDSError(f"{path}: layer {i} is missing, expected {len(tokens)} tokens")
                continue
            shape, dtype = shapes[f"layer.{i}"]
            if len(shape) != 4 or shape[1] != 1 or shape[2] != len(tokens) or dtype not in ("F32", "F16", "BF16") \
                    or not 0 < shape[0] * shape[3] < 2**31:
                raise EdgeDSError(f"{path}: layer {i} is {dtype} {list(shape)}, expected latent rows "
                                  f"[batch, 1, {len(tokens)} tokens, width] of floats")
        for name, (shape, dtype) in shapes.items() if not latent else ():
            if dtype not in ("F32", "F16", "BF16") or not 0 < len(shape) <= 4 or not 0 <= math.prod(shape) < 2**31:
                raise EdgeDSError(f"{path}: tensor '{name}' is {dtype} {list(shape)}, not a cache array of floats")
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
            raise EdgeDSError(f"{path}: not a readable prompt cache ({e})") from None
        for i, c in enumerate(self.layers):
            prefix = f"layer.{i}"
            mine = {k[len(prefix) + 1:] if k != prefix else "": v for k, v in arrays.items()
                    if k == prefix or k.startswith(prefix + ".")}
            try:
                c.restore(mine, len(tokens))
            except (KeyError, ValueError) as e:
                raise EdgeDSError(f"{path}: layer {i} does not fit this model's cache ({e})") from None
        self.tokens = tokens
        return self
