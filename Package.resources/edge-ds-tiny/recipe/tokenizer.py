"""The sentencepiece tokenizer: BPE, 4096 pieces, byte fallback, "\\n" as its own piece.

Control pieces: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <|user|>=3, <|assistant|>=4 (the chat
template's role markers). The chat template ends an assistant turn with </s>, so a reply stops
at EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 4096
ROLE_TOKENS = ["<|user|>", "<|assistant|>"]
# Each user turn is one line after <|user|>; the model answers after <|assistant|> and ends with
# </s>. A system message (the model has never seen one) is rendered like a user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|user|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(documents: list[str], out_dir: Path) -> spm.SentencePieceProcessor:
    """Train on whole documents (lines joined by "\n", so line-initial words get their own merges); writes tokenizer.model and tokenizer_config.json to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        max_sentence_length=1 << 20,
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=ROLE_TOKENS,
        user_defined_symbols=["\n"],
        num_threads=1,  # one thread: the merge order is then the same on every machine
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
