"""DeepSeek-V3.2 (deepseek_v32): DeepSeek Sparse Attention against transformers'
DeepseekV32ForCausalLM and an independent float64 numpy reference of the Lightning Indexer.

Top-k selection is discontinuous. Two correct implementations may pick different rows where the
k-th and (k+1)-th index scores tie or nearly tie (the ReLU makes exact ties at 0 common on random
weights), and one different row changes that position's output and, through the later layers,
every later position. So:
- every selection is checked against the reference wherever its k-th/(k+1)-th gap is clear,
  computed from the inputs that implementation's indexer actually received;
- logits are compared at the positions before the first near-tie anywhere in the model (where
  both implementations provably made the same choices), and the tests insist that those
  positions reach well past index_topk, so they cannot pass by comparing nothing.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
import torch

from edge_ds.cache import PromptCache
from edge_ds.loading import load_model
from edge_ds.models import indexer as edge_indexer
from tests.tiny_models import STYLES, hf_logits

KINDS = ("v32", "v32wide")
TOL = 1e-4
GAP = 1e-5  # a k-th/(k+1)-th score gap below GAP * max|score| of that query is a near-tie


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def tokens(vocab: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, length))


# --- what each implementation's indexer saw and chose ----------------------------------------

@dataclass
class Call:
    layer: int
    x: np.ndarray  # [L, D] the layer's attention input
    q_latent: np.ndarray  # [L, q_lora]
    offset: int  # position of the first query
    chosen: np.ndarray | None  # [L, topk] rows chosen, None: all


@contextmanager
def record_edge(model):
    """Every LightningIndexer call of our model, with its layer."""
    layer_of = {id(layer.self_attn.indexer): i for i, layer in enumerate(model.layers)}
    calls: list[Call] = []
    original = edge_indexer.LightningIndexer.__call__

    def spy(self, x, q_latent, keys, offset, mask):
        out = original(self, x, q_latent, keys, offset, mask)
        calls.append(Call(layer_of[id(self)], np.array(x[0]), np.array(q_latent[0]), offset,
                          None if out is None else np.array(out[0])))
        return out

    edge_indexer.LightningIndexer.__call__ = spy
    try:
        yield calls
    finally:
        edge_indexer.LightningIndexer.__call__ = original


@contextmanager
def record_hf():
    """Every DeepseekV32Indexer call of transformers (full forwards only)."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf

    calls: list[Call] = []
    original = hf.DeepseekV32Indexer.forward

    def spy(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids, past_key_values=None):
        out = original(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids,
                       past_key_values)
        calls.append(Call(self.layer_idx, hidden_states[0].detach().double().numpy(),
                          q_resid[0].detach().double().numpy(), 0, out[0].numpy()))
        return out

    hf.DeepseekV32Indexer.forward = spy
    try:
        yield calls
    finally:
        hf.DeepseekV32Indexer.forward = original


# --- the independent reference ----------------------------------------------------------------

