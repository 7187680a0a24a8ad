"""Train edge-ds-tiny: a DeepSeek-V3-architecture model on the KJV corpus, with transformers on CPU.

Writes a Hugging Face checkpoint (float32 safetensors, config.json, tokenizer) to OUT/hf and a
training log OUT/train_log.json (loss curve, expert load per layer, validation perplexity).
The data order, initialisation and tokenizer are fixed by the seed, and the first steps repeat a
run's losses exactly; but torch's CPU backward is not bit-reproducible from run to run (some
kernels' sums depend on thread timing), so after some tens of steps two runs drift apart and a
rebuild is an equivalent model (same recipe, same data, similar perplexity), not the same bits.
With 1 thread instead of 2 the weights differ after the first steps.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
import tokenizer as recipe_tokenizer  # noqa: E402

# Every feature the runtime supports: q_lora + kv_lora MLA, interleaved RoPE, a dense first layer,
# then MoE layers with 16 routed experts (top-4) in 4 groups (top-2 groups), one shared expert,
# sigmoid scores with e_score_correction_bias (noaux_tc), normalised top-k weights.
MODEL = dict(
    vocab_size=recipe_tokenizer.VOCAB_SIZE, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
    rope_interleave=True, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=1024,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
TRAIN = dict(
    seed=0, steps=900, batch=16, seq_len=256, lr=3e-3, min_lr_ratio=0.1, warmup=100, weight_decay=0.1,
    grad_clip=1.0, chat_fraction=0.15, bias_update=1e-2, eval_window=256, threads=2,
)


def encode_documents(tok, chapters: list[list[str]]) -> list[list[int]]:
    """Each chapter as one document: BOS, verses joined by newlines, EOS."""
    return [tok.encode("\n".join(c)) + tok.eos_ids[:1] for c in chapters]


def chat_document(tok, chapter: list[str], rng: random.Random) -> list[int]:
    """1-3 turns where the user says a verse and the assistant answers with the next one, rendered
    by the shipped chat template, so `edge-ds chat` has seen its own format."""
    turns = rng.randint(1, 3)
    if len(chapter) < 2:
        return []
    start = rng.randrange(0, max(1, len(chapter) - 2 * turns))
    messages = []
    for k in range(turns):
        i = start + 2 * k
        if i + 1 >= len(chapter):
            break
        messages += [{"role": "user", "content": chapter[i]}, {"role": "assistant", "content": chapter[i + 1]}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False), add_bos=False)


def epoch_stream(tok, docs: list[list[int]], chapters: list[list[str]], rng: random.Random) -> list[int]:
    """One pass over the chapters in a shuffled order, with chat documents mixed in."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += docs[i]
        if rng.random() < TRAIN["chat_fraction"] * 4:  # chat docs are ~1/4 the length of a chapter
            stream += chat_document(tok, chapters[rng.randrange(len(chapters))], rng)
    return stream


def batches(tok, docs, chapters, seed: int):
    """Endless [batch, seq_len + 1] windows cut from shuffled epochs."""
    rng = random.Random(seed)
    n = TRAIN["seq_len"] + 1
    pending: list[list[int]] = []
    while True:
        stream = epoch_stream(tok, docs, chapters, rng)
        windows = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
        rng.shuffle(windows)
        pending += windows
        while len(pending) >= TRAIN["batch"]:
            yield torch.tensor(pending[:TRAIN["batch"]], dtype=torch.long)
            pending = pending[TRAIN["batch"]:]


def validation_windows(tok, text: str, window: int) -> list[list[int]]:
    """The validation text as one token sequence cut into non-overlapping windows of window + 1
    tokens (each window predicts its last `window` tokens). The edge-ds test uses the same cut."""
    ids = tok.encode(text)
    return [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]


