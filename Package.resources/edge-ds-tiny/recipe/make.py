"""Build edge-ds-tiny from a clean checkout in one command:

    python Package.resources/edge-ds-tiny/recipe/make.py [--work DIR]

corpus (committed xz) -> sentencepiece tokenizer -> train (train.py, ~65 min on 2 cores) ->
`edge-ds convert` to float32 / 8-bit / 4-bit (+ its ONNX export) -> the datacenter build: the float
weights in DeepSeek's FP8 layout (edge_ds.datacenter.write_fp8_checkpoint) -> validation perplexity
of each with edge-ds -> `edge-ds bench` on the 4-bit model -> greedy samples -> report.json + the
model's README.md -> install the 4-bit model into Package.resources/edge-ds-tiny/ (recipe/ is left
as it is) and the FP8 build into Package.resources/edge-ds-tiny-fp8/ (what `edge-ds parity` with
no arguments takes as its reference).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402

QUANTS = {"float32": ("none", None, "float32"), "8bit": ("8bit", 64, "float32"), "4bit": ("4bit", 64, "float32")}
SHIPPED = "4bit"
FP8 = "fp8"  # the datacenter build: e4m3 + 128x128 weight_scale_inv, run on the torch backend
FP8_DIR = MODEL_DIR.parent / (MODEL_DIR.name + "-fp8")
SAMPLE_PROMPTS = [
    "In the beginning",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the",
]
TEST_WINDOWS = 12  # tests/test_default_model.py scores this many validation windows (a quick CI check)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model",
               "tokenizer_config.json", "model.onnx", "onnx.json")  # the ONNX export: the fast path off Apple Silicon


def float_subset_perplexity(work: Path, log: dict) -> float:
    """The torch float model's perplexity on the first TEST_WINDOWS validation windows: the
    independent figure the test holds the shipped 4-bit model to."""
    import torch
    import transformers

    import train
    from edge_ds.tokenizer import Tokenizer

    torch.set_num_threads(2)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    tok = Tokenizer.load(work / "hf")
    windows = train.validation_windows(tok, corpus.VALIDATION.read_text(encoding="utf-8"), log["train"]["eval_window"])
    return train.perplexity(model, windows[:TEST_WINDOWS])


def convert_all(work: Path) -> dict[str, Path]:
    from converters.mlx import convert

    out = {}
    for name, (quant, group, dtype) in QUANTS.items():
        dst = work / name
        if dst.exists():
            shutil.rmtree(dst)
        # The shipped build carries its onnxruntime export too, made from the float weights.
        convert(work / "hf", dst, quant=quant, group_size=group, dtype=dtype, progress=False, onnx=name == SHIPPED)
        out[name] = dst
    from edge_ds.datacenter import write_fp8_checkpoint

    fp8 = work / FP8
    shutil.rmtree(fp8, ignore_errors=True)
    out[FP8] = write_fp8_checkpoint(work / "hf", fp8)
    return out


def evaluate(dirs: dict[str, Path], window: int) -> dict:
    import edge_ds
    from edge_ds.bench import run_bench
    from edge_ds.info import model_info
    from edge_ds.perplexity import perplexity

    text = corpus.VALIDATION.read_text(encoding="utf-8")
    report: dict = {"perplexity": {}, "size_bytes": {}, "bits_per_weight": {}}
    for name, d in dirs.items():
        if name == FP8:  # DeepSeek's FP8 serving numerics (torch, emulated exactly on the CPU)
            lm = edge_ds.load(d, backend="torch", device="cpu", gemm="fp8")
        else:
            lm = edge_ds.load(d, backend="mlx")
        t = time.time()
        result = perplexity(lm, text, window)
        report["perplexity"][name] = result.perplexity
        report["perplexity_tokens"] = result.tokens
        info = model_info(d)
        onnx_bytes = sum((d / n).stat().st_size for n in ("model.onnx", "onnx.json") if (d / n).is_file())
        report["size_bytes"][name] = info["size_on_disk_bytes"] - onnx_bytes  # the weights, not the export beside them
        report["bits_per_weight"][name] = info["bits_per_weight"]
        print(f"{name}: validation perplexity {result.perplexity:.3f} ({result.tokens} tokens, "
              f"{time.time() - t:.1f} s), {info['size_on_disk_bytes'] / 1e6:.1f} MB", flush=True)
        if name == SHIPPED:
            report["perplexity_onnx"] = perplexity(edge_ds.load(d, backend="onnx"), text, window).perplexity
            report["info"] = info
            report["bench"] = run_bench(lm, 128, 64, 5)
            report["samples"] = [
                {"prompt": p, "continuation": lm.generate(p, max_tokens=40, chat_template=False).text}
                for p in SAMPLE_PROMPTS
            ]
            report["chat_sample"] = {"user": "The LORD is my shepherd; I shall not want.",
                                     "assistant": lm.generate("The LORD is my shepherd; I shall not want.",
                                                              max_tokens=60).text}
    return report


def corpus_tokens(tokenizer_dir: Path) -> int:
    from edge_ds.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    train, _ = corpus.split()
    return sum(len(tok.encode("\n".join(c))) + 1 for c in train)


def install(src: Path, fp8: Path) -> None:
    """Replace the model files in Package.resources/edge-ds-tiny with src's, keeping recipe/, and
    Package.resources/edge-ds-tiny-fp8 with the FP8 build."""
    for old in MODEL_DIR.glob("model*.safetensors"):
        old.unlink()
    for f in [*src.glob("model*.safetensors"), *(src / n for n in MODEL_FILES)]:
        if f.is_file():
            shutil.copy2(f, MODEL_DIR / f.name)
    shutil.rmtree(FP8_DIR, ignore_errors=True)
    shutil.copytree(fp8, FP8_DIR)
    shutil.copy2(MODEL_DIR / "LICENSE", FP8_DIR / "LICENSE")
    (FP8_DIR / "README.md").write_text(
        "# edge-ds-tiny, datacenter build\n\n"
        "The float weights edge-ds-tiny was trained to (see ../edge-ds-tiny/README.md), written by\n"
        "`../edge-ds-tiny/recipe/make.py` in DeepSeek-V3's FP8 layout: decoder projections as float8_e4m3fn with float32\n"
        "`weight_scale_inv` per 128x128 block, embeddings, norms, router and head in bfloat16, the\n"
        "router's correction bias in float32 (`edge_ds.datacenter.write_fp8_checkpoint`). It runs on the\n"
        "torch backend (`pip install -e \".[torch]\"`) and is the reference `edge-ds parity` takes\n"
        "with no arguments. MIT licence, like the 4-bit build.\n")


def write_readme(report: dict, log: dict) -> None:
    ppl, info, bench = report["perplexity"], report["info"], report["bench"]
    f32 = ppl["float32"]
    rows = "\n".join(
        f"| {name} | {ppl[name]:.3f} | {100 * (ppl[name] / f32 - 1):+.2f}% | {report['bits_per_weight'][name]} | "
        f"{report['size_bytes'][name] / 1e6:.1f} MB |" for name in QUANTS)
    if FP8 in ppl:
        rows += (f"\n| FP8 (DeepSeek's layout and numerics, torch backend; `../edge-ds-tiny-fp8`) | {ppl[FP8]:.3f} | "
                 f"{100 * (ppl[FP8] / f32 - 1):+.2f}% | {report['bits_per_weight'][FP8]} | "
                 f"{report['size_bytes'][FP8] / 1e6:.1f} MB |")
    if "perplexity_onnx" in report:
        onnx = report["perplexity_onnx"]
        rows += (f"\n| 4bit, its onnxruntime export (block 32; the default backend off Apple Silicon) | {onnx:.3f} | "
                 f"{100 * (onnx / f32 - 1):+.2f}% | | (same directory) |")
    balance = log["validation_load_max_over_mean"]
    samples = "\n\n".join(f"**{s['prompt']}**{s['continuation']}" if s["continuation"][:1] in " ,.;:" else
                          f"**{s['prompt']}** {s['continuation']}" for s in report["samples"])
    model, train = log["model"], log["train"]
    corpus_tokens = report["corpus_tokens"]
    text = f"""# edge-ds-tiny

