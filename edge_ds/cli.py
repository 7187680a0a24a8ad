"""The `edge-ds` command line: convert, export-onnx, generate, chat, serve, info, bench, trace.

The top layer: the one module that imports both the runtime and the converters, and the one
place that knows command-line flags (library errors name arguments; FLAGS turns them into
flags). Commands import what they run when they run, so `edge-ds --help` loads no MLX.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

import click

from . import backends
from .errors import EdgeDSError, OptionError
from .options import SamplingOptions
from .server import Limits  # light: the server loads the model's runtime (MLX) only through load()

# The flag for each library argument that OptionError may name.
FLAGS = {
    "max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k",
    "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed", "stop": "--stop",
    "path": "--model DIR", "backend": "--backend",
    "expert_budget": "--expert-budget", "trace": "--trace", "budget": "--budget", "window": "--window",
    "quant": "--quant", "group_size": "--group-size", "dtype": "--dtype",
    "bits": "--bits", "block_size": "--block-size", "accuracy_level": "--accuracy-level",
    "device": "--device", "gemm": "--gemm", "windows": "--windows",
}


def user_message(e: EdgeDSError) -> str:
    """The error's message, with a flag where the library named an argument."""
    return e.spelled(FLAGS.get(e.option, e.option)) if isinstance(e, OptionError) else str(e)


