"""edge-ds forward passes against transformers' DeepseekV2/V3ForCausalLM (eager, float32) on the same weights.

Also: the latent cache (decode, chunked prefill, save/load, rewind), absorbed vs expanded MLA,
the router against a numpy implementation of deepseek-format.md's rules, and YaRN against
transformers' rope init.
"""

from __future__ import annotations

import math
import zlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from edge_ds.cache import LatentCache, PromptCache
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError
from edge_ds.loading import load_model
from edge_ds.models.deepseek import causal_mask
from edge_ds.models.moe import Router
from edge_ds.models.rope import rope_inv_freq
from tests.tiny_models import hf_logits

KINDS = ("v3", "v2lite", "moonlight", "v2grouped")  # dense attention; V3.2 in test_v32.py

TOL = 1e-4


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def tokens_for(vocab: int, batch: int = 2, length: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


def run(model, toks: np.ndarray, cache=None) -> np.ndarray:
    out = model(mx.array(toks), cache=cache)
    mx.eval(out)
    return np.array(out)


@pytest.fixture(scope="module")
def converted_models(zoo):
    """kind -> edge-ds model loaded from convert(quant='none', dtype='float32')."""
    return {kind: load_model(zoo.converted(kind, "none", "float32")) for kind in KINDS}


# --- full forward, decode, chunked prefill vs transformers ------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_sequence_matches_transformers(zoo, converted_models, kind):
    tiny = zoo.hf(kind)
    toks = tokens_for(tiny.vocab_size)
    ref = hf_logits(tiny.model, toks)
    got = run(converted_models[kind], toks)
    err = rel_err(got, ref)
    print(f"\n{kind}: full-sequence rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decode_matches_transformers(zoo, converted_models, kind):
    tiny = zoo.hf(kind)
    model = converted_models[kind]
    toks = tokens_for(tiny.vocab_size, seed=1)
    ref = hf_logits(tiny.model, toks)
    cache = PromptCache(len(model.layers))
    outs = [run(model, toks[:, :5], cache)]
    for i in range(5, toks.shape[1]):
        outs.append(run(model, toks[:, i : i + 1], cache))
    assert cache.offset == toks.shape[1]
    got = np.concatenate(outs, axis=1)
    err = rel_err(got, ref)
    print(f"\n{kind}: prefill 5 + decode rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_matches_transformers(zoo, converted_models, kind):
    tiny = zoo.hf(kind)
    model = converted_models[kind]
    toks = tokens_for(tiny.vocab_size, length=21, seed=2)
    ref = hf_logits(tiny.model, toks)
    cache = PromptCache(len(model.layers))
    outs, start = [], 0
    for size in (7, 3, 11):
        outs.append(run(model, toks[:, start : start + size], cache))
        start += size
    got = np.concatenate(outs, axis=1)
    err = rel_err(got, ref)
    print(f"\n{kind}: chunked prefill (7, 3, 11) rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_unconverted_hf_dir_loads_directly(zoo, kind):
    tiny = zoo.hf(kind)
    toks = tokens_for(tiny.vocab_size, seed=3)
    err = rel_err(run(load_model(tiny.path), toks), hf_logits(tiny.model, toks))
    assert err < TOL


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_legacy_rope_scaling_spelling(zoo, legacy_rope, tmp_path, kind):
    """config.json with rope_scaling (as DeepSeek ships it) instead of transformers 5's rope_parameters."""
    tiny = zoo.hf(kind)
    legacy = legacy_rope(tiny.path, tmp_path / "legacy")
    assert legacy.joinpath("config.json").read_text().count("rope_parameters") == 0
    toks = tokens_for(tiny.vocab_size, seed=4)
    err = rel_err(run(load_model(legacy), toks), hf_logits(tiny.model, toks))
    assert err < TOL


def test_bf16_hf_dir_matches_bf16_rounded_weights(tmp_path):
    """A BF16 checkpoint: the oracle is transformers (float32 compute) on the BF16-rounded weights.

    Only the parameters are rounded; casting the whole module would also round transformers'
    rotary inv_freq buffer and put a position-dependent error into the oracle itself.
    """
    import copy

    from tests.tiny_models import make_hf_model, save_hf

    model = make_hf_model("v3", seed=5)
    save_hf(copy.deepcopy(model), tmp_path / "bf16", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    toks = tokens_for(model.config.vocab_size, seed=5)
    ref = hf_logits(model, toks)
    err = rel_err(run(load_model(tmp_path / "bf16", dtype=mx.float32), toks), ref)
    assert err < TOL


# --- absorbed (decode, L == 1) vs expanded (prefill, L > 1) MLA ----------------------------


@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_absorbed_and_expanded_mla_agree(converted_models, kind):
    model = converted_models[kind]
    attn = model.layers[1].self_attn
    D = model.config.hidden_size
    x = mx.array(np.random.default_rng(7).standard_normal((2, 12, D)).astype(np.float32))

    # expanded: two chunks of 6 (the second attends over the cached first)
    exp_cache = LatentCache()
    e1 = attn(x[:, :6], causal_mask(6, 0, mx.float32), exp_cache)
    e2 = attn(x[:, 6:], causal_mask(6, 6, mx.float32), exp_cache)
    expanded = np.array(mx.concatenate([e1, e2], axis=1))
    # absorbed: one token at a time from an empty cache
    abs_cache = LatentCache()
    absorbed = np.array(mx.concatenate([attn(x[:, i : i + 1], None, abs_cache) for i in range(12)], axis=1))
    err = rel_err(absorbed, expanded)
    print(f"\n{kind}: absorbed vs expanded MLA rel err {err:.2e}")
    assert err < 1e-5
    np.testing.assert_allclose(np.array(abs_cache.state), np.array(exp_cache.state), rtol=1e-5, atol=1e-6)

    # whole model: decode-only from position 0 vs one prefill of the same tokens
    toks = tokens_for(model.config.vocab_size, seed=8, length=10)
    cache = PromptCache(len(model.layers))
    decoded = np.concatenate([run(model, toks[:, i : i + 1], cache) for i in range(10)], axis=1)
    assert rel_err(decoded, run(model, toks)) < 1e-5


# --- prompt cache: save/load, rewind ----------------------------------------------------------


def feed(model, cache: PromptCache, toks: list[int]) -> np.ndarray:
    out = run(model, np.array([toks]), cache)
    cache.tokens.extend(toks)
    return out


def test_prompt_cache_save_load_continues_identically(converted_models, tmp_path):
    model = converted_models["v3"]
    n = len(model.layers)
    toks = tokens_for(model.config.vocab_size, batch=1, length=14, seed=9)[0].tolist()

    live = PromptCache(n)
    feed(model, live, toks[:8])
    live.save(tmp_path / "p.safetensors")
    loaded = PromptCache.load(tmp_path / "p.safetensors", n)
    assert loaded.tokens == toks[:8] and loaded.offset == 8

    a = np.concatenate([feed(model, live, [t]) for t in toks[8:]], axis=1)
    b = np.concatenate([feed(model, loaded, [t]) for t in toks[8:]], axis=1)
    np.testing.assert_array_equal(a, b)
    # and both equal an uncached forward of the whole sequence
    assert rel_err(a, run(model, np.array([toks]))[:, 8:]) < 1e-5


def test_prompt_cache_rewind_and_refeed(converted_models):
    model = converted_models["v3"]
    toks = tokens_for(model.config.vocab_size, batch=1, length=12, seed=10)[0].tolist()
    cache = PromptCache(len(model.layers))
    feed(model, cache, toks[:6])
    first = feed(model, cache, toks[6:])
    cache.rewind(4)
    assert cache.offset == 8 and cache.tokens == toks[:8]
    again = feed(model, cache, toks[8:])
    np.testing.assert_allclose(again, first[:, 2:], rtol=1e-5, atol=1e-5)
    # rewinding, then feeding different tokens, then the original ones again, still matches
    cache.rewind(4)
    feed(model, cache, [(t + 1) % model.config.vocab_size for t in toks[8:]])
    cache.rewind(4)
    np.testing.assert_allclose(feed(model, cache, toks[8:]), first[:, 2:], rtol=1e-5, atol=1e-5)


def test_prompt_cache_wrong_num_layers(converted_models, tmp_path):
    model = converted_models["v3"]
    n = len(model.layers)
    cache = PromptCache(n)
    feed(model, cache, [1, 2, 3])
    cache.save(tmp_path / "p.safetensors")
    with pytest.raises(EdgeDSError, match="p.safetensors"):
        PromptCache.load(tmp_path / "p.safetensors", n + 1)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache at all")
    with pytest.raises(EdgeDSError, match="junk.safetensors"):
        PromptCache.load(tmp_path / "junk.safetensors", n)


# --- routing ---------------------------------------------------------------------------------


def router_config(E, k, method, scoring, n_group=1, topk_group=1, norm=False, scale=1.0) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3" if method == "noaux_tc" else "deepseek_v2", vocab_size=16, hidden_size=48,
        intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=k, topk_method=method,
        scoring_func=scoring, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
        routed_scaling_factor=scale))


def route_reference(x, W, bias, cfg: ModelConfig):
    """deepseek-format.md's routing rules in float64 numpy.

    Returns (sorted index sets [N, k], weights in index order [N, k], decisive margin [N]):
    the margin is the smallest gap at a selection boundary (kth vs k+1th expert, kept vs
    dropped group); tokens where it is tiny are float-rounding ties, not semantics.
    """
    logits = x.astype(np.float64) @ W.astype(np.float64).T
    if cfg.scoring_func == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias if cfg.topk_method == "noaux_tc" else s.copy()
    N, E = s.shape
    k = cfg.num_experts_per_tok
    margin = np.full(N, np.inf)
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        g = choice.reshape(N, cfg.n_group, -1)
        if cfg.topk_method == "noaux_tc":
            gs = np.sort(g, axis=-1)[..., -2:].sum(-1)  # sum of each group's top two
        else:
            gs = g.max(-1)  # group_limited_greedy: the group's best expert
        order = np.argsort(-gs, axis=-1)
        kept = order[:, : cfg.topk_group]
        if cfg.topk_group < cfg.n_group:
            sorted_gs = -np.sort(-gs, axis=-1)
            margin = np.minimum(margin, sorted_gs[:, cfg.topk_group - 1] - sorted_gs[:, cfg.topk_group])
        mask = np.ones((N, cfg.n_group), bool)
        np.put_along_axis(mask, kept, False, axis=-1)
        g = np.where(mask[..., None], -np.inf, g)
        choice = g.reshape(N, E)
    sc = -np.sort(-choice, axis=-1)
    if k < E:
        gap = sc[:, k - 1] - sc[:, k]
        margin = np.minimum(margin, np.where(np.isinf(sc[:, k]), np.inf, gap))
    idx = np.sort(np.argsort(-choice, axis=-1)[:, :k], axis=-1)
    w = np.take_along_axis(s, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * cfg.routed_scaling_factor, margin


ROUTER_CASES = {
    # V2-Lite: softmax greedy, unnormalised
    "softmax-greedy": dict(E=16, k=4, method="greedy", scoring="softmax"),
    "softmax-greedy-norm-scaled": dict(E=16, k=3, method="greedy", scoring="softmax", norm=True, scale=2.0),
    # V2 / V2.5: group_limited_greedy
    "softmax-group-limited": dict(E=16, k=3, method="group_limited_greedy", scoring="softmax", n_group=4,
                                  topk_group=2, scale=1.5),
    "softmax-group-limited-norm": dict(E=24, k=4, method="group_limited_greedy", scoring="softmax", n_group=8,
                                       topk_group=3, norm=True, scale=16.0),
    # V3: sigmoid + correction bias + groups (sum of top two), normalised, scaled
    "sigmoid-noaux-groups": dict(E=32, k=8, method="noaux_tc", scoring="sigmoid", n_group=8, topk_group=4,
                                 norm=True, scale=2.5),
    "sigmoid-noaux-groups-unnormed": dict(E=16, k=3, method="noaux_tc", scoring="sigmoid", n_group=4,
                                          topk_group=2, norm=False, scale=1.0),
    # Moonlight: noaux_tc with one group
    "sigmoid-noaux-one-group": dict(E=16, k=6, method="noaux_tc", scoring="sigmoid", norm=True, scale=2.446),
    # scoring_func is followed whatever the method
    "sigmoid-greedy": dict(E=16, k=2, method="greedy", scoring="sigmoid", norm=True),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_matches_numpy_rules(case):
    spec = ROUTER_CASES[case]
    cfg = router_config(**spec)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    N, D, E = 512, cfg.hidden_size, cfg.n_routed_experts
    x = rng.standard_normal((N, D)).astype(np.float32)
    W = (rng.standard_normal((E, D)) * 0.3).astype(np.float32)
    bias = (rng.uniform(-0.3, 0.3, E) if cfg.topk_method == "noaux_tc" else np.zeros(E)).astype(np.float32)

    router = Router(cfg)
    router.weight = mx.array(W)
    if cfg.topk_method == "noaux_tc":
        router.e_score_correction_bias = mx.array(bias)
    idx, w = router(mx.array(x))
    idx, w = np.array(idx).astype(np.int64), np.array(w).astype(np.float64)
    order = np.argsort(idx, axis=-1)
    idx, w = np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)

    ref_idx, ref_w, margin = route_reference(x, W, bias, cfg)
    decided = margin > 1e-5
    assert decided.mean() > 0.95, "too many near-ties for a meaningful comparison"
    assert (idx[decided] == ref_idx[decided]).all(), f"{(idx != ref_idx).any(-1)[decided].sum()} tokens differ"
    np.testing.assert_allclose(w[decided], ref_w[decided], rtol=2e-5, atol=1e-7)

    # the inputs exercise the rule that distinguishes this case from plain greedy top-k on the scores
    plain_cfg = router_config(**dict(spec, method="greedy", n_group=1, topk_group=1))
    plain_idx, _, _ = route_reference(x, W, np.zeros(E, np.float32), plain_cfg)
    if cfg.topk_method != "greedy":
        assert (plain_idx != ref_idx).any(-1).mean() > 0.1


# --- YaRN, softmax scale ----------------------------------------------------------------------

V3_REAL = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512,
               q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
               n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
               max_position_embeddings=163840, rope_theta=10000,
               rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
V2_LITE_REAL = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512,
                    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    max_position_embeddings=163840, rope_theta=10000,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})


@pytest.mark.parametrize("real,mscale_all", [(V3_REAL, None), (V2_LITE_REAL, None), (V3_REAL, 0.707)])
def test_yarn_inv_freq_matches_transformers(real, mscale_all):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    real = dict(real)
    if mscale_all is not None:  # mscale != mscale_all_dim: the cos/sin multiplier is not 1
        real["rope_scaling"] = dict(real["rope_scaling"], mscale_all_dim=mscale_all)
    hf_fields = {k: v for k, v in real.items() if k != "model_type"}
    Cfg = transformers.DeepseekV3Config if real["model_type"] == "deepseek_v3" else transformers.DeepseekV2Config
    hf_cfg = Cfg(**dict(hf_fields, num_hidden_layers=1))
    ref_inv, ref_att = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv, att = rope_inv_freq(real["qk_rope_head_dim"], float(real["rope_theta"]), real["rope_scaling"],
                             real["max_position_embeddings"])
    assert inv.shape == (32,)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)
    assert att == pytest.approx(float(ref_att), rel=1e-6)
    if mscale_all is not None:
        assert att != pytest.approx(1.0)
    # the correction really ramps: high frequencies untouched, low ones divided by factor
    plain = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    assert inv[0] == pytest.approx(plain[0], rel=1e-6)
    assert inv[-1] == pytest.approx(plain[-1] / 40, rel=1e-5)


def test_softmax_scale_real_dims():
    assert ModelConfig.from_dict(V3_REAL).softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert ModelConfig.from_dict(V2_LITE_REAL).softmax_scale == pytest.approx(0.114721, abs=1e-6)
    # no rope_scaling (Moonlight): plain 1/sqrt(qk_head_dim)
    moon = dict(V3_REAL, rope_scaling=None, rope_theta=50000)
    assert ModelConfig.from_dict(moon).softmax_scale == pytest.approx(1 / math.sqrt(192), rel=1e-9)
    # the transformers 5 spelling gives the same
    params = dict(V3_REAL["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
    spelled = {k: v for k, v in V3_REAL.items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_dict(dict(spelled, rope_parameters=params)).softmax_scale == pytest.approx(
        0.135234, abs=1e-6)
