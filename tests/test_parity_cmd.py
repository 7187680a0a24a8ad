"""`edge-ds parity` (edge_ds/parity.py): its figures against metrics computed independently here
(torch float64 KL, argmax, NLL) from the reference's and candidate's logits on the same windows;
the table and --json; specs; one clear error for a candidate of another vocabulary, a missing
directory and an empty text."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs the dev or torch extra")
pytest.importorskip("transformers", reason="the torch backend needs the dev or torch extra")

from click.testing import CliRunner  # noqa: E402

from edge_ds.cli import main as cli  # noqa: E402
from tiny_models import condition, make_hf_model, save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "Package.resources" / "edge-ds-tiny"
TEXT = (SHIPPED / "recipe" / "data" / "validation.txt").read_text(encoding="utf-8")[:6000]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A V3-style HF checkpoint with the shipped tokenizer (vocab 4096), its 4-bit MLX conversion,
    a model of another vocabulary, and a text file."""
    from converters.mlx import convert

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parity")
    hf = save_hf(condition(make_hf_model("v3", seed=4, vocab_size=4096)), root / "hf")
    other = save_hf(condition(make_hf_model("v3", seed=4, vocab_size=4000)), root / "other_vocab")
    for d in (hf, other):
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(SHIPPED / name, d / name)
    convert(str(hf), str(root / "mlx4"), quant="4bit")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"hf": hf, "mlx4": root / "mlx4", "other": other, "text": text, "root": root}


