"""Shared fixtures: tiny transformers DeepSeek models and their checkpoint dirs, made once per session.

`zoo.hf(kind, seed=0, **overrides)` -> Tiny(model, path): a randomly initialised transformers
model (float32, eval, eager attention; the parity oracle) and its save_pretrained directory.
`zoo.converted(kind, quant, ...)` -> the directory edge-ds's converter wrote for it.
Both are cached for the whole session, so each checkpoint is written and converted once.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tiny_models import make_hf_model, save_hf  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")


@dataclass
class Tiny:
    model: object  # transformers DeepseekV{2,3}ForCausalLM, float32, eval
    path: Path  # its save_pretrained directory (float32 safetensors, per-expert names)

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


def _key(kind: str, seed: int, overrides: dict) -> str:
    parts = [kind, f"s{seed}"] + [f"{k}-{v}" for k, v in sorted(overrides.items())]
    return "_".join(parts).replace("/", "-").replace(" ", "")


class TinyZoo:
    def __init__(self, root: Path):
        self.root = root
        self._hf: dict[str, Tiny] = {}
        self._converted: dict[tuple, Path] = {}

    def hf(self, kind: str, seed: int = 0, **overrides) -> Tiny:
        key = _key(kind, seed, overrides)
        if key not in self._hf:
            model = make_hf_model(kind, seed, **overrides)
            path = self.root / "hf" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            save_hf(model, path)
            self._hf[key] = Tiny(model, path)
        return self._hf[key]

    def converted(self, kind: str, quant: str, dtype: str = "float32", group_size: int | None = None,
                  seed: int = 0, **overrides) -> Path:
        from converters.mlx import convert

        key = (_key(kind, seed, overrides), quant, dtype, group_size)
        if key not in self._converted:
            src = self.hf(kind, seed, **overrides).path
            dst = self.root / "mlx" / f"{key[0]}_{quant}_{dtype}_g{group_size}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            convert(src, dst, quant=quant, group_size=group_size, dtype=dtype)
            self._converted[key] = dst
        return self._converted[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> TinyZoo:
    return TinyZoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def legacy_rope():
    """legacy_rope(src, dst): copy an HF dir, spelling RoPE the legacy way in config.json."""
    return legacy_rope_copy


def legacy_rope_copy(src: Path, dst: Path) -> Path:
    """A copy of an HF dir whose config.json spells RoPE the legacy way (rope_scaling + rope_theta),
    as DeepSeek's own config.json files do; transformers 5 writes rope_parameters instead."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        cfg["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst

