"""DeepSeek-V4 on the MLX runtime against transformers' DeepseekV4ForCausalLM (float32, eager).

CSA layers choose index_topk compressed entries per query; top-k is discontinuous, so where the
oracle's k-th and (k+1)-th scores are (near-)tied two correct kernels may choose differently and
everything after may differ. The tests compare selected sets and logits up to the first such
near-tie, report where it is, and require it to leave most of the sequence checked.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
import torch

from edge_ds.loading import load_model
from edge_ds.models import compressor as edge_compressor
from tests.tiny_v4 import STYLES, logits, make_v4, save_v4

TOL = 1e-4
GAP = 1e-6  # a k-th/(k+1)-th index-score gap below GAP * max|score| is a near-tie
LENGTH = 96  # 12 to 16 sliding windows, 6 to 12 of the largest compression rate


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def tokens(vocab: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, length))


@contextmanager
def record_hf():
    """transformers' CSA choices per call: (scores [S, T], chosen [S, k] with -1 for none), in layer order."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

    calls, scores = [], []
    forward, scorer = hf.DeepseekV4Indexer.forward, hf.DeepseekV4IndexerScorer.forward

    def spy_scorer(self, *args, **kwargs):
        out = scorer(self, *args, **kwargs)
        scores.append(out[0].double().numpy())
        return out

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append((scores[-1], out[0].numpy()))
        return out

    hf.DeepseekV4Indexer.forward, hf.DeepseekV4IndexerScorer.forward = spy, spy_scorer
    try:
        yield calls
    finally:
        hf.DeepseekV4Indexer.forward, hf.DeepseekV4IndexerScorer.forward = forward, scorer


@contextmanager
def record_edge():
    """Our CSA choices per prefill call: the entries each query attends to, in layer order."""
    calls = []
    original = edge_compressor.Compressor.__call__

    def spy(self, *args):
        entries, seen = original(self, *args)
        if self.csa and entries is not None:
            calls.append(np.array(seen[0]) == 0)  # [L, T] chosen and visible
        return entries, seen

    edge_compressor.Compressor.__call__ = spy
    try:
        yield calls
    finally:
        edge_compressor.Compressor.__call__ = original