def hf_rotary(hf_model, n: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' RoPE tables (half-split layout, YaRN's attention factor folded in) for positions 0..n-1."""
    x = torch.zeros(1, n, hf_model.config.hidden_size)
    cos, sin = hf_model.model.rotary_emb(x, torch.arange(n)[None])
    return cos[0].double().numpy(), sin[0].double().numpy()


def indexer_weights(source, layer: int) -> dict[str, np.ndarray]:
    """float64 indexer weights of one layer, from a transformers model or an edge-ds MLX model."""
    if isinstance(source, torch.nn.Module):
        ix, get = source.model.layers[layer].self_attn.indexer, lambda t: t.detach().double().numpy()
    else:
        ix, get = source.layers[layer].self_attn.indexer, lambda a: np.array(a.astype(mx.float32), np.float64)
    return {"wq_b": get(ix.wq_b.weight), "wk": get(ix.wk.weight), "k_norm_w": get(ix.k_norm.weight),
            "k_norm_b": get(ix.k_norm.bias), "weights_proj": get(ix.weights_proj.weight)}


def reference_scores(w: dict, x_all: np.ndarray, q_latent: np.ndarray, offset: int, cos: np.ndarray,
                     sin: np.ndarray, cfg: dict) -> np.ndarray:
    """index[l, t] = sum_h w[l, h] relu(q[l, h] . k[t]) / sqrt(H d), -inf past the query (float64).
    x_all [T, D]: the layer input of every row so far; q_latent [L, q_lora]: the queries' at offset."""
    H, d, r = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    L, T = q_latent.shape[0], x_all.shape[0]
    pos = np.arange(offset, offset + L)

    def rope(v, c, s):  # rotate the halves of the first r values
        a, b = v[..., : r // 2], v[..., r // 2 : r]
        return np.concatenate([v[..., :r] * c + np.concatenate([-b, a], -1) * s, v[..., r:]], -1)

    q = (q_latent.astype(np.float64) @ w["wq_b"].T).reshape(L, H, d)
    k = x_all.astype(np.float64) @ w["wk"].T
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6) * w["k_norm_w"] + w["k_norm_b"]
    q, k = rope(q, cos[pos][:, None], sin[pos][:, None]), rope(k, cos[:T], sin[:T])
    per_head = np.maximum(np.einsum("lhd,td->lht", q, k), 0) / np.sqrt(d)
    weights = x_all[pos].astype(np.float64) @ w["weights_proj"].T / np.sqrt(H)
    scores = np.einsum("lh,lht->lt", weights, per_head)
    scores[np.arange(T)[None] > pos[:, None]] = -np.inf
    return scores


@dataclass
class Verdict:
    checked: int  # queries whose selection was compared with the reference
    tied: int  # queries skipped as near-ties
    first_tie: int  # the first position with a near-tie in any layer (sequence length if none)
    chosen: dict  # (layer, position) -> the visible rows chosen


def first_difference(a: Verdict, b: Verdict, length: int) -> int:
    """The first position at which two runs chose different rows in some layer (length if none).
    Each run's choice equals the reference wherever that is not near-tied (check_selections), so
    they can part only at a near-tie; before it, their inputs and outputs must agree."""
    differ = [pos for key, rows in a.chosen.items() if b.chosen.get(key) != rows for pos in [key[1]]]
    return min(differ, default=length)


