"""The MLX backend: the model as MLX modules (Metal on Apple Silicon, else MLX's CPU backend),
optionally with routed experts read on demand under a byte budget."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..backend import ExpertOptions
from ..errors import EdgeDSError
from ..layout import WEIGHTS_GLOB, has_weights
from ..cache import PromptCache
from ..config import ModelConfig
from ..experts import ExpertCache, TraceRecorder, attach_experts
from ..loading import load_model
from ..wired import wire


class MLXBackend:
    """Backend over a model family's Model (edge_ds/models); `model` is the MLX module itself."""

    name = "mlx"

    def __init__(self, model, experts: ExpertCache | None = None):
        self.model = model
        self.config = model.config
        self.experts = experts
        self.device = str(mx.default_device())

    def __call__(self, tokens: mx.array, cache: PromptCache | None = None) -> mx.array:
        # With a cache only the last position's logits are read (backend.Backend): the head runs on it alone.
        return self.model(tokens, cache=cache, last_only=cache is not None)

    def make_cache(self) -> PromptCache:
        return self.model.make_cache()

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory_bytes(self) -> int:
        return mx.get_peak_memory()


def detect(directory: Path) -> bool:
    """MLX reads every model directory; it is the default, never a detected export."""
    return False


def load(directory: Path, experts: ExpertOptions | None = None) -> MLXBackend:
    """The whole model resident, or (with `experts`) the trunk resident and routed experts read on
    demand into a cache of at most `experts.budget` bytes, with identical results. On Apple
    Silicon the weights in memory (trunk and expert slots) are wired."""
    ModelConfig.load(directory)  # a bad config.json is the first thing to say
    if not has_weights(directory):
        what = "expert_budget and trace need" if experts is not None else "the mlx backend needs"
        raise EdgeDSError(f"{directory}: {what} MLX weights ({WEIGHTS_GLOB}), and this directory has none; "
                          "convert the checkpoint with edge-ds convert")
    if experts is None:
        model = load_model(directory)
        wire(model)
        return MLXBackend(model)
    model = load_model(directory, routed_experts=False)
    cache = attach_experts(model, directory, experts.budget, policy=experts.policy, prefetch=experts.prefetch,
                           page_cache=experts.page_cache)
    wire(model, cache.slots * cache.store.expert_bytes)
    if experts.trace is not None:
        cache.recorder = TraceRecorder.for_cache(experts.trace, cache, directory)
    return MLXBackend(model, cache)