def first_near_tie(calls, topk: int, m_of_call: list[int]) -> int:
    """The first position where some CSA layer's oracle scores are near-tied at the top-k boundary."""
    first = LENGTH
    for (scores, _), m in zip(calls, m_of_call):
        for p, row in enumerate(scores):
            visible = row[: (p + 1) // m]
            if len(visible) <= topk:
                continue
            s = np.sort(visible)[::-1]
            if s[topk - 1] - s[topk] <= GAP * np.abs(s).max():
                first = min(first, p)
                break
    return first


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """kind -> (transformers model, its HF dir, edge-ds float model)."""
    out = {}
    for kind in STYLES:
        hf = make_v4(kind)
        path = save_v4(hf, tmp_path_factory.mktemp(f"v4{kind}"))
        out[kind] = (hf, path, load_model(path))
    return out


@pytest.mark.parametrize("kind", sorted(STYLES))
def test_float_logits_and_selections_match_transformers(v4, kind):
    hf, _, model = v4[kind]
    cfg = STYLES[kind]
    toks = tokens(cfg["vocab_size"], LENGTH, seed=1)
    with record_hf() as theirs:
        ref = logits(hf, toks)[0]
    with record_edge() as ours:
        got = np.array(model(mx.array(toks)))[0]
    csa_rates = [cfg["compress_rates"]["compressed_sparse_attention"]] * len(theirs)
    clean = first_near_tie(theirs, cfg["index_topk"], csa_rates)
    print(f"\n{kind}: first near-tie at position {clean} of {LENGTH}")
    assert clean >= LENGTH // 2, "too many near-ties for the comparison to mean much: change the seed"
    assert len(ours) == len(theirs) == cfg["layer_types"].count("compressed_sparse_attention")
    selections = 0
    for (_, chosen), mine in zip(theirs, ours):
        for p in range(clean):
            want = {int(e) for e in chosen[p] if e >= 0}
            assert set(np.flatnonzero(mine[p]).tolist()) == want, (p, sorted(want))
            selections += len(want) > 0
    assert selections > 0
    assert rel_err(got[:clean], ref[:clean]) < TOL


@pytest.mark.parametrize("kind", sorted(STYLES))
def test_decode_and_chunked_prefill_equal_the_full_forward(v4, kind):
    """Token by token through the cache, and prefill in uneven chunks, give the full forward's numbers."""
    _, _, model = v4[kind]
    toks = tokens(STYLES[kind]["vocab_size"], LENGTH, seed=2)
    full = np.array(model(mx.array(toks)))[0]
    cache = model.make_cache()
    step = np.concatenate([np.array(model(mx.array(toks[:, i:i + 1]), cache))[0] for i in range(LENGTH)])
    assert rel_err(step, full) < 1e-5
    cache, chunks, start = model.make_cache(), [], 0
    for size in (5, 1, 17, 3, 40, 30):
        chunks.append(np.array(model(mx.array(toks[:, start:start + size]), cache))[0])
        start += size
    assert start == LENGTH
    assert rel_err(np.concatenate(chunks), full) < 1e-5


def test_greedy_64_tokens_follow_transformers_argmax(v4):
    """Greedy decoding through the cache: each of 64 tokens is transformers' full-forward argmax
    for the sequence before it (unless its top two logits are near-tied)."""
    hf, _, model = v4["a"]
    prompt = tokens(STYLES["a"]["vocab_size"], 6, seed=3)
    cache, ours = model.make_cache(), []
    step = model(mx.array(prompt), cache)[:, -1]
    for _ in range(64):
        ours.append(int(mx.argmax(step, axis=-1).item()))
        step = model(mx.array([[ours[-1]]]), cache)[:, -1]
    seq = np.concatenate([prompt, np.array([ours])], axis=1)
    ref = logits(hf, seq)[0, 5:-1]  # the logits that chose each of our tokens
    for i, (t, row) in enumerate(zip(ours, ref)):
        top2 = np.sort(row)[-2:]
        assert t == int(np.argmax(row)) or top2[1] - top2[0] < 1e-4 * np.abs(row).max(), f"token {i}"


def test_cache_holds_a_window_and_compressed_entries(v4):
    """The cache's bytes follow config.cache_bytes (what `info` reports) and stay nearly flat: the
    window is bounded, only one entry per m tokens grows."""
    _, path, model = v4["a"]
    cfg = model.config
    cache = model.make_cache()
    toks = tokens(cfg.vocab_size, 203, seed=4)
    for n in (1, 7, 50, 203):
        done = cache.offset
        model(mx.array(toks[:, done:n]), cache)
        mx.eval([a for c in cache for a in ([c.window] if c.window is not None else [])])
        assert cache.nbytes == cfg.cache_bytes(n, 4), n
    # A full KV row per token and layer would be 4 * 32 values; this config keeps (32 + 16) / 4 per
    # token in each of its 2 CSA layers and 32 / 8 in its HCA layer: 28, about 0.22 of it.
    full_rows = 65536 * cfg.num_hidden_layers * cfg.head_dim * 4
    assert 0.2 < cfg.cache_bytes(65536, 4) / full_rows < 0.23


@pytest.mark.parametrize("kind", sorted(STYLES))
def test_rewind_goes_back_to_the_last_prefill(v4, kind):
    """A pooled window cannot be rewound token by token: a rewind goes back to where the last
    multi-token call left the cache (the tokens after it are recomputed), or empties it when it
    must go back further; decoding on from there equals a full forward (an independent run)."""
    _, _, model = v4[kind]
    toks = tokens(128, 48, seed=6)[0].tolist()
    cache = model.make_cache()
    model(mx.array([toks[:30]]), cache)  # a prompt: its end is remembered
    for t in toks[30:42]:  # a reply, token by token
        model(mx.array([[t]]), cache)
    cache.tokens = list(toks[:42])
    assert cache.reuse_prefix(toks[:42] + [1, 2]) == 42  # nothing to rewind: all of it is reused
    assert cache.reuse_prefix(toks[:38] + [5]) == 30 and cache.tokens == toks[:30]  # back to the prefill's end
    got = [np.array(model(mx.array([toks[30:38] + [5]]), cache))[0, -1]]  # 9 tokens: the new point, at 39
    got += [np.array(model(mx.array([[t]]), cache))[0, -1] for t in toks[38:44]]
    seq = toks[:38] + [5] + toks[38:44]
    want = np.array(model(mx.array([seq])))[0, 38:]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-5)
    cache.tokens = list(seq)
    assert cache.reuse_prefix(seq[:42] + [7]) == 39 and cache.tokens == seq[:39]
    got = [np.array(model(mx.array([seq[39:42] + [7]]), cache))[0, -1]]
    np.testing.assert_allclose(got[0], np.array(model(mx.array([seq[:42] + [7]])))[0, -1], rtol=1e-5, atol=1e-5)
    cache.tokens = seq[:42] + [7]
    # Before the last multi-token call's start (position 39): an empty cache.
    assert cache.reuse_prefix(toks[:20] + [5]) == 0 and cache.offset == 0 and cache.tokens == []
    fresh = np.array(model(mx.array([toks[:20] + [5]]), cache))
    np.testing.assert_allclose(fresh, np.array(model(mx.array([toks[:20] + [5]]))), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def v4_4bit(v4, tmp_path_factory):
    """Config "a" (with room for a byte-level tokenizer's vocabulary) converted to 4 bits, group 32:
    what a user runs."""
    from converters.mlx import convert
    from tests.test_api import add_tokenizer

    path = save_v4(make_v4("a", vocab_size=300), tmp_path_factory.mktemp("v4tok"))
    add_tokenizer(path, 300)
    return convert(path, tmp_path_factory.mktemp("v4q") / "q4", quant="4bit", group_size=32, dtype="float32")


@pytest.mark.parametrize("budget", ["10%", "25%"])
def test_lazy_experts_bit_identical_to_resident(v4_4bit, budget):
    from edge_ds.experts import attach_experts

    toks = tokens(300, 48, seed=7)
    resident = load_model(v4_4bit)
    lazy = load_model(v4_4bit, routed_experts=False)
    experts = attach_experts(lazy, v4_4bit, budget)
    outs = []
    for model in (resident, lazy):
        cache = model.make_cache()
        out = [np.array(model(mx.array(toks[:, :24]), cache))]
        out += [np.array(model(mx.array(toks[:, i:i + 1]), cache)) for i in range(24, 48)]
        outs.append(np.concatenate(out, axis=1))
    assert sum(experts.stats.misses.values()) > 0  # experts were paged in and out
    np.testing.assert_array_equal(outs[1], outs[0])


def test_info_reports_v4_cache_at_long_contexts(v4_4bit):
    from edge_ds.info import CACHE_CONTEXTS, model_info

    facts = model_info(v4_4bit)
    assert facts["family"] == "DeepSeek-V4" and facts["moe_layers"] == STYLES["a"]["num_hidden_layers"]
    cfg = load_model(v4_4bit).config
    assert facts["cache_bytes_at"] == {n: cfg.cache_bytes(n, 4) for n in CACHE_CONTEXTS}


def test_api_generates_chats_and_traces_on_v4(v4_4bit, tmp_path):
    """generate, a chat over several turns (prefix reuse through the V4 cache), lazy experts with
    a trace: the same tokens as the resident model."""
    import edge_ds
    from edge_ds.experts.trace import load_trace

    prompt = "the quick brown fox jumps over the lazy dog"
    lm = edge_ds.load(v4_4bit)
    ref = lm.generate(prompt, max_tokens=24, chat_template=False)
    assert ref.stats.generation_tokens == 24
    chat = lm.chat()
    streams, replies = [], []
    for turn in ("hello", "and again", "once more"):
        streams.append(chat.send(turn, max_tokens=8))
        replies.append("".join(streams[-1]))
    assert len(replies) == 3 and len(chat.messages) == 6
    # Later turns go back to where the previous prompt's prefill ended, not to the start.
    assert all(0 < s.stats.prefilled_tokens < s.stats.prompt_tokens for s in streams[1:])
    lazy = edge_ds.load(v4_4bit, expert_budget="25%", trace=tmp_path / "t.jsonl")
    out = lazy.generate(prompt, max_tokens=24, chat_template=False)
    assert out.tokens == ref.tokens and lazy.expert_stats()["misses"] > 0
    lazy.experts.recorder.close()
    assert len(load_trace(tmp_path / "t.jsonl").steps) > 0


def test_prompt_cache_saves_and_restores(v4, tmp_path):
    """Saved mid-window (open windows, CSA overlap, entries), restored into a fresh cache: decoding
    goes on exactly as without the round trip. A latent cache's file does not fit a V4 model."""
    from edge_ds.cache import PromptCache
    from edge_ds.errors import EdgeDSError

    _, _, model = v4["b"]
    toks = tokens(128, 50, seed=8)
    cache = model.make_cache()
    model(mx.array(toks[:, :37]), cache)
    cache.tokens = toks[0, :37].tolist()
    cache.save(tmp_path / "v4.safetensors", "fp")
    restored = model.make_cache().restore(tmp_path / "v4.safetensors", "fp")
    assert restored.tokens == cache.tokens and restored.nbytes == cache.nbytes
    want = np.array(model(mx.array(toks[:, 37:]), cache))
    got = np.array(model(mx.array(toks[:, 37:]), restored))
    np.testing.assert_array_equal(got, want)

    latent = PromptCache(len(model.layers))
    latent.layers[0].update_and_fetch(mx.zeros((1, 1, 3, 8)))
    for c in latent.layers[1:]:
        c.update_and_fetch(mx.zeros((1, 1, 3, 8)))
    latent.tokens = [1, 2, 3]
    latent.save(tmp_path / "latent.safetensors")
    with pytest.raises(EdgeDSError, match="does not fit this model's cache"):
        model.make_cache().restore(tmp_path / "latent.safetensors")


@pytest.mark.parametrize("edit, message", [
    ({"layer_types": ["sliding_attention", "linear_attention", "sliding_attention", "sliding_attention"]},
     r"field 'layer_types\[1\]' is 'linear_attention'"),
    ({"layer_types": ["sliding_attention"] * 3}, "field 'layer_types' has 3 entries for 4 layers"),
    ({"mlp_layer_types": ["moe", "dense", "moe", "moe"]}, r"field 'mlp_layer_types\[1\]'"),
    ({"compress_rates": {"compressed_sparse_attention": 0}}, "compress_rates.compressed_sparse_attention' must be positive"),
    ({"compress_rates": {"sparse": 4}}, "field 'compress_rates' has unknown layer type 'sparse'"),
    ({"num_key_value_heads": 2}, "field 'num_key_value_heads' must be 1"),
    ({"o_groups": 3}, "field 'o_groups' \\(3\\) must divide num_attention_heads"),
    ({"partial_rotary_factor": 1.5}, "field 'partial_rotary_factor' must be in"),
    ({"scoring_func": "relu"}, "field 'scoring_func' must be one of"),
    ({"hidden_act": "gelu"}, "field 'hidden_act' must be 'silu'"),
    ({"q_lora_rank": None}, "missing field 'q_lora_rank'"),
    ({"compress_ratios": [0, 4, 7, 4], "layer_types": None}, r"field 'compress_ratios\[2\]' is 7"),
    ({"rope_parameters": {"main": {"rope_type": "longrope"}, "compress": {}}}, "rope_parameters.main.type"),
])
def test_config_errors_name_the_field(tmp_path, edit, message):
    import json

    from edge_ds.config import ModelConfig
    from edge_ds.errors import EdgeDSError

    d = dict(STYLES["a"], model_type="deepseek_v4", **edit)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(EdgeDSError, match=message) as e:
        ModelConfig.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_legacy_spellings_fold_in_as_transformers_folds_them():
    """compress_ratios (one more entry for the MTP layer), compress_rate_*, num_hash_layers,
    qk_rope_head_dim and a flat rope_scaling give what transformers' DeepseekV4Config makes of them."""
    from transformers import DeepseekV4Config

    from edge_ds.config import ModelConfig

    legacy = {k: v for k, v in STYLES["a"].items() if k not in ("layer_types", "compress_rates", "rope_parameters",
                                                               "partial_rotary_factor", "num_hash_layers")}
    # transformers maps legacy ratios through a fixed {0, 4, 128} table, so those are the ones to compare.
    legacy.update(compress_ratios=[0, 4, 128, 4, 4], compress_rate_csa=4, compress_rate_hca=128, num_hash_layers=2,
                  qk_rope_head_dim=16, rope_scaling={"type": "yarn", "factor": 16,
                                                     "original_max_position_embeddings": 64})
    theirs = DeepseekV4Config(**legacy)
    ours = ModelConfig.from_dict(dict(legacy, model_type="deepseek_v4"))
    assert ours.layer_types == theirs.layer_types and ours.mlp_layer_types == theirs.mlp_layer_types
    assert ours.compress_rates == theirs.compress_rates and ours.qk_rope_head_dim == theirs.qk_rope_head_dim
    compress = theirs.rope_parameters["compress"]
    assert ours.compress_rope_scaling["factor"] == compress["factor"] and compress["attention_factor"] == 1.0
    assert ours.compress_rope_scaling["attention_factor"] == 1.0 and ours.rope_scaling is None
    again = DeepseekV4Config(**{k: v for k, v in ours.to_dict().items() if k != "model_type"})
    assert again.layer_types == theirs.layer_types and again.rope_parameters["compress"]["factor"] == 16


def test_a_batch_equals_its_sequences_run_alone(v4):
    _, _, model = v4["a"]
    toks = tokens(128, 2 * 40, seed=9).reshape(2, 40)
    both = np.array(model(mx.array(toks)))
    for b in range(2):
        np.testing.assert_allclose(both[b], np.array(model(mx.array(toks[b:b + 1])))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_router_weights_follow_deepseeks_gate(scoring):
    """DeepSeek's V4 gate (inference/model.py): weights are the chosen scores, renormalised to sum 1
    unless the scores are a softmax, times route_scale. Computed here in numpy from the logits."""
    from edge_ds.config import DeepseekV4Config
    from edge_ds.models.deepseek_v4 import Router

    cfg = DeepseekV4Config.from_dict({**STYLES["b"], "scoring_func": scoring, "model_type": "deepseek_v4"})
    router = Router(cfg, hashed=False)
    rng = np.random.default_rng(0)
    router.weight = mx.array(rng.normal(0, 0.5, router.weight.shape).astype(np.float32))
    x = rng.normal(0, 1, (5, cfg.hidden_size)).astype(np.float32)
    indices, weights = router(mx.array(x))
    logits = x.astype(np.float64) @ np.array(router.weight, np.float64).T
    scores = {"softmax": np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), "sigmoid": 1 / (1 + np.exp(-logits)),
              "sqrtsoftplus": np.sqrt(np.log1p(np.exp(logits)))}[scoring]
    chosen = np.take_along_axis(scores, np.array(indices).astype(np.int64), -1)
    assert np.array_equal(np.sort(np.array(indices), -1), np.sort(np.argsort(-scores, -1)[:, :cfg.num_experts_per_tok], -1))
    want = (chosen if scoring == "softmax" else chosen / chosen.sum(-1, keepdims=True)) * cfg.routed_scaling_factor
    np.testing.assert_allclose(np.array(weights), want, rtol=1e-5)