def check_selections(calls: list[Call], weights, cos, sin, cfg: dict, length: int) -> Verdict:
    """Every call's chosen rows against the reference computed from that call's own inputs."""
    topk = cfg["index_topk"]
    xs: dict[int, list[np.ndarray]] = {}
    checked = tied = 0
    first_tie = length
    chosen_at: dict = {}
    for c in calls:
        xs.setdefault(c.layer, []).append(c.x)
        x_all = np.concatenate(xs[c.layer])
        scores = reference_scores(weights(c.layer), x_all, c.q_latent, c.offset, cos, sin, cfg)
        for i, row in enumerate(scores):
            pos, visible = c.offset + i, c.offset + i + 1
            chosen = set(range(x_all.shape[0])) if c.chosen is None else set(c.chosen[i].tolist())
            chosen_at[c.layer, pos] = frozenset(r for r in chosen if r < visible)
            if visible <= topk:
                assert set(range(visible)) <= chosen, (c.layer, pos)  # dense: every visible row
                continue
            order = np.argsort(-row)
            gap = row[order[topk - 1]] - row[order[topk]]
            if gap <= GAP * np.abs(row[np.isfinite(row)]).max():
                tied += 1
                first_tie = min(first_tie, pos)
                continue
            assert chosen == set(order[:topk].tolist()), (c.layer, pos, sorted(chosen ^ set(order[:topk])))
            checked += 1
    return Verdict(checked, tied, first_tie, chosen_at)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v32(zoo):
    """kind -> (tiny transformers model, its HF dir, edge-ds float model of the converted dir)."""
    return {k: (zoo.hf(k), load_model(zoo.converted(k, "none", "float32"))) for k in KINDS}


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_dense_up_to_index_topk(v32, kind):
    """Up to index_topk rows the indexer keeps everything: V3.2 is V3, to 1e-4."""
    tiny, model = v32[kind]
    topk = STYLES[kind]["index_topk"]
    toks = np.concatenate([tokens(tiny.vocab_size, topk, seed=s) for s in range(2)])
    with record_edge(model) as calls:
        got = np.array(model(mx.array(toks)))
    assert calls and all(c.chosen is None for c in calls)
    assert rel_err(got, hf_logits(tiny.model, toks)) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_selection_and_logits_beyond_index_topk(v32, kind):
    """4x index_topk and more: both implementations' selections equal the reference wherever it
    is not near-tied, and the logits agree to 1e-4 before the two first choose differently."""
    tiny, model = v32[kind]
    cfg = STYLES[kind]
    topk, length = cfg["index_topk"], 4 * cfg["index_topk"] + 8
    toks = tokens(tiny.vocab_size, length, seed=1)
    cos, sin = hf_rotary(tiny.model, length)
    with record_edge(model) as ours:
        got = np.array(model(mx.array(toks)))[0]
    with record_hf() as theirs:
        ref = hf_logits(tiny.model, toks)[0]
    mine = check_selections(ours, lambda l: indexer_weights(model, l), cos, sin, cfg, length)
    hf = check_selections(theirs, lambda l: indexer_weights(tiny.model, l), cos, sin, cfg, length)
    print(f"\n{kind}: selections checked {mine.checked} (near-ties {mine.tied}, first at {mine.first_tie}); "
          f"transformers {hf.checked} ({hf.tied}, {hf.first_tie})")
    beyond = cfg["num_hidden_layers"] * (length - topk)
    assert mine.checked >= 0.8 * beyond and hf.checked >= 0.8 * beyond
    parted = first_difference(mine, hf, length)
    assert parted >= 2 * topk, "the two part too early for this test to mean much"
    assert rel_err(got[:parted], ref[:parted]) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_agree(v32, kind):
    """Token-by-token decode chooses what the reference chooses from its inputs, and matches the
    prefill's logits before the two first choose differently."""
    tiny, model = v32[kind]
    cfg = STYLES[kind]
    topk, length = cfg["index_topk"], 4 * cfg["index_topk"] + 4
    toks = tokens(tiny.vocab_size, length, seed=2)
    cos, sin = hf_rotary(tiny.model, length)
    with record_edge(model) as prefill_calls:
        whole = np.array(model(mx.array(toks), cache=PromptCache(len(model.layers))))[0]
    prefilled = check_selections(prefill_calls, lambda l: indexer_weights(model, l), cos, sin, cfg, length)
    cache = PromptCache(len(model.layers))
    with record_edge(model) as calls:
        steps = [np.array(model(mx.array(toks[:, :3]), cache=cache))[0]]
        steps += [np.array(model(mx.array(toks[:, i:i + 1]), cache=cache))[0] for i in range(3, length)]
    stepped = np.concatenate(steps)
    verdict = check_selections(calls, lambda l: indexer_weights(model, l), cos, sin, cfg, length)
    print(f"\n{kind}: decode selections checked {verdict.checked}, near-ties {verdict.tied}")
    assert verdict.checked >= 0.8 * cfg["num_hidden_layers"] * (length - topk)
    parted = first_difference(verdict, prefilled, length)
    assert parted >= 2 * topk, "prefill and decode part too early for this test to mean much"
    assert rel_err(stepped[:parted], whole[:parted]) < TOL


