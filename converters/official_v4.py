"""DeepSeek-V4 checkpoints as DeepSeek and transformers store them, seen in the runtime's names.

Three spellings of the same tensors reach the converter:
- DeepSeek's official release: unprefixed names (`embed.weight`, `layers.3.attn.wq_a.weight`,
  `layers.3.ffn.experts.7.w1.weight`, `hc_head_fn`, `mtp.0.*`), dense weights FP8 e4m3 with a
  `<module>.scale` of F8_E8M0 per 128x128 block, routed experts packed FP4 (E2M1, two per I8
  byte, LOW nibble first) with one F8_E8M0 scale per 32 inputs (`expert_dtype: fp4`), or FP8
  blocks like the dense weights (V4-Flash-Base, `expert_dtype: fp8`).
- transformers' save_pretrained (5.23): the same leaves under a `model.` prefix, except
  `model.embed_tokens`, `model.hc_head.*` and a bare `head.weight`.
- transformers' module names (the runtime's "HF layout", layout.hf_shapes), with routed experts
  either one tensor per expert or fused per layer: `mlp.experts.gate_up_proj` [E, 2I, D]
  (gate rows, then up rows) and `mlp.experts.down_proj` [E, D, I].

`V4Source` maps every stored name to the runtime's name (the renames of transformers'
conversion_mapping "deepseek_v4" entry, experts kept per expert), reads any of them as
float32, and hands packed FP4 experts over as MLX `mxfp4` arrays without touching their bits.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from edge_ds import layout
from edge_ds.checkpoint import Checkpoint
from edge_ds.errors import EdgeDSError

from .fp8 import BLOCK, FP8, dequantize_fp8_blocks
from .staging import Source

# --- the formats ------------------------------------------------------------------------------
# E2M1 by code: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa (OCP MX spec).
FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
FP4_GROUP = 32  # inputs per E8M0 scale of a packed FP4 weight: exactly MX's block
MXFP4 = {"group_size": FP4_GROUP, "bits": 4, "mode": "mxfp4"}  # MLX's quantization of those weights
E8M0_NAN = 0xFF  # the one E8M0 code that is not a power of two
SCALE_SUFFIX = ".scale"  # official `<module>.scale` beside `<module>.weight`


def e8m0_to_float32(scale: np.ndarray, where: str) -> np.ndarray:
    """F8_E8M0 codes (any shape, 1 byte each) -> float32 2^(code - 127), exact (2^-127 is a float32
    subnormal). The NaN code is refused naming `where`."""
    codes = np.ascontiguousarray(scale).view(np.uint8)
    if (codes == E8M0_NAN).any():
        raise EdgeDSError(f"{where}: has {int((codes == E8M0_NAN).sum())} NaN scales (E8M0 code 0xFF)")
    return np.ldexp(np.float32(1), codes.astype(np.int32) - 127).astype(np.float32)


def fp4_to_mxfp4(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed FP4 [rows, cols/2] (I8/U8, low nibble = even column) and E8M0 scales [rows, cols/32]
    -> MLX mxfp4 (uint32 [rows, cols/8], uint8 [rows, cols/32]), the arrays
    mx.quantize(w, group_size=32, bits=4, mode="mxfp4") makes.

    No arithmetic: MLX packs element j of a row at bits 4*(j % 8) of word j // 8, which is the
    little-endian reading of the same bytes, its codes are the same E2M1 codes, and its scales
    are the same E8M0 bytes (tests/test_v4_convert.py proves it against MLX)."""
    rows, half = packed.shape
    b = np.ascontiguousarray(packed).view(np.uint8)
    return b.view("<u4").astype(np.uint32, copy=False).reshape(rows, half // 4), \
        np.ascontiguousarray(scale).view(np.uint8).copy()


def decode_fp4(packed: np.ndarray, scale: np.ndarray, where: str) -> np.ndarray:
    """Packed FP4 [rows, cols/2] with E8M0 scales [rows, cols/32] -> float32 [rows, cols] (exact)."""
    b = np.ascontiguousarray(packed).view(np.uint8)
    rows = b.shape[0]
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(rows, -1)  # low nibble first
    w = FP4_VALUES[codes]
    s = e8m0_to_float32(scale, where)
    return (w.reshape(rows, -1, FP4_GROUP) * s[:, :, None]).reshape(rows, -1)


# --- names --------------------------------------------------------------------------------------
# Official leaf (after `layers.{i}.`) -> the runtime's leaf (after `model.layers.{i}.`), from the
# renames of transformers' conversion_mapping "deepseek_v4" entry.
_LAYER_LEAVES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{blk}_{p}": f"{blk}_hc.{p}" for blk in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.norm.weight": "self_attn.kv_norm.weight",  # transformers' save spelling of kv_norm
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    **{f"attn.{src}compressor.{a}": f"self_attn.compressor.{dst}{b}"
       for src, dst in (("", ""), ("indexer.", "indexer."))
       for a, b in (("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"),
                    ("ape", "position_bias"), ("norm.weight", "kv_norm.weight"))},
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    **{f"ffn.shared_experts.{w}.weight": f"mlp.shared_experts.{p}.weight"
       for w, p in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))},
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        **{f"hc_head_{p}": f"model.hc_head.hc_{p}" for p in ("fn", "base", "scale")},
        **{f"hc_head.hc_{p}": f"model.hc_head.hc_{p}" for p in ("fn", "base", "scale")}}
