"""DeepSeek-V4 on the torch backend (edge_ds/backends/torch.py) against transformers'
DeepseekV4ForCausalLM (the oracle) on tests/tiny_v4.py's two checkpoints: float32 logits, cached
decode and a rewind, the MLX V4 model on the same checkpoint, `edge-ds parity` between the two,
and a V4 FP8 build (power-of-two E8M0 block scales, V4's FP8 names) dequantized like a loop
oracle and run with gemm fp8."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs the dev or torch extra")
pytest.importorskip("transformers", reason="the torch backend needs the dev or torch extra")

from edge_ds.backends import torch as torch_backend  # noqa: E402
from edge_ds.errors import EdgeDSError  # noqa: E402
from tiny_v4 import logits, make_v4, save_v4  # noqa: E402

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "Package.resources" / "edge-ds-tiny"
LENGTH = 40  # 5-6 sliding windows, 2-3 entries of the largest compression rate, past index_topk
TOKENS = np.random.default_rng(0).integers(0, 128, (2, LENGTH))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """kind -> (transformers float model, its checkpoint dir)."""
    root = tmp_path_factory.mktemp("torch_v4")
    return {kind: (m, save_v4(m, root / kind)) for kind, m in ((k, make_v4(k, seed=2)) for k in ("a", "b"))}


@pytest.mark.parametrize("kind", ["a", "b"])
def test_float_logits_match_transformers(v4, kind):
    """Hash layers (tid2eid), sinks, hyper-connections, compressors and indexers all loaded: float32
    logits equal transformers' full forward."""
    model, d = v4[kind]
    lm = torch_backend.load(d, device="cpu", gemm="bf16", dtype="float32")
    got = lm(TOKENS)
    want = logits(model, TOKENS)
    err = np.abs(got - want).max()
    print(f"\nV4 {kind}: torch backend vs transformers, max |logit difference| {err:.2e}")
    assert got.shape == (2, LENGTH, 128) and err < 1e-4
    assert any(hasattr(layer.mlp.gate, "tid2eid") for layer in lm.model.model.layers)


@pytest.mark.parametrize("kind", ["a", "b"])
def test_cache_decode_and_rewind(v4, kind):
    """Prefill, then one token at a time through transformers' V4 cache, equals the full forward's
    positions; a rewind (V4's pooled cache cannot be cropped: dropped and the held tokens recomputed)
    gives transformers' logits of the new sequence, and decoding goes on from there."""
    model, d = v4[kind]
    lm = torch_backend.load(d, device="cpu", gemm="bf16", dtype="float32")
    want = logits(model, TOKENS[:1])[0]
    cache = lm.make_cache()
    got = [lm(TOKENS[:1, :9], cache)[0, -1]]
    got += [lm(TOKENS[:1, i:i + 1], cache)[0, -1] for i in range(9, LENGTH)]
    err = max(np.abs(g - want[8 + i]).max() for i, g in enumerate(got))
    print(f"\nV4 {kind}: cached decode vs full forward {err:.2e}")
    assert cache.offset == LENGTH and err < 1e-5
    cache.tokens = TOKENS[0].tolist()
    assert cache.reuse_prefix(TOKENS[0, :21].tolist() + [7, 8]) == 21
    assert cache.offset == 21 and cache.held == 0  # nothing of transformers' cache survives
    seq = np.concatenate([TOKENS[:1, :21], [[7, 8]]], axis=1)
    again = [lm(np.array([[7, 8]]), cache)[0, -1]]
    for t in (3, 5):
        again.append(lm(np.array([[t]]), cache)[0, -1])
        seq = np.concatenate([seq, [[t]]], axis=1)
    ref = logits(model, seq)[0]
    assert max(np.abs(a - ref[22 + i]).max() for i, a in enumerate(again)) < 1e-5


def test_api_load_and_generate(v4, tmp_path):
    """edge_ds.load(..., backend="torch") on a V4 checkpoint through the generation loop: greedy
    tokens are transformers' full-forward argmax at every step."""
    import edge_ds

    model, d = v4["b"]
    model_dir = tmp_path / "with_tokenizer"
    shutil.copytree(d, model_dir)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, model_dir / name)
    lm = edge_ds.load(model_dir, backend="torch", device="cpu", gemm="bf16", dtype="float32")
    assert lm.backend.name == "torch" and lm.config.model_type == "deepseek_v4"
    prompt = [1, 5, 9, 33, 70]
    out = lm.generate(prompt, max_tokens=8, chat_template=False)
    seq = list(prompt)
    for t in out.tokens:
        assert t == int(np.argmax(logits(model, np.array([seq]))[0, -1]))
        seq.append(t)
    assert len(out.tokens) == 8 or out.stats.finish_reason == "stop"


