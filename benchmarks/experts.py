"""Lazy expert loading benchmark: decode tok/s, hit rate, bytes read per token and read GB/s at
expert budgets of 100/50/25/10% of the routed-expert bytes, warm and cold, against the fully
resident model in the same run.

    python benchmarks/experts.py [--model DIR]... [-p 128] [-g 64] [-n 3] [--budgets 100,50,25,10]
                                 [--prefetch-at 50,25] [--json OUT]
    python benchmarks/experts.py --policies [--model DIR]...   # trace replay: LRU/LFU/hybrid/Belady

Each configuration runs in a fresh process (clean allocator, honest peak RSS). Warm: one
warm-up generation fills the expert cache and the page cache, then n timed runs (median).
Cold: for each of n runs a fresh process-local expert cache and the model files dropped from
the page cache (posix_fadvise DONTNEED) right before generating. "resident + sync" is the
resident model forced to evaluate each layer's router output, as lazy loading must: it
isolates the cost of that synchronisation. Prompts are random token ids, decoding greedy
without EOS stop, as in `edge-ds bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(cfg: dict) -> dict:
    """One configuration, in this process."""
    import mlx.core as mx

    import edge_ds
    from edge_ds.experts import drop_page_cache
    from edge_ds.generate import GenerationStats, generate_tokens
    from edge_ds.sampling import make_sampler

    if cfg["sync"]:
        from edge_ds.models import moe

        route = moe.Router.__call__

        def synced(self, x):
            out = route(self, x)
            mx.eval(out)
            return out

        moe.Router.__call__ = synced

    def load():
        return edge_ds.load(cfg["model"], expert_budget=cfg["budget"], prefetch=cfg["prefetch"])

    lm = load()
    mx.random.seed(0)
    prompt = mx.random.randint(0, lm.config.vocab_size, (cfg["p"],)).tolist()
    sampler = make_sampler(0.0)

    def once() -> GenerationStats:
        stats = GenerationStats()
        for _ in generate_tokens(lm.backend, prompt, lm.new_cache(), sampler, cfg["g"], stats):
            pass
        return stats

    runs, experts = [], []
    if cfg["cold"]:
        for i in range(cfg["n"]):
            if i:
                lm.experts.close()
                lm = load()  # an empty expert cache
            dropped = drop_page_cache(lm.experts.store.files())
            runs.append(once())
            experts.append(lm.expert_stats())
    else:
        once()
        if lm.experts is not None:
            lm.experts.stats.reset()
        runs = [once() for _ in range(cfg["n"])]
        if lm.experts is not None:
            experts.append(lm.expert_stats())
        dropped = None
    out = {
        "decode_tps": statistics.median(r.generation_tps for r in runs),
        "prompt_tps": statistics.median(r.prompt_tps for r in runs),
        "decode_tps_runs": [round(r.generation_tps, 3) for r in runs],
        "peak_rss_mb": _peak_rss_mb(),
        "page_cache_dropped": dropped,
    }
    if experts:
        out.update({k: statistics.median(e[k] for e in experts) for k in
                    ("hit_rate", "bytes_read_per_token", "read_gbps", "resident_expert_bytes", "budget_bytes",
                     "routed_expert_bytes", "prefetch_issued", "prefetch_used")})
    return out


def _peak_rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run(cfg: dict) -> dict:
    label = f"budget={cfg['budget']} cold={cfg['cold']} prefetch={cfg['prefetch']} sync={cfg['sync']}"
    print(f"+ {Path(cfg['model']).name}: {label}", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"configuration {label} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


PROMPTS = ["In the beginning", "And the LORD spake unto Moses, saying,", "Blessed are the",
           "The quick brown fox"]


def policy_table(model: str, tokens: int, budgets: list[str], half_lives: list[float]) -> str:
    """Records routing while generating from a few natural prompts (sampled, seed 0), then replays
    the trace against each policy (and the hybrid at several half-lives)."""
    import tempfile

    import edge_ds
    from edge_ds.experts.replay import replay
    from edge_ds.experts.trace import load_trace

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "routing.jsonl"
        lm = edge_ds.load(model, trace=file)
        for i, prompt in enumerate(PROMPTS):
            lm.generate(prompt, max_tokens=tokens, temperature=0.8, seed=i, chat_template=False)
        lm.experts.recorder.close()
        tr = load_trace(file)
    decode = sum(1 for s in tr.steps if not s.prefill)
    names = ("lru", "lfu", "hybrid", "belady-0", "belady-1", "belady")
    lines = [f"**{Path(model).name}**: routing of {len(PROMPTS)} prompts x {tokens} sampled tokens "
             f"({decode} decode (token, layer) steps), decode hit rate by policy", "",
             "| budget | slots | LRU | LFU | hybrid | Belady, this token | Belady, next token | Belady "
             "| hybrid - Belady |", "|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        r = replay(tr, b, policies=names)
        rates = [r[p]["hit_rate"] for p in names]
        lines.append(f"| {b} | {r['slots']} | " + " | ".join(f"{x:.3f}" for x in rates)
                     + f" | {100 * (rates[2] - rates[-1]):+.1f} pts |")
    lines += ["", "| hybrid half-life (tokens) | " + " | ".join(budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for h in half_lives:
        rates = [replay(tr, b, policies=("hybrid",), half_life=h)["hybrid"]["hit_rate"] for b in budgets]
        lines.append(f"| {h:g} | " + " | ".join(f"{x:.3f}" for x in rates) + " |")
    lines += ["", "| hybrid, layers of lookahead hints | " + " | ".join(budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for ahead in range(max(len(s.hints or {}) for s in tr.steps) + 1):
        rates = [replay(_nearest_hints(tr, ahead), b, policies=("hybrid",))["hybrid"]["hit_rate"] for b in budgets]
        lines.append(f"| {ahead} | " + " | ".join(f"{x:.3f}" for x in rates) + " |")
    return "\n".join(lines)


def _nearest_hints(tr, ahead: int):
    """The trace with each step's hints cut to the nearest `ahead` later layers."""
    from dataclasses import replace

    from edge_ds.experts.trace import Trace

    steps = [replace(s, hints={m: s.hints[m] for m in sorted(s.hints)[:ahead]}) if s.hints else s for s in tr.steps]
    return Trace(tr.header, steps)