def test_greedy_64_tokens_match_transformers(v32):
    """64 greedy tokens (context past 8x index_topk) equal transformers' generate(), unless the
    two part where a near-tie in a selection or in the top two logits is shown."""
    kind = "v32"
    tiny, model = v32[kind]
    cfg = STYLES[kind]
    prompt = tokens(tiny.vocab_size, 6, seed=3)
    with torch.no_grad():
        theirs = tiny.model.generate(torch.tensor(prompt), max_new_tokens=64, do_sample=False,
                                     min_new_tokens=64)[0, 6:].tolist()
    cache, ours = PromptCache(len(model.layers)), []
    logits = model(mx.array(prompt), cache=cache)[:, -1]
    for _ in range(64):
        t = int(mx.argmax(logits, axis=-1).item())
        ours.append(t)
        logits = model(mx.array([[t]]), cache=cache)[:, -1]
    print(f"\ngreedy: {sum(a == b for a, b in zip(ours, theirs))} of 64 tokens equal")
    if ours == theirs:
        return
    j = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    seq = np.concatenate([prompt, np.array([theirs[:j]])], axis=1)
    cos, sin = hf_rotary(tiny.model, seq.shape[1])
    with record_hf() as calls:
        last = hf_logits(tiny.model, seq)[0, -1]
    verdict = check_selections(calls, lambda l: indexer_weights(tiny.model, l), cos, sin, cfg, seq.shape[1])
    top2 = np.sort(last)[-2:]
    assert verdict.tied > 0 or top2[1] - top2[0] < 1e-4 * np.abs(last).max(), \
        f"greedy parted at token {j} with no near-tie shown"


def test_4bit_build_matches_its_dequantized_weights(zoo):
    """A 4-bit V3.2 (indexer projections quantized too) equals transformers running the very
    weights the 4-bit dir holds, dequantized independently, to 1e-3 before the first near-tie."""
    from tests.test_quantized import dequantized_hf_state
    from tests.tiny_models import condition, make_hf_model

    kind = "v32"
    cfg = STYLES[kind]
    wide = dict(hidden_size=128, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32,
                intermediate_size=128, moe_intermediate_size=64, index_head_dim=64)
    dst = zoo.converted(kind, "4bit", "float32", group_size=32, **wide)
    ref_model = condition(make_hf_model(kind, **wide))
    ref_model.load_state_dict(dequantized_hf_state(dst, ref_model), strict=True)
    q = json.loads((dst / "config.json").read_text())
    model = load_model(dst)
    assert "scales" in model.layers[1].self_attn.indexer.wq_b  # the indexer runs quantized too
    length = 4 * cfg["index_topk"] + 8
    toks = tokens(q["vocab_size"], length, seed=4)
    cos, sin = hf_rotary(ref_model, length)
    with record_hf() as calls:
        ref = hf_logits(ref_model, toks)[0]
    verdict = check_selections(calls, lambda l: indexer_weights(ref_model, l), cos, sin, dict(cfg, **wide), length)
    clean = verdict.first_tie  # the 4-bit model's own indexer scores differ from the reference's by rounding
    assert clean >= 2 * cfg["index_topk"]
    got = np.array(model(mx.array(toks)))[0]
    assert rel_err(got[:clean], ref[:clean]) < 1e-3


def test_lazy_experts_bit_identical_at_10_percent(zoo):
    from edge_ds.experts import attach_experts

    dst = zoo.converted("v32", "4bit", "float32", group_size=32, n_routed_experts=16)  # 10%: 3 of 32 experts
    toks = tokens(160, 40, seed=5)
    resident = load_model(dst)
    lazy = load_model(dst, routed_experts=False)
    experts = attach_experts(lazy, dst, "10%")
    outs = []
    for model in (resident, lazy):
        cache = PromptCache(len(model.layers))
        out = [np.array(model(mx.array(toks[:, :20]), cache=cache))]
        out += [np.array(model(mx.array(toks[:, i:i + 1]), cache=cache)) for i in range(20, 40)]
        outs.append(np.concatenate(out, axis=1))
    assert experts.stats.misses and sum(experts.stats.misses.values()) > 0  # experts were paged in
    np.testing.assert_array_equal(outs[1], outs[0])


def test_info_counts_the_index_key_cache(zoo):
    from edge_ds.info import model_info

    facts = model_info(zoo.converted("v32", "none", "float32"))
    cfg = STYLES["v32"]
    row = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] + cfg["index_head_dim"]
    assert facts["family"] == "DeepSeek-V3.2"
    assert facts["cache_bytes_per_token"] == cfg["num_hidden_layers"] * row * 4


