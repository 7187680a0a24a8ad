"""Routing traces: recorded during generation, replayed offline; Belady's optimum bounds every policy."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from edge_ds.cli import main as cli
from edge_ds.errors import EdgeDSError
from edge_ds.experts import LRU, attach_experts
from edge_ds.experts.policy import DecayedFrequency
from edge_ds.loading import load_model
from edge_ds.experts.replay import Belady, _next_uses, replay, simulate
from edge_ds.experts.trace import Step, TraceRecorder, load_trace
from tests.test_experts import greedy_run


@pytest.fixture(scope="module")
def recorded(zoo, tmp_path_factory):
    """A trace of a 10-token prompt and 64 greedy tokens on a V3-style model with 16 experts."""
    path = zoo.converted("v3", "4bit", n_routed_experts=16)
    file = tmp_path_factory.mktemp("trace") / "routing.jsonl"
    model = load_model(path, routed_experts=False)
    cache = attach_experts(model, path, "25%")
    cache.recorder = TraceRecorder.for_cache(file, cache, path)
    prompt = np.random.default_rng(4).integers(0, 160, 20).tolist()
    greedy_run(model, prompt, 64)
    cache.recorder.close()
    return file, cache


def test_trace_records_every_token_and_layer(recorded):
    file, cache = recorded
    tr = load_trace(file)
    assert tr.header["layers"] == [1, 2] and tr.header["num_experts"] == 16 and tr.header["top_k"] == 3
    decode = [s for s in tr.steps if not s.prefill]
    prefill = [s for s in tr.steps if s.prefill]
    assert len(prefill) == 20 * 2 and len(decode) == 64 * 2
    assert all(len(s.experts) == 3 for s in tr.steps)  # split calls of one layer are merged
    assert [s.t for s in decode[::2]] == list(range(20, 84))


def test_trace_carries_lookahead_hints(recorded):
    tr = load_trace(recorded[0])
    decode = [s for s in tr.steps if not s.prefill]
    assert all(set(s.hints) == {2} and len(s.hints[2]) == 3 for s in decode if s.layer == 1)
    assert all(s.hints is None for s in decode if s.layer == 2)  # the last MoE layer looks nowhere


def test_belady_bounds_every_policy(recorded):
    tr = load_trace(recorded[0])
    for budget in ("20%", "40%", "70%"):
        r = replay(tr, budget, policies=("lru", "lfu", "hybrid", "belady-0", "belady-1", "belady"))
        assert r["steps"] == 128 and r["slots"] >= 3
        for name in ("lru", "lfu", "hybrid", "belady-0", "belady-1"):
            assert 0 <= r[name]["hit_rate"] <= r["belady"]["hit_rate"] <= 1
            assert r[name]["hits"] + r[name]["misses"] == 128 * 3
        blind = replay(tr, budget, policies=("hybrid",), hints=False)["hybrid"]
        assert blind["hit_rate"] <= r["belady"]["hit_rate"]
    full = replay(tr, "100%")
    assert full["belady"]["misses"] == full["lru"]["misses"] == len({(s.layer, e) for s in tr.steps
                                                                      if not s.prefill for e in s.experts})


def test_belady_on_a_known_sequence():
    steps = [Step(t, 0, (e,), False) for t, e in enumerate([1, 2, 3, 1, 2, 4, 1, 2, 3, 4])]
    assert simulate(steps, 2, LRU())["hits"] == 0  # LRU thrashes a cycle one longer than the cache
    # Worked by hand: evict the key used furthest ahead -> hits at t=3 (1), t=6 (1), t=9 (4).
    assert simulate(steps, 2, Belady(), _next_uses(steps))["hits"] == 3
    # Seeing two tokens ahead is enough here (worked by hand: the same three hits) ...
    assert simulate(steps, 2, Belady(2, DecayedFrequency()), _next_uses(steps))["hits"] == 3
    # ... seeing only the current token leaves nothing but the fallback's ranking.
    blind = simulate(steps, 2, Belady(0, DecayedFrequency()), _next_uses(steps))
    assert blind == simulate(steps, 2, DecayedFrequency()) and blind["hits"] < 3


def test_trace_replay_cli(recorded):
    r = CliRunner().invoke(cli, ["trace", "replay", str(recorded[0]), "--budget", "25%", "--budget", "50%"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("| 25%") or line.startswith("| 50%")]
    assert len(rows) == 2 and "Belady" in r.output


def test_bad_trace_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"something": 1}) + "\n")
    with pytest.raises(EdgeDSError, match="bad.jsonl: not an edge-ds routing trace"):
        load_trace(bad)
    r = CliRunner().invoke(cli, ["trace", "replay", str(bad), "--budget", "25%"])
    assert r.exit_code == 1 and "bad.jsonl" in r.output