class Group(click.Group):
    """Prints user errors as one line on stderr and exits 1, never with a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeDSError as e:
            click.echo(f"edge-ds: error: {user_message(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-ds")
def main():
    """Run DeepSeek-architecture models (MLA + sparse MoE) on this machine."""


def sampling_options(f):
    options = [
        click.option("--max-tokens", "-m", default=256, show_default=True, help="Tokens to generate at most."),
        click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0: greedy)."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--min-p", default=0.0, show_default=True, help="Drop tokens below min-p x the top probability."),
        click.option("--repetition-penalty", default=None, type=float, help="CTRL-style penalty (> 1 discourages)."),
        click.option("--seed", default=None, type=int, help="Random seed for sampling."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        kw["sampling"] = dict(max_tokens=kw.pop("max_tokens"), temperature=kw.pop("temp"), top_p=kw.pop("top_p"),
                              top_k=kw.pop("top_k"), min_p=kw.pop("min_p"),
                              repetition_penalty=kw.pop("repetition_penalty"), seed=kw.pop("seed"),
                              stop=list(kw.pop("stop")))
        SamplingOptions(**kw["sampling"])  # the API checks them again; here, before a model is loaded
        return f(*args, **kw)

    return wrapper


model_option = click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
                            help="Converted model directory (default: the shipped model).")


backend_option = click.option("--backend", type=click.Choice(backends.names()), default=None,
                              help="Runtime (default: mlx on Apple Silicon; elsewhere onnx when the model "
                                   "directory holds an `edge-ds export-onnx` export, else mlx).")


def torch_options(f):
    """--device, --gemm and --act-dtype for the torch backend, collected into one `backend_options` dict
    of load() options (only the ones given, so other backends see none unless asked)."""
    options = [
        click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
                     help="With --backend torch: where it computes (default: cuda when torch sees a GPU)."),
        click.option("--gemm", type=click.Choice(["bf16", "fp8"]), default=None,
                     help="With --backend torch: bf16 (dequantized weights, DeepSeek's default) or fp8 "
                          "(DeepSeek's FP8 GEMM for e4m3 weights)."),
        click.option("--act-dtype", "act_dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
                     help="With --backend torch: activation dtype (default bfloat16, as DeepSeek serves)."),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        given = dict(device=kw.pop("device"), gemm=kw.pop("gemm"), dtype=kw.pop("act_dtype"))
        kw["backend_options"] = {k: v for k, v in given.items() if v is not None}
        return f(*args, **kw)

    return wrapper


@contextlib.contextmanager
def progress_bar(label: str):
    """Yields a progress(done, total, item) callback drawing a bar on stderr; the bar is made on
    the first report, when the total is known."""
    bar = None

    def progress(done: int, total: int, item: str) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                                    item_show_func=lambda x: x)
            bar.__enter__()
        bar.update(done - bar.pos, item)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def expert_options(f):
    """--expert-budget, --prefetch, --page-cache and --trace, collected into one `experts` dict of load() options."""
    options = [
        click.option("--expert-budget", default=None,
                     help="Keep at most this much of the routed experts in memory, reading the rest on demand: "
                          "bytes, a size (2GB, 512MiB) or a share of the experts (25%). Results are unchanged."),
        click.option("--prefetch/--no-prefetch", default=False, show_default=True,
                     help="With --expert-budget: read the next layer's likely experts ahead."),
        click.option("--page-cache/--no-page-cache", default=True, show_default=True,
                     help="With --expert-budget: let the OS page cache keep read experts too (off: the budget "
                          "bounds all memory experts take)."),
        click.option("--trace", "trace_file", type=click.Path(dir_okay=False), default=None,
                     help="Record routing (layer, token, experts) to this JSONL file (see `edge-ds trace replay`)."),
    ]
    for option in reversed(options):
        f = option(f)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        kw["experts"] = dict(expert_budget=kw.pop("expert_budget"), prefetch=kw.pop("prefetch"),
                             expert_page_cache=kw.pop("page_cache"), trace=kw.pop("trace_file"))
        return f(*args, **kw)

    return wrapper


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--quant", "-q", type=click.Choice(["4bit", "8bit", "mxfp4", "mxfp8", "none"]), default="4bit",
              show_default=True, help="Weight format.")
@click.option("--group-size", type=int, default=None, help="Quantization group size (4bit/8bit: 32, 64, 128).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True, help="Type of unquantized weights and of scales.")
@click.option("--onnx/--no-onnx", "with_onnx", default=None,
              help="Also write an onnxruntime export (4-bit, block 32) beside the MLX weights. Default: yes where "
                   "MLX has no Metal (off Apple Silicon), where the export is the faster backend.")
def convert(src, dst, quant, group_size, dtype, with_onnx):
    """Convert a Hugging Face or DeepSeek-V4 release checkpoint (BF16, FP8, FP4 experts) in SRC to an MLX
    model in DST."""
    from converters.mlx import convert as run
    from converters.onnx import not_exportable
    from edge_ds.config import ModelConfig

    why_not = not_exportable(ModelConfig.load(src))
    if with_onnx and why_not:
        raise EdgeDSError(f"--onnx: {why_not}")
    if with_onnx is None and not backends.apple_silicon() and not why_not:
        with_onnx = True
        click.echo("this machine runs MLX on its CPU, where onnxruntime is faster: an ONNX export goes beside "
                   "the MLX weights (--no-onnx skips it; --backend mlx still runs the MLX weights)", err=True)
    with progress_bar("converting") as progress:
        out = run(src, dst, quant=quant, group_size=group_size, dtype=dtype, progress=progress, onnx=bool(with_onnx))
    click.echo(f"wrote {out}", err=True)


@main.command("export-onnx")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Weight bits of every projection, the head and the routed experts.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Input features per quantization scale.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="4", show_default=True,
              help="onnxruntime's compute type: 0 float32 activations (exact), 4 int8 activations (fast).")
def export_onnx(src, dst, bits, block_size, accuracy_level):
    """Export a Hugging Face checkpoint (BF16 or FP8) in SRC to an onnxruntime model in DST."""
    from converters.onnx import export_onnx as run

    with progress_bar("exporting") as progress:
        out = run(src, dst, bits=int(bits), block_size=int(block_size), accuracy_level=int(accuracy_level),
                  progress=progress)
    click.echo(f"wrote {out}", err=True)


def _print_expert_stats(st: dict) -> None:
    from .experts.budget import format_bytes

    per_layer = " ".join(f"{l}:{r:.2f}" for l, r in st["hit_rate_per_layer"].items())
    click.echo(
        f"Experts: {st['slots']} slots, {format_bytes(st['resident_expert_bytes'])} resident of "
        f"{format_bytes(st['budget_bytes'])} budget ({format_bytes(st['routed_expert_bytes'])} routed in all)\n"
        f"Expert hits: {st['hits']}, misses: {st['misses']}, hit rate {st['hit_rate']:.3f} (per layer {per_layer})\n"
        f"Expert reads: {format_bytes(st['bytes_read_per_token'])}/token, {st['read_gbps']:.2f} GB/s, "
        f"prefetch {st['prefetch_used']}/{st['prefetch_issued']} used", err=True)


def _print_stats(stats, lm) -> None:
    click.echo(
        f"\n==========\nPrompt: {stats.prompt_tokens} tokens ({stats.prefilled_tokens} prefilled), "
        f"{stats.prompt_tps:.3f} tokens-per-sec\nGeneration: {stats.generation_tokens} tokens, "
        f"{stats.generation_tps:.3f} tokens-per-sec\nPeak memory: {stats.peak_memory_gb:.3f} GB\n"
        f"Backend: {lm.backend.name} ({lm.backend_reason}), {lm.backend.device}", err=True)


def parallel_option(f):
    """--parallel expert|tensor|pipeline: the model split over the ranks `mlx.launch` started (README, Several
    machines), passed to load() with the `experts` dict (or `backend_options` where a command has no experts)."""

    @click.option("--parallel", type=click.Choice(["expert", "tensor", "pipeline"]), default=None,
                  help="Under mlx.launch: split the model over the ranks (expert: routed experts by id, trunk "
                       "on every rank; tensor: attention heads and every MLP's intermediate dimension; "
                       "pipeline: layers in stages). Rank 0 prints and serves; one process: a normal load.")
    @functools.wraps(f)
    def wrapper(*args, parallel=None, **kw):
        if parallel is not None:
            target = "experts" if "experts" in kw else "backend_options"
            kw[target] = {**kw[target], "parallel": parallel}
        return f(*args, **kw)

    return wrapper


@main.command()
@model_option
@click.option("--prompt", "-p", required=True, help="Prompt text ('-' reads standard input).")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as plain text.")
@click.option("--quiet", is_flag=True, help="Print only the generated text.")
@sampling_options
@expert_options
@backend_option
@torch_options
@parallel_option
def generate(model_dir, prompt, no_chat_template, quiet, sampling, experts, backend, backend_options):
    """Generate text from a prompt."""
    from .api import load

    if prompt == "-":
        prompt = sys.stdin.read()
    lm = load(model_dir, backend=backend, **experts, **backend_options)
    stream = lm.stream(prompt, chat_template=False if no_chat_template else None, **sampling)
    for chunk in stream:
        click.echo(chunk, nl=False)
        sys.stdout.flush()
    click.echo()
    if not quiet:
        _print_stats(stream.stats, lm)
        if lm.experts is not None:
            _print_expert_stats(lm.expert_stats())


CHAT_HELP = """Commands:
  /reset          start a new conversation (the system prompt stays)
  /exit, /bye     quit (Ctrl-D too)
  /help, /?       this list
