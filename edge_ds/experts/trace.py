"""Routing traces: which experts each token chose in each MoE layer, as JSON lines.

A trace is a header {"edge_ds_trace": 1, "layers", "num_experts", "top_k", "expert_bytes",
...}, then one line per MoE call {"t": first token, "layer", "prefill", "experts": [[e, ...] per
token]} (and "hints": the later layers' routers' guesses, the runtime's lookahead). A layer that
splits its experts over several calls writes several lines; reading merges them per (token,
layer). The runtime writes traces (TraceRecorder, set on an ExpertCache); replay.py analyses them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeDSError

FORMAT = 1


class TraceRecorder:
    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        try:
            self._file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise EdgeDSError(f"{self.path}: cannot write the trace: {e.strerror or e}") from None
        self._write(dict(edge_ds_trace=FORMAT, **header))

    @classmethod
    def for_cache(cls, path: str | Path, cache, model_dir: Path) -> "TraceRecorder":
        store = cache.store
        return cls(path, dict(model=str(model_dir), layers=list(store.layers), num_experts=store.num_experts,
                              top_k=store.cfg.num_experts_per_tok, expert_bytes=store.expert_bytes))

    def record(self, layer: int, t: int, experts: np.ndarray, prefill: bool,
               hints: dict[int, np.ndarray] | None = None) -> None:
        """experts [N, k]: token t + i chose experts[i] in `layer`; hints: later layer -> [N, k]
        experts its router picks on this layer's input (the runtime's lookahead)."""
        r = {"t": int(t), "layer": int(layer), "prefill": bool(prefill), "experts": experts.tolist()}
        if hints:
            r["hints"] = {str(m): g.tolist() for m, g in hints.items()}
        self._write(r)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class Step:
    t: int  # token
    layer: int
    experts: tuple[int, ...]
    prefill: bool
    hints: dict[int, tuple[int, ...]] | None = None  # later layer -> predicted experts (lookahead)


@dataclass
class Trace:
    header: dict
    steps: list[Step]

    @property
    def expert_bytes(self) -> int:
        return int(self.header["expert_bytes"])

    @property
    def routed_bytes(self) -> int:
        return self.expert_bytes * int(self.header["num_experts"]) * len(self.header["layers"])


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EdgeDSError(f"{path}: cannot read the trace: {e.strerror or e}") from None
    try:
        header = json.loads(lines[0]) if lines else {}
        if header.get("edge_ds_trace") != FORMAT:
            raise ValueError("no edge_ds_trace header")
        merged: dict[tuple[int, int], Step] = {}
        for n, line in enumerate(lines[1:], start=2):
            r = json.loads(line)
            for i, row in enumerate(r["experts"]):
                key = (int(r["t"]) + i, int(r["layer"]))
                step = merged.setdefault(key, Step(key[0], key[1], (), bool(r["prefill"])))
                step.experts = tuple(sorted(set(step.experts) | {int(e) for e in row}))
                if "hints" in r and step.hints is None:
                    step.hints = {int(m): tuple(int(e) for e in g[i]) for m, g in r["hints"].items()}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise EdgeDSError(f"{path}: not an edge-ds routing trace ({e})") from None
    return Trace(header, list(merged.values()))
