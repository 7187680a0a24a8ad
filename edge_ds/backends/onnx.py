"""The onnxruntime backend: runs an `edge-ds export-onnx` directory on the CPU.

OnnxModel implements the backend interface (edge_ds/backend.py), so generation, streaming,
chat and the server run unchanged on it. The latent cache stays in
onnxruntime-owned OrtValues: each step binds the previous step's present_latent.{i} outputs
as past_latent.{i} inputs (IOBinding), so the cache is never copied through numpy.

OnnxRows is the server's continuous batch (edge_ds/batching.py) on the same graph: its inputs
already take one position and one attention-mask row per batch row, so requests with caches of
different lengths decode in one run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnxruntime as ort

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

from ..backend import ExpertOptions
from ..cache import PromptCache
from ..config import ModelConfig
from ..errors import ContextLengthError, EdgeDSError, OptionError
from ..layout import ONNX_MANIFEST as MANIFEST


class OrtLatent:
    """One layer's latent rows [B, 1, T, kv_lora + rope], held by onnxruntime."""

    def __init__(self, value: ort.OrtValue):
        self.value = value

    @property
    def offset(self) -> int:
        return self.value.shape()[2]

    def rewind(self, n: int) -> None:
        """Forgets the last n tokens (rare: chat turns that diverge), through one copy."""
        if n:
            rows = self.value.numpy()
            self.value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(rows[:, :, : rows.shape[2] - n]))

    @property
    def state(self) -> None:
        return None  # nothing for MLX to evaluate: onnxruntime computed it already

    @property
    def nbytes(self) -> int:
        shape = self.value.shape()
        return int(np.prod(shape)) * 4


class OrtCache(PromptCache):
    """PromptCache (token bookkeeping, prefix reuse) over onnxruntime-held latents."""

    def __init__(self, num_layers: int, latent_dim: int, batch: int = 1):
        empty = np.zeros((batch, 1, 0, latent_dim), np.float32)
        super().__init__(num_layers, lambda: OrtLatent(ort.OrtValue.ortvalue_from_numpy(empty)))
        self.mask = np.zeros((batch, 0), np.int64)  # attention_mask of the rows held

    def rewind(self, n: int) -> None:
        n = min(n, self.offset)
        super().rewind(n)
        self.mask = self.mask[:, : self.mask.shape[1] - n]

    def save(self, path, model_fingerprint: str = "") -> None:
        raise EdgeDSError("prompt cache files are written by the MLX backend only")


