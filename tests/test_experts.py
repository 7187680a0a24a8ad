"""Lazy expert loading: exactness against the resident model, the budget, eviction, prefetch,
bad slices, the API and CLI. Tiny checkpoints with 16 experts so a 10% budget means something."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import edge_ds
from edge_ds.cache import PromptCache
from edge_ds.cli import main as cli
from edge_ds.errors import EdgeDSError
from edge_ds.experts import DecayedFrequency, LRU, LFU, attach_experts, parse_budget
from edge_ds.experts.store import ExpertStore
from edge_ds.loading import load_model

E16 = dict(n_routed_experts=16)


def lazy_model(path: Path, budget, **options):
    model = load_model(path, routed_experts=False)
    return model, attach_experts(model, path, budget, **options)


def greedy_run(model, prompt: list[int], steps: int, check=None) -> tuple[list[np.ndarray], list[int]]:
    """Prefill `prompt`, then `steps` greedy tokens one at a time; returns each call's logits."""
    cache = PromptCache(model.config.num_hidden_layers)
    logits = [np.array(model(mx.array([prompt]), cache=cache))]
    tokens = []
    for _ in range(steps):
        t = int(logits[-1][0, -1].argmax())
        tokens.append(t)
        logits.append(np.array(model(mx.array([[t]]), cache=cache)))
        if check:
            check()
    return logits, tokens


@pytest.fixture(scope="module")
def tiny16(zoo):
    return {kind: zoo.converted(kind, "4bit", **E16) for kind in ("v3", "v2lite")}


# --- the budget ----------------------------------------------------------------------------
def test_parse_budget():
    assert parse_budget(1000, 10**9) == 1000
    assert parse_budget("2GB", 10**10) == 2 * 10**9
    assert parse_budget("512MiB", 10**10) == 512 * 2**20
    assert parse_budget("1.5g", 10**10) == 1.5e9
    assert parse_budget("25%", 4000) == 1000
    assert parse_budget("100%", 4000) == 4000
    assert parse_budget("5GB", 1000) == 1000  # more than the experts: all of them
    for bad in ("", "abc", "-5MB", "0", "150%", "0%", "12 parsecs", True, 1.5):
        with pytest.raises(EdgeDSError, match="expert_budget"):
            parse_budget(bad, 4000)


def test_budget_below_one_token_is_refused(tiny16):
    model = load_model(tiny16["v3"], routed_experts=False)
    with pytest.raises(EdgeDSError, match="top_k = 3"):
        attach_experts(model, tiny16["v3"], 100)


# --- exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v3", "v2lite"])
def test_ten_percent_budget_is_bit_identical(tiny16, kind):
    """Full-forward logits and 64 greedy tokens with their logits equal the resident model exactly,
    while resident expert bytes stay within the budget at every step."""
    path = tiny16[kind]
    resident = load_model(path)
    lazy, cache = lazy_model(path, "10%")
    budget = parse_budget("10%", cache.store.routed_bytes)
    assert cache.capacity_bytes <= budget and cache.slots < cache.store.num_experts * len(cache.store.layers)

    tokens = np.random.default_rng(1).integers(0, 160, (2, 40))
    np.testing.assert_array_equal(np.array(lazy(mx.array(tokens))), np.array(resident(mx.array(tokens))))
    assert cache.stats.prefill_misses > 0
    for n in (2, 5, 12, 15):  # short prompts: more experts than slots, but the unsorted decode-style path
        np.testing.assert_array_equal(np.array(lazy(mx.array(tokens[:1, :n]))),
                                      np.array(resident(mx.array(tokens[:1, :n]))))

    def within_budget():
        assert cache.resident_bytes <= budget

    prompt = tokens[0, :9].tolist()
    ref_logits, ref_tokens = greedy_run(resident, prompt, 64)
    got_logits, got_tokens = greedy_run(lazy, prompt, 64, within_budget)
    assert got_tokens == ref_tokens
    for a, b in zip(got_logits, ref_logits):
        np.testing.assert_array_equal(a, b)
    assert sum(cache.stats.misses.values()) > 0 and cache.stats.evictions > 0


