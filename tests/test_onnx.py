"""ONNX export and the onnxruntime backend.

Parity at accuracy level 0: onnxruntime running the exported graph must equal transformers
running the very weights the graph holds, dequantized here by an independent numpy reading
of the MatMulNBits/QMoE blocks and mapped back to the Hugging Face layout. That isolates
graph bugs (routing, MLA absorption, RoPE, masks, cache) from 4-bit quantization noise.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file as np_load

import edge_ds
from converters.onnx import export_onnx
from edge_ds.backends.onnx import OnnxModel
from edge_ds.errors import EdgeDSError
from tests.test_api import add_tokenizer
from tests.test_convert import FP8_DIMS, FP8_QUANT_CONFIG, fp8_dequantize_loop, fp8_quantize, is_fp8_weight, \
    transformers_state
from tests.tiny_models import condition, hf_logits, make_hf_model, save_hf

KINDS = ("v3", "v2lite", "moonlight")
ROUTING = KINDS + ("v2grouped",)  # + group_limited_greedy


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def export(src: Path, dst: Path, **options) -> Path:
    out = export_onnx(src, dst, **options)
    onnx.checker.check_model(str(out / "model.onnx"))  # every export passes the checker
    assert onnx.load(str(out / "model.onnx"), load_external_data=False).ir_version == 10
    return out


@pytest.fixture(scope="module")
def exports(zoo, tmp_path_factory):
    """kind -> (transformers model, export dir at 4 bits, block 32, accuracy level 0)."""
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            tiny = zoo.hf(kind)
            cache[kind] = tiny.model, export(tiny.path, root / kind, bits=4, block_size=32, accuracy_level=0)
        return cache[kind]

    return get


# --- an independent reader of the exported weights ---------------------------------------------


def unpack_blocks(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """uint8 [..., N, blocks * bs * bits / 8] (4-bit: low nibble first) and scales [..., N, blocks]
    -> float32 [..., N, k], w = (q - 2^(bits-1)) * scale."""
    flat = packed.reshape(*scales.shape[:-1], -1)
    if bits == 4:
        q = np.empty(flat.shape[:-1] + (flat.shape[-1] * 2,), np.float32)
        q[..., 0::2], q[..., 1::2] = flat & 15, flat >> 4
    else:
        q = flat.astype(np.float32)
    block = q.shape[-1] // scales.shape[-1]
    return ((q - 2 ** (bits - 1)) * np.repeat(scales, block, axis=-1))[..., :k]


def graph_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    proto = onnx.load(str(path / "model.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type in ("MatMulNBits", "QMoE", "GatherBlockQuantized")}
    return init, attrs


def dequantized_state(model, path: Path) -> dict[str, torch.Tensor]:
    """transformers' state dict with every quantized weight replaced by what the graph holds."""
    init, attrs = graph_weights(path)
    cfg = model.config
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    embed = "model.embed_tokens.weight"  # GatherBlockQuantized: the head's layout, zero point 2^(bits-1)
    state[embed] = unpack_blocks(init[embed + ".qweight"], init[embed + ".scales"], attrs["embed"]["bits"],
                                 cfg.hidden_size)
    for node, a in attrs.items():
        if node == "embed":
            continue
        if a.get("K") is None:  # QMoE: fc1 rows interleave gate and up; [E, N] scales are one per row
            bits = a["expert_weight_bits"]

            def expert_weights(fc: str, k: int) -> np.ndarray:
                scales = init[node.replace("experts", fc + ".scales")]
                scales = scales if scales.ndim == 3 else scales[..., None]
                return unpack_blocks(init[node.replace("experts", fc + ".qweight")], scales, bits, k)

            # Widths that are not whole blocks are zero-padded in the graph: the padding must be 0.
            D, I = cfg.hidden_size, cfg.moe_intermediate_size
            fc1_scales = init[node.replace("experts", "fc1.scales")]
            w1 = expert_weights("fc1", fc1_scales.shape[-1] * a["block_size"] if fc1_scales.ndim == 3 else D)
            w2 = expert_weights("fc2", I)
            gate, up, down = w1[:, 0::2], w1[:, 1::2], w2
            assert not gate[:, I:].any() and not up[:, I:].any() and not gate[:, :, D:].any() and not down[:, D:].any()
            state[f"{node}.gate_up_proj"] = np.concatenate([gate[:, :I, :D], up[:, :I, :D]], axis=1)
            # The graph folds routed_scaling_factor into the down projections' scales.
            state[f"{node}.down_proj"] = down[:, :D] / np.float32(cfg.routed_scaling_factor)
            continue
        w = unpack_blocks(init[node + ".qweight"], init[node + ".scales"], a["bits"], a["K"])
        if node.endswith(("q_kv_a_proj", "q_b_proj")) and (cfg.q_lora_rank is None) == node.endswith("q_kv_a_proj"):
            # ... and the scores' softmax scale into the query's rope rows (rotation is linear).
            H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            heads = w[: H * (nope + rope)].reshape(H, nope + rope, -1)
            heads[:, nope:] /= np.float32(model.model.layers[0].self_attn.scaling)  # transformers' own
        if node.endswith("q_kv_a_proj"):
            base = node[: -len("q_kv_a_proj")]
            q_name = base + ("q_proj.weight" if cfg.q_lora_rank is None else "q_a_proj.weight")
            n = state[q_name].shape[0]
            state[q_name], state[base + "kv_a_proj_with_mqa.weight"] = w[:n], w[n:]
        elif node.endswith("gate_up_proj"):
            base = node[: -len("gate_up_proj")]
            n = w.shape[0] // 2
            state[base + "gate_proj.weight"], state[base + "up_proj.weight"] = w[:n], w[n:]
        else:
            assert node + ".weight" in state, node
            state[node + ".weight"] = w
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def oracle(model, path: Path):
    twin = copy.deepcopy(model)
    twin.load_state_dict(dequantized_state(model, path))
    return twin


