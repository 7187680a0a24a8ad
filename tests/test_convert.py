"""converters.mlx.convert: FP8 sources, the MTP module, mlx-lm interop, bad input, bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

import torch
from safetensors.numpy import load_file as np_load
from safetensors.torch import save_file as torch_save

from converters.mlx import convert
from edge_ds.errors import EdgeDSError
from edge_ds.loading import load_model
from tests.tiny_models import condition, hf_logits, make_hf_model, save_hf

ROOT = Path(__file__).resolve().parents[1]
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
# group_size 64 divides every projection's input width (see test_quantized.py)
WIDE = dict(vocab_size=256, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
            num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=64, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64)
WIDE_BY_KIND = {"v3": dict(WIDE, q_lora_rank=64), "v2lite": dict(WIDE)}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run(model, toks: np.ndarray) -> np.ndarray:
    out = model(mx.array(toks))
    mx.eval(out)
    return np.array(out)


def read_converted(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return out


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == FP8:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(a))


def write_shards(directory: Path, tensors: dict[str, np.ndarray], shard_of: dict[str, int], n: int) -> None:
    """Writes model-0000i-of-0000n.safetensors files plus model.safetensors.index.json."""
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        part = {k: to_torch(v) for k, v in tensors.items() if shard_of[k] == i}
        torch_save(part, str(directory / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: names[shard_of[k]] for k in sorted(tensors)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def tree_hash(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- FP8 sources ------------------------------------------------------------------------------

# Not multiples of 128: hidden 160 (2 ragged column blocks), q_lora 136, kv_a out 144 + 32 = 176,
# q_b out 2 * 96 = 192, moe_intermediate 96, intermediate 200.
FP8_DIMS = dict(vocab_size=160, hidden_size=160, intermediate_size=200, moe_intermediate_size=96,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=144,
                qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def is_fp8_weight(name: str, a: np.ndarray) -> bool:
    """DeepSeek's rule: 2-D projection weights in the decoder layers; not embeddings, lm_head,
    norms, the router weight or its correction bias."""
    return (name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))
            and a.ndim == 2 and "norm" not in name)


def fp8_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 128x128 block (ragged edges as they are): scale = amax / 448, q = fp8(w / scale)."""
    rows, cols = w.shape
    scale = np.ones((-(-rows // 128), -(-cols // 128)), np.float32)
    q = np.zeros(w.shape, FP8)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            blk = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            amax = float(np.abs(blk).max())
            s = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
            scale[bi, bj] = s
            q[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128] = (blk / s).astype(FP8)
    return q, scale


def fp8_dequantize_loop(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The oracle: an explicit loop over 128x128 blocks, w = float(q) * scale_inv[block]."""
    out = np.empty(q.shape, np.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rs, cs = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[rs, cs] = q[rs, cs].astype(np.float32) * np.float32(scale[bi, bj])
    return out


def transformers_state(hf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF checkpoint names (per-expert) -> transformers 5's in-memory layout (fused experts)."""
    state, experts = {}, {}
    for name, a in hf.items():
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = a
        else:
            state[name] = a
    for prefix, by_e in experts.items():
        E = range(len(by_e))
        state[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([by_e[e]["gate_proj"], by_e[e]["up_proj"]]) for e in E])
        state[f"{prefix}.mlp.experts.down_proj"] = np.stack([by_e[e]["down_proj"] for e in E])
    return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(float transformers model, its float32 tensors, FP8 dir, {name: (fp8, scale_inv)})."""
    root = tmp_path_factory.mktemp("fp8")
    model = condition(make_hf_model("v3", seed=21, **FP8_DIMS))
    save_hf(model, root / "float")
    original = np_load(str(root / "float" / "model.safetensors"))

    src = root / "fp8"
    src.mkdir()
    tensors, fp8 = {}, {}
    for name, a in original.items():
        if is_fp8_weight(name, a):
            q, s = fp8_quantize(a)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            fp8[name] = (q, s)
        else:
            tensors[name] = a
    # shard 0: trunk and layer 0; shard 1: layers 1-2; every other scale_inv in the other shard
    shard_of = {}
    for name in tensors:
        base = name.removesuffix("_scale_inv")
        shard = 1 if base.startswith(("model.layers.1.", "model.layers.2.")) else 0
        if name.endswith("_scale_inv") and sorted(fp8).index(base) % 2:
            shard = 1 - shard
        shard_of[name] = shard
    write_shards(src, tensors, shard_of, 2)
    cfg = json.loads((root / "float" / "config.json").read_text())
    cfg["quantization_config"] = FP8_QUANT_CONFIG
    (src / "config.json").write_text(json.dumps(cfg, indent=2))

    split = sum(1 for n in fp8 if shard_of[n] != shard_of[n + "_scale_inv"])
    assert split >= 5 and len(set(shard_of.values())) == 2
    assert any(q.shape[0] % 128 and q.shape[1] % 128 for q, _ in fp8.values())  # ragged both ways
    return model, original, src, fp8


def test_fp8_checkpoint_layout(fp8_checkpoint):
    """The fixture really is DeepSeek's layout (as read back by the safetensors package)."""
    from safetensors import safe_open

    _, original, src, fp8 = fp8_checkpoint
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    # 3 layers x 5 attention projections, the dense mlp's 3, 2 MoE layers x (8 experts + shared) x 3
    assert len(fp8) == 3 * 5 + 3 + 2 * (8 + 1) * 3
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8
    for name, (q, s) in fp8.items():
        with safe_open(str(src / index[name]), "pt") as f:
            t = f.get_tensor(name)
        assert t.dtype == torch.float8_e4m3fn and tuple(t.shape) == q.shape
        with safe_open(str(src / index[name + "_scale_inv"]), "pt") as f:
            sc = f.get_tensor(name + "_scale_inv")
        assert sc.dtype == torch.float32 and tuple(sc.shape) == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
    assert "model.layers.1.mlp.gate.weight" not in fp8 and "lm_head.weight" not in fp8
    assert "model.embed_tokens.weight" not in fp8


def test_fp8_convert_dequantizes_exactly(fp8_checkpoint, tmp_path):
    model, original, src, fp8 = fp8_checkpoint
    before = tree_hash(src)
    dst = convert(src, tmp_path / "out", quant="none", dtype="float32")
    assert tree_hash(src) == before
    out = read_converted(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg  # the output is plain float32

    H, nope = FP8_DIMS["num_attention_heads"], FP8_DIMS["qk_nope_head_dim"]

    def converted(name: str) -> np.ndarray:
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            return out[f"{prefix}.mlp.switch_mlp.{proj}.weight"][int(e)]
        if name.endswith("kv_b_proj.weight"):
            base = name.removesuffix("kv_b_proj.weight")
            wk = out[base + "embed_q.weight"].transpose(0, 2, 1)
            kv_b = np.concatenate([wk, out[base + "unembed_out.weight"]], axis=1)
            assert wk.shape[1] == nope and kv_b.shape[0] == H
            return kv_b.reshape(-1, kv_b.shape[-1])
        return out[name]

    worst = 0.0
    for name, (q, s) in fp8.items():
        got = converted(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, fp8_dequantize_loop(q, s), err_msg=name)
        # ... and that is the original within FP8 (e4m3) rounding: half an ulp of a 3-bit mantissa
        # (2^-4 relative), or half the subnormal spacing (2^-10 * scale) near zero
        orig = original[name]
        scale_map = np.repeat(np.repeat(s, 128, 0), 128, 1)[: orig.shape[0], : orig.shape[1]]
        bound = np.maximum(np.abs(orig) * 2.0**-4, scale_map * 2.0**-10) * 1.0001
        err = np.abs(got - orig)
        assert (err <= bound).all(), name
        worst = max(worst, float((err / np.abs(orig).max()).max()))
    for name, a in original.items():  # embeddings, lm_head, norms, router, bias: copied as they are
        if name not in fp8:
            np.testing.assert_array_equal(converted(name), a, err_msg=name)
    assert not any(k.endswith("_scale_inv") for k in out)

    # logits: exactly transformers on the FP8-dequantized weights, and close to the float model
    toks = np.random.default_rng(22).integers(0, FP8_DIMS["vocab_size"], size=(2, 24))
    ours = run(load_model(dst), toks)
    oracle = make_hf_model("v3", seed=998, **FP8_DIMS)
    oracle.load_state_dict(transformers_state(
        {k: fp8_dequantize_loop(*fp8[k]) if k in fp8 else a for k, a in original.items()}), strict=True)
    exact = rel_err(ours, hf_logits(oracle, toks))
    ref = hf_logits(model, toks)
    err = rel_err(ours, ref)
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(ours).double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    print(f"\nFP8: worst weight error {worst:.3e} of the tensor's max; logits vs transformers on the "
          f"dequantized weights {exact:.2e}; vs the float model: rel err {err:.3e}, top-1 {top1:.3f}, "
          f"KL {kl:.5f}")
    assert exact < 1e-4
    assert err < 0.3 and top1 >= 0.9 and kl < 0.02


def test_fp8_dir_is_not_loaded_directly(fp8_checkpoint):
    with pytest.raises(EdgeDSError, match="FP8"):
        load_model(fp8_checkpoint[2])


def test_fp8_convert_quantized(fp8_checkpoint, tmp_path):
    """FP8 -> dequantize -> 4bit: hidden 160 is not a multiple of 64, so those stay float; the rest load."""
    model, _, src, _ = fp8_checkpoint
    dst = convert(src, tmp_path / "q", quant="4bit", group_size=32, dtype="float32")
    toks = np.random.default_rng(23).integers(0, FP8_DIMS["vocab_size"], size=(1, 16))
    assert np.isfinite(run(load_model(dst), toks)).all()
    names = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in names  # in 160 = 5 groups of 32


# --- the MTP module -----------------------------------------------------------------------------


def test_mtp_module_goes_to_its_own_file(zoo, tmp_path):
    tiny = zoo.hf("v3")
    cfg = tiny.config
    n, D, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    original = np_load(str(tiny.path / "model.safetensors"))
    rng = np.random.default_rng(30)
    mtp = {f"model.layers.{n}.{k}": v for k, v in {
        "embed_tokens.weight": rng.standard_normal((V, D)),
        "enorm.weight": np.ones(D), "hnorm.weight": np.ones(D),
        "eh_proj.weight": rng.standard_normal((D, 2 * D)),
        "shared_head.norm.weight": np.ones(D),
        "shared_head.head.weight": rng.standard_normal((V, D)),
    }.items()}
    last = f"model.layers.{n - 1}."
    mtp.update({f"model.layers.{n}." + k[len(last):]: v + 0.5 for k, v in original.items() if k.startswith(last)})
    mtp = {k: np.asarray(v, np.float32) for k, v in mtp.items()}

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny.path / "config.json", src / "config.json")
    tensors = {**original, **mtp}
    write_shards(src, tensors, {k: int(k in mtp) for k in tensors}, 2)

    dst = convert(src, tmp_path / "dst", quant="none", dtype="float32")
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(f"model.layers.{n}.") for k in index)
    assert "mtp.safetensors" not in set(index.values())
    for f in dst.glob("model*.safetensors"):
        assert not any(k.startswith(f"model.layers.{n}.") for k in mx.load(str(f))), f.name
    kept = {k: np.array(v) for k, v in mx.load(str(dst / "mtp.safetensors")).items()}
    assert all(k.startswith(f"model.layers.{n}.") for k in kept)
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.head.weight",
              "shared_head.norm.weight", "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight"):
        np.testing.assert_array_equal(kept[f"model.layers.{n}.{k}"], mtp[f"model.layers.{n}.{k}"])
    assert any("experts" in k or "switch_mlp" in k for k in kept)  # its decoder layer came along

    toks = np.random.default_rng(31).integers(0, V, size=(2, 12))
    ref = hf_logits(tiny.model, toks)
    assert rel_err(run(load_model(dst), toks), ref) < 1e-4
    assert rel_err(run(load_model(src), toks), ref) < 1e-4  # the unconverted dir skips it too

    from mlx_lm.utils import load_model as mlx_lm_load

    lm, _ = mlx_lm_load(dst)  # mlx-lm only globs model*.safetensors: the MTP file is not in its way
    assert rel_err(run(lm, toks), ref) < 1e-4


# --- mlx-lm interop ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_edge_ds_output_loads_in_mlx_lm(zoo, kind):
    from mlx_lm.utils import load_model as mlx_lm_load

    qdir = zoo.converted(kind, "4bit", "float32", seed=11, **WIDE_BY_KIND[kind])
    lm, cfg = mlx_lm_load(qdir)  # strict: every tensor must be one mlx-lm expects
    assert cfg["quantization"]["bits"] == 4
    assert "QuantizedSwitchLinear" in {type(m).__name__ for m in lm.modules()}
    toks = np.random.default_rng(40).integers(0, WIDE["vocab_size"], size=(2, 20))
    ours = run(load_model(qdir), toks)
    theirs = run(lm, toks)
    assert theirs.dtype == np.float32
    err = rel_err(ours, theirs)
    print(f"\n{kind}: edge-ds 4bit dir, edge-ds vs mlx-lm rel err {err:.2e}")
    assert err < 1e-3
    # not trivially equal to the float model
    assert rel_err(theirs, hf_logits(zoo.hf(kind, seed=11, **WIDE_BY_KIND[kind]).model, toks)) > 1e-2


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_mlx_lm_output_loads_in_edge_ds(zoo, legacy_rope, tmp_path, kind):
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.utils import quantize_model, save_config, save_model

    tiny = zoo.hf(kind, seed=11, **WIDE_BY_KIND[kind])
    # mlx-lm 0.32 reads only the legacy rope_scaling spelling (as DeepSeek's own configs have it)
    hf = legacy_rope(tiny.path, tmp_path / "hf")
    # what mlx_lm.convert(hf, out, quantize=True, q_bits=4, q_group_size=64, dtype="float32") does,
    # minus the tokenizer it would insist on
    lm, cfg = mlx_lm_load(hf, lazy=True)
    lm.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                       lm.parameters()))
    lm, cfg = quantize_model(lm, cfg, 64, 4)
    out = tmp_path / "mlx"
    save_model(out, lm)
    save_config(cfg, out / "config.json")
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("model.layers.0.self_attn.embed_q.scales" in names) == (kind == "v3")
    assert "model.layers.1.mlp.switch_mlp.up_proj.scales" in names

    toks = np.random.default_rng(41).integers(0, WIDE["vocab_size"], size=(2, 20))
    theirs = run(mlx_lm_load(out)[0], toks)
    ours = run(load_model(out), toks)
    err = rel_err(ours, theirs)
    print(f"\n{kind}: mlx-lm 4bit dir, edge-ds vs mlx-lm rel err {err:.2e}")
    assert err < 1e-3
    assert rel_err(ours, hf_logits(tiny.model, toks)) > 1e-2  # it is the quantized model


