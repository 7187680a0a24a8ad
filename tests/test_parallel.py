"""Expert, tensor and pipeline parallelism over MLX's distributed layer: 2 ranks on localhost (ring
backend) against an independent single-process run of the same checkpoint.

Each 2-rank run starts this file as a script twice, with the environment `mlx.launch --backend
ring` gives its processes (MLX_HOSTFILE: a JSON list of each rank's "ip:port", MLX_RANK), so a
test can kill one rank. A run does all its checks at once (one model load per rank).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKENS = np.random.default_rng(7).integers(2, 300, (2, 24))  # logits batch (V4: its first row)
PROMPT = [int(t) for t in np.random.default_rng(8).integers(2, 300, 12)]
GREEDY = 64
# Routed experts large enough that a rank reading them all would exceed its bound below; under
# --parallel tensor every column split (o_proj: 4 heads x 32, down_proj: 128) halves into whole
# 4-bit groups of 64.
SHAPE = dict(vocab_size=300, max_position_embeddings=256, n_routed_experts=16, moe_intermediate_size=128,
             intermediate_size=128, v_head_dim=32)
# Tensors a tensor-parallel rank holds a share of (the test's own list, from mlx-lm's scheme).
SPLIT = ("q_proj.", "q_b_proj.", "kv_b_proj.", "embed_q.", "unembed_out.", "o_proj.", "gate_proj.", "up_proj.",
         "down_proj.")
SLACK = 128 * 1024  # safetensors headers, the index, config.json: what a load reads besides tensors
CHAT = {"messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 24, "temperature": 0}


# --- what both sides run ------------------------------------------------------------------
def workload(lm) -> dict:
    """Logits without a cache, 64 greedy tokens, then a second turn on the same cache (its
    prefix reused: the followers must rewind their mirror of it too)."""
    from edge_ds.generate import GenerationStats, generate_tokens
    from edge_ds.sampling import make_sampler

    tokens = TOKENS[:1] if lm.config.model_type == "deepseek_v4" else TOKENS  # V4's uncached forward takes batch 1
    greedy = make_sampler(0.0)
    cache = lm.new_cache()
    first = list(generate_tokens(lm.backend, PROMPT, cache, greedy, GREEDY, GenerationStats()))
    again = PROMPT + first[:8] + [5]
    second = list(generate_tokens(lm.backend, again, cache, greedy, 16, GenerationStats()))
    return {"logits": lm.logits(tokens), "first": first, "second": second}


def worker(mode: str, model: str, out: str, budget: str = "-", parallel: str = "expert") -> None:
    """One rank (run as a script under the ring environment)."""
    import edge_ds
    from edge_ds.parallel import run

    if mode == "loop":
        run.FATAL = True  # as `python -m edge_ds` does
    lm = edge_ds.load(model, parallel=parallel, expert_budget=None if budget == "-" else budget)  # ranks > 0 never return
    if mode == "parity":  # the checks, then the same model behind the HTTP server until stdin closes
        from edge_ds.server import make_server

        got = workload(lm)  # its cache is dropped as it returns
        from edge_ds.generate import GenerationStats, generate_tokens
        from edge_ds.sampling import make_sampler

        cache = lm.new_cache()
        list(generate_tokens(lm.backend, PROMPT[:4], cache, make_sampler(0.0), 2, GenerationStats()))
        del cache
        lm.logits(TOKENS[:1, :4])  # tells the followers to drop both mirrors
        got["freed"] = lm.backend.freed_sent
        np.save(out + ".npy", got.pop("logits"))
        got["bytes"] = lm.backend.bytes_read
        got["slots"] = lm.experts.slots if lm.experts is not None else 0
        Path(out).write_text(json.dumps(got))
        server = make_server(lm, "127.0.0.1", 0, quiet=True)
        server.start()
        print(server.server_port, flush=True)
        sys.stdin.read()
        server.close()
    elif mode == "loop":
        print("ready", flush=True)
        while True:
            lm.logits(TOKENS)


# --- launching ----------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(tmp: Path, args: list[str], size: int = 2, extra_env: dict | None = None,
           **popen) -> list[subprocess.Popen]:
    """`size` ranks of `python args...` with mlx.launch's ring environment."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
    env = dict(os.environ, MLX_HOSTFILE=str(hostfile), PYTHONPATH=str(ROOT), EDGE_DS_PARALLEL_TIMEOUT="20")
    env.update(extra_env or {})
    return [subprocess.Popen([sys.executable, *args], env=dict(env, MLX_RANK=str(r)), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            for r in range(size)]


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str, str]]:
    outs = []
    for p in procs:
        if p.stdin is not None and p.stdin.closed:
            p.stdin = None  # closed by the test already; communicate() would flush it
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, o, e))
    return outs