def oracle_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> dict:
    """KL(ref || cand), top-1 agreement and both perplexities with torch in float64."""
    p = torch.log_softmax(torch.from_numpy(ref_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(cand_logits).double(), -1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # [N, T]
    t = torch.from_numpy(targets)[..., None]
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
            "ref_ppl": math.exp(float(-p.gather(-1, t).mean())), "ppl": math.exp(float(-q.gather(-1, t).mean())),
            "worst": np.unravel_index(int(kl.argmax()), kl.shape)}


def test_parity_figures_match_independent_metrics(dirs):
    import edge_ds
    from edge_ds.parity import parity

    ref = edge_ds.load(dirs["hf"], backend="torch", device="cpu", gemm="bf16", dtype="float32")
    cand = edge_ds.load(dirs["mlx4"], backend="mlx")
    report = parity(ref, [cand], TEXT, window=32, windows=5)
    # the oracle's windows: BOS + text, 33 tokens each, sharing one token at each seam
    ids = ref.tokenizer.encode(TEXT)
    win = np.array([ids[i * 32:i * 32 + 33] for i in range(5)])
    ref_logits = np.concatenate([ref.logits(w[None, :-1]) for w in win])
    cand_logits = np.concatenate([cand.logits(w[None, :-1]) for w in win])
    want = oracle_metrics(ref_logits, cand_logits, win[:, 1:])
    c = report.candidates[0]
    assert report.tokens == 160 and report.windows == 5
    assert c.kl_mean == pytest.approx(want["kl_mean"], rel=1e-5)
    assert c.kl_max == pytest.approx(want["kl_max"], rel=1e-5)
    assert c.top1_agreement == pytest.approx(want["top1"])
    assert report.reference_perplexity == pytest.approx(want["ref_ppl"], rel=1e-6)
    assert c.perplexity == pytest.approx(want["ppl"], rel=1e-6)
    assert c.perplexity_gap == pytest.approx(want["ppl"] / want["ref_ppl"] - 1, rel=1e-5, abs=1e-9)
    assert (c.worst_window, c.worst_position) == tuple(int(x) for x in want["worst"])
    assert c.kl_mean > 1e-4  # 4-bit weights do move the distribution: the test can see a difference
    # the reference against itself: zero divergence, full agreement
    same = parity(ref, [ref], TEXT, window=32, windows=2).candidates[0]
    assert same.kl_max < 1e-9 and same.top1_agreement == 1.0 and abs(same.perplexity_gap) < 1e-12


def test_cli_table_and_json(dirs):
    hf, mlx4, text = str(dirs["hf"]), str(dirs["mlx4"]), str(dirs["text"])
    start = time.perf_counter()
    r = CliRunner().invoke(cli, ["parity", hf, mlx4, f"torch,gemm=bf16,dtype=float32:{hf}", "--text", text,
                                 "--windows", "3", "--window", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "| candidate | backend | KL mean |" in r.stdout and f"| mlx:{mlx4} | mlx |" in r.stdout
    assert "gemm fp8" in r.stdout  # the reference's default: DeepSeek's FP8 GEMM where weights are FP8
    r = CliRunner().invoke(cli, ["parity", hf, mlx4, "--text", text, "--windows", "2", "--window", "32", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["windows"] == 2 and out["tokens"] == 64 and out["reference_backend"] == "torch"
    assert [c["backend"] for c in out["candidates"]] == ["mlx"]
    assert set(out["candidates"][0]) >= {"kl_mean", "kl_max", "top1_agreement", "perplexity", "perplexity_gap",
                                         "worst_window", "worst_position"}
    assert time.perf_counter() - start < 60


def test_specs():
    from edge_ds.parity import parse_spec

    s = parse_spec("torch,gemm=fp8,dtype=float32:/x/y", None, device="cpu")
    assert (s.backend, s.options, str(s.path)) == ("torch", {"device": "cpu", "gemm": "fp8", "dtype": "float32"},
                                                   "/x/y")
    assert parse_spec("mlx:/x/y", None, device="cpu").options == {}
    assert parse_spec("/nowhere", "torch", gemm="fp8").options == {"gemm": "fp8"}


@pytest.mark.parametrize("case", ["other_vocab", "missing_dir", "empty_text", "no_candidate", "no_fp8_build"])
def test_bad_input_is_one_clear_error(dirs, case, monkeypatch):
    hf, text = str(dirs["hf"]), str(dirs["text"])
    empty = dirs["root"] / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    args, want = {
        "other_vocab": ([hf, str(dirs["other"]), "--text", text], "vocabulary of 4000 tokens, the reference's has 4096"),
        "missing_dir": ([hf, str(dirs["root"] / "nope"), "--text", text], "nope: no such model directory"),
        "empty_text": ([hf, str(dirs["mlx4"]), "--text", str(empty)], "empty.txt: the text is empty"),
        "no_candidate": ([hf], "give at least one CAND"),
        "no_fp8_build": ([], "edge-ds-tiny-fp8: no datacenter build of the shipped model here; give REF and CAND"),
    }[case]
    if case == "no_fp8_build":  # an installation without the FP8 build (a resources folder without it)
        monkeypatch.setattr("edge_ds.parity.resources_dir", lambda: dirs["root"])
    r = CliRunner().invoke(cli, ["parity", *args])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-ds: error: ") and want in lines[0], r.stderr


def test_shipped_model_same_weights_on_two_runtimes(tmp_path):
    """The shipped 4-bit weights, dequantized exactly into a Hugging Face checkpoint, on torch
    (transformers' modules, float32) against the shipped MLX build: only arithmetic differs, so
    parity must find (almost) nothing; then the FP8 build of those weights does differ."""
    import edge_ds
    from edge_ds.datacenter import write_fp8_checkpoint
    from edge_ds.parity import parity

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shipped_parity import mlx_to_hf_float

    float_dir = mlx_to_hf_float(SHIPPED, tmp_path / "float-of-4bit")
    ref = edge_ds.load(float_dir, backend="torch", device="cpu", dtype="float32")
    shipped = edge_ds.load(SHIPPED, backend="mlx")
    same = parity(ref, [shipped], TEXT, window=64, windows=2).candidates[0]
    assert same.kl_max < 1e-8 and same.top1_agreement == 1.0 and abs(same.perplexity_gap) < 1e-6
    fp8 = edge_ds.load(write_fp8_checkpoint(float_dir, tmp_path / "fp8"), backend="torch", device="cpu", gemm="fp8")
    moved = parity(fp8, [shipped], TEXT, window=64, windows=2).candidates[0]
    assert 1e-5 < moved.kl_mean < 0.05 and moved.top1_agreement > 0.9


FP8_BUILD = ROOT / "Package.resources" / "edge-ds-tiny-fp8"


def _dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """DeepSeek's weight_dequant, written out: each 128x128 block (ragged at the edges) times its scale."""
    rows = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[: q.shape[0], : q.shape[1]]
    return q.astype(np.float64) * rows


def test_shipped_fp8_build_is_deepseeks_layout_of_the_trained_weights():
    """The FP8 build in Package.resources is DeepSeek's layout (e4m3 projections, float32 scales of
    ceil(out/128) x ceil(in/128), DeepSeek's quantization_config) and holds the same trained weights
    as the shipped 4-bit build: both round one float model, so every weight of one is within the
    sum of the two rounding errors of the other's (a 4-bit step is far coarser than that margin
    for unrelated weights)."""
    import ml_dtypes
    import mlx.core as mx
    from safetensors import safe_open

    cfg = json.loads((FP8_BUILD / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    fp8: dict[str, np.ndarray] = {}
    for f in sorted(FP8_BUILD.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                fp8[k] = (t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn
                          else t.float().numpy())
    q4: dict[str, mx.array] = {}
    for f in sorted(SHIPPED.glob("model*.safetensors")):
        q4.update(mx.load(str(f)))
    quant = json.loads((SHIPPED / "config.json").read_text())["quantization"]
    group, bits = quant["group_size"], quant["bits"]
    checked = 0
    for name, q in fp8.items():
        if q.dtype != ml_dtypes.float8_e4m3fn:
            continue
        scale = fp8[name + "_scale_inv"]
        assert scale.dtype == np.float32 and scale.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128)), name
        w8 = _dequantize_fp8(q, scale)
        module = name.removesuffix(".weight")
        if ".mlp.experts." in module:  # MLX stacks routed experts: switch_mlp.{proj}.weight [E, out, in]
            layer, rest = module.split(".mlp.experts.")
            e, proj = rest.split(".")
            mlx_module, index = f"{layer}.mlp.switch_mlp.{proj}", (int(e),)
        elif ".kv_b_proj" in module:  # split into embed_q / unembed_out by the converter
            continue
        else:
            mlx_module, index = module, ()
        w = q4[mlx_module + ".weight"]
        if mlx_module + ".scales" in q4:
            s, b = q4[mlx_module + ".scales"], q4[mlx_module + ".biases"]
            if index:
                w, s, b = w[index], s[index], b[index]
            w4 = np.array(mx.dequantize(w, s, b, group_size=group, bits=bits).astype(mx.float32), np.float64)
            step = np.abs(np.repeat(np.array(s.astype(mx.float32), np.float64), group, axis=-1))  # one 4-bit step
        else:  # kept in float by the converter (an input width that is not a multiple of the group)
            w4 = np.array((w[index] if index else w).astype(mx.float32), np.float64)
            step = np.zeros_like(w4)
        # |q4 - w| <= one step (MLX's affine grid is shifted to hold 0 exactly, so not always half a
        # step); |fp8 - w| <= 2^-4 |w| (3 mantissa bits) + half an e4m3 subnormal step.
        margin = step + 2.0**-4 * np.abs(w8) / (1 - 2.0**-4) + 2.0**-10 * scale.max()
        assert np.all(np.abs(w8 - w4) <= margin * 1.0001), name
        # Rounding errors average a quarter step; unrelated weights would differ by several steps.
        if step.any():
            assert np.mean(np.abs(w8 - w4)) < 0.4 * np.mean(step), (name, np.mean(np.abs(w8 - w4)) / np.mean(step))
        checked += 1
    assert checked >= 40


def test_parity_with_no_arguments_compares_the_shipped_builds():
    """`edge-ds parity` alone: the FP8 build on torch (gemm fp8) against the shipped 4-bit MLX build
    and its ONNX export."""
    r = CliRunner().invoke(cli, ["parity", "--windows", "2", "--window", "64", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["reference"].endswith("edge-ds-tiny-fp8") and out["reference_backend"] == "torch"
    assert [c["backend"] for c in out["candidates"]] == ["mlx", "onnx"]
    for c in out["candidates"]:
        # The same trained model: unrelated weights would disagree on most tokens (KL of nats).
        assert c["kl_mean"] < 0.05 and c["top1_agreement"] > 0.85 and abs(c["perplexity_gap"]) < 0.05, c


def test_guess_backend(dirs, tmp_path):
    from edge_ds.parity import guess_backend

    assert guess_backend(dirs["hf"]) == "torch" and guess_backend(dirs["mlx4"]) == "mlx"
    assert guess_backend(tmp_path) is None  # nothing there: load() says what is missing
    both = tmp_path / "both"
    shutil.copytree(dirs["mlx4"], both)
    (both / "onnx.json").write_text("{}")
    assert guess_backend(both) is None  # an export beside mlx-lm weights: load()'s default choice
    (tmp_path / "onnx_only").mkdir()
    shutil.copy(dirs["mlx4"] / "config.json", tmp_path / "onnx_only" / "config.json")
    (tmp_path / "onnx_only" / "onnx.json").write_text("{}")
    assert guess_backend(tmp_path / "onnx_only") == "onnx"
