"""Builds the ~450M-parameter DeepSeek-V3-shaped benchmark checkpoint (random weights, seed 0).

Shaped like the model the reference anchors in the README (Measured) were taken on, so figures compare.
Needs the dev extra (torch, transformers, tokenizers). Output: DIR/hf (bfloat16 safetensors
plus a 32000-entry byte-level BPE tokenizer.json, so mlx-lm can load it too).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4,
    n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
)


def make_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # Any text will do for a benchmark tokenizer: the project's own sources.
    root = Path(__file__).resolve().parent.parent
    text = [p.read_text(errors="ignore") for p in sorted(root.rglob("*.py")) + sorted(root.rglob("*.md"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text * 4, trainer)
    # Top the vocabulary up to exactly vocab_size with filler tokens: the text is small.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<unused_{i}>" for i in range(missing)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')


def build(out: Path) -> Path:
    import torch
    import transformers

    hf = out / "hf"
    if (hf / "config.json").is_file():
        return hf
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**BENCH_CONFIG))
    model.to(torch.bfloat16).save_pretrained(hf, safe_serialization=True)
    make_tokenizer(hf, BENCH_CONFIG["vocab_size"])
    return hf


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out")))
