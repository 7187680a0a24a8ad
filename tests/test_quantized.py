"""Quantized checkpoints: compute parity on the dequantized weights, and a quality report.

"Quantized compute": edge-ds running a 4-/8-bit converted dir must equal transformers running
the very weights that dir holds, dequantized here by an independent numpy reading of MLX's
affine format and mapped back to the HF layout. That isolates compute bugs (quantized
matmuls, expert gathers, the kv_b_proj split) from quantization noise.
"""

from __future__ import annotations

import json

import ml_dtypes
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from edge_ds.cache import PromptCache
from edge_ds.loading import load_model
from tests.tiny_models import condition, hf_logits, make_hf_model

# Wide enough that group_size 64 divides the input width of every projection:
# hidden 128, q_lora 64, kv_lora 64, nope 64, H*v 128, intermediate 192, moe_intermediate 64.
WIDE = dict(vocab_size=256, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
            num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=64, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64)
WIDE_BY_KIND = {"v3": dict(WIDE, q_lora_rank=64), "v2lite": dict(WIDE)}
PROJS = ("gate_proj", "up_proj", "down_proj")


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run(model, toks: np.ndarray, cache=None) -> np.ndarray:
    out = model(mx.array(toks), cache=cache)
    mx.eval(out)
    return np.array(out)


# --- an independent reader of MLX's affine quantization --------------------------------------


def unpack_affine(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [..., W] -> integers [..., W * 32 // bits]; within a word the lowest bits come first."""
    assert packed.dtype == np.uint32 and 32 % bits == 0
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    q = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def dequantize_affine(packed, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """w = scale * q + bias, one (scale, bias) per group_size consecutive values of the last axis."""
    q = unpack_affine(packed, bits).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=-1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=-1)
    assert s.shape == q.shape
    return s * q + b


FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)  # magnitudes; bit 3 is the sign


def dequantize_mx(packed, scales, group_size: int, bits: int) -> np.ndarray:
    """MLX's mxfp4/mxfp8: e2m1 / e4m3 elements packed little-end-first into uint32 words, one
    E8M0 scale (2^(s - 127)) per group of 32."""
    assert packed.dtype == np.uint32 and scales.dtype == np.uint8 and group_size == 32
    if bits == 8:
        q = np.ascontiguousarray(packed).view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        nib = unpack_affine(packed, 4)
        q = FP4_E2M1[nib & 7] * np.where(nib & 8, np.float32(-1), np.float32(1))
    return q * np.repeat(np.exp2(scales.astype(np.float32) - 127), group_size, axis=-1)


def read_dir(path: Path) -> dict[str, np.ndarray]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update({k: np.array(v) for k, v in mx.load(str(path / shard)).items()})
    assert set(out) == set(index["weight_map"])
    return out


def dequantized_hf_state(path: Path, hf_model) -> dict[str, torch.Tensor]:
    """The converted dir's weights, dequantized and mapped back to transformers' in-memory layout."""
    cfg = json.loads((path / "config.json").read_text())
    gs, bits, mode = (cfg["quantization"][k] for k in ("group_size", "bits", "mode"))
    raw = read_dir(path)

    flat: dict[str, np.ndarray] = {}
    for name, a in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len("weight")]
        if base + "scales" in raw and mode == "affine":
            a = dequantize_affine(a, raw[base + "scales"], raw[base + "biases"], gs, bits)
        elif base + "scales" in raw:
            assert base + "biases" not in raw
            a = dequantize_mx(a, raw[base + "scales"], gs, bits)
        flat[name] = a.astype(np.float32)

    # mlx-lm layout -> HF checkpoint layout (per-expert tensors, kv_b_proj)
    hf: dict[str, np.ndarray] = {}
    H, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    for name, a in flat.items():
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            for e in range(a.shape[0]):
                hf[f"{prefix}.experts.{e}.{rest}"] = a[e]
        elif name.endswith("self_attn.embed_q.weight"):  # [H, kv_lora, nope] = W_UK^T per head
            base = name[: -len("embed_q.weight")]
            wk = a.transpose(0, 2, 1)  # [H, nope, kv_lora]
            wv = flat[base + "unembed_out.weight"]  # [H, v, kv_lora]
            assert wk.shape[:2] == (H, nope)
            kv_b = np.concatenate([wk, wv], axis=1)
            hf[base + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
        elif name.endswith("self_attn.unembed_out.weight"):
            continue
        else:
            hf[name] = a

    # HF checkpoint layout -> transformers 5 in-memory fused experts
    state: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, a in hf.items():
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            fused.setdefault(prefix, {}).setdefault(int(e), {})[proj] = a
        else:
            state[name] = a
    for prefix, by_e in fused.items():
        E = len(by_e)
        state[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([by_e[e]["gate_proj"], by_e[e]["up_proj"]], axis=0) for e in range(E)])
        state[f"{prefix}.mlp.experts.down_proj"] = np.stack([by_e[e]["down_proj"] for e in range(E)])
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def test_numpy_unpack_matches_mx_dequantize():
    """Sanity of the oracle: the numpy reader agrees with MLX's own dequantize."""
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        for gs in (32, 64):
            w = mx.array(rng.standard_normal((3, 5, 128)).astype(np.float32))
            packed, scales, biases = mx.quantize(w, gs, bits)
            ref = np.array(mx.dequantize(packed, scales, biases, gs, bits))
            mine = dequantize_affine(np.array(packed), np.array(scales), np.array(biases), gs, bits)
            np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-6)
            # and it reconstructs the original to within one quantization step (MLX nudges the
            # scale so that the group's extreme value is exact, so not always half a step)
            step = np.repeat(np.abs(np.array(scales)), gs, axis=-1)
            assert (np.abs(mine - np.array(w)) <= step + 1e-6).all()
    for mode, bits in (("mxfp4", 4), ("mxfp8", 8)):
        w = mx.array(rng.standard_normal((3, 5, 128)).astype(np.float32))
        packed, scales = mx.quantize(w, 32, bits, mode=mode)
        ref = np.array(mx.dequantize(packed, scales, group_size=32, bits=bits, mode=mode, dtype=mx.float32))
        np.testing.assert_array_equal(dequantize_mx(np.array(packed), np.array(scales), 32, bits), ref)