Ctrl-C stops a reply without ending the session. A long conversation drops its oldest turns."""


@main.command()
@model_option
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@expert_options
@backend_option
@parallel_option
def chat(model_dir, system, sampling, experts, backend):
    """Chat in the terminal. /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."""
    from .api import load

    lm = load(model_dir, backend=backend, **experts)
    if not lm.tokenizer.has_chat_template:
        raise EdgeDSError(f"{lm.path}: the model has no chat template; use `edge-ds generate --no-chat-template`")
    session = lm.chat(system)
    warned_full = False
    click.echo(f"edge-ds chat: {lm.path.name}. /reset to start over, /exit to quit, /help for more.", err=True)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if cmd in ("/help", "/?"):
            click.echo(CHAT_HELP, err=True)
            continue
        if cmd.startswith("/") and " " not in cmd:
            click.echo(f"unknown command {cmd}; /help lists the commands", err=True)
            continue
        if not cmd:
            continue
        try:
            stream = session.send(line, **sampling)
            if session.dropped_turns and not warned_full:
                click.echo("(the conversation is longer than the context: the oldest turns are dropped from "
                           "now on, the system prompt kept; /reset starts over)", err=True)
                warned_full = True
            for chunk in stream:
                click.echo(chunk, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [stopped]", err=True)
            continue
        except EdgeDSError as e:  # the session goes on: say why this turn failed
            click.echo(f"edge-ds: error: {user_message(e)}", err=True)
            continue
        click.echo()


@main.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set --api-key before exposing it).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: any free port).")
@click.option("--max-connections", default=Limits.max_connections, show_default=True, type=click.IntRange(1),
              metavar="N", help="Open connections served at once; more are answered 503 with Retry-After.")
@click.option("--max-queue", default=Limits.max_queued, show_default=True, type=click.IntRange(1), metavar="N",
              help="Generation requests queued or running; more are answered 429 with Retry-After.")
@click.option("--max-concurrency", default=1, show_default=True, type=click.IntRange(1), metavar="N",
              help="Decode up to N requests together as one batch (MLX or ONNX; DeepSeek-V4 queues); more wait. "
                   "1: one at a time, with the prompt cache kept between requests.")
@click.option("--api-key", envvar="EDGE_DS_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (401 otherwise). "
                   "Prefer the EDGE_DS_API_KEY environment variable: a flag shows in the process list.")
@expert_options
@backend_option
@parallel_option
def serve(model_dir, host, port, max_connections, max_queue, max_concurrency, api_key, experts, backend):
    """Serve the model over an OpenAI-compatible HTTP API until Ctrl-C.

    GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming
    with "stream": true). One generation at a time, others waiting their turn, unless
    --max-concurrency N decodes up to N together."""
    from .api import load
    from .server import serve as run

    limits = Limits.sized(max_connections, max_queue)
    lm = load(model_dir, backend=backend, **experts)

    def ready(server) -> None:
        click.echo(f"edge-ds serve: {server.model_id} at {server.url}/v1 (Ctrl-C stops)")

    run(lm, host, port, on_ready=ready, limits=limits, api_key=api_key or None,  # returns on Ctrl-C: exit status 0
        max_concurrency=max_concurrency)


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model_dir, as_json):
    """Show a model's family, parameters, bits per weight, size and cache cost."""
    from .info import model_info

    facts = model_info(model_dir)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    q = facts["quantization"]
    rows = [
        ("family", f"{facts['family']} ({facts['model_type']})"),
        ("layers", f"{facts['layers']} ({facts['moe_layers']} MoE, {facts['routed_experts']} experts, "
                   f"top-{facts['experts_per_token']})"),
        ("parameters", f"{facts['total_params'] / 1e6:,.1f}M total, {facts['active_params'] / 1e6:,.1f}M active"),
        ("weights", f"{facts['bits_per_weight']} bits/weight"
                    + (f" ({q.get('mode', 'symmetric')} {q['bits']}-bit, group "
                       f"{q.get('group_size', q.get('block_size'))})" if q else " (unquantized)")
                    + (f", routed experts {facts['expert_quantization']['mode']} "
                       f"{facts['expert_quantization']['bits']}-bit" if q and facts.get("expert_quantization")
                       and (facts["expert_quantization"]["mode"], facts["expert_quantization"]["bits"])
                       != (q.get("mode", "affine"), q["bits"]) else "")),
        ("size on disk", f"{facts['size_on_disk_bytes'] / 1e6:,.1f} MB"),
        ("cache", f"{facts['cache_bytes_per_token']:,} bytes/token ({facts['cache_dtype']}); "
                  + ", ".join(f"{_tokens(n)}: {_bytes(b)}" for n, b in facts["cache_bytes_at"].items())),
        ("backend", f"{facts['backend']} by default ({facts['backend_reason']})"),
    ]
    for k, v in rows:
        click.echo(f"{k:>13}: {v}")