# --- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ROUTING)
def test_parity_with_transformers_on_the_same_weights(exports, kind):
    model, path = exports(kind)
    toks = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 11))
    ref = hf_logits(oracle(model, path), toks)
    got = OnnxModel(path).forward(toks)
    assert rel_err(got, ref) < 1e-3
    # and the quantization did change the weights, so the oracle is not just the float model
    assert rel_err(hf_logits(model, toks), ref) > 1e-2


@pytest.mark.parametrize("block_size", [64, 128])
def test_widths_that_are_not_whole_blocks_are_padded(zoo, tmp_path, block_size):
    """hidden 64 and moe_intermediate 32 at block 64 (experts' intermediate padded) and 128 (both
    padded): the export runs and equals transformers on the weights it holds (the oracle also
    checks that the padding is zero)."""
    tiny = zoo.hf("v3")
    path = export(tiny.path, tmp_path / f"b{block_size}", bits=4, block_size=block_size, accuracy_level=0)
    toks = np.random.RandomState(5).randint(0, tiny.vocab_size, (2, 11))
    assert rel_err(OnnxModel(path).forward(toks), hf_logits(oracle(tiny.model, path), toks)) < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_decode_with_cache_equals_full_forward(exports, kind):
    model, path = exports(kind)
    om = OnnxModel(path)
    toks = np.random.RandomState(2).randint(0, model.config.vocab_size, (1, 10))
    full = om.forward(toks)
    cache = om.make_cache()
    steps = [om.forward(toks[:, :4], cache)] + [om.forward(toks[:, t : t + 1], cache) for t in range(4, 10)]
    assert cache.offset == 10
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5


def test_left_padded_batch_equals_single_runs(exports):
    model, path = exports("v3")
    om = OnnxModel(path)
    rs = np.random.RandomState(3)
    a, b = rs.randint(0, 160, 7), rs.randint(0, 160, 4)
    ids = np.zeros((2, 7), np.int64)
    ids[0], ids[1, 3:] = a, b
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    cache = om.make_cache(2)
    batch = om.forward(ids, cache, attention_mask=mask)
    nxt = np.array([[5], [9]])
    step = om.forward(nxt, cache)  # one decode step on the padded cache

    for row, seq in ((0, a), (1, b)):
        c = om.make_cache()
        single = om.forward(seq[None], c)
        assert rel_err(batch[row, -len(seq):], single[0]) < 1e-5
        assert rel_err(step[row], om.forward(nxt[row : row + 1], c)[0]) < 1e-5


def test_logits_to_keep_runs_the_head_on_the_last_positions(exports):
    _, path = exports("v2lite")
    om = OnnxModel(path)
    toks = np.arange(1, 9)[None]
    np.testing.assert_allclose(om.forward(toks, logits_to_keep=1), om.forward(toks)[:, -1:], rtol=1e-6, atol=1e-6)


