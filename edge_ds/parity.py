"""How far an edge build is from the reference: `edge-ds parity REF CAND [CAND ...]`.

The reference (by default the torch backend: the datacenter numerics) and every candidate (an
MLX dir, an ONNX export, another torch configuration) score the same token windows of one text;
per candidate: mean and max KL(ref || cand) per predicted token, top-1 agreement, the perplexity
of each and the relative gap, and where the divergence is largest.

A model is named by its directory, optionally with a backend and that backend's options in
front: `DIR`, `mlx:DIR`, `onnx:DIR`, `torch:DIR`, `torch,gemm=fp8,dtype=float32:DIR`. A bare
directory runs on the backend its files call for (an ONNX export on onnx, mlx-lm weights on
mlx, a Hugging Face checkpoint on torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .api import LanguageModel, load
from .backends import names as backend_names
from .checkpoint import Checkpoint
from .errors import EdgeDSError, OptionError
from .layout import ONNX_MANIFEST
from .perplexity import split_windows
from .resources import DEFAULT_MODEL, resources_dir

WINDOW = 128  # tokens predicted per window
WINDOWS = 8  # windows scored (from the start of the text)
BATCH = 4  # windows per forward pass
_SPEC = re.compile(r"^(?P<backend>[a-z_]+)(?P<options>(,[a-z_]+=[A-Za-z0-9_.]+)*):(?P<path>.+)$")


def default_text_path() -> Path:
    """The shipped model's held-out validation text (King James Bible chapters it never trained on)."""
    return resources_dir() / DEFAULT_MODEL / "recipe" / "data" / "validation.txt"


@dataclass
class ModelSpec:
    path: Path
    backend: str | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options.items())
        return f"{self.backend}{opts}:{self.path}" if self.backend else str(self.path)


def parse_spec(spec: str, default_backend: str | None = None, **default_options) -> ModelSpec:
    """`DIR` or `BACKEND[,key=value...]:DIR` (see the module docstring)."""
    m = _SPEC.match(spec)
    if m and not Path(spec).expanduser().exists() and m["backend"] in backend_names():
        given = dict(kv.split("=", 1) for kv in m["options"].split(",") if kv)
        inherited = default_options if m["backend"] == "torch" else {}
        return ModelSpec(Path(m["path"]).expanduser(), m["backend"], {**inherited, **given})
    path = Path(spec).expanduser()
    backend = default_backend or guess_backend(path)
    return ModelSpec(path, backend, dict(default_options) if backend == "torch" else {})


def guess_backend(path: Path) -> str | None:
    """onnx for an export, mlx for mlx-lm weights, torch for a Hugging Face checkpoint; None (load()'s
    default choice) for a directory with both an export and mlx-lm weights, or one that is none
    of these (load() then says what is wrong with it)."""
    onnx = (path / ONNX_MANIFEST).is_file()
    names: list[str] = []
    if (path / "config.json").is_file():
        try:
            with Checkpoint(path) as ckpt:
                names = ckpt.names()
        except EdgeDSError:
            names = []
    mlx_names = (".switch_mlp.", ".embed_q.", ".unembed_out.", ".scales")
    mlx = any(any(s in n for s in mlx_names) for n in names)
    if onnx:
        return None if mlx else "onnx"
    if mlx:
        return "mlx"
    return "torch" if names and "torch" in backend_names() else None


FP8_BUILD = DEFAULT_MODEL + "-fp8"  # the shipped model's datacenter build (DeepSeek's FP8 layout)
ONNX_BUILD = DEFAULT_MODEL + "-onnx"


def default_comparison(**options) -> tuple[ModelSpec, list[ModelSpec]]:
    """`edge-ds parity` with no arguments: the shipped model's FP8 build on torch (gemm fp8) against
    its shipped MLX build and, when present, its ONNX export (beside the MLX weights or apart)."""
    root = resources_dir()
    fp8 = root / FP8_BUILD
    if not (fp8 / "config.json").is_file():
        raise EdgeDSError(f"{fp8}: no datacenter build of the shipped model here; give REF and CAND")
    cands = [ModelSpec(root / DEFAULT_MODEL, "mlx")]
    for onnx in (root / DEFAULT_MODEL, root / ONNX_BUILD):  # the export beside the MLX weights, or apart
        if (onnx / ONNX_MANIFEST).is_file():
            cands.append(ModelSpec(onnx, "onnx"))
            break
    return ModelSpec(fp8, "torch", {"gemm": "fp8", **options}), cands


def open_model(spec: ModelSpec) -> LanguageModel:
    path = spec.path
    if not path.is_dir():
        raise EdgeDSError(f"{path}: no such model directory")
    return load(path, backend=spec.backend, **spec.options)


@dataclass
class CandidateReport:
    model: str
    backend: str
    device: str
    kl_mean: float  # nats per predicted token, KL(ref || cand)
    kl_max: float
    top1_agreement: float  # share of positions where the argmax token agrees
    perplexity: float
    perplexity_gap: float  # perplexity / reference perplexity - 1
    worst_window: int  # where KL(ref || cand) is largest (the first such position)
    worst_position: int  # index of the predicting token inside its window
    worst_token: int  # the token id at that position