# --- models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from converters.mlx import convert
    from tests.test_api import add_tokenizer
    from tests.tiny_models import make_hf_model, save_hf

    base = tmp_path_factory.mktemp("parallel")
    out = {}
    for kind in ("v3", "v2lite"):
        hf = base / f"hf_{kind}"
        save_hf(make_hf_model(kind, **SHAPE), hf)
        add_tokenizer(hf, 300)
        for quant in ("none", "4bit"):
            out[kind, quant] = convert(hf, base / f"{kind}_{quant}", quant=quant, dtype="float32")
    return out


# --- tests --------------------------------------------------------------------------------
def test_plan_refuses_models_that_do_not_divide():
    from edge_ds.config import ModelConfig
    from edge_ds.parallel import ParallelError, expert_plan
    from tests.tiny_models import V3

    cfg = ModelConfig.from_dict(dict(V3, n_routed_experts=8))
    assert expert_plan(cfg, 1, 2).owned == [1, 3, 5, 7]
    assert expert_plan(cfg, 0, 8).owned == [0]
    with pytest.raises(ParallelError, match="does not divide over 3 ranks"):
        expert_plan(cfg, 0, 3)
    with pytest.raises(ParallelError, match="fewer than the 16 ranks"):
        expert_plan(cfg, 0, 16)