def test_unquantized_experts_are_exact(zoo):
    path = zoo.converted("v3", "none", **E16)
    resident = load_model(path)
    lazy, cache = lazy_model(path, "25%")
    tokens = mx.array(np.random.default_rng(2).integers(0, 160, (1, 30)))
    np.testing.assert_array_equal(np.array(lazy(tokens)), np.array(resident(tokens)))
    ref, _ = greedy_run(resident, [1, 2, 3], 12)
    got, _ = greedy_run(lazy, [1, 2, 3], 12)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_prefetch_is_exact_and_used(tiny16):
    path = tiny16["v3"]
    resident = load_model(path)
    lazy, cache = lazy_model(path, "50%", prefetch=True)
    ref, _ = greedy_run(resident, [5, 6, 7], 24)
    got, _ = greedy_run(lazy, [5, 6, 7], 24)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    st = cache.stats_dict()
    assert st["prefetch_issued"] > 0 and 0 < st["prefetch_used"] <= st["prefetch_issued"]
    assert cache.resident_bytes <= cache.capacity_bytes


# --- eviction ------------------------------------------------------------------------------
def test_policies_rank_as_described():
    lru, lfu, hyb = LRU(), LFU(), DecayedFrequency(half_life=4)
    for p in (lru, lfu, hyb):
        for t in range(10):
            p.access("hot", t)  # used every token for a while
        p.access("new", 10)
    assert lru.victims(["hot", "new"], 1) == ["hot"]  # recency only
    assert lfu.victims(["hot", "new"], 1) == ["new"]
    assert hyb.victims(["hot", "new"], 1) == ["new"]  # frequent and recent enough
    for t in range(11, 40):
        hyb.access("new", t)  # "hot" has not been used for 30 tokens: its score decays away
    assert hyb.victims(["hot", "new"], 1) == ["hot"]
    hyb.set_hints({"hot": 1, "cold": 0})  # predicted for the next layers of this token
    assert hyb.victims(["hot", "new", "cold"], 2) == ["new", "hot"]


def test_frequent_expert_survives_one_off_misses(tiny16):
    path = tiny16["v3"]
    _, cache = lazy_model(path, 4 * ExpertStore(path, load_model(path, routed_experts=False).config,
                                                mx.float32).expert_bytes)
    assert cache.slots == 4
    for t in range(8):  # expert 0 of layer 1 is used by every token
        cache.tokens += 1
        cache.acquire(1, [0, 1 + t % 2], streaming=False)
    for e in (5, 6, 7, 8, 9):  # one-off experts
        cache.tokens += 1
        cache.acquire(1, [0, e] if e % 2 else [e], streaming=False)
    assert (1, 0) in cache.slot_of
    assert cache.stats.evictions > 0 and cache.resident_bytes <= cache.capacity_bytes


def test_long_prefill_does_not_flush_decode_set(tiny16):
    path = tiny16["v2lite"]
    lazy, cache = lazy_model(path, "50%")
    greedy_run(lazy, [3, 1, 4], 32)
    decode_set = {k for k, s in cache.slot_of.items() if s not in cache.low}
    assert len(decode_set) == cache.slots
    lazy(mx.array(np.random.default_rng(3).integers(0, 160, (1, 200))))  # a long prompt, all experts
    assert cache.stats.prefill_misses > 0
    kept = decode_set & set(cache.slot_of)
    assert len(kept) >= cache.slots - cache.stream_window
    assert cache.resident_bytes <= cache.capacity_bytes


# --- bad slices ----------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _slice(path: Path, layer: int, expert: int, key: str):
    model = load_model(path, routed_experts=False)
    t = ExpertStore(path, model.config, mx.float32).tensors[layer][key]
    return t.paths[expert], t.offsets[expert], t.nbytes