class OnnxModel:
    """An exported graph in an onnxruntime session: __call__(tokens [B, L], cache) -> logits."""

    name = "onnx"
    experts = None  # every expert is in the graph
    # onnxruntime hands back numpy: generation samples there (arrays.py) instead of copying each
    # step's logits into MLX. Callers that pass MLX tokens (the server's batch) get MLX back.
    arrays = "numpy"

    def __init__(self, directory: str | Path, threads: int | None = None):
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise EdgeDSError(f"{directory}: no {MANIFEST} (make one with `edge-ds export-onnx`)")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise EdgeDSError(f"{manifest_path}: not valid JSON ({e})") from None
        self.config = ModelConfig.load(directory)
        model_file = directory / self.manifest.get("file", "model.onnx")
        if not model_file.is_file():
            raise EdgeDSError(f"{model_file}: not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or int(os.environ.get("EDGE_DS_THREADS", 0))
        options.log_severity_level = 3  # onnxruntime's warnings are not the user's business
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EdgeDSError(f"{model_file}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.num_layers = self.config.num_hidden_layers
        self.latent_dim = self.config.latent_dim
        self._outputs = ["logits"] + [f"present_latent.{i}" for i in range(self.num_layers)]
        self.device = f"onnxruntime {ort.__version__} CPU, {options.intra_op_num_threads or 'all'} threads"

    def reset_peak_memory(self) -> None:
        """A process's peak resident set cannot be reset: peak_memory_bytes counts from its start."""

    def peak_memory_bytes(self) -> int:
        """onnxruntime allocates outside MLX: the process's peak resident set instead."""
        if resource is None:
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB

    def make_cache(self, batch: int = 1) -> OrtCache:
        return OrtCache(self.num_layers, self.latent_dim, batch)

    def __call__(self, tokens: np.ndarray | mx.array, cache: OrtCache | None = None) -> np.ndarray | mx.array:
        """The backend contract: int tokens [B, L] -> float32 logits [B, L, V] (last position only
        while a cache is being filled step by step: generation reads no other), in the tokens' library."""
        ids = np.asarray(tokens).astype(np.int64)
        logits = self.forward(ids, cache, logits_to_keep=1 if cache is not None else 0)
        return logits if isinstance(tokens, np.ndarray) else mx.array(logits)

    def forward(self, ids: np.ndarray, cache: OrtCache | None = None, attention_mask: np.ndarray | None = None,
                logits_to_keep: int = 0) -> np.ndarray:
        """ids [B, L] int64; attention_mask [B, L] (1 = token, 0 = left padding) for the new tokens;
        appends to `cache` (a fresh one when None). Returns logits [B, L or logits_to_keep, V]."""
        B, L = ids.shape
        cache = cache if cache is not None else self.make_cache(B)
        if cache.mask.shape[0] != B:
            if cache.offset:
                raise EdgeDSError(f"the cache holds a batch of {cache.mask.shape[0]}, got {B} rows")
            cache = self._resize(cache, B)
        if cache.offset + L > self.config.max_position_embeddings:
            raise ContextLengthError(f"{cache.offset + L} positions exceed the model's max_position_embeddings "
                              f"({self.config.max_position_embeddings})")
        new_mask = np.ones((B, L), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        mask = np.concatenate([cache.mask, new_mask], axis=1)
        # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -L:]

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        binding.bind_cpu_input("logits_to_keep", np.array([logits_to_keep], np.int64))
        for i, layer in enumerate(cache.layers):
            binding.bind_ortvalue_input(f"past_latent.{i}", layer.value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        for layer, value in zip(cache.layers, present):
            layer.value = value
        cache.mask = mask
        return logits.numpy()

    def why_not_batched(self) -> str | None:
        """None when the export's graph can decode rows of different lengths together (batch_rows), else
        why not: decided from onnx.json, which lists the graph's inputs and their axes."""
        inputs = self.manifest.get("inputs")
        if not isinstance(inputs, dict):
            return f"this export's {MANIFEST} lists no graph inputs (re-export it with `edge-ds export-onnx`)"
        wanted = {"position_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"]}
        for name, axes in wanted.items():
            if inputs.get(name) != axes:
                return (f"this export's graph has no per-row {name} {axes} (its {MANIFEST} lists "
                        f"{inputs.get(name)}); re-export it with `edge-ds export-onnx`")
        return None

    def batch_rows(self) -> "OnnxRows":
        return OnnxRows(self)

    def _resize(self, cache: OrtCache, batch: int) -> OrtCache:
        fresh = self.make_cache(batch)
        cache.layers, cache.mask = fresh.layers, fresh.mask
        return cache


class OnnxRows:
    """The rows of a continuous batch (batching.Rows) on the exported graph. Each layer's latents
    [B, 1, T, D] are left-padded: every row's tokens end at the last column, where the graph appends
    the step's new one; attention_mask [B, T] is 0 on each row's padding (the graph turns it into
    -1e9 before the softmax, so padding weighs exactly 0) and each row's position_ids is its own
    length. A lone request's cache holds no padding, so a row sees what it would see alone."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.latents: list[ort.OrtValue] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.lengths: list[int] = []  # each row's tokens (its next position)

    def join(self, cache: OrtCache) -> None:
        """Appends a lone request's cache [1, 1, n, D] as the last row (one copy of the batch)."""
        if cache.mask.shape[0] != 1 or not cache.mask.all():
            raise EdgeDSError("a batch row must come from one unpadded sequence's cache")
        n, T = cache.offset, self.mask.shape[1]
        width = max(n, T)
        olds = [v.numpy() for v in self.latents] or [None] * len(cache.layers)
        self.latents = [ort.OrtValue.ortvalue_from_numpy(np.concatenate(
            ([_left_pad(old, width)] if old is not None else []) + [_left_pad(layer.value.numpy(), width)]))
            for old, layer in zip(olds, cache.layers)]
        self.mask = np.concatenate([_left_pad(self.mask, width), _left_pad(np.ones((1, n), np.int64), width)])
        self.lengths.append(n)

    def decode(self, tokens: list[int]) -> mx.array:
        """One step for every row; returns logits [B, vocab]."""
        B = len(tokens)
        if max(self.lengths) + 1 > self.model.config.max_position_embeddings:
            raise ContextLengthError(f"{max(self.lengths) + 1} positions exceed the model's max_position_embeddings "
                                     f"({self.model.config.max_position_embeddings})")
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)
        binding = self.model.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array(tokens, np.int64).reshape(B, 1))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", np.array(self.lengths, np.int64).reshape(B, 1))
        binding.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        for i, value in enumerate(self.latents):
            binding.bind_ortvalue_input(f"past_latent.{i}", value)
        for name in self.model._outputs:
            binding.bind_output(name, "cpu")
        self.model.session.run_with_iobinding(binding)
        logits, *self.latents = binding.get_outputs()
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
        return mx.array(logits.numpy()[:, -1, :])

    def keep(self, index: list[int]) -> None:
        """Keeps these rows and drops the columns that are padding in all of them (one copy)."""
        width = max(self.lengths[b] for b in index)
        start = self.mask.shape[1] - width
        self.latents = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[index, :, start:]))
                        for v in self.latents]
        self.mask = np.ascontiguousarray(self.mask[index, start:])
        self.lengths = [self.lengths[b] for b in index]


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    """Zeros before axis 2 (latents [B, 1, T, D]) or axis 1 (masks [B, T]) up to `width` columns."""
    axis = 2 if a.ndim == 4 else 1
    pad = [(0, 0)] * a.ndim
    pad[axis] = (width - a.shape[axis], 0)
    return np.pad(a, pad) if pad[axis][0] else a


def detect(directory: Path) -> bool:
    """The directory holds an `edge-ds export-onnx` export."""
    return (Path(directory) / MANIFEST).is_file()


def load(directory: Path, experts: ExpertOptions | None = None) -> OnnxModel:
    if experts is not None:
        raise OptionError("expert_budget", "{option} and trace need the mlx backend (onnx keeps every expert "
                                           "resident)")
    return OnnxModel(directory)
