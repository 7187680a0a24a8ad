"""The backend interface: what the generation loop, the API, `bench` and the server need from a
runtime that computes a DeepSeek model (MLX, onnxruntime, ...).

A backend lives in its own module of edge_ds/backends/ (the module's name is the backend's
name) and offers:

    load(directory: Path, experts: ExpertOptions | None) -> Backend
        the model in `directory`; `experts` asks for routed experts read on demand (a backend
        that keeps every expert resident raises OptionError("expert_budget", ...) if given one)
    detect(directory: Path) -> bool
        whether `directory` holds this backend's own export (it is then the default off Apple
        Silicon, see backends.default_backend)

A Backend object may also say `arrays = "numpy"`: its __call__ takes and returns numpy arrays,
and the generation loop, sampling and perplexity then run in numpy (arrays.py), so it runs where
MLX is not installed. Without it, MLX arrays.

Nothing else in the runtime names a backend, so adding one is adding a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .config import ModelConfig

if TYPE_CHECKING:
    from .cache import PromptCache


@dataclass(frozen=True)
class ExpertOptions:
    """Routed experts read on demand into a byte budget (see experts/)."""

    budget: int | str = "100%"  # bytes, "2GB", "512MiB" or a share of the routed experts, "25%"
    policy: str = "hybrid"
    prefetch: bool = False
    page_cache: bool = True  # False: expert reads bypass the OS page cache too
    trace: str | Path | None = None  # record routing to this JSONL file


@runtime_checkable
class Backend(Protocol):
    """A loaded model on one runtime."""

    name: str  # the module's name: "mlx", "onnx"
    config: ModelConfig
    device: str  # where it computes, in words (bench reports it)
    experts: Any  # the lazy expert cache (experts.ExpertCache), or None when every expert is resident

    def __call__(self, tokens: Any, cache: PromptCache | None = None) -> Any:
        """int token ids [B, L] -> float logits [B, L, V], arrays of the backend's `arrays` library.
        With a cache, the new tokens follow what it holds and are appended to it; only the last
        position's logits need be right."""

    def make_cache(self) -> PromptCache:
        """An empty cache for one sequence."""

    def reset_peak_memory(self) -> None:
        """Starts a new peak-memory measurement."""

    def peak_memory_bytes(self) -> int:
        """The most memory the model's computation has held since the last reset."""