EXPERT_W = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # DeepSeek's w1/w2/w3
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_OFFICIAL_EXPERT = re.compile(r"^(?:ffn|mlp)\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def runtime_name(stored: str) -> str | None:
    """The runtime's (transformers' module) name of a stored tensor name in any of the three
    spellings; None for names that are not one of V4's main-model tensors."""
    top = _TOP.get(stored.removeprefix("model."))
    if top is not None:
        return top
    m = _LAYER.match(stored)
    if m is None:
        return None
    i, leaf = m.groups()
    if leaf in _LAYER_LEAVES:
        return f"model.layers.{i}.{_LAYER_LEAVES[leaf]}"
    e = _OFFICIAL_EXPERT.match(leaf)
    if e is not None:
        return layout.expert_name(int(i), int(e.group(1)), EXPERT_W[e.group(2)])
    if stored.startswith("model.") and leaf in _RUNTIME_LEAVES or layout.parse_expert(stored):
        return stored  # already the runtime's
    return None


_RUNTIME_LEAVES = set(_LAYER_LEAVES.values())
# runtime leaf -> official leaf, for naming a missing tensor as the release names it
_OFFICIAL_LEAF = {v: k for k, v in _LAYER_LEAVES.items() if k != "attn.norm.weight"}


def is_official_layout(names) -> bool:
    """Whether a checkpoint's names are DeepSeek's own release layout: `embed.weight`, no `model.` prefix."""
    return "embed.weight" in names and not any(n.startswith("model.") for n in names)


# --- the source -----------------------------------------------------------------------------------
class V4Source(Source):
    """A V4 checkpoint in any of the three spellings, seen under the runtime's names.

    names() lists the main model's tensors (FP8 `.scale` companions travel with their weight;
    fused experts appear as per-expert names); `mtp.*` tensors are copied as stored (raw_names).
    Names the table does not know are listed as stored, so the converter reports them as unexpected."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        stored_names = ckpt.names()
        present = set(stored_names)
        self._stored: dict[str, str] = {}  # runtime name -> stored name
        self._fused: dict[str, tuple[str, int, slice]] = {}  # per-expert name -> (fused name, expert, rows)
        self._raw: list[str] = []
        self._official = is_official_layout(present)
        for name in stored_names:
            if name.startswith("mtp."):
                self._raw.append(name)
                continue
            if layout.is_recomputed(name):
                continue  # RoPE's inverse frequencies
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) + ".weight" in present \
                    or layout.is_fp8_scale(name) and name.removesuffix(layout.FP8_SCALE_SUFFIX) in present:
                continue  # a block scale (official `.scale`, or transformers' `weight_scale_inv`): read with its weight
            fused = _FUSED.match(name)
            if fused is not None:
                self._add_fused(name, int(fused.group(1)), fused.group(2))
                continue
            target = runtime_name(name) or name
            other = self._stored.get(target)
            if other is not None:
                raise EdgeDSError(f"{ckpt.info(name).path}: tensor '{name}' and tensor '{other}' are both "
                                  f"'{target}'; the checkpoint mixes two spellings of one tensor")
            self._stored[target] = name

    def _add_fused(self, name: str, layer: int, kind: str) -> None:
        info = self.ckpt.info(name)
        if len(info.shape) != 3:
            raise EdgeDSError(f"{info.path}: tensor '{name}' has shape {list(info.shape)}; fused experts are "
                              "[experts, rows, cols]")
        E, rows, _ = info.shape
        parts = (("gate_proj", slice(0, rows // 2)), ("up_proj", slice(rows // 2, rows))) \
            if kind == "gate_up_proj" else (("down_proj", slice(0, rows)),)
        if kind == "gate_up_proj" and rows % 2:
            raise EdgeDSError(f"{info.path}: tensor '{name}' has {rows} rows per expert; gate_up_proj stacks "
                              "gate then up rows, an even number")
        for e in range(E):
            for proj, rs in parts:
                self._fused[layout.expert_name(layer, e, proj)] = (name, e, rs)

    # --- what the converter asks ---
    def names(self) -> list[str]:
        return sorted([*self._stored, *self._fused])

    def __contains__(self, name: object) -> bool:
        return name in self._stored or name in self._fused

    def raw_names(self) -> list[str]:
        return list(self._raw)

    def stored(self, name: str) -> str:
        return self._fused[name][0] if name in self._fused else self._stored.get(name, name)

    def label(self, name: str) -> str:
        stored = self.stored(name)
        if name in self._fused:
            fused, e, _ = self._fused[name]
            return f"tensor '{fused}' (expert {e}: {name})"
        return f"tensor '{name}'" if stored == name else f"tensor '{stored}' ({name})"

    def missing_label(self, name: str) -> str:
        m = layout.layer_of(name)
        official = _OFFICIAL_LEAF.get(name.split(f"layers.{m}.", 1)[-1]) if m is not None else None
        if official is None or not self._official:
            return self.label(name)
        return f"tensor 'layers.{m}.{official}' ({name})"

    def scale_of(self, name: str) -> str | None:
        """The block-scale tensor stored beside weight `name`, if any."""
        if name in self._fused:
            return None
        stored = self.stored(name)
        for s in (stored.removesuffix(".weight") + SCALE_SUFFIX, layout.fp8_scale_of(stored)):
            if s in self.ckpt:
                return s
        return None

    def is_fp4(self, name: str) -> bool:
        """Packed FP4: an 8-bit integer tensor with a `.scale` beside it."""
        return self.ckpt.info(self.stored(name)).dtype in ("I8", "U8") and self.scale_of(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._fused:
            fused, _, rows = self._fused[name]
            _, n, cols = self.ckpt.info(fused).shape
            return (len(range(n)[rows]), cols)
        shape = self.ckpt.info(self.stored(name)).shape
        return (*shape[:-1], 2 * shape[-1]) if self.is_fp4(name) else shape

    def read_float32(self, name: str) -> np.ndarray:
        if name in self._fused:
            return self._read_fused(name)
        stored = self.stored(name)
        info = self.ckpt.info(stored)
        where = f"{info.path}: {self.label(name)}"
        scale_name = self.scale_of(name)
        if self.is_fp4(name):
            packed, scale = self._fp4_parts(name)
            return decode_fp4(packed, scale, f"{self.ckpt.info(scale_name).path}: tensor '{scale_name}'")
        w = self.ckpt.read(stored)
        if info.dtype == "F8_E4M3":
            if scale_name is None:
                raise EdgeDSError(f"{where} is FP8 but has no '{stored.removesuffix('.weight')}{SCALE_SUFFIX}' "
                                  "block scale")
            scale = self._block_scale(scale_name, info.shape)
            return dequantize_fp8_blocks(w.view(FP8), scale, BLOCK, name=where)
        if scale_name is not None:
            raise EdgeDSError(f"{self.ckpt.info(scale_name).path}: tensor '{scale_name}' scales a {info.dtype} "
                              f"weight; block scales go with F8_E4M3 weights, FP4 ones with I8")
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise EdgeDSError(f"{where} has dtype {info.dtype}; expected a floating-point weight")
        return np.asarray(w).astype(np.float32, copy=False)

    def read_integer(self, name: str) -> np.ndarray:
        stored = self.stored(name)
        info = self.ckpt.info(stored)
        if info.dtype not in ("I64", "I32", "I16", "U32", "U16", "U8", "I8"):
            raise EdgeDSError(f"{info.path}: {self.label(name)} has dtype {info.dtype}; expected an integer table")
        return self.ckpt.read(stored)

    def read_mxfp4(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        if name in self._fused or not self.is_fp4(name):
            return None
        return fp4_to_mxfp4(*self._fp4_parts(name))

    # --- helpers ---
    def _fp4_parts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(packed [rows, cols/2], E8M0 codes [rows, cols/32]), shapes and dtypes checked."""
        stored, scale_name = self.stored(name), self.scale_of(name)
        info, sinfo = self.ckpt.info(stored), self.ckpt.info(scale_name)
        if len(info.shape) != 2 or info.shape[1] * 2 % FP4_GROUP:
            raise EdgeDSError(f"{info.path}: packed FP4 {self.label(name)} has shape {list(info.shape)}; expected "
                              f"[rows, cols/2] with cols a multiple of {FP4_GROUP}")
        want = (info.shape[0], info.shape[1] * 2 // FP4_GROUP)
        if sinfo.dtype not in ("F8_E8M0", "U8") or sinfo.shape != want:
            raise EdgeDSError(f"{sinfo.path}: tensor '{scale_name}' is {sinfo.dtype} {list(sinfo.shape)}; packed FP4 "
                              f"'{stored}' {list(info.shape)} needs F8_E8M0 {list(want)} (one scale per "
                              f"{FP4_GROUP} inputs)")
        scale = self.ckpt.read(scale_name).view(np.uint8)
        if (scale == E8M0_NAN).any():
            raise EdgeDSError(f"{sinfo.path}: tensor '{scale_name}' has NaN scales (E8M0 code 0xFF)")
        return self.ckpt.read(stored), scale

    def _block_scale(self, scale_name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 [ceil(rows/128), ceil(cols/128)] block scales of an FP8 weight of `shape`."""
        sinfo = self.ckpt.info(scale_name)
        want = tuple(-(-d // BLOCK) for d in shape)
        if sinfo.shape != want:
            raise EdgeDSError(f"{sinfo.path}: tensor '{scale_name}' has shape {list(sinfo.shape)}; an FP8 weight "
                              f"{list(shape)} needs {list(want)} ({BLOCK}x{BLOCK} blocks)")
        s = self.ckpt.read(scale_name)
        if sinfo.dtype in ("F8_E8M0", "U8"):
            return e8m0_to_float32(s, f"{sinfo.path}: tensor '{scale_name}'")
        if sinfo.dtype != "F32":
            raise EdgeDSError(f"{sinfo.path}: tensor '{scale_name}' has dtype {sinfo.dtype}; block scales are "
                              "F8_E8M0 (or F32)")
        return s

    def _read_fused(self, name: str) -> np.ndarray:
        """One expert's rows of a fused tensor, reading only that expert's bytes."""
        fused, e, rows = self._fused[name]
        info = self.ckpt.info(fused)
        if info.dtype not in ("F32", "F16", "BF16"):
            raise EdgeDSError(f"{info.path}: tensor '{fused}' has dtype {info.dtype}; fused experts are read "
                              "from float checkpoints only")
        dtype = np.dtype(ml_dtypes.bfloat16) if info.dtype == "BF16" else np.dtype(
            {"F32": "<f4", "F16": "<f2"}[info.dtype])
        m = np.memmap(info.path, dtype=dtype, mode="r", offset=info.offset, shape=info.shape)
        try:
            return np.array(m[e, rows], dtype=np.float32)
        finally:
            del m


def keeps_float32(name: str) -> bool:
    """V4 tensors the converter writes in float32 whatever --dtype says, as transformers keeps them:
    those the runtime computes with in float32 (layout.keeps_float32: hyper-connection mixers,
    attention sinks, pooling biases, the router's correction bias) and the norms' weights."""
    leaf = name.rsplit(".", 2)
    return layout.keeps_float32(name) or (len(leaf) > 2 and "norm" in leaf[-2])