def test_corrupt_expert_slice_names_the_file(tiny16, tmp_path):
    path = _copy(tiny16["v3"], tmp_path / "corrupt")
    for e in range(16):  # every expert of layer 1, so any routing reads one
        f, offset, n = _slice(path, 1, e, "up_proj.scales")
        with open(f, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\xff" * n)  # NaN scales
    lazy, _ = lazy_model(path, "25%")
    with pytest.raises(EdgeDSError, match=rf"{f.name}.*corrupt.*up_proj\.scales"):
        lazy(mx.array([[1, 2, 3]]))


def test_truncated_expert_slice_names_the_file(tiny16, tmp_path):
    path = _copy(tiny16["v3"], tmp_path / "truncated")
    f, offset, _ = _slice(path, 2, 0, "gate_proj.weight")
    lazy, cache = lazy_model(path, "25%")
    with open(f, "r+b") as fh:  # the file shrinks after loading: the header was fine
        fh.truncate(offset + 10)
    with pytest.raises(EdgeDSError, match=rf"{f.name}: truncated"):
        lazy(mx.array([list(range(20))]))
    assert cache.resident_bytes <= cache.capacity_bytes
    with pytest.raises(EdgeDSError, match=f.name):  # and at load time, by the header check
        lazy_model(path, "25%")


# --- platform ------------------------------------------------------------------------------
def _cached(f: Path, offset: int, n: int) -> bool:
    """Whether the whole pages inside bytes offset..offset+n of f are in the page cache, by
    mincore(2) on a mapping (a read, even one that may not wait, would start reading them in);
    the pages a slice shares with its neighbours are not its own."""
    import ctypes
    import mmap
    import os

    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    n = (offset + n) // mmap.PAGESIZE * mmap.PAGESIZE - start
    assert n > 0, "the slice must span a whole page"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(f, os.O_RDONLY)
    try:
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer(n // mmap.PAGESIZE)
        try:
            assert libc.mincore(addr, n, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, n)
        return all(b & 1 for b in vec.raw)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="Linux drops read slices with posix_fadvise; macOS's F_NOCACHE cannot be observed here")
def test_no_page_cache_leaves_expert_slices_uncached(zoo, tmp_path):
    import os

    from edge_ds.experts import drop_page_cache

    src = zoo.converted("v3", "4bit", moe_intermediate_size=256, **E16)  # 8 KiB slices: whole pages
    ref, _ = greedy_run(load_model(src), [4, 5, 6], 8)
    runs = {}
    for page_cache in (False, True):
        path = _copy(src, tmp_path / str(page_cache))
        for f in path.glob("*.safetensors"):  # written back, so DONTNEED can drop the pages
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        lazy, cache = lazy_model(path, "25%", page_cache=page_cache)
        assert drop_page_cache(cache.store.files())
        got, _ = greedy_run(lazy, [4, 5, 6], 8)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
        # Where the resident experts' slices are, from the store: loading a model to find out
        # would read the trunk with read-ahead and pull neighbouring slices into the page cache.
        slices = [(t.paths[e], t.offsets[e], t.nbytes) for l, e in cache.slot_of
                  for t in [cache.store.tensors[l]["gate_proj.weight"]]]
        runs[page_cache] = [_cached(*where) for where in slices]
    assert runs[True] and all(runs[True])  # the control: read slices stay in the page cache
    assert runs[False] and not any(runs[False])


def test_weights_are_wired_on_metal(with_tokenizer, monkeypatch):
    from edge_ds.wired import HEADROOM, parameter_bytes

    limits = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1 << 40})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: limits.append(n) or 0)
    lm = edge_ds.load(with_tokenizer, expert_budget="25%")
    trunk = parameter_bytes(lm.backend.model)
    assert limits == [int((trunk + lm.experts.slots * lm.experts.store.expert_bytes) * HEADROOM)]
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1000})
    edge_ds.load(with_tokenizer)
    assert limits[-1] == 1000  # never above what the system allows


# --- API and CLI ---------------------------------------------------------------------------
def _add_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # No byte alphabet: every id must stay below the tiny model's vocab_size (160).
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(["experts are read on demand from the model files. " * 20], trainer)
    assert tok.get_vocab_size() <= 160
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def with_tokenizer(tiny16, tmp_path_factory):
    return _add_tokenizer(_copy(tiny16["v3"], tmp_path_factory.mktemp("tok") / "m"))


def test_api_budget_and_stats(with_tokenizer):
    ref = edge_ds.load(with_tokenizer).generate("experts are", max_tokens=20, chat_template=False)
    lm = edge_ds.load(with_tokenizer, expert_budget="25%")
    out = lm.generate("experts are", max_tokens=20, chat_template=False)
    assert out.tokens == ref.tokens
    st = lm.expert_stats()
    assert st["hits"] + st["misses"] > 0 and st["decode_tokens"] >= 19
    assert set(st["hit_rate_per_layer"]) == {1, 2}
    assert st["resident_expert_bytes"] <= st["budget_bytes"] <= st["routed_expert_bytes"] // 4
    assert st["bytes_read_per_token"] > 0 and st["read_gbps"] > 0
    with pytest.raises(EdgeDSError, match="without expert_budget"):
        edge_ds.load(with_tokenizer).expert_stats()


def test_cli_bench_and_generate_with_budget(with_tokenizer):
    r = CliRunner().invoke(cli, ["bench", "--model", str(with_tokenizer), "--expert-budget", "25%", "-p", "8",
                                 "-g", "4", "-n", "1"])
    assert r.exit_code == 0, r.output
    assert "Expert hits" in r.output and "GB/s" in r.output
    r = CliRunner().invoke(cli, ["generate", "--model", str(with_tokenizer), "--expert-budget", "1KB",
                                 "--prompt", "x", "--no-chat-template"])
    assert r.exit_code == 1 and "--expert-budget" in r.output


