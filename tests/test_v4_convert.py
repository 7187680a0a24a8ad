"""DeepSeek-V4 checkpoints -> edge-ds (issue 18 parts 2 and 3): the official release layout
(FP8 + E8M0 128x128 block scales, packed FP4 experts with E8M0 per-32 scales; the Base release's
FP8 experts), transformers' save_pretrained and fused-expert spellings, MLX mxfp4 bit for bit.

Oracles: bit-level decoders of E2M1 / E4M3 / E8M0 written from their definitions
(tests/v4_official.py), ml_dtypes, transformers' own renames and DeepseekV4ForCausalLM run on
the weights the checkpoint decodes to."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converters.mlx import convert
from converters.official_v4 import e8m0_to_float32, fp4_to_mxfp4, is_official_layout, runtime_name
from edge_ds.errors import EdgeDSError
from tests.v4_official import E2M1, e8m0, fp4_decode, make_v4_model, official_name, per_expert_state, write_official

HAS_RUNTIME = importlib.util.find_spec("edge_ds.models.deepseek_v4") is not None
TOL = 1e-4


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16 buffer format: carry the bits
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def read_dir(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update({k: to_numpy(v) for k, v in mx.load(str(f)).items()})
    return out


def tree_hash(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def raw_tensors(directory: Path) -> dict[str, tuple[str, bytes, tuple]]:
    """name -> (safetensors dtype, raw bytes, shape), read with the safetensors library."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                out[k] = (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"",
                          tuple(t.shape))
    return out


def mlx_words(codes: np.ndarray) -> np.ndarray:
    """MLX's packing by arithmetic: code j of a row at bits 4*(j % 8) of uint32 word j // 8."""
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // 8, 8).astype(np.uint64)
    return (c << (4 * np.arange(8, dtype=np.uint64))).sum(-1).astype(np.uint32)