@dataclass
class ParityReport:
    reference: str
    reference_backend: str
    reference_device: str
    reference_perplexity: float
    text: str
    window: int
    windows: int
    tokens: int  # predicted tokens per model
    candidates: list[CandidateReport]

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class _Tally:
    """Running sums of one candidate's comparison with the reference."""

    def __init__(self):
        self.kl_sum = self.nll = 0.0
        self.agree = self.count = 0
        self.kl_max, self.worst = -1.0, (0, 0, 0)

    def add(self, ref_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray, window_ids: list[int],
            inputs: np.ndarray) -> None:
        """ref_lp, lp: log-probabilities [B, T, V]; targets [B, T] the next tokens; inputs [B, T]."""
        kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)  # [B, T]
        self.kl_sum += float(kl.sum())
        self.agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
        self.nll -= float(np.take_along_axis(lp, targets[..., None], axis=-1).sum())
        self.count += kl.size
        flat = int(np.argmax(kl))  # the first maximum, windows in text order within the batch
        b, t = divmod(flat, kl.shape[1])
        if kl[b, t] > self.kl_max:
            self.kl_max, self.worst = float(kl[b, t]), (window_ids[b], t, int(inputs[b, t]))


def parity(ref: LanguageModel, candidates: list[LanguageModel], text: str, window: int = WINDOW,
           windows: int = WINDOWS, batch: int = BATCH, labels: list[str] | None = None,
           progress: Callable[[int, int, str], None] | None = None, text_name: str = "text") -> ParityReport:
    """Scores the first `windows` windows of `window` predicted tokens of `text` (encoded with the
    reference's tokenizer, BOS first) with the reference and every candidate."""
    if window < 1:
        raise OptionError("window", f"{{option}} must be at least 1, got {window}")
    if windows < 1:
        raise OptionError("windows", f"{{option}} must be at least 1, got {windows}")
    labels = labels or [str(c.path) for c in candidates]
    if not text.strip():
        raise EdgeDSError(f"{text_name}: the text is empty")
    limit = min([ref.config.max_position_embeddings] + [c.config.max_position_embeddings for c in candidates])
    if window + 1 > limit:
        raise OptionError("window", f"{{option}} ({window}) + 1 tokens exceed max_position_embeddings ({limit})")
    ids = ref.tokenizer.encode(text)
    for cand, label in zip(candidates, labels):
        if cand.config.vocab_size != ref.config.vocab_size:
            raise EdgeDSError(f"{label}: a vocabulary of {cand.config.vocab_size} tokens, the reference's has "
                              f"{ref.config.vocab_size}: parity compares models of one vocabulary")
        if cand.tokenizer.encode(text[:4000]) != ref.tokenizer.encode(text[:4000]):
            raise EdgeDSError(f"{label}: its tokenizer encodes the text differently from the reference's")
    chosen = split_windows(ids, window)[:windows]
    if not chosen or len(chosen[0]) < 2:
        raise EdgeDSError(f"{text_name}: too short: it must encode to at least two tokens")
    order = sorted(range(len(chosen)), key=lambda i: (-len(chosen[i]), i))  # full windows batch together
    batches = []
    for i in order:
        if batches and len(batches[-1]) < batch and len(chosen[batches[-1][0]]) == len(chosen[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    tallies = [_Tally() for _ in candidates]
    ref_nll, steps, done = 0.0, len(batches) * (1 + len(candidates)), 0
    for group in batches:
        tokens = np.array([chosen[i] for i in group], dtype=np.int64)  # [B, T + 1]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        ref_lp = _log_softmax(ref.logits(inputs))
        ref_nll -= float(np.take_along_axis(ref_lp, targets[..., None], axis=-1).sum())
        done += 1
        if progress:
            progress(done, steps, "reference")
        for k, (cand, tally) in enumerate(zip(candidates, tallies)):
            tally.add(ref_lp, _log_softmax(cand.logits(inputs)), targets, group, inputs)
            done += 1
            if progress:
                progress(done, steps, labels[k])
    count = tallies[0].count if tallies else sum(len(w) - 1 for w in chosen)
    ref_ppl = math.exp(ref_nll / count)
    reports = []
    for cand, label, t in zip(candidates, labels, tallies):
        ppl = math.exp(t.nll / t.count)
        reports.append(CandidateReport(label, cand.backend.name, cand.backend.device, t.kl_sum / t.count,
                                       t.kl_max, t.agree / t.count, ppl, ppl / ref_ppl - 1, *t.worst))
    return ParityReport(str(ref.path), ref.backend.name, ref.backend.device, ref_ppl, text_name, window,
                        len(chosen), count, reports)


def format_table(report: ParityReport) -> str:
    """The report as a Markdown table (one row per candidate)."""
    lines = [f"reference: {report.reference} ({report.reference_backend}: {report.reference_device}), "
             f"perplexity {report.reference_perplexity:.4f}",
             f"text: {report.text}, {report.windows} windows x {report.window} tokens = {report.tokens} predicted "
             "tokens", "",
             "| candidate | backend | KL mean | KL max | top-1 agree | perplexity | gap | largest KL at |",
             "|---|---|---|---|---|---|---|---|"]
    for c in report.candidates:
        lines.append(f"| {c.model} | {c.backend} | {c.kl_mean:.3g} | {c.kl_max:.3g} | {c.top1_agreement:.2%} | "
                     f"{c.perplexity:.4f} | {c.perplexity_gap:+.2%} | window {c.worst_window}, "
                     f"position {c.worst_position} |")
    return "\n".join(lines)