The default model of edge-ds: a {info['total_params'] / 1e6:.1f}M-parameter DeepSeek-V3-architecture model
({info['active_params'] / 1e6:.1f}M active per token) trained from scratch on the King James Bible, shipped
at 4 bits ({report['size_bytes']['4bit'] / 1e6:.1f} MB). It writes KJV-style English; it knows nothing else.

Architecture (config.json): {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, MLA with
q_lora_rank {model['q_lora_rank']} and kv_lora_rank {model['kv_lora_rank']} ({model['num_attention_heads']} heads,
nope {model['qk_nope_head_dim']} + interleaved rope {model['qk_rope_head_dim']}, v {model['v_head_dim']}); layer 0
dense, then MoE layers with {model['n_routed_experts']} routed experts, top-{model['num_experts_per_tok']}, in
{model['n_group']} groups of which the top {model['topk_group']} are eligible, {model['n_shared_experts']} shared
expert, sigmoid scores with `e_score_correction_bias` (noaux_tc). Tokenizer: sentencepiece BPE,
{model['vocab_size']} pieces, byte fallback; chat template with `<|user|>` / `<|assistant|>` turns ending in `</s>`.

## Training

`python Package.resources/edge-ds-tiny/recipe/make.py` rebuilds everything here (seed {train['seed']}):
{train['steps']} steps of {train['batch']} x {train['seq_len']} tokens ({train['steps'] * train['batch'] * train['seq_len'] / 1e6:.1f}M
tokens, ~{train['steps'] * train['batch'] * train['seq_len'] / corpus_tokens:.1f} epochs) with transformers' DeepseekV3ForCausalLM in
float32 on 2 CPU cores ({log['train_seconds'] / 60:.0f} min), AdamW lr {train['lr']} with warm-up and cosine decay.
15% of the documents are chat-formatted (a verse as the user turn, the next verse as the reply).
Experts are balanced without an auxiliary loss, as in DeepSeek-V3: after every step each expert's
selection bias moves by {train['bias_update']} towards the mean load. Expert load on the validation
text, max/mean per MoE layer (1.0 is perfect balance): {', '.join(f'{b:.2f}' for b in balance)}.

## Validation perplexity

{report['perplexity_tokens']:,} held-out tokens (25 whole chapters, `recipe/data/validation.txt`), windows of
{log['train']['eval_window']} tokens, measured with `edge-ds perplexity`. The float figure from training
(torch, float32): {log['validation_ppl_float']:.3f}.

| weights | perplexity | vs float | bits/weight | size |
|---|---|---|---|---|
{rows}

## Speed

`edge-ds bench -p 128 -g 64 -n 5` (median) on the 2-core x86-64 Linux CI machine, MLX CPU backend:
prompt {bench['prompt_tps']:.1f} tok/s, generation {bench['generation_tps']:.1f} tok/s, peak memory
{bench['peak_memory_gb'] * 1000:.0f} MB.

## Samples (4-bit, greedy, `--no-chat-template`, 40 tokens)

{samples}

Chat (`edge-ds chat`), user: *{report['chat_sample']['user']}* → assistant: *{report['chat_sample']['assistant']}*

## Licence

The corpus, the King James Version (1611), is in the public domain; it comes from Debian's
`bible-kjv-text` 4.38 (see `recipe/corpus.py` and `LICENSE`). The weights and tokenizer are
released under the MIT licence like edge-ds.
"""
    (MODEL_DIR / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("build/edge-ds-tiny"), help="scratch directory")
    ap.add_argument("--skip-train", action="store_true", help="reuse WORK/hf from an earlier run")
    ap.add_argument("--no-install", action="store_true", help="do not touch Package.resources/edge-ds-tiny")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus.write_validation()
    if not (args.skip_train and (work / "hf" / "config.json").is_file()):
        import train

        train.train(work)
    log = json.loads((work / "train_log.json").read_text())
    if "validation_ppl_float_test_windows" not in log:
        log["test_windows"] = TEST_WINDOWS
        log["validation_ppl_float_test_windows"] = float_subset_perplexity(work, log)
        (work / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    dirs = convert_all(work)
    report = evaluate(dirs, log["train"]["eval_window"])
    report["validation_ppl_float_torch"] = log["validation_ppl_float"]
    report["validation_load_max_over_mean"] = log["validation_load_max_over_mean"]
    report["train_seconds"] = log["train_seconds"]
    report["corpus_tokens"] = corpus_tokens(work / "hf")
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    if not args.no_install:
        install(dirs[SHIPPED], dirs[FP8])
        shutil.copy2(work / "report.json", HERE / "report.json")
        shutil.copy2(work / "train_log.json", HERE / "train_log.json")
        write_readme(report, log)
    print(json.dumps({k: report[k] for k in ("perplexity", "bench")}, indent=1, default=str))


if __name__ == "__main__":
    main()