def test_graph_interface_and_manifest(exports):
    model, path = exports("v3")
    cfg = model.config
    proto = onnx.load(str(path / "model.onnx"))
    inputs = {i.name for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    L = cfg.num_hidden_layers
    assert inputs == {"input_ids", "attention_mask", "position_ids", "logits_to_keep",
                      *(f"past_latent.{i}" for i in range(L))}
    assert set(outputs) == {"logits", *(f"present_latent.{i}" for i in range(L))}
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "QMoE", "RMSNormalization", "RotaryEmbedding"} <= ops
    manifest = json.loads((path / "onnx.json").read_text())
    assert manifest["latent_dim"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert manifest["inputs"]["past_latent.0"] == ["batch", 1, "past_seq", manifest["latent_dim"]]
    # every projection and the embedding are quantized: the only float matrices are the router, kv_b halves, RoPE tables
    init, _ = graph_weights(path)
    floats = [k for k, v in init.items() if v.dtype == np.float32 and v.ndim >= 2 and not k.endswith(".scales")]
    assert all(k.endswith(("gate.weight_t", ".w_uk", ".w_uv", "rope.cos", "rope.sin")) for k in floats), floats
    assert manifest["external_data"] == "model.onnx.data" and (path / "model.onnx.data").is_file()


def test_eight_bit_and_fast_accuracy_level(zoo, tmp_path):
    """8-bit, block 64 at accuracy level 0 is exact on its weights; level 4 (int8 activations) stays close."""
    tiny = zoo.hf("v3", hidden_size=128, moe_intermediate_size=64)
    toks = np.random.RandomState(4).randint(0, 160, (1, 9))
    exact = export(tiny.path, tmp_path / "q8", bits=8, block_size=64, accuracy_level=0)
    ref = hf_logits(oracle(tiny.model, exact), toks)
    assert rel_err(OnnxModel(exact).forward(toks), ref) < 1e-3
    fast = export(tiny.path, tmp_path / "q4l4", bits=4, block_size=64, accuracy_level=4)
    ref4 = hf_logits(oracle(tiny.model, fast), toks)
    assert rel_err(OnnxModel(fast).forward(toks), ref4) < 5e-2


# --- other sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("v3", "v2lite"))
def test_export_from_an_mlx_float_dir_equals_the_hf_export(zoo, exports, tmp_path, kind):
    """The mlx-lm layout (experts stacked, kv_b_proj split for deepseek_v3) maps back exactly."""
    _, from_hf = exports(kind)
    out = export(zoo.converted(kind, "none"), tmp_path / "onnx", bits=4, block_size=32, accuracy_level=0)
    a, _ = graph_weights(out)
    b, _ = graph_weights(from_hf)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_export_from_an_mlx_4bit_dir(tmp_path):
    """A 4-bit edge-ds dir (what the shipped default model is): at 8 bits the export adds little
    to the source's own quantization, so it runs like the MLX backend on that dir."""
    from converters.mlx import convert
    from edge_ds.loading import load_model
    from tests.test_quantized import run

    save_hf(condition(make_hf_model("v3", seed=7)), tmp_path / "hf")
    src = convert(tmp_path / "hf", tmp_path / "q4", quant="4bit", group_size=32, dtype="float32")
    out = export(src, tmp_path / "onnx", bits=8, block_size=32, accuracy_level=0)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    toks = np.random.RandomState(6).randint(0, 160, (1, 10))
    ref = run(load_model(src), toks)
    assert rel_err(OnnxModel(out).forward(toks), ref) < 3e-2


# --- FP8 sources ----------------------------------------------------------------------------------


def test_fp8_export_equals_bf16_export_up_to_fp8_rounding(tmp_path):
    model = condition(make_hf_model("v3", seed=21, **FP8_DIMS))
    save_hf(model, tmp_path / "float")
    original = np_load(str(tmp_path / "float" / "model.safetensors"))
    fp8_tensors, rounded = {}, {}
    for name, a in original.items():
        if is_fp8_weight(name, a):
            q, s = fp8_quantize(a)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = q, s
            rounded[name] = fp8_dequantize_loop(q, s)
        else:
            fp8_tensors[name] = rounded[name] = a
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    for name, tensors, extra in (("fp8", fp8_tensors, {"quantization_config": FP8_QUANT_CONFIG}),
                                 ("rounded", rounded, {})):
        d = tmp_path / name
        d.mkdir()
        _save_safetensors(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    opts = dict(bits=8, block_size=32, accuracy_level=0)
    from_fp8 = export(tmp_path / "fp8", tmp_path / "fp8.onnx", **opts)
    from_rounded = export(tmp_path / "rounded", tmp_path / "rounded.onnx", **opts)
    from_float = export(tmp_path / "float", tmp_path / "float.onnx", **opts)

    # The FP8 export holds exactly the export of the FP8 values dequantized with the 128x128 rule...
    a, _ = graph_weights(from_fp8)
    b, _ = graph_weights(from_rounded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # ...so it differs from the BF16/F32 original's export only by FP8 rounding.
    # The logits move by about what FP8 rounding moves transformers' (float weights vs FP8-rounded).
    # Both exports hold the same 8-bit embedding, so transformers' two models get it too.
    toks = np.random.RandomState(5).randint(0, 160, (1, 12))
    got, ref = OnnxModel(from_fp8).forward(toks), OnnxModel(from_float).forward(toks)
    init, attrs = graph_weights(from_float)
    embed = "model.embed_tokens.weight"
    table = unpack_blocks(init[embed + ".qweight"], init[embed + ".scales"], attrs["embed"]["bits"], 160)
    twins = []
    for weights in (original, rounded):
        twin = copy.deepcopy(model)
        twin.load_state_dict(transformers_state({**weights, embed: table}))
        twins.append(twin)
    rounding = rel_err(hf_logits(twins[1], toks), hf_logits(twins[0], toks))
    assert 0 < rel_err(got, ref) < 1.5 * rounding + 1e-2


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from tests.test_convert import to_torch
    from safetensors.torch import save_file

    save_file({k: to_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# --- API, CLI, bad input ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("onnx_api")
    save_hf(make_hf_model("v3", vocab_size=300, max_position_embeddings=64), base / "hf")
    add_tokenizer(base / "hf", 300)
    return export_onnx(base / "hf", base / "onnx", bits=4, block_size=32, accuracy_level=0)


def test_api_generates_the_full_forward_argmax(lm_dir):
    lm = edge_ds.load(lm_dir, backend="onnx")
    prompt = lm.tokenizer.encode("the quick brown fox")
    out = lm.generate(prompt, max_tokens=6)
    assert out.stats.generation_tokens + (out.stats.finish_reason == "stop") >= 1
    # onnxruntime's memory is not MLX's: the process peak RSS, at least the model file's size
    assert out.stats.peak_memory_gb * 1e9 >= (lm_dir / "model.onnx").stat().st_size
    seq = list(prompt)
    for t in out.tokens:
        assert int(lm.logits([seq])[0, -1].argmax()) == t
        seq.append(t)
    assert lm.logits([[1, 2, 3], [4, 5, 6]]).shape == (2, 3, 300)
    text = "".join(lm.stream("the lazy dog", max_tokens=4))
    assert isinstance(text, str)


def test_chat_turns_reuse_the_cache(lm_dir):
    lm = edge_ds.load(lm_dir, backend="onnx")
    chat = lm.chat()
    first = chat.send("the quick fox", max_tokens=3)
    "".join(first)
    held = chat.cache.offset
    second = chat.send("the dog", max_tokens=3)
    "".join(second)
    assert second.stats.prefilled_tokens < second.stats.prompt_tokens
    assert chat.cache.offset > held and chat.cache.offset == len(chat.cache.tokens)


def test_default_backend_rule(lm_dir, monkeypatch):
    from edge_ds import backends

    monkeypatch.setattr(backends.platform, "system", lambda: "Linux")
    monkeypatch.setattr(backends.platform, "machine", lambda: "x86_64")
    assert backends.default_backend(lm_dir) == "onnx"
    assert backends.default_backend(lm_dir.parent / "hf") == "mlx"
    monkeypatch.setattr(backends.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(backends.platform, "machine", lambda: "arm64")
    assert backends.default_backend(lm_dir) == "mlx"


def test_cli_generate_with_onnx_backend(lm_dir):
    r = subprocess.run([sys.executable, "-m", "edge_ds.cli", "generate", "--model", str(lm_dir), "--backend", "onnx",
                        "-p", "the quick", "--no-chat-template", "-m", "3", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _nan_source(src: Path, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    tensors = np_load(str(dst / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = np.nan
    _save_safetensors(tensors, dst / "model.safetensors")
    return "model.layers.1.self_attn.o_proj.weight"


def test_attention_bias_is_refused_before_writing(zoo, tmp_path):
    """The graph has no attention biases: a model with them is refused, not exported wrong."""
    import shutil

    src = tmp_path / "biased"
    shutil.copytree(zoo.hf("v3").path, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attention_bias"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeDSError, match="config.json.*attention_bias"):
        export_onnx(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["biased"]


def test_bad_input_fails_with_one_line_and_writes_nothing(zoo, tmp_path):
    src = zoo.hf("v3").path
    nan_src = tmp_path / "nan"
    tensor = _nan_source(src, nan_src)
    for args, message in (([str(nan_src), str(tmp_path / "a")], tensor),
                          ([str(tmp_path / "missing"), str(tmp_path / "c")], "not a directory")):
        r = subprocess.run([sys.executable, "-m", "edge_ds.cli", "export-onnx", *args], capture_output=True, text=True)
        assert r.returncode == 1
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr
        assert errors[0].startswith("edge-ds: error:") and message in errors[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]  # no DST, no partial directory


def test_bad_runtime_input(lm_dir, tmp_path):
    lm = edge_ds.load(lm_dir, backend="onnx")
    with pytest.raises(EdgeDSError, match="token_ids"):
        lm.logits([[300]])
    with pytest.raises(EdgeDSError, match="max_position_embeddings"):
        lm.generate(list(range(1, 60)), max_tokens=10)
    with pytest.raises(EdgeDSError, match="expert_budget"):  # the library names the argument; the CLI its flag
        edge_ds.load(lm_dir, backend="onnx", expert_budget="50%")
    with pytest.raises(EdgeDSError, match="onnx.json"):
        OnnxModel(lm_dir.parent / "hf")
    with pytest.raises(EdgeDSError, match="backend"):
        edge_ds.load(lm_dir, backend="tpu")


def test_readme_example_runs_the_exported_default_model(tmp_path):
    """The README's plain-onnxruntime example (no edge_ds imports) on the exported shipped model
    generates what the onnx backend generates greedily."""
    from edge_ds.resources import default_model_path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("Plain onnxruntime, no edge-ds code")[1].split("```python\n")[1].split("```")[0]
    assert "edge_ds" not in code and len(code.strip().splitlines()) <= 30
    out = export_onnx(default_model_path(), tmp_path / "tiny-onnx")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lm = edge_ds.load(out, backend="onnx")
    expected = lm.generate("In the beginning", max_tokens=40, chat_template=False).text
    assert r.stdout.strip() == expected.strip() and len(expected.split()) >= 5


def test_info_and_expert_budget_on_an_onnx_export(lm_dir, monkeypatch):
    """`info` reads an export (no safetensors) and says which backend runs it; an expert budget
    on it names what is missing instead of a missing-file error."""
    from edge_ds import backends
    from edge_ds.info import model_info

    monkeypatch.setattr(backends.platform, "system", lambda: "Linux")
    facts, hf = model_info(lm_dir), model_info(lm_dir.parent / "hf")
    assert facts["total_params"] == hf["total_params"] and facts["active_params"] == hf["active_params"]
    assert facts["quantization"]["bits"] == 4 and facts["bits_per_weight"] > 4  # scales and float kv_b count too
    assert facts["backend"] == "onnx" and "onnx export" in facts["backend_reason"]
    assert hf["backend"] == "mlx"
    with pytest.raises(EdgeDSError, match="expert_budget and trace need MLX weights"):
        edge_ds.load(lm_dir, expert_budget="50%")
    r = subprocess.run([sys.executable, "-m", "edge_ds.cli", "info", str(lm_dir)], capture_output=True, text=True)
    assert r.returncode == 0 and "backend: " in r.stdout, r.stderr


def test_convert_adds_the_fast_backend_off_apple_silicon(lm_dir, tmp_path):
    """`edge-ds convert` on a machine without Metal (this one) writes the ONNX export beside the MLX
    weights, and loading picks it with no flag; `--backend mlx` and lazy experts still run the MLX
    weights; --no-onnx writes MLX only."""
    from edge_ds import backends

    assert not backends.apple_silicon()  # CI and these machines: MLX on its CPU
    src = lm_dir.parent / "hf"
    both, mlx_only = tmp_path / "both", tmp_path / "mlx"
    for dst, extra in ((both, []), (mlx_only, ["--no-onnx"])):
        r = subprocess.run([sys.executable, "-m", "edge_ds.cli", "convert", str(src), str(dst), *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (both / "onnx.json").is_file() and not (mlx_only / "onnx.json").exists()
    assert not list(both.glob(".onnx-export-*"))  # the staging directory is gone
    lm = edge_ds.load(both)
    assert lm.backend.name == "onnx" and "onnx export" in lm.backend_reason
    assert edge_ds.load(mlx_only).backend.name == "mlx"
    assert edge_ds.load(both, backend="mlx").backend.name == "mlx"
    assert edge_ds.load(both, expert_budget="50%").backend.name == "mlx"
    prompt = lm.tokenizer.encode("the quick brown fox")
    ours = edge_ds.load(both).generate(prompt, max_tokens=5)
    assert ours.stats.generation_tokens + (ours.stats.finish_reason == "stop") >= 1


def test_convert_refuses_onnx_for_a_model_without_a_graph(zoo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge_ds.cli", "convert", str(zoo.hf("v32").path), str(tmp_path / "o"),
                        "--onnx"], capture_output=True, text=True)
    assert r.returncode != 0 and "deepseek_v32" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