def test_mlx_and_torch_agree(v4):
    """The MLX V4 runtime and the torch V4 backend on the same checkpoint, float32."""
    mx = pytest.importorskip("mlx.core")
    from edge_ds.loading import load_model

    for kind, (_, d) in v4.items():
        mlx_logits = np.array(load_model(d)(mx.array(TOKENS)))
        got = torch_backend.load(d, device="cpu", dtype="float32")(TOKENS)
        err = np.abs(got - mlx_logits).max()
        print(f"\nV4 {kind}: torch backend vs MLX runtime {err:.2e}")
        assert err < 1e-5


def test_bfloat16_router_scores_in_float32(v4):
    """bf16 activations: the V4 gate scores in float32 (DeepSeek's) while transformers' own router
    would score in bf16; its weights are those of the float32 gate on the same input."""
    _, d = v4["a"]
    lm = torch_backend.load(d, device="cpu", dtype="bfloat16")
    assert lm.router_fix == "float32 scores"
    layer = lm.model.model.layers[1]
    gate = layer.mlp.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert layer.attn_hc.fn.dtype == torch.float32 and layer.self_attn.sinks.dtype == torch.float32
    h = torch.randn(5, 64).bfloat16()
    logit, weights, idx = gate(h)
    assert logit.dtype == weights.dtype == torch.float32
    ref = torch.nn.functional.softplus(h.float() @ gate.weight.float().T).sqrt()  # sqrtsoftplus, V4's default
    chosen = (ref + gate.e_score_correction_bias).topk(2, dim=-1)[1]
    assert torch.equal(idx.sort(-1)[0], chosen.sort(-1)[0])
    w = ref.gather(1, idx)
    torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * lm.config.routed_scaling_factor)
    assert np.isfinite(lm(TOKENS[:1, :12])).all()