class LoadCounter:
    """Counts how many tokens each routed expert receives, per MoE layer (forward hooks on gates)."""

    def __init__(self, model) -> None:
        self.layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
        self.gates = [model.model.layers[i].mlp.gate for i in self.layers]
        self.counts = [torch.zeros(g.num_experts) for g in self.gates]
        for g, c in zip(self.gates, self.counts):
            g.register_forward_hook(self._hook(c))

    @staticmethod
    def _hook(count: torch.Tensor):
        def hook(module, args, out) -> None:  # out = (router_logits, topk_weights, topk_indices)
            count.add_(torch.bincount(out[2].flatten(), minlength=count.numel()).to(count.dtype))
        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def max_over_mean(self) -> list[float]:
        return [float(c.max() / c.mean()) if c.sum() > 0 else float("nan") for c in self.counts]

    def update_bias(self, step_size: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: nudge each expert's selection bias up when
        it got fewer tokens than the mean this step, down when it got more."""
        with torch.no_grad():
            for g, c in zip(self.gates, self.counts):
                g.e_score_correction_bias.add_(step_size * torch.sign(c.mean() - c))


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        x = torch.tensor([w], dtype=torch.long)
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return math.exp(nll / count)


def lr_at(step: int) -> float:
    if step < TRAIN["warmup"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
    t = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
    floor = TRAIN["min_lr_ratio"]
    return TRAIN["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(out: Path, steps: int | None = None) -> dict:
    from edge_ds.tokenizer import Tokenizer  # the runtime's own encoder, so training sees what it will

    if steps is not None:
        TRAIN["steps"] = steps
    torch.manual_seed(TRAIN["seed"])
    torch.set_num_threads(TRAIN["threads"])
    hf = out / "hf"
    train_chapters, valid_chapters = corpus.split()
    recipe_tokenizer.train_tokenizer(["\n".join(c) for c in train_chapters], hf)
    tok = Tokenizer.load(hf)
    docs = encode_documents(tok, train_chapters)
    print(f"corpus: {sum(map(len, docs))} training tokens in {len(docs)} chapters", flush=True)

    config = transformers.DeepseekV3Config(**MODEL)
    model = transformers.DeepseekV3ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters", flush=True)
    counter = LoadCounter(model)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))
    log: dict = {"model": MODEL, "train": TRAIN, "params": n_params, "corpus_tokens": sum(map(len, docs)),
                 "loss": [], "load_max_over_mean": []}
    model.train()
    t0 = time.time()
    data = batches(tok, docs, train_chapters, TRAIN["seed"])
    for step in range(TRAIN["steps"]):
        x = next(data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        counter.reset()
        logits = model(input_ids=x[:, :-1], use_cache=False).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter.update_bias(TRAIN["bias_update"])
        log["loss"].append(round(loss.item(), 4))
        if step % 25 == 0 or step == TRAIN["steps"] - 1:
            balance = [round(v, 2) for v in counter.max_over_mean()]
            log["load_max_over_mean"].append({"step": step, "per_layer": balance})
            rate = (step + 1) * x.numel() / (time.time() - t0)
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  load max/mean {balance}  "
                  f"{rate:.0f} tok/s", flush=True)
    log["train_seconds"] = round(time.time() - t0, 1)

    model.eval()
    counter.reset()
    windows = validation_windows(tok, corpus.VALIDATION.read_text(encoding="utf-8"), TRAIN["eval_window"])
    log["validation_tokens"] = sum(len(w) - 1 for w in windows)
    log["validation_ppl_float"] = perplexity(model, windows)
    log["validation_load_max_over_mean"] = [round(v, 3) for v in counter.max_over_mean()]
    log["validation_load"] = [c.tolist() for c in counter.counts]
    print(f"validation: {log['validation_tokens']} tokens, perplexity {log['validation_ppl_float']:.3f}, "
          f"load max/mean per MoE layer {log['validation_load_max_over_mean']}", flush=True)

    model.save_pretrained(hf, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    args = ap.parse_args()
    train(args.out, args.steps)