def codes_of(packed: np.ndarray) -> np.ndarray:
    b = packed.view(np.uint8)
    codes = np.empty((b.shape[0], 2 * b.shape[1]), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = b & 0xF, b >> 4  # low nibble first
    return codes


# --- the formats ---------------------------------------------------------------------------------

def test_e8m0_matches_ml_dtypes_and_refuses_nan():
    codes = np.arange(255, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(e8m0_to_float32(codes, "x"), want)
    np.testing.assert_array_equal(e8m0(codes), want)  # the helper's definition agrees too
    with pytest.raises(EdgeDSError, match="NaN scales"):
        e8m0_to_float32(np.array([3, 255], np.uint8), "x")


def test_e2m1_table_is_the_reference_table():
    np.testing.assert_array_equal(E2M1, [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    assert np.signbit(E2M1[8])


def test_fp4_repack_is_mlx_mxfp4_bit_for_bit():
    """Random packed FP4 and E8M0 scales: the repacked arrays are MLX's packing (by arithmetic),
    mx.dequantize gives exactly the independent decode, and mx.quantize of those floats gives
    the same bits wherever MLX's own scale choice can reproduce them."""
    rng = np.random.default_rng(0)
    rows, cols = 24, 256
    packed = rng.integers(-128, 128, size=(rows, cols // 2), dtype=np.int8)
    scales = rng.integers(110, 140, size=(rows, cols // 32), dtype=np.uint8)
    wq, sc = fp4_to_mxfp4(packed, scales)
    assert wq.dtype == np.uint32 and wq.shape == (rows, cols // 8) and sc.dtype == np.uint8
    codes = codes_of(packed)
    np.testing.assert_array_equal(wq, mlx_words(codes))
    np.testing.assert_array_equal(sc, scales)

    want = fp4_decode(packed, scales)
    got = np.array(mx.dequantize(mx.array(wq), mx.array(sc), group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    np.testing.assert_array_equal(got.view(np.uint32) & 0x7FFFFFFF, want.view(np.uint32) & 0x7FFFFFFF)
    np.testing.assert_array_equal(got, want)

    # MLX picks scale 2^(floor(log2 amax) - 2): it reproduces a group's bits when its largest
    # |code| is 4 or 6 (values 4s, 6s) and it has no -0 (which MLX writes as +0).
    qw, qs = (np.array(a) for a in mx.quantize(mx.array(want), group_size=32, bits=4, mode="mxfp4"))
    g_codes = codes.reshape(rows, -1, 32)
    top = np.abs(E2M1[g_codes]).max(-1)
    same = (top >= 4) & ~(g_codes == 8).any(-1)
    assert same.sum() > 10 and (~same).sum() > 10
    words_same = np.repeat(same, 4, axis=1)  # 4 words of 8 codes per group of 32
    np.testing.assert_array_equal(qw[words_same], wq[words_same])
    np.testing.assert_array_equal(qs[same], sc[same])
    # elsewhere re-quantizing gives other bits (so the converter repacks instead) but equal values
    assert (qs[top < 4] != sc[top < 4]).all()
    np.testing.assert_array_equal(
        np.array(mx.dequantize(mx.array(qw), mx.array(qs), group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)),
        want)


# --- names ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return make_v4_model(seed=0)


def test_official_names_are_transformers_renames(tiny):
    """The helper's official names (from the reference) map, by transformers' own conversion
    renames, to the model's state-dict names; the converter maps them to the same names."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    mapping = get_checkpoint_conversion_mapping("deepseek_v4")
    renames = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if not isinstance(t, WeightRenaming)]
    sd = tiny.state_dict()
    state = per_expert_state(tiny)
    official = {official_name(hf): hf for hf in state}
    assert is_official_layout(official)
    for name, hf in official.items():
        theirs, _ = rename_source_key(name, renames, converters, "model", sd)
        if ".mlp.experts." in hf:  # transformers fuses experts; its converter names the fused tensor
            proj = "down_proj" if hf.endswith("down_proj.weight") else "gate_up_proj"
            assert theirs == f"{hf.split('.mlp.experts.')[0]}.mlp.experts.{proj}", (name, theirs)
        else:
            assert theirs == hf, (name, theirs, hf)
        assert runtime_name(name) == hf, name


def test_save_pretrained_names_map_to_runtime_names(tiny, tmp_path):
    """transformers 5.23's save_pretrained writes official leaves under `model.`: each maps back."""
    tiny.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not is_official_layout(names) and "head.weight" in names  # the hybrid spelling
    mapped = sorted(runtime_name(n) for n in names)
    assert mapped == sorted(per_expert_state(tiny)), set(mapped) ^ set(per_expert_state(tiny))


# --- conversion ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(src dir, transformers model holding the decoded weights, decoded state) for FP4 experts."""
    model = make_v4_model(seed=1)
    src = tmp_path_factory.mktemp("v4") / "official"
    decoded = write_official(model, src, "fp4", seed=1)
    return src, model, decoded


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = make_v4_model(seed=2)
    src = tmp_path_factory.mktemp("v4") / "base"
    decoded = write_official(model, src, "fp8", seed=2)
    return src, model, decoded


@pytest.fixture(scope="module")
def official_b(tmp_path_factory):
    """Another schedule: CSA first, two hash layers, hc_mult 4, o_groups 2, rates 8 and 16, 6 experts top-3."""
    from tests.v4_official import CSA, HCA, SWA

    model = make_v4_model(seed=5, hc_mult=4, o_groups=2, layer_types=[CSA, HCA, SWA, HCA],
                          mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], compress_rates={CSA: 8, HCA: 16},
                          num_experts_per_tok=3, n_routed_experts=6)
    src = tmp_path_factory.mktemp("v4") / "official_b"
    decoded = write_official(model, src, "fp4", seed=5)
    return src, model, decoded


@pytest.fixture(scope="module")
def official_none(official, tmp_path_factory):
    dst = tmp_path_factory.mktemp("v4out") / "none"
    convert(official[0], dst, quant="none", dtype="float32")
    return dst


def expected_mxfp4(src: Path, layer: int, proj: str, E: int) -> tuple[np.ndarray, np.ndarray]:
    """The stacked words/scales MLX would hold for the source's packed FP4 experts, by arithmetic."""
    w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
    raw = raw_tensors(src)
    words, scales = [], []
    for e in range(E):
        dtype, data, shape = raw[f"layers.{layer}.ffn.experts.{e}.{w}.weight"]
        assert dtype == "torch.int8"
        packed = np.frombuffer(data, np.uint8).reshape(shape)
        words.append(mlx_words(codes_of(packed)))
        _, sdata, sshape = raw[f"layers.{layer}.ffn.experts.{e}.{w}.scale"]
        scales.append(np.frombuffer(sdata, np.uint8).reshape(sshape))
    return np.stack(words), np.stack(scales)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_fp4_experts_are_bit_identical(official, official_none, tmp_path, quant):
    src, model, decoded = official
    if quant == "none":
        dst = official_none
    else:
        dst = tmp_path / "q4"
        convert(src, dst, quant="4bit", group_size=32)
    out = read_dir(dst)
    cfg = json.loads((dst / "config.json").read_text())
    q = cfg["quantization"]
    assert "expert_dtype" not in cfg
    if quant == "4bit":
        assert (q["mode"], q["bits"], q["group_size"]) == ("affine", 4, 32)
    E = model.config.n_routed_experts
    for i in range(model.config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            path = f"model.layers.{i}.mlp.switch_mlp.{proj}"
            assert q[path] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            words, scales = expected_mxfp4(src, i, proj, E)
            np.testing.assert_array_equal(out[f"{path}.weight"], words)
            np.testing.assert_array_equal(out[f"{path}.scales"], scales)
            assert f"{path}.biases" not in out
            deq = np.array(mx.dequantize(mx.array(out[f"{path}.weight"]), mx.array(out[f"{path}.scales"]),
                                         group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
            want = np.stack([decoded[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(E)])
            np.testing.assert_array_equal(deq, want)


def test_official_dense_weights_and_kept_tensors(official, official_none):
    """--quant none --dtype float32: FP8 weights equal the block-scale decode exactly (ragged
    blocks included), tid2eid stays an integer table, the MTP module is copied byte for byte."""
    src, model, decoded = official
    out = read_dir(official_none)
    for name, want in decoded.items():
        if ".mlp.experts." in name:
            continue
        got = out[name]
        if name.endswith("tid2eid"):
            assert got.dtype.kind == "i", got.dtype
            np.testing.assert_array_equal(got, want)
        else:
            assert got.dtype == np.float32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    # ragged blocks were exercised: q_b_proj has 192 rows, o_a_proj 192 columns, head 160 rows
    assert out["model.layers.0.self_attn.q_b_proj.weight"].shape[0] == 192
    assert out["model.layers.0.self_attn.o_a_proj.weight"].shape[1] == 192
    src_raw, mtp_raw = raw_tensors(src), raw_tensors(official_none)
    mtp = {k: v for k, v in src_raw.items() if k.startswith("mtp.")}
    assert mtp and {k: mtp_raw[k] for k in mtp} == mtp
    assert not any(k.startswith("mtp.") for k in out)


def test_bfloat16_output_keeps_float32_tensors(official, tmp_path):
    """--dtype bfloat16: hyper-connection mixers, sinks, position biases, norms and the correction
    bias stay float32 (as transformers keeps them); linear weights become bfloat16."""
    dst = tmp_path / "bf16"
    convert(official[0], dst, quant="none", dtype="bfloat16")
    out = read_dir(dst)
    for name, a in out.items():
        if ".switch_mlp." in name or name.endswith("tid2eid"):
            continue
        keep = any(s in name for s in (".attn_hc.", ".ffn_hc.", ".hc_head.", ".sinks", ".position_bias", "norm",
                                      "e_score_correction_bias"))
        assert a.dtype == (np.float32 if keep else ml_dtypes.bfloat16), (name, a.dtype)
    assert out["model.layers.0.self_attn.sinks"].dtype == np.float32
    np.testing.assert_array_equal(out["model.layers.1.attn_hc.fn"], official[2]["model.layers.1.attn_hc.fn"])


@pytest.mark.parametrize("quant", ["none", "mxfp4"])
def test_base_fp8_experts(base, tmp_path, quant):
    """V4-Flash-Base: FP8 experts are dequantized exactly, then get --quant like the rest (no
    per-module mxfp4 entries: their bits are MLX's own quantization)."""
    src, model, decoded = base
    dst = tmp_path / quant
    convert(src, dst, quant=quant, dtype="float32")
    out, cfg = read_dir(dst), json.loads((dst / "config.json").read_text())
    E = model.config.n_routed_experts
    for i in range(model.config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            path = f"model.layers.{i}.mlp.switch_mlp.{proj}"
            want = np.stack([decoded[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(E)])
            if quant == "none":
                np.testing.assert_array_equal(out[f"{path}.weight"], want)
            else:
                assert path not in cfg["quantization"]
                qw, qs = mx.quantize(mx.array(want), group_size=32, bits=4, mode="mxfp4")
                np.testing.assert_array_equal(out[f"{path}.weight"], np.array(qw))
                np.testing.assert_array_equal(out[f"{path}.scales"], np.array(qs))
    if quant == "none":
        assert "quantization" not in cfg


@pytest.mark.parametrize("spelling", ["save_pretrained", "fused"])
def test_transformers_spellings(tiny, tmp_path, spelling):
    """A float checkpoint saved by transformers (official leaves under `model.`) or holding the
    model's own state dict (experts fused [E, 2I, D] / [E, D, I]) converts to the model's values."""
    src = tmp_path / "src"
    if spelling == "save_pretrained":
        tiny.save_pretrained(src)
    else:
        src.mkdir()
        tiny.config.save_pretrained(src)
        save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(src / "model.safetensors"))
    before = tree_hash(src)
    dst = tmp_path / "dst"
    convert(src, dst, quant="none", dtype="float32")
    out = read_dir(dst)
    state = per_expert_state(tiny)
    E = tiny.config.n_routed_experts
    for name, want in state.items():
        if ".mlp.experts." in name:
            continue
        np.testing.assert_array_equal(out[name], want, err_msg=name)
    for i in range(tiny.config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            want = np.stack([state[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(E)])
            np.testing.assert_array_equal(out[f"model.layers.{i}.mlp.switch_mlp.{proj}.weight"], want)
    assert tree_hash(src) == before


# --- against transformers --------------------------------------------------------------------------

def tokens(vocab: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, length))


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.float().numpy()


@pytest.mark.skipif(not HAS_RUNTIME, reason="the V4 runtime (edge_ds/models/deepseek_v4.py) is not there yet")
@pytest.mark.parametrize("which", ["official", "official_b", "base"])
def test_logits_match_transformers(request, official_none, tmp_path, which):
    """The converted model (non-expert weights float32, FP4 experts mxfp4) against transformers
    on the decoded weights; 64 tokens: eight sliding windows, at least eight compressed entries
    per compressed layer, index_topk above the entries so no selection tie can decide the result."""
    from edge_ds.loading import load_model

    src, model, _ = request.getfixturevalue(which)
    if which == "official":
        dst = official_none
    else:
        dst = tmp_path / which
        convert(src, dst, quant="none", dtype="float32")
    toks = tokens(model.config.vocab_size, 64)
    lm = load_model(dst)
    got = np.array(lm(mx.array(toks)).astype(mx.float32))
    err = rel_err(got, hf_logits(model, toks))
    print(f"\n{which}: converted vs transformers on the decoded weights, rel err {err:.2e}")
    assert err < TOL


# --- bad input ---------------------------------------------------------------------------------

def _shard_of(src: Path, name: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][name]


def _rewrite(src: Path, edit) -> None:
    """Rewrites every shard with `edit(name -> tensor dict)` applied, index updated."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors)
        save_file(tensors, str(src / shard))
        for k in [k for k, v in index["weight_map"].items() if v == shard and k not in tensors]:
            del index["weight_map"][k]
    index_path.write_text(json.dumps(index))


def _truncated_fp4_shard(src: Path) -> str:
    """The shard cut in the middle of a packed FP4 expert (as an interrupted download leaves it)."""
    name = "layers.2.ffn.experts.3.w1.weight"
    shard = _shard_of(src, name)
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    shard.write_bytes(data[:8 + n + (begin + end) // 2])
    return f"{shard.name}: truncated safetensors file: tensor '{name}'"


def _fp4_scale_shape(src: Path) -> str:
    name = "layers.1.ffn.experts.2.w3.scale"

    def edit(t):
        if name in t:
            t[name] = t[name][:, :1].contiguous()
    _rewrite(src, edit)
    return name


def _fp8_scale_shape(src: Path) -> str:
    name = "layers.0.attn.wq_b.scale"  # q_b_proj [192, 48]: 2x1 blocks

    def edit(t):
        if name in t:
            t[name] = t[name][:1].contiguous()
    _rewrite(src, edit)
    return name


def _missing_tid2eid(src: Path) -> str:
    def edit(t):
        t.pop("layers.0.ffn.gate.tid2eid", None)
    _rewrite(src, edit)
    return "layers.0.ffn.gate.tid2eid"


def _tid2eid_out_of_range(src: Path) -> str:
    def edit(t):
        if "layers.0.ffn.gate.tid2eid" in t:
            t["layers.0.ffn.gate.tid2eid"][7, 1] = 4  # n_routed_experts is 4
    _rewrite(src, edit)
    return "layers.0.ffn.gate.tid2eid"


def _fp8_without_scale(src: Path) -> str:
    def edit(t):
        t.pop("layers.3.attn.wo_b.scale", None)
    _rewrite(src, edit)
    return "layers.3.attn.wo_b"


BAD = {"truncated-fp4-shard": _truncated_fp4_shard, "fp4-scale-shape": _fp4_scale_shape,
       "fp8-scale-shape": _fp8_scale_shape, "missing-tid2eid": _missing_tid2eid,
       "tid2eid-range": _tid2eid_out_of_range, "fp8-without-scale": _fp8_without_scale}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_official_input_fails_cleanly(official, tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(official[0], src)
    named = BAD[case](src)
    before = tree_hash(src)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    dst = out_parent / "dst"
    with pytest.raises(EdgeDSError) as e:
        convert(src, dst, quant="4bit", group_size=32, dtype="float32")
    msg = str(e.value)
    print(f"\n{case}: {msg}")
    assert named in msg and "\n" not in msg, msg
    assert str(src) in msg
    assert not dst.exists() and list(out_parent.iterdir()) == []
    assert tree_hash(src) == before


def dequantized_state(dst: Path) -> dict[str, np.ndarray]:
    """A converted directory's weights as float32 in transformers' names (experts per expert), each
    quantized module dequantized by MLX with the block config.json gives it."""
    cfg = json.loads((dst / "config.json").read_text())
    q = cfg.get("quantization") or {}
    arrays = {k: mx.array(v.astype(np.float32)) if v.dtype == ml_dtypes.bfloat16 else mx.array(v)
              for k, v in read_dir(dst).items()}
    out = {}
    for name, a in arrays.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.scales" in arrays:
            block = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine"),
                     **q.get(module, {})}
            a = mx.dequantize(a, arrays[f"{module}.scales"], arrays.get(f"{module}.biases"), block["group_size"],
                              block["bits"], mode=block["mode"], dtype=mx.float32)
        a = np.array(a)
        if ".switch_mlp." in name:
            layer, proj = name.split(".mlp.switch_mlp.")
            for e in range(a.shape[0]):
                out[f"{layer}.mlp.experts.{e}.{proj}"] = a[e]
        else:
            out[name] = a
    return out


@pytest.mark.skipif(not HAS_RUNTIME, reason="the V4 runtime (edge_ds/models/deepseek_v4.py) is not there yet")
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_output_runs_as_quantized(official, tmp_path, quant):
    """--quant 4bit/8bit beside the FP4 experts' mxfp4 (two modes in one config.json): the loaded
    model equals transformers on the weights MLX dequantizes from the converted files, and those
    are not the float weights (so the quantization was applied)."""
    import copy

    from edge_ds.loading import load_model
    from tests.v4_official import load_per_expert

    src, model, decoded = official
    dst = tmp_path / quant
    convert(src, dst, quant=quant, group_size=64, dtype="float32")
    state = dequantized_state(dst)
    assert sorted(state) == sorted(decoded)
    ref = copy.deepcopy(model)
    load_per_expert(ref, {k: state[k].astype(decoded[k].dtype) for k in decoded})
    toks = tokens(model.config.vocab_size, 40, seed=1)
    got = np.array(load_model(dst)(mx.array(toks)).astype(mx.float32))
    err = rel_err(got, hf_logits(ref, toks))
    drift = rel_err(hf_logits(ref, toks), hf_logits(model, toks))
    print(f"\n{quant}: converted vs transformers on its dequantized weights {err:.2e} (vs float weights {drift:.2e})")
    assert err < TOL and drift > 10 * err


def test_converted_v4_is_not_converted_again(official_none, tmp_path):
    with pytest.raises(EdgeDSError, match="already an edge-ds"):
        convert(official_none, tmp_path / "again", quant="none")
    assert not (tmp_path / "again").exists()


def test_onnx_export_refuses_v4(official, tmp_path):
    from converters.onnx import export_onnx

    with pytest.raises(EdgeDSError, match="deepseek_v4.*mlx backend"):
        export_onnx(official[0], tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_cli_convert_official(official, tmp_path):
    from click.testing import CliRunner

    from edge_ds.cli import main

    dst = tmp_path / "cli"
    r = CliRunner().invoke(main, ["convert", str(official[0]), str(dst), "--quant", "mxfp8"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["mode"] == "mxfp8"
    assert cfg["quantization"]["model.layers.3.mlp.switch_mlp.down_proj"]["mode"] == "mxfp4"


def test_runtime_names_with_fp8_scale_inv(tiny, tmp_path):
    """transformers' names with FP8 linears beside a float32 `weight_scale_inv` (its FP8 quantizer's
    spelling), experts per expert: dequantized by the same 128x128 rule."""
    from tests.v4_official import fp8_decode, fp8_encode

    state = per_expert_state(tiny)
    tensors, want = {}, {}
    for name, a in state.items():
        if a.ndim == 2 and name.endswith("proj.weight"):
            q, codes = fp8_encode(a)
            tensors[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.from_numpy(e8m0(codes))
            want[name] = fp8_decode(q, codes)
        else:
            tensors[name], want[name] = torch.from_numpy(np.ascontiguousarray(a)), a
    src = tmp_path / "src"
    src.mkdir()
    tiny.config.save_pretrained(src)
    save_file(tensors, str(src / "model.safetensors"))
    dst = tmp_path / "dst"
    convert(src, dst, quant="none", dtype="float32")
    out = read_dir(dst)
    E = tiny.config.n_routed_experts
    for name, w in want.items():
        if ".mlp.experts." not in name:
            np.testing.assert_array_equal(out[name], w, err_msg=name)
    w = np.stack([want[f"model.layers.2.mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    np.testing.assert_array_equal(out["model.layers.2.mlp.switch_mlp.down_proj.weight"], w)