# --- bad input ---------------------------------------------------------------------------------


def _truncate(src: Path) -> str:
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return "model.safetensors"


def _absurd_header(src: Path) -> str:
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    return "model.safetensors"


def _missing_shard(src: Path) -> str:
    tensors = np_load(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    write_shards(src, tensors, {k: int(k.startswith("model.layers.2.")) for k in tensors}, 2)
    (src / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def _wrong_intermediate_size(src: Path) -> str:
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] += 4
    (src / "config.json").write_text(json.dumps(cfg))
    return "model.layers.0.mlp."


def _unknown_model_type(src: Path) -> str:
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    return "model_type"


def _rewrite(src: Path, edit) -> None:
    tensors = np_load(str(src / "model.safetensors"))
    edit(tensors)
    torch_save({k: to_torch(v) for k, v in tensors.items()}, str(src / "model.safetensors"),
               metadata={"format": "pt"})


def _nan_weight(src: Path) -> str:
    name = "model.layers.2.self_attn.o_proj.weight"

    def edit(t):
        t[name][3, 5] = np.nan
    _rewrite(src, edit)
    return name


def _missing_expert(src: Path) -> str:
    def edit(t):
        del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    _rewrite(src, edit)
    return "model.layers.2.mlp.experts"


BAD_INPUTS = {
    "truncated": _truncate,
    "absurd-header-length": _absurd_header,
    "missing-shard": _missing_shard,
    "shape-mismatch": _wrong_intermediate_size,
    "unknown-model-type": _unknown_model_type,
    "nan-weight": _nan_weight,
    "missing-expert": _missing_expert,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(zoo, tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(zoo.hf("v3").path, src)
    named = BAD_INPUTS[case](src)
    before = tree_hash(src)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    dst = out_parent / "dst"
    with pytest.raises(EdgeDSError) as e:
        convert(src, dst, quant="4bit", group_size=32, dtype="float32")
    msg = str(e.value)
    assert named in msg, msg
    if case == "shape-mismatch":
        assert "config.json" in msg and "shape" in msg
    if case == "missing-expert":
        assert "expert 5" in msg and "up_proj" in msg
    assert "\n" not in msg
    assert not dst.exists()
    assert list(out_parent.iterdir()) == []  # no .dst.partial-* left behind
    assert tree_hash(src) == before


def test_existing_dst_is_refused_and_untouched(zoo, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    before = tree_hash(dst)
    with pytest.raises(EdgeDSError, match="dst"):
        convert(zoo.hf("v3").path, dst, quant="4bit", dtype="float32")
    assert tree_hash(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# --- bounded memory ------------------------------------------------------------------------------

MEM_CONFIG = dict(
    model_type="deepseek_v3", vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=0, kv_lora_rank=128, q_lora_rank=256,
    qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, routed_scaling_factor=2.5, norm_topk_prob=True,
    topk_method="noaux_tc", scoring_func="sigmoid", max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=False, rope_scaling=None, torch_dtype="float32")


def layer_shapes(c: dict, i: int) -> dict[str, tuple]:
    """HF tensor names and shapes of one MoE decoder layer (deepseek-format.md)."""
    D, H, E, I = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"], c["moe_intermediate_size"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    p = f"model.layers.{i}."
    s = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_a_proj.weight": (c["q_lora_rank"], D), "self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
        "self_attn.q_b_proj.weight": (H * qk, c["q_lora_rank"]),
        "self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], D),
        "self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
        "self_attn.kv_b_proj.weight": (H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
        "self_attn.o_proj.weight": (D, H * c["v_head_dim"]),
        "mlp.gate.weight": (E, D), "mlp.gate.e_score_correction_bias": (E,),
        "mlp.shared_experts.gate_proj.weight": (I, D), "mlp.shared_experts.up_proj.weight": (I, D),
        "mlp.shared_experts.down_proj.weight": (D, I),
    }
    for e in range(E):
        s.update({f"mlp.experts.{e}.gate_proj.weight": (I, D), f"mlp.experts.{e}.up_proj.weight": (I, D),
                  f"mlp.experts.{e}.down_proj.weight": (D, I)})
    return {p + k: v for k, v in s.items()}


def test_convert_memory_is_bounded_by_a_layer(tmp_path):
    c = MEM_CONFIG
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(c))
    rng = np.random.default_rng(50)

    def tensor(shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return (rng.random(shape, dtype=np.float32) - 0.5) * 0.1

    weight_map, total, layer_bytes = {}, 0, 0
    trunk = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
             "model.norm.weight": (c["hidden_size"],), "lm_head.weight": (c["vocab_size"], c["hidden_size"])}
    units = [("model-trunk.safetensors", trunk)] + [
        (f"model-layer{i:02d}.safetensors", layer_shapes(c, i)) for i in range(c["num_hidden_layers"])]
    for fname, shapes in units:  # one shard per layer, written one at a time
        arrays = {k: tensor(v) for k, v in shapes.items()}
        nbytes = sum(a.nbytes for a in arrays.values())
        total += nbytes
        if fname != "model-trunk.safetensors":
            layer_bytes = max(layer_bytes, nbytes)
        torch_save({k: torch.from_numpy(v) for k, v in arrays.items()}, str(src / fname))
        weight_map.update({k: fname for k in arrays})
        del arrays
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    bound = 2.5 * layer_bytes
    assert 25e6 <= layer_bytes <= 40e6
    assert total >= 4 * bound

    script = textwrap.dedent(f"""
        import json, resource
        import mlx.core as mx, numpy as np
        from mlx.utils import tree_flatten
        from converters.mlx import convert
        from edge_ds.checkpoint import Checkpoint
        from edge_ds.config import ModelConfig
        from edge_ds.models.deepseek import Model
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        convert({str(src)!r}, {str(tmp_path / "out")!r}, quant="4bit")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"base_kb": base, "peak_kb": peak}}))
    """)
    # Through a shell that forks python (no exec of the last command): on Linux a process's ru_maxrss
    # starts from the high-water mark of the memory image its exec replaced, and a child forked
    # straight from pytest would inherit pytest's whole RSS as its "baseline".
    proc = subprocess.run(["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, script], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    grown = (r["peak_kb"] - r["base_kb"]) * unit
    print(f"\nconvert 4bit: checkpoint {total / 1e6:.0f} MB, largest layer {layer_bytes / 1e6:.1f} MB, "
          f"peak RSS growth {grown / 1e6:.1f} MB over a {r['base_kb'] * unit / 1e6:.0f} MB baseline "
          f"(bound {bound / 1e6:.1f} MB)")
    assert r["base_kb"] * unit < 1e9, "baseline polluted by the parent's memory"
    assert grown < bound
    assert grown < total / 4

    # the output is a working model
    out = load_model(tmp_path / "out")
    assert np.isfinite(run(out, np.array([[1, 2, 3]]))).all()