def test_onnx_export_refuses_v32(zoo, tmp_path):
    from converters.onnx import export_onnx
    from edge_ds.errors import EdgeDSError

    with pytest.raises(EdgeDSError, match="deepseek_v32.*sparse attention"):
        export_onnx(zoo.hf("v32").path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp8_checkpoint_converts_to_its_dequantized_weights(zoo, tmp_path):
    """V3.2 ships FP8 128x128 like V3, the indexer's wq_b and wk included (weights_proj stays
    BF16): the converted model equals transformers on the block-dequantized weights."""
    from safetensors.numpy import load_file

    from converters.mlx import convert
    from tests.test_convert import fp8_dequantize_loop, fp8_quantize, transformers_state, write_shards
    from tests.tiny_models import make_hf_model

    tiny = zoo.hf("v32")
    original = load_file(str(tiny.path / "model.safetensors"))
    fp8_names = [n for n, a in original.items() if n.startswith("model.layers.") and a.ndim == 2
                 and (n.endswith(("_proj.weight", "_proj_with_mqa.weight", "indexer.wq_b.weight", "indexer.wk.weight")))
                 and not n.endswith("weights_proj.weight")]
    assert any("indexer.wq_b" in n for n in fp8_names) and any("indexer.wk" in n for n in fp8_names)
    tensors, fp8 = dict(original), {}
    for name in fp8_names:
        fp8[name] = fp8_quantize(original[name])
        tensors[name], tensors[name + "_scale_inv"] = fp8[name]
    src = tmp_path / "fp8"
    src.mkdir()
    write_shards(src, tensors, {n: 0 for n in tensors}, 1)
    cfg = json.loads((tiny.path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    model = load_model(convert(src, tmp_path / "out", quant="none", dtype="float32"))

    oracle = make_hf_model("v32", seed=7)
    oracle.load_state_dict(transformers_state(
        {k: fp8_dequantize_loop(*fp8[k]) if k in fp8 else a for k, a in original.items()}), strict=True)
    length = 4 * STYLES["v32"]["index_topk"] + 8
    toks = tokens(tiny.vocab_size, length, seed=6)
    cos, sin = hf_rotary(oracle, length)
    with record_hf() as calls:
        ref = hf_logits(oracle, toks)[0]
    clean = check_selections(calls, lambda l: indexer_weights(oracle, l), cos, sin, STYLES["v32"], length).first_tie
    assert clean >= 2 * STYLES["v32"]["index_topk"]
    assert rel_err(np.array(model(mx.array(toks)))[0][:clean], ref[:clean]) < TOL


def test_api_generates_with_lazy_experts_and_a_trace(zoo, tmp_path):
    """The whole runtime on V3.2 past index_topk: load() with an expert budget and a routing trace
    generates exactly what the resident model generates."""
    import shutil

    import edge_ds
    from edge_ds.experts.trace import load_trace
    from tests.test_api import add_tokenizer

    src = zoo.converted("v32", "4bit", "float32", group_size=32, n_routed_experts=16, vocab_size=300)
    model_dir = tmp_path / "v32"
    shutil.copytree(src, model_dir)
    add_tokenizer(model_dir, 300)
    prompt = "the quick brown fox jumps over the lazy dog"  # longer than index_topk once encoded
    ref = edge_ds.load(model_dir).generate(prompt, max_tokens=24, chat_template=False)
    lm = edge_ds.load(model_dir, expert_budget="25%", trace=tmp_path / "t.jsonl")
    out = lm.generate(prompt, max_tokens=24, chat_template=False)
    assert out.stats.prompt_tokens + 24 > 2 * STYLES["v32"]["index_topk"]
    assert out.tokens == ref.tokens and lm.expert_stats()["misses"] > 0
    lm.experts.recorder.close()
    assert len(load_trace(tmp_path / "t.jsonl").steps) > 0