# --- memory --------------------------------------------------------------------------------
_CODES = {np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}


def _inflate(template: Path, out: Path, num_experts: int) -> Path:
    """A copy of `template` with `num_experts` routed experts per layer: the template's experts
    tiled, a random router over all of them. Written tensor by tensor (never all in memory)."""
    from edge_ds.checkpoint import Checkpoint

    out.mkdir()
    cfg = json.loads((template / "config.json").read_text())
    E = cfg["n_routed_experts"]
    cfg["n_routed_experts"] = num_experts
    (out / "config.json").write_text(json.dumps(cfg))
    ck = Checkpoint(template)
    rng = np.random.default_rng(0)
    plan = {}  # name -> (dtype, shape, write(f))
    for name in ck.names():
        info = ck.info(name)
        if ".switch_mlp." in name:
            shape = (num_experts, *info.shape[1:])
            plan[name] = (ck.read(name), shape, num_experts // E)
        elif name.endswith("mlp.gate.weight"):
            plan[name] = (rng.normal(0, 0.1, (num_experts, info.shape[1])).astype(np.float32), None, 1)
        elif name.endswith("e_score_correction_bias"):
            plan[name] = (np.zeros(num_experts, np.float32), None, 1)
        else:
            plan[name] = (ck.read(name), None, 1)
    header, offset = {}, 0
    for name, (a, shape, reps) in plan.items():
        n = a.nbytes * reps
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(shape or a.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for a, _, reps in plan.values():
            for _ in range(reps):
                f.write(np.ascontiguousarray(a).tobytes())
    return out


_MEASURE = r"""
import json, resource, sys
import edge_ds, mlx.core as mx, numpy as np
from mlx.utils import tree_flatten
from edge_ds.cache import PromptCache
from edge_ds.experts import attach_experts
from edge_ds.loading import load_model

def status(field):  # Linux: VmRSS (now) / VmHWM (peak), in bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def peak():  # ru_maxrss would include the parent's peak: Linux keeps it across fork + exec
    return status("VmHWM")

path, budget = sys.argv[1], int(sys.argv[2])
mx.eval(mx.zeros(8) + 1)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak from here
model = load_model(path, routed_experts=False)
cache = attach_experts(model, path, budget)
trunk = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
kv = PromptCache(model.config.num_hidden_layers)
logits = model(mx.array([list(range(48))]), cache=kv)
over = 0
for _ in range(24):
    t = int(np.array(logits[0, -1]).argmax())
    logits = model(mx.array([[t]]), cache=kv)
    mx.eval(logits)
    over = max(over, cache.resident_bytes - budget)
st = cache.stats_dict()
print(json.dumps(dict(base=base, peak=peak(), trunk=trunk, routed=st["routed_expert_bytes"], over=over,
                      misses=st["misses"] + st["prefill_misses"])))
"""


@pytest.mark.slow
def test_peak_rss_stays_near_trunk_plus_budget(zoo, tmp_path):
    """A model whose routed experts are ~5x (trunk + budget + allowance) runs in a subprocess whose
    peak RSS grows by at most trunk + budget + a fixed allowance over the bare interpreter."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure a subprocess's peak RSS")
    template = zoo.converted("v3", "4bit", hidden_size=256, moe_intermediate_size=512, n_routed_experts=8)
    path = _inflate(template, tmp_path / "big", 768)
    budget = 32 << 20
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(budget)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    allowance = 48 << 20  # allocator cache, one prefill wave of unpacked weights, activations
    assert m["routed"] >= 4 * (m["trunk"] + budget + allowance)  # the experts could not all fit
    assert m["over"] <= 0 and m["misses"] > 0
    assert m["peak"] - m["base"] <= m["trunk"] + budget + allowance, m


def test_cli_generate_records_a_trace(with_tokenizer, tmp_path):
    from edge_ds.experts.trace import load_trace

    file = tmp_path / "t.jsonl"
    r = CliRunner().invoke(cli, ["generate", "--model", str(with_tokenizer), "--expert-budget", "50%", "--trace",
                                 str(file), "--prompt", "experts are", "--no-chat-template", "-m", "6"])
    assert r.exit_code == 0, r.output
    assert "Expert hits" in r.output
    tr = load_trace(file)
    assert tr.header["layers"] == [1, 2] and len([s for s in tr.steps if not s.prefill]) >= 2 * 5