def deepseek_gate(scoring: str, scale: float, renormalise: bool | None = None):
    """DeepSeek's V4 Gate.forward (inference/model.py), as a forward for transformers' routers:
    float32 scores, choice by score + bias or tid2eid, weights from the unbiased scores, divided
    by their sum unless the scoring is softmax (renormalise=True: always, transformers' rule),
    times the scale."""
    renormalise = scoring != "softmax" if renormalise is None else renormalise

    def forward(self, hidden, input_ids=None):
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ self.weight.float().T
        scores = {"softmax": lambda x: x.softmax(-1), "sigmoid": torch.sigmoid,
                  "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt()}[scoring](logits)
        if input_ids is not None:
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            idx = (scores + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if renormalise:
            w = w / w.sum(-1, keepdim=True)
        return logits, w * scale, idx
    return forward


def test_softmax_scored_v4_follows_deepseeks_gate(v4, tmp_path, monkeypatch):
    """scoring_func softmax (no V4 release uses it; transformers' V4 cannot even build it): the
    chosen softmax scores are not renormalised in DeepSeek's gate. Oracle: transformers' model
    with DeepSeek's gate written here in place of its routers."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

    model, d = v4["a"]
    soft = tmp_path / "softmax"
    shutil.copytree(d, soft)
    cfg = json.loads((soft / "config.json").read_text())
    (soft / "config.json").write_text(json.dumps(dict(cfg, scoring_func="softmax")))
    lm = torch_backend.load(soft, device="cpu", dtype="float32")
    assert "no renormalisation" in lm.router_fix
    got = lm(TOKENS)
    as_saved = logits(model, TOKENS)  # transformers' own routers, sqrtsoftplus

    def run(*gate) -> np.ndarray:
        monkeypatch.setattr(hf.DeepseekV4TopKRouter, "forward", deepseek_gate(*gate))
        monkeypatch.setattr(hf.DeepseekV4HashRouter, "forward", deepseek_gate(*gate))
        return logits(model, TOKENS)

    scale = model.config.routed_scaling_factor
    assert np.abs(run(model.config.scoring_func, scale) - as_saved).max() < 1e-5  # the gate here is transformers' there
    want = run("softmax", scale)
    err = np.abs(got - want).max()
    print(f"\nV4 softmax gate: torch backend vs DeepSeek's gate {err:.2e}, vs renormalised "
          f"{np.abs(got - run('softmax', scale, True)).max():.2e}")
    assert err < 1e-4 and np.abs(run("softmax", scale, True) - want).max() > 1e-3


def test_official_layout_and_packed_fp4_refused(v4, tmp_path):
    """DeepSeek's release layout: one message naming the transformers-format checkpoint."""
    from safetensors.torch import save_file

    _, d = v4["a"]
    off = tmp_path / "official"
    off.mkdir()
    shutil.copy(d / "config.json", off / "config.json")
    save_file({"embed.weight": torch.zeros(128, 64), "layers.0.attn.wq_a.weight": torch.zeros(16, 64)},
              str(off / "model.safetensors"))
    with pytest.raises(EdgeDSError, match="official V4 release layout.*transformers-format"):
        torch_backend.load(off, device="cpu")
    # an integer (packed FP4) expert weight under transformers' names: named, not misread
    from safetensors.torch import load_file

    packed = tmp_path / "packed"
    packed.mkdir()
    shutil.copy(d / "config.json", packed / "config.json")
    state = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] // 2, dtype=torch.int8)
    save_file(state, str(packed / "model.safetensors"))
    with pytest.raises(EdgeDSError, match=f"{name}.*int8.*packed FP4"):
        torch_backend.load(packed, device="cpu")


# --- FP8 -------------------------------------------------------------------------------------

def e8m0(bits: np.ndarray) -> np.ndarray:
    """E8M0 codes -> float64: 2^(code - 127)."""
    return np.ldexp(1.0, bits.astype(np.int64) - 127)


def dequant_loop(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = np.empty(q.shape, np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            r, c = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[r, c] = q[r, c].astype(np.float32) * np.float32(s[i, j])
    return out


# V4's FP8 projections (DeepSeek's release): attention's q/kv/o, the indexer's q_b_proj, experts.
FP8_SUFFIXES = ("self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_proj.weight",
                "self_attn.o_a_proj.weight", "self_attn.o_b_proj.weight", "indexer.q_b_proj.weight",
                "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def is_v4_fp8(name: str) -> bool:
    return (name.startswith("model.layers.") and name.endswith(FP8_SUFFIXES)
            and not (".compressor." in name and not name.endswith("indexer.q_b_proj.weight")))


@pytest.fixture(scope="module")
def fp8_v4(tmp_path_factory):
    """A V4 model wider than one 128 block (hidden 160, experts 96 x 160, q_b 136 -> 128), its
    float checkpoint, the FP8 build write_fp8_checkpoint makes of it, and every stored tensor."""
    from safetensors import safe_open

    from edge_ds.datacenter import write_fp8_checkpoint

    root = tmp_path_factory.mktemp("torch_v4_fp8")
    model = make_v4("a", seed=5, hidden_size=160, q_lora_rank=136, moe_intermediate_size=96, o_lora_rank=72)
    src = save_v4(model, root / "float")
    dst = write_fp8_checkpoint(src, root / "fp8", shard_bytes=300_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(index.values()):
        with safe_open(str(dst / shard), "pt") as f:
            stored.update({n: f.get_tensor(n) for n in f.keys()})
    return model, src, dst, stored


def test_fp8_build_is_deepseeks_v4_layout(fp8_v4):
    """E4M3 exactly where DeepSeek's V4 release has it, power-of-two E8M0 block scales equal to the
    loop quantization, tid2eid unchanged, sinks/pooling biases/hyper-connections float32, the rest
    bf16, and quantization_config with scale_fmt ue8m0."""
    from safetensors.torch import load_file

    model, src, dst, stored = fp8_v4
    original = load_file(str(src / "model.safetensors"))
    fp8_names = {n for n in original if is_v4_fp8(n)}
    assert {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn} == fp8_names
    assert any(".indexer.q_b_proj." in n for n in fp8_names) and any(".o_a_proj." in n for n in fp8_names)
    for name in fp8_names:
        w = original[name].numpy()
        s = stored[name + "_scale_inv"]
        assert s.dtype == torch.float8_e8m0fnu, name
        scale = e8m0(s.view(torch.uint8).numpy())
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                amax = np.float32(np.abs(blk).max())
                want = 2.0 ** math.ceil(math.log2(float(amax / np.float32(448)))) if amax > 0 else 1.0
                assert scale[i, j] == want, (name, i, j)
                q = (blk / np.float32(want)).astype(FP8)
                got = stored[name].view(torch.uint8).numpy()[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                np.testing.assert_array_equal(got, q.view(np.uint8), err_msg=name)
    for name, t in original.items():
        if name in fp8_names:
            continue
        if name.endswith("tid2eid"):
            assert stored[name].dtype == t.dtype and torch.equal(stored[name], t)
        elif any(k in name for k in ("sinks", "position_bias", "_hc.", "hc_head", "e_score_correction_bias")):
            assert stored[name].dtype == torch.float32 and torch.equal(stored[name], t), name
        else:
            assert stored[name].dtype == torch.bfloat16, name
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]


def dequantized(stored: dict) -> dict[str, torch.Tensor]:
    """The FP8 build's tensors, e4m3 ones dequantized by the loop with E8M0 scales decoded here."""
    tensors = {}
    for n, t in stored.items():
        if n.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = e8m0(stored[n + "_scale_inv"].view(torch.uint8).numpy())
            tensors[n] = torch.from_numpy(dequant_loop(t.view(torch.uint8).numpy().view(FP8), s))
        else:
            tensors[n] = t if not t.is_floating_point() else t.float()
    return tensors


def fp8_oracle_linear(weight: np.ndarray):
    """DeepSeek's FP8 linear with ue8m0 activation scales, from the numpy oracle (act_oracle),
    float64 product of the dequantized operands, rounded to float32 then bf16."""
    from test_datacenter_fp8 import act_oracle

    w = weight.astype(np.float64)

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().reshape(-1, x.shape[-1]).numpy()
        q, s = act_oracle(flat, ue8m0=True)
        a = q.view(FP8).astype(np.float64) * np.repeat(s, 128, axis=1)[:, :flat.shape[1]]
        y = (a @ w.T).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        return torch.from_numpy(y).reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)

    return forward


def test_fp8_gemm_matches_model_level_oracle(fp8_v4):
    """gemm fp8 against transformers' V4 on the dequantized weights with every FP8 target except the
    grouped o_a_proj running the numpy FP8 linear, and routed experts the same with swiglu_limit's
    clamps written here: the two differ by float32 summation order only, FP8's own effect is
    far larger."""
    model, _, dst, stored = fp8_v4
    deq = dequantized(stored)
    oracle = make_v4("a", seed=0, hidden_size=160, q_lora_rank=136, moe_intermediate_size=96, o_lora_rank=72)
    oracle.load_state_dict(fuse_experts(deq), strict=True)
    float_logits = logits(oracle, TOKENS[:1, :24])
    limit = model.config.swiglu_limit
    for name, module in oracle.named_modules():
        if type(module) is torch.nn.Linear and is_v4_fp8(f"{name}.weight") and not name.endswith("o_a_proj"):
            module.forward = fp8_oracle_linear(deq[f"{name}.weight"].numpy())
        if name.endswith(".mlp.experts"):
            lin = [[fp8_oracle_linear(deq[f"{name}.{e}.{p}.weight"].numpy()) for p in ("gate_proj", "up_proj", "down_proj")]
                   for e in range(module.num_experts)]

            def experts(hidden, top_k_index, top_k_weights, lin=lin, act=module.act_fn):
                out = torch.zeros_like(hidden)
                for t in range(hidden.shape[0]):
                    for k in range(top_k_index.shape[1]):
                        g, u, dn = lin[int(top_k_index[t, k])]
                        x = hidden[t:t + 1]
                        out[t] += (dn(act(g(x).clamp(max=limit)) * u(x).clamp(-limit, limit)) * top_k_weights[t, k])[0]
                return out

            module.forward = experts
    want = logits(oracle, TOKENS[:1, :24])
    got = torch_backend.load(dst, device="cpu", gemm="fp8", dtype="float32")(TOKENS[:1, :24])
    err = float(np.abs(got - want).max() / np.abs(want).max())
    effect = float(np.abs(float_logits - want).max() / np.abs(want).max())
    print(f"\nV4 gemm fp8 vs model-level FP8 oracle: relative {err:.2e} (FP8's own effect {effect:.2e})")
    assert err < 2e-3 and effect > 10 * err


def fuse_experts(tensors: dict) -> dict:
    """Per-expert tensors -> transformers' fused gate_up_proj / down_proj."""
    tensors, fused = dict(tensors), {}
    for name in list(tensors):
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            fused.setdefault(prefix, {}).setdefault(int(e), {})[proj] = tensors.pop(name)
    for prefix, by_e in fused.items():
        tensors[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_e[e]["gate_proj"], by_e[e]["up_proj"]]) for e in sorted(by_e)])
        tensors[f"{prefix}.mlp.experts.down_proj"] = torch.stack([by_e[e]["down_proj"] for e in sorted(by_e)])
    return tensors


def test_fp8_dequantized_matches_loop_oracle_and_gemm_fp8_runs(fp8_v4):
    """gemm bf16, float32 activations: transformers' V4 holding the loop-dequantized tensors (experts
    fused by hand). gemm fp8: FP8 linears where the weight is e4m3 and the module a plain linear
    (routed experts as FP8Experts with swiglu_limit), o_a_proj (grouped) dequantized, the
    compressor's BF16 projections as stored; its logits near the dequantized model's."""
    from edge_ds.datacenter import FP8Experts, FP8Linear

    model, _, dst, stored = fp8_v4
    oracle = make_v4("a", seed=0, hidden_size=160, q_lora_rank=136, moe_intermediate_size=96, o_lora_rank=72)
    oracle.load_state_dict(fuse_experts(dequantized(stored)), strict=True)
    toks = TOKENS[:, :24] % 128
    want = logits(oracle, toks)
    deq = torch_backend.load(dst, device="cpu", gemm="bf16", dtype="float32")(toks)
    err = np.abs(deq - want).max()
    print(f"\nV4 FP8 build, gemm bf16 vs transformers on loop-dequantized weights {err:.2e}")
    assert err < 1e-4
    lm = torch_backend.load(dst, device="cpu", gemm="fp8", dtype="float32")
    assert lm.scale_fmt == "ue8m0"
    attn = lm.model.model.layers[1].self_attn
    assert isinstance(attn.q_b_proj, FP8Linear) and isinstance(attn.kv_proj, FP8Linear)
    assert isinstance(attn.compressor.indexer.q_b_proj, FP8Linear)
    assert not isinstance(attn.o_a_proj, FP8Linear) and not isinstance(attn.compressor.kv_proj, FP8Linear)
    experts = lm.model.model.layers[1].mlp.experts
    assert isinstance(experts, FP8Experts) and experts.limit == model.config.swiglu_limit
    assert isinstance(lm.model.model.layers[1].mlp.shared_experts.up_proj, FP8Linear)
    got = lm(toks)
    rel = float(np.abs(got - deq).max() / np.abs(deq).max())
    print(f"V4 FP8 build, gemm fp8 vs gemm bf16 (float32 activations): relative {rel:.2e}, "
          f"top-1 {(got.argmax(-1) == deq.argmax(-1)).mean():.2%}")
    assert np.isfinite(got).all() and 0 < rel < 0.1 and (got.argmax(-1) == deq.argmax(-1)).mean() > 0.8


# --- parity ----------------------------------------------------------------------------------

def test_parity_torch_reference_vs_mlx_v4(tmp_path):
    """`edge-ds parity`: the torch V4 reference (float32) against the MLX V4 build of the same
    checkpoint: KL ~0, top-1 100%."""
    pytest.importorskip("mlx.core")
    from click.testing import CliRunner

    from edge_ds.cli import main as cli

    d = save_v4(make_v4("b", seed=3, vocab_size=4096), tmp_path / "v4_4096")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, d / name)
    text = tmp_path / "text.txt"
    text.write_text((SHIPPED / "recipe" / "data" / "validation.txt").read_text(encoding="utf-8")[:3000],
                    encoding="utf-8")
    r = CliRunner().invoke(cli, ["parity", f"torch,gemm=bf16,dtype=float32:{d}", f"mlx:{d}", "--text", str(text),
                                 "--windows", "2", "--window", "32", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    cand = out["candidates"][0]
    print(f"\nV4 parity torch float32 -> MLX: KL mean {cand['kl_mean']:.2e}, max {cand['kl_max']:.2e}, "
          f"top-1 {cand['top1_agreement']:.2%}")
    assert out["reference_backend"] == "torch" and cand["backend"] == "mlx"
    assert cand["kl_max"] < 1e-8 and cand["top1_agreement"] == 1.0


def test_fp8_build_runs_without_ml_dtypes_or_mlx(fp8_v4, tmp_path):
    """A GPU image without MLX or ml_dtypes: safetensors' own reader (E8M0 scales as torch's
    float8_e8m0fnu), gemm fp8, the same logits as in this process."""
    import subprocess
    import sys

    _, _, dst, _ = fp8_v4
    toks = TOKENS[:1, :16]
    np.save(tmp_path / "tokens.npy", toks)
    code = ("import sys; sys.modules['ml_dtypes'] = None; sys.modules['mlx'] = None\n"
            "import numpy as np, torch; torch.set_num_threads(1)\n"
            "from edge_ds.backends import torch as tb\n"
            "lm = tb.load(sys.argv[1], device='cpu', gemm='fp8', dtype='float32')\n"
            "np.save(sys.argv[2], lm(np.load(sys.argv[3])))\n"
            "assert not [m for m in sys.modules if m.startswith(('mlx', 'ml_dtypes')) and sys.modules[m]]")
    out = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-c", code, str(dst), str(out), str(tmp_path / "tokens.npy")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(out), torch_backend.load(dst, device="cpu", gemm="fp8", dtype="float32")(toks))