def table(model: str, rows: list[tuple[dict, dict]], resident: float) -> str:
    lines = [f"**{Path(model).name}**, median decode tok/s; x = ratio to the resident model in the same run",
             "", "| experts | page cache | prefetch | decode tok/s | x resident | hit rate | MB read/token | "
                 "read GB/s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for cfg, r in rows:
        if cfg["budget"] is None:
            what = "resident + sync" if cfg["sync"] else "resident"
            lines.append(f"| {what} | - | - | {r['decode_tps']:.2f} | {r['decode_tps'] / resident:.2f} | - | - | - | "
                         f"{r['peak_rss_mb']:.0f} |")
            continue
        lines.append(f"| {cfg['budget']} | {'cold' if cfg['cold'] else 'warm'} | {'on' if cfg['prefetch'] else 'off'} "
                     f"| {r['decode_tps']:.2f} | {r['decode_tps'] / resident:.2f} | {r['hit_rate']:.3f} | "
                     f"{r['bytes_read_per_token'] / 1e6:.2f} | {r['read_gbps']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", action="append", help="Converted model dir (repeatable; default: the shipped model "
                                                     "and bench_out/edge-q4).")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--budgets", default="100,50,25,10")
    ap.add_argument("--prefetch-at", default="50,25", help="Budgets also measured with prefetch on (warm and cold).")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--json", default=None, help="Also save all results here.")
    ap.add_argument("--policies", action="store_true", help="Only the trace replay of policies (per model).")
    ap.add_argument("--trace-tokens", type=int, default=256)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.policies:
        for model in args.model or [str(ROOT / "Package.resources" / "edge-ds-tiny")]:
            print(policy_table(model, args.trace_tokens, ["10%", "25%", "50%"], [4, 16, 64, 256, 1e9]) + "\n")
        return
    models = args.model or [str(ROOT / "Package.resources" / "edge-ds-tiny"), str(ROOT / "bench_out" / "edge-q4")]
    for model in models:
        if not (Path(model) / "config.json").is_file():
            raise SystemExit(f"{model}: no model there (the benchmark model is built by "
                             f"`python benchmarks/bench_model.py bench_out`)")
    budgets = [f"{b}%" for b in args.budgets.split(",") if b]
    prefetch_at = {f"{b}%" for b in args.prefetch_at.split(",") if b}
    everything = {}
    for model in models:
        base = dict(model=model, p=args.p, g=args.g, n=args.n, cold=False, prefetch=False, sync=False, budget=None)
        configs = [dict(base), dict(base, sync=True)]
        for b in budgets:
            for cold in ([False] if args.no_cold else [False, True]):
                configs.append(dict(base, budget=b, cold=cold))
                if b in prefetch_at:
                    configs.append(dict(base, budget=b, cold=cold, prefetch=True))
        rows = [(c, run(c)) for c in configs]
        resident = rows[0][1]["decode_tps"]
        everything[model] = [{"config": c, "result": r} for c, r in rows]
        print(table(model, rows, resident) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