def test_tensor_plan_refuses_models_that_do_not_divide():
    """From config.json alone: heads, intermediate sizes, and quantized column splits (o_proj,
    down_proj) that would cut a quantization group; DeepSeek-V4 is refused by name."""
    from edge_ds.config import ModelConfig
    from edge_ds.parallel import ParallelError, tensor_plan
    from tests.tiny_models import V3
    from tests.tiny_v4 import V4_A

    cfg = ModelConfig.from_dict(V3)  # 4 heads, intermediate 96, moe_intermediate 32
    plan = tensor_plan(cfg, 1, 2)
    assert plan.split("model.layers.1.mlp.switch_mlp.down_proj.weight", (8, 64, 4)) == (2, 2, 4)
    assert plan.split("model.layers.1.mlp.switch_mlp.up_proj.scales", (8, 32, 1)) == (1, 16, 32)
    assert plan.split("model.layers.0.mlp.down_proj.weight", (64, 96)) == (1, 48, 96)
    assert plan.split("model.layers.1.mlp.experts.5.gate_proj.weight", (32, 64)) == (0, 16, 32)
    assert plan.split("model.layers.1.self_attn.kv_b_proj.weight", (4 * 40, 32)) == (0, 80, 160)
    assert plan.split("model.layers.1.self_attn.embed_q.weight", (4, 32, 16)) == (0, 2, 4)
    assert plan.split("model.layers.1.self_attn.o_proj.scales", (64, 2)) == (1, 1, 2)
    for replicated in ("model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                       "model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert plan.split(replicated, (64, 64)) is None
    local = plan.local_config(cfg)
    assert (local.num_attention_heads, local.intermediate_size, local.moe_intermediate_size) == (2, 48, 16)
    with pytest.raises(ParallelError, match="num_attention_heads = 4 does not divide over 3 ranks"):
        tensor_plan(cfg, 0, 3)
    with pytest.raises(ParallelError, match="intermediate_size = 96 does not divide over 64 ranks"):
        tensor_plan(ModelConfig.from_dict(dict(V3, num_attention_heads=64)), 0, 64)
    with pytest.raises(ParallelError, match="moe_intermediate_size = 32 does not divide over 64 ranks"):
        tensor_plan(ModelConfig.from_dict(dict(V3, num_attention_heads=64, intermediate_size=128)), 0, 64)
    # 4-bit groups of 32: o_proj 4 x 16 = 64, down_proj 128 (dense) and 64 (experts) halve into whole groups
    q4 = dict(V3, v_head_dim=16, intermediate_size=128, moe_intermediate_size=64,
              quantization={"group_size": 32, "bits": 4})
    tensor_plan(ModelConfig.from_dict(q4), 0, 2)
    with pytest.raises(ParallelError, match=r"o_proj's input \(num_attention_heads x v_head_dim = 4 x 16 = 64\) "
                                            r"splits into 16 columns per rank over 4 ranks, not a whole number "
                                            r"of quantization groups of 32"):
        tensor_plan(ModelConfig.from_dict(q4), 0, 4)
    with pytest.raises(ParallelError, match=r"layers.1.mlp.switch_mlp.down_proj's input \(moe_intermediate_size = 64\)"):
        tensor_plan(ModelConfig.from_dict(dict(q4, v_head_dim=32)), 0, 4)
    with pytest.raises(ParallelError, match="DeepSeek-V4 is not supported"):
        tensor_plan(ModelConfig.from_dict(dict(V4_A, model_type="deepseek_v4")), 0, 2)


@pytest.mark.parametrize("kind,quant,budget,parallel", [
    ("v3", "none", "-", "expert"), ("v3", "4bit", "-", "expert"), ("v2lite", "none", "-", "expert"),
    ("v2lite", "4bit", "50%", "expert"), ("v3", "4bit", "-", "pipeline"), ("v2lite", "none", "-", "pipeline"),
    ("v3", "4bit", "-", "tensor"), ("v2lite", "none", "-", "tensor"),
    pytest.param("v3", "none", "-", "tensor", marks=pytest.mark.slow),
    pytest.param("v2lite", "4bit", "-", "tensor", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process(models, kind, quant, budget, parallel, tmp_path):
    """Logits to 1e-5 relative, greedy tokens identical (two turns on one cache), each rank reads
    at most the trunk plus its half of the routed experts (counted, and measured by the OS); on
    the V3 4-bit model, `serve` under 2 ranks answers chat completions as one process does. The
    V2 4-bit run uses lazy experts with a per-rank budget (50% of the rank's half) against the
    resident single-process model. Pipeline: each rank reads only its stage's tensors. Tensor: each
    rank reads the replicated trunk and half of every split tensor (heads, intermediate dimensions),
    against the test's own tally of the safetensors headers."""
    import edge_ds
    from edge_ds.server import make_server

    path = models[kind, quant]
    out = tmp_path / "rank0.json"
    procs = launch(tmp_path, [__file__, "parity", str(path), str(out), budget, parallel], stdin=subprocess.PIPE)
    try:
        lm = edge_ds.load(path)  # the single-process run, meanwhile
        ref = workload(lm)
        serving = (kind, quant, parallel) == ("v3", "4bit", "expert")
        if serving:
            single = make_server(lm, "127.0.0.1", 0, quiet=True)
            single.start()
            try:
                want = [post(single.server_port, CHAT), post(single.server_port, dict(CHAT, max_tokens=8))]
            finally:
                single.close()
        line = procs[0].stdout.readline()
        assert line.strip().isdigit(), procs[0].stderr.read()[-3000:]
        if serving:
            port = int(line)
            got_http = [post(port, CHAT), post(port, dict(CHAT, max_tokens=8))]  # the second reuses the cache
    finally:
        procs[0].stdin.close()
    for r, (code, _, err) in enumerate(finish(procs)):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    got = json.loads(out.read_text())
    logits = np.load(str(out) + ".npy")
    rel = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert rel < 1e-5, rel
    assert got["first"] == ref["first"] and len(got["first"]) == GREEDY
    assert got["second"] == ref["second"]
    assert got["freed"] == 2  # the followers drop the mirrors of caches rank 0 dropped
    if serving:
        for g, w in zip(got_http, want):
            assert g["choices"] == w["choices"] and g["usage"] == w["usage"]
        assert got_http[0]["choices"][0]["message"]["content"]

    b = got["bytes"]
    if parallel == "tensor":
        trunk, split = header_bytes(path)
        assert split // 2 > SLACK  # so that reading the other rank's half too would fail the bound
        for row in b["per_rank"]:
            assert row["split"] == split // 2 and row["trunk"] == trunk, (row, trunk, split)  # the reader's count
            assert row["experts"] == b["routed_total"] // 2, row
            if row["os_read"] >= 0:  # the OS's count of what loading read: at least the share, at most + headers
                assert trunk + split // 2 <= row["os_read"] <= trunk + split // 2 + SLACK, (row, trunk, split)
        return
    share = b["routed_total"] // 2
    assert share > SLACK  # so that reading the other rank's experts too would fail the bound
    if parallel == "pipeline":  # "trunk" + "experts": the stage's tensors; every tensor on exactly one rank
        whole = b["per_rank"][0]["trunk"] + b["per_rank"][1]["trunk"] + 2 * share
        stages = [row["trunk"] + row["experts"] for row in b["per_rank"]]
        assert sum(stages) == whole
        for row, stage in zip(b["per_rank"], stages):
            assert stage < whole - SLACK
            assert 0 <= row["os_read"] <= stage + SLACK, (row, b)
        return
    if budget != "-":  # lazy: nothing but the trunk read at load; the cache holds half of the rank's experts
        assert b["expert_cache"] <= share // 2 and got["slots"] == (16 // 2) * 2 // 2, (b, got["slots"])  # its 8 experts x 2 MoE layers, halved
        assert all(row["experts"] == 0 and 0 <= row["os_read"] <= row["trunk"] + SLACK for row in b["per_rank"])
        return
    for row in b["per_rank"]:
        assert row["experts"] == share, row  # exactly its half, counted by the reader
        # The OS's count of bytes read while loading: trunk + its half, plus headers and config.
        if row["os_read"] >= 0:
            assert row["os_read"] <= row["trunk"] + share + SLACK, (row, b)


def header_bytes(path: Path) -> tuple[int, int]:
    """(replicated, split) bytes of a model dir's tensors under tensor parallelism, from the
    safetensors library's headers and the test's own list of split tensors (SPLIT)."""
    from safetensors import safe_open

    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I32": 4}
    trunk = split = 0
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = int(np.prod(sl.get_shape())) * itemsize[sl.get_dtype()]
                if any(f".{k}" in name for k in SPLIT):
                    split += n
                else:
                    trunk += n
    return trunk, split


def post(port: int, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_cli_generate_under_mlx_launch(models, tmp_path):
    """The real launcher and entry: `mlx.launch --python python -- -m edge_ds generate --parallel expert`."""
    path = models["v2lite", "4bit"]
    args = ["generate", "--model", str(path), "--prompt", "the quick brown fox", "--max-tokens", "24", "--temp", "0",
            "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed beside this python")
    two = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "-p", str(free_ports(1)[0]),
                          "--python", sys.executable, "--", "-m", "edge_ds", *args, "--parallel", "expert"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert two.returncode == 0, two.stderr[-3000:]
    import edge_ds

    one = edge_ds.load(path).generate("the quick brown fox", max_tokens=24, temperature=0).text
    assert one.strip()
    assert two.stdout.rstrip("\n") == one


@pytest.mark.parametrize("parallel,change,message", [
    ("expert", dict(n_routed_experts=3, n_group=1, topk_group=1), "n_routed_experts = 3 does not divide over 2 ranks"),
    ("tensor", dict(quantization={"group_size": 128, "bits": 4}),
     "o_proj's input (num_attention_heads x v_head_dim = 4 x 32 = 128) splits into 64 columns per rank over 2 ranks, "
     "not a whole number of quantization groups of 128")])
def test_non_dividing_model_is_refused_before_reading(models, tmp_path, parallel, change, message):
    """Expert: n_routed_experts 3 over 2 ranks; tensor: 4-bit groups of 128 along o_proj's 128 input
    columns, which 2 ranks would cut in half. Both ranks refuse from config.json alone (the
    directory has no weights, so any read would fail differently)."""
    d = tmp_path / "odd"
    d.mkdir()
    cfg = json.loads((models["v3", "none"] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, **change)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((models["v3", "none"] / name).read_bytes())
    results = finish(launch(tmp_path, [__file__, "parity", str(d), str(tmp_path / "x.json"), "-", parallel]),
                     timeout=30)
    for r, (code, _, err) in enumerate(results):
        assert code != 0
        assert message in err, err[-2000:]


def test_dead_rank_stops_rank_0_with_a_clear_error(models, tmp_path):
    procs = launch(tmp_path, [__file__, "loop", str(models["v3", "4bit"]), "-"])
    try:
        line = procs[0].stdout.readline()
        assert line.strip() == "ready", procs[0].stderr.read()[-2000:]
        time.sleep(0.5)  # mid-forward, most likely
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = procs[0].wait(timeout=30)
        took = time.monotonic() - start
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert code == 1
    assert took < 30
    lines = [l for l in err.splitlines() if l.startswith("edge-ds:")]
    assert len(lines) == 1, err[-2000:]
    assert "rank 0: lost the connection to rank 1 (127.0.0.1:" in lines[0], lines


@pytest.mark.slow
def test_hung_rank_stops_rank_0_after_the_timeout(models, tmp_path):
    """A rank that stops answering without closing its sockets (SIGSTOP): the watchdog ends rank 0
    after EDGE_DS_PARALLEL_TIMEOUT seconds with one line naming the rank."""
    procs = launch(tmp_path, [__file__, "loop", str(models["v3", "4bit"]), "-"],
                   extra_env={"EDGE_DS_PARALLEL_TIMEOUT": "4"})
    try:
        assert procs[0].stdout.readline().strip() == "ready", procs[0].stderr.read()[-2000:]
        procs[1].send_signal(signal.SIGSTOP)
        code = procs[0].wait(timeout=30)
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert code == 1
    assert "rank 0: no answer from rank 1 (127.0.0.1:" in err and "for 4 s" in err, err[-2000:]


def two_ranks_against_one(path: Path, tmp_path: Path, parallel: str) -> None:
    """The workload on 2 ranks and in one process: logits to 1e-5 relative, greedy tokens identical."""
    import edge_ds

    out = tmp_path / "rank0.json"
    procs = launch(tmp_path, [__file__, "parity", str(path), str(out), "-", parallel], stdin=subprocess.PIPE)
    try:
        ref = workload(edge_ds.load(path))
        assert procs[0].stdout.readline().strip().isdigit(), procs[0].stderr.read()[-3000:]
    finally:
        procs[0].stdin.close()
    for r, (code, _, err) in enumerate(finish(procs)):
        assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    got = json.loads(out.read_text())
    logits = np.load(str(out) + ".npy")
    assert np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-5
    assert got["first"] == ref["first"] and got["second"] == ref["second"]


@pytest.mark.slow
def test_deepseek_v4_expert_parallel(tmp_path):
    """V4 (V4MoE is a models.moe.MoE: the same hook): 4-bit, logits and greedy tokens as one process."""
    from converters.mlx import convert
    from tests.test_api import add_tokenizer
    from tests.tiny_v4 import make_v4, save_v4

    hf = save_v4(make_v4("a", vocab_size=300), tmp_path / "hf")
    path = convert(hf, tmp_path / "q4", quant="4bit", dtype="float32")
    add_tokenizer(path, 300)
    two_ranks_against_one(path, tmp_path, "expert")


@pytest.mark.slow
def test_deepseek_v32_tensor_parallel(tmp_path):
    """V3.2 under --parallel tensor: its Lightning Indexer is replicated (it reads q_a's latent and
    the hidden state, both whole on every rank), so every rank picks the same rows; 4-bit."""
    from converters.mlx import convert
    from tests.test_api import add_tokenizer
    from tests.tiny_models import make_hf_model, save_hf

    hf = tmp_path / "hf"
    save_hf(make_hf_model("v32", **SHAPE), hf)
    add_tokenizer(hf, 300)
    path = convert(hf, tmp_path / "q4", quant="4bit", dtype="float32")
    two_ranks_against_one(path, tmp_path, "tensor")


if __name__ == "__main__":
    worker(*sys.argv[1:6])