def _tokens(n: int) -> str:
    """4096 -> '4k tokens', 1048576 -> '1M tokens'."""
    return f"{n >> 20}M tokens" if n >= 1 << 20 else f"{n >> 10}k tokens"


def _bytes(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


@main.command()
@model_option
@click.option("--prompt-tokens", "-p", default=128, show_default=True, help="Random prompt length.")
@click.option("--generation-tokens", "-g", default=64, show_default=True, help="Tokens generated per trial.")
@click.option("--num-trials", "-n", default=3, show_default=True, help="Timed trials after one warm-up (medians).")
@click.option("--depth", "-d", default=0, show_default=True,
              help="Tokens already in the cache before each trial's prompt (llama-bench's -d): speed at a long context.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@expert_options
@backend_option
@torch_options
@parallel_option
def bench(model_dir, prompt_tokens, generation_tokens, num_trials, depth, as_json, experts, backend, backend_options):
    """Measure prompt and generation tokens/s (same meaning as mlx-lm's benchmark)."""
    from .api import load
    from .bench import run_bench

    if prompt_tokens < 1 or generation_tokens < 1 or num_trials < 1 or depth < 0:
        raise EdgeDSError("-p, -g and -n must be at least 1, and -d at least 0")
    lm = load(model_dir, backend=backend, **experts, **backend_options)
    result = run_bench(lm, prompt_tokens, generation_tokens, num_trials, depth)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"prompt_tps={result['prompt_tps']:.3f} generation_tps={result['generation_tps']:.3f} "
                   f"peak_memory={result['peak_memory_gb']:.3f} GB ({num_trials} trials, median"
                   + (f", after {depth} tokens of context)" if depth else ")"))
        if "experts" in result:
            _print_expert_stats(result["experts"])


@main.group()
def trace():
    """Routing traces recorded with --trace."""


@trace.command("replay")
@click.argument("trace_file", type=click.Path(dir_okay=False))
@click.option("--budget", "budgets", multiple=True, required=True,
              help="Cache size: bytes, a size (512MiB) or a share of the routed experts (25%). Repeatable.")
@click.option("--prefill", is_flag=True, help="Replay prefill steps too (the runtime streams them past the cache).")
@click.option("--half-life", type=float, default=None, help="The hybrid policy's half-life in tokens.")
def trace_replay(trace_file, budgets, prefill, half_life):
    """Replay a trace against LRU, LFU, the runtime's hybrid policy and Belady's optimum.

    Two more columns show Belady seeing only the current token, and the current and next token:
    how much of the optimum needs routing that no runtime can know yet."""
    from .experts.replay import replay
    from .experts.trace import load_trace

    names = ("lru", "lfu", "hybrid", "belady-0", "belady-1", "belady")
    tr = load_trace(trace_file)
    click.echo(f"{tr.header.get('model', trace_file)}: {len(tr.steps)} (token, layer) steps, "
               f"{tr.header['num_experts']} experts x {len(tr.header['layers'])} layers, top-{tr.header['top_k']}")
    click.echo("| budget | slots | LRU | LFU | hybrid | Belady, this token | Belady, next token | Belady |\n"
               "|---|---|---|---|---|---|---|---|")
    for b in budgets:
        r = replay(tr, b, policies=names, prefill=prefill, half_life=half_life)
        rates = " | ".join(f"{r[p]['hit_rate']:.3f}" for p in names)
        click.echo(f"| {b} | {r['slots']} | {rates} |")


@main.command()
@model_option
@click.option("--file", "text_file", type=click.Path(dir_okay=False), required=True,
              help="UTF-8 text to score.")
@click.option("--window", default=256, show_default=True, help="Tokens predicted per window.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@backend_option
@torch_options
@parallel_option
def perplexity(model_dir, text_file, window, as_json, backend, backend_options):
    """Perplexity of a text file (non-overlapping windows, BOS at the start)."""
    from .api import load
    from .perplexity import perplexity as measure

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeDSError(f"{text_file}: cannot read as UTF-8 text ({e})") from None
    try:
        with progress_bar("scoring") as progress:
            result = measure(load(model_dir, backend=backend, **backend_options), text, window, progress=progress)
    except ValueError as e:
        raise EdgeDSError(f"{text_file}: {e}") from None
    if as_json:
        click.echo(json.dumps({"perplexity": result.perplexity, "mean_nll": result.mean_nll,
                               "tokens": result.tokens, "window": window}, indent=2))
    else:
        click.echo(f"perplexity={result.perplexity:.4f} ({result.tokens} tokens, window {window})")


@main.command()
@click.argument("ref", required=False)
@click.argument("candidates", nargs=-1)
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text to score (default: the shipped model's held-out validation text).")
@click.option("--windows", default=8, show_default=True, help="Windows scored, from the start of the text.")
@click.option("--window", default=128, show_default=True, help="Tokens predicted per window.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@torch_options
def parity(ref, candidates, text_file, windows, window, as_json, backend_options):
    """How far each candidate build is from a reference build, on the same token windows.

    REF and each CAND is a directory, run on the backend its files call for (a Hugging Face
    checkpoint on torch, the datacenter numerics, with --gemm fp8 by default for REF; an ONNX
    export on onnx; mlx-lm weights on mlx), or BACKEND[,key=value...]:DIR, e.g. torch,gemm=bf16:DIR.
    With no arguments: the shipped model's FP8 build against its shipped builds."""
    from .parity import default_comparison, default_text_path, format_table, open_model, parse_spec
    from .parity import parity as measure

    if ref is None:
        ref_spec, cand_specs = default_comparison(**backend_options)
    else:
        if not candidates:
            raise EdgeDSError("give at least one CAND to compare with REF")
        options = {"gemm": "fp8", **backend_options}
        ref_spec = parse_spec(ref, None, **options)
        cand_specs = [parse_spec(c, None, **backend_options) for c in candidates]
    text_path = Path(text_file) if text_file else default_text_path()
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeDSError(f"{text_path}: cannot read as UTF-8 text ({e})") from None
    if not text.strip():
        raise EdgeDSError(f"{text_path}: the text is empty")
    reference = open_model(ref_spec)
    models = [open_model(s) for s in cand_specs]
    with progress_bar("comparing") as progress:
        report = measure(reference, models, text, window, windows, labels=[str(s) for s in cand_specs],
                         progress=progress, text_name=str(text_path))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_table(report))


if __name__ == "__main__":
    main()