@pytest.mark.parametrize("quant", ["4bit", "8bit", "mxfp4", "mxfp8"])
@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_quantized_compute_matches_transformers_on_dequantized_weights(zoo, kind, quant):
    tiny = zoo.hf(kind, seed=11, **WIDE_BY_KIND[kind])
    qdir = zoo.converted(kind, quant, "float32", seed=11, **WIDE_BY_KIND[kind])

    # every projection (and the embedding, lm_head) is quantized; norms and the router are not
    names = json.loads((qdir / "model.safetensors.index.json").read_text())["weight_map"]
    weights = [n for n in names if n.endswith(".weight")]
    unquantized = sorted(n for n in weights if n[: -len("weight")] + "scales" not in names)
    assert unquantized and all("norm" in n or n.endswith("mlp.gate.weight") for n in unquantized), unquantized
    assert "lm_head.scales" in names and "model.embed_tokens.scales" in names
    assert ("model.layers.0.self_attn.kv_b_proj.scales" in names) == (kind == "v2lite")
    assert ("model.layers.0.self_attn.embed_q.scales" in names) == (kind == "v3")

    oracle = make_hf_model(kind, seed=999, **WIDE_BY_KIND[kind])  # its weights are all replaced
    oracle.load_state_dict(dequantized_hf_state(qdir, oracle), strict=True)

    toks = np.random.default_rng(12).integers(0, WIDE["vocab_size"], size=(2, 24))
    ref = hf_logits(oracle, toks)
    model = load_model(qdir)
    # many rows at once (CPU: weights unpacked, dense matmuls), then the quantized kernels:
    # a 5-token prefill (10 rows) and one token at a time with the latent cache
    full = rel_err(run(model, toks), ref)
    cache = PromptCache(len(model.layers))
    steps = [run(model, toks[:, :5], cache)] + [run(model, toks[:, i : i + 1], cache) for i in range(5, 12)]
    decode = rel_err(np.concatenate(steps, axis=1), ref[:, :12])
    noise = rel_err(ref, hf_logits(tiny.model, toks))  # quantization noise, for scale
    print(f"\n{kind} {quant}: edge-ds vs transformers(dequantized) rel err: prefill {full:.2e}, "
          f"cached decode {decode:.2e} (quantization noise vs float: {noise:.2e})")
    assert full < 1e-3 and decode < 1e-3
    assert noise > 10 * max(full, decode)  # the weights really are the quantized ones, not the float ones


# --- quality report ---------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quality(ref_logits: np.ndarray, q_logits: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || quant)) over all positions."""
    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = (ref_logits.argmax(-1) == q_logits.argmax(-1)).mean()
    return float(top1), float(kl.mean())


def conditioned_model(kind: str, seed: int):
    """A WIDE tiny model scaled to behave more like a trained one: embeddings of unit RMS carry
    the residual stream, the residual writers (o_proj, down_proj) add small updates, and a
    larger lm_head gives peaked next-token distributions (entropy ~2.8 nats, not ~5.1 of a
    maximum 5.5). The default init is chaotic: 4-bit noise alone scrambles its flat outputs,
    so top-1 and KL could not tell a working quantizer from a broken one."""
    return condition(make_hf_model(kind, seed, **WIDE_BY_KIND[kind]))


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_quality_report(tmp_path, kind):
    from converters.mlx import convert
    from tests.tiny_models import save_hf

    model = conditioned_model(kind, seed=13)
    save_hf(model, tmp_path / "hf")
    toks = np.random.default_rng(14).integers(0, WIDE["vocab_size"], size=(2, 32))  # 64 positions
    ref = hf_logits(model, toks)
    convert(tmp_path / "hf", tmp_path / "none", quant="none", dtype="float32")
    assert rel_err(run(load_model(tmp_path / "none"), toks), ref) < 1e-4

    report = {}
    for quant in ("4bit", "8bit", "mxfp4", "mxfp8"):
        convert(tmp_path / "hf", tmp_path / quant, quant=quant, dtype="float32")
        report[quant] = quality(ref, run(load_model(tmp_path / quant), toks))
    garbage = quality(ref, np.roll(ref, 1, axis=1))  # each position scored against its neighbour's logits
    print(f"\n{kind} tiny (hidden 128, 64 positions)  quant: top-1  KL(float||quant)")
    for quant, (top1, kl) in report.items():
        print(f"  {quant:6s} {top1:.3f}  {kl:.5f}")
    print(f"  (unrelated logits: {garbage[0]:.3f}  {garbage[1]:.3f})")

    for quant, (top1, kl) in report.items():
        assert kl > 1e-6, quant  # something was quantized
        assert top1 >= 0.6 and kl < 0.5, quant  # far from unrelated outputs (KL ~6)
    assert garbage[1] > 2.0
    (t4, kl4), (t8, kl8) = report["4bit"], report["8bit"]
    (tf4, klf4), (tf8, klf8) = report["mxfp4"], report["mxfp8"]
    assert t8 >= 0.95 and kl8 < 0.01 and kl8 < kl4 / 10
    assert tf8 >= 0.85 and klf8 < 0.05 and klf8 < klf4 / 4
    assert kl8 < klf8  # 255 uniform levels per group beat a 3-bit mantissa
