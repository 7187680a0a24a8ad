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
from typing import Any

import numpy as np

from ..config import brief
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
    """Reads a trace. A run killed while writing leaves at most its last line unfinished (each
    record is one line, written and flushed whole): such a line is left out, so the trace reads up
    to its last complete record. Anything else malformed is an error naming the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise EdgeDSError(f"{path}: cannot read the trace: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise EdgeDSError(f"{path}: not an edge-ds routing trace (not UTF-8 text: {e.reason} at byte {e.start})") \
            from None
    lines = text.split("\n")
    unfinished = lines.pop()  # "" when the file ends with its newline
    records: list[tuple[int, Any]] = []
    for n, line in enumerate(lines, start=1):
        try:
            records.append((n, json.loads(line)))
        except (ValueError, RecursionError) as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise EdgeDSError(f"{path}: line {n} is not an edge-ds trace record ({why})") from None
    try:
        records.append((len(lines) + 1, json.loads(unfinished)))
    except (ValueError, RecursionError):
        pass  # the line a killed writer was in the middle of
    if not records:
        raise EdgeDSError(f"{path}: not an edge-ds routing trace (empty)")
    header = records[0][1]
    if not isinstance(header, dict) or header.get("edge_ds_trace") != FORMAT:
        raise EdgeDSError(f"{path}: not an edge-ds routing trace (line 1 is not an edge_ds_trace {FORMAT} header)")
    for key in ("num_experts", "top_k", "expert_bytes"):
        if not _count(header.get(key)) or not 0 < header[key] < 2**53:  # replay computes with them as floats
            raise EdgeDSError(f"{path}: line 1: header field '{key}' must be an integer in [1, 2**53), "
                              f"got {brief(header.get(key))}")
    layers = header.get("layers")
    if not isinstance(layers, list) or not all(_count(x) and x < 2**53 for x in layers):
        raise EdgeDSError(f"{path}: line 1: header field 'layers' must be a list of layer numbers, got {brief(layers)}")
    merged: dict[tuple[int, int], Step] = {}
    clock: dict[int, int] = {}  # layer -> its last record's token: the recorder's clock only moves on
    for n, r in records[1:]:
        problem = _record_problem(r, header["num_experts"])
        if not problem and r["t"] < clock.get(r["layer"], 0):
            problem = f"field 't' goes back from {clock[r['layer']]} to {r['t']} in layer {r['layer']}"
        if problem:
            raise EdgeDSError(f"{path}: line {n}: {problem}")
        clock[r["layer"]] = r["t"]
        for i, row in enumerate(r["experts"]):
            key = (r["t"] + i, r["layer"])
            step = merged.setdefault(key, Step(key[0], key[1], (), r["prefill"]))
            step.experts = tuple(sorted(set(step.experts) | set(row)))
            if "hints" in r and step.hints is None:
                step.hints = {int(m): tuple(g[i]) for m, g in r["hints"].items()}
    return Trace(header, list(merged.values()))


def _count(x: Any) -> bool:
    """A non-negative JSON integer (true and false are not)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _record_problem(r: Any, num_experts: int) -> str | None:
    """What is wrong with one record (None when nothing is): the fields replay reads, checked."""
    if not isinstance(r, dict):
        return "a record must be a JSON object"
    for key in ("t", "layer"):
        if not _count(r.get(key)) or r[key] >= 2**53:  # replay computes with them as floats
            return f"field '{key}' must be an integer in [0, 2**53), got {brief(r.get(key))}"
    if not isinstance(r.get("prefill"), bool):
        return f"field 'prefill' must be true or false, got {brief(r.get('prefill'))}"

    def rows_problem(rows: Any, what: str, count: int | None) -> str | None:
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            return f"field '{what}' must be a list of expert lists, one per token"
        if count is not None and len(rows) != count:
            return f"field '{what}' has {len(rows)} tokens, but 'experts' has {count}"
        bad = [e for row in rows for e in row if not _count(e) or e >= num_experts]
        if bad:
            return f"field '{what}' holds {brief(bad[0])}, not an expert of 0..{num_experts - 1}"
        return None

    problem = rows_problem(r.get("experts"), "experts", None)
    if problem:
        return problem
    hints = r.get("hints", {})
    if not isinstance(hints, dict):
        return "field 'hints' must map later layers to expert lists"
    for m, g in hints.items():
        if not (m.isascii() and m.isdigit() and len(m) < 10):
            return f"field 'hints' has {brief(m)}, not a layer number"
        problem = rows_problem(g, f"hints.{m}", len(r["experts"]))
        if problem:
            return problem
    return None
