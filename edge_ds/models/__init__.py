"""The model families: one module each, named after the model_type it runs (deepseek.py runs
deepseek_v2, deepseek_v3, kimi_k2 and deepseek_v32). Each offers build(cfg, names) -> Model."""

from __future__ import annotations

import importlib
from typing import Iterable

from ..config import ModelConfig

FAMILY_OF = {"deepseek_v4": "deepseek_v4"}  # model_type -> module; the rest run on deepseek.py


def build(cfg: ModelConfig, names: Iterable[str]):
    """An empty model of cfg's family, laid out for a checkpoint with these tensor names."""
    module = importlib.import_module(f"{__name__}.{FAMILY_OF.get(cfg.model_type, 'deepseek')}")
    return module.build(cfg, names)
