"""The shipped default model (Package.resources/edge-ds-tiny): quality, tokenizer, chat, CLI.

The float perplexity it is held to was measured by the training recipe in torch
(recipe/train_log.json), independently of edge-ds.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import edge_ds
from edge_ds.resources import default_model_path

MODEL = default_model_path()
RECIPE = MODEL / "recipe"


@pytest.fixture(scope="module")
def lm():
    return edge_ds.load()  # no path: the shipped model


@pytest.fixture(scope="module")
def corpus_words() -> set[str]:
    import lzma

    text = lzma.decompress((RECIPE / "data" / "kjv.txt.xz").read_bytes()).decode("utf-8")
    return set(re.findall(r"[A-Za-z]+", text))


def test_load_without_path_is_the_shipped_model(lm):
    assert lm.path.resolve() == MODEL.resolve()
    assert lm.config.n_routed_experts >= 16 and lm.config.num_experts_per_tok >= 2
    assert lm.config.n_group > 1 and lm.config.topk_group < lm.config.n_group
    assert lm.config.q_lora_rank and lm.config.first_k_dense_replace == 1
    assert lm.config.quantization["bits"] == 4


def test_repository_copy_is_small():
    """The 4-bit MLX weights (~14 MB) and their onnxruntime export (~17 MB, the fast path off Apple
    Silicon), the recipe and its data."""
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 35e6


def test_default_backend_off_apple_silicon_is_the_shipped_onnx_export(lm):
    from edge_ds.backends import apple_silicon

    assert (MODEL / "onnx.json").is_file()
    assert lm.backend.name == ("mlx" if apple_silicon() else "onnx")


def test_validation_perplexity_of_4bit_is_within_5_percent_of_float(lm):
    """The first `test_windows` validation windows (a few thousand tokens keep CI quick); the
    recipe scored the same windows with the float model in torch."""
    from edge_ds.perplexity import split_windows, window_nll

    log = json.loads((RECIPE / "train_log.json").read_text())
    float_ppl = log["validation_ppl_float_test_windows"]
    text = (RECIPE / "data" / "validation.txt").read_text(encoding="utf-8")
    windows = split_windows(lm.tokenizer.encode(text), log["train"]["eval_window"])[:log["test_windows"]]
    nll, count = window_nll(lm.backend, windows)
    ppl = math.exp(nll / count)
    assert count >= 3000
    # A model that learned nothing scores about the vocabulary size (4096); even uniform over
    # the corpus' own ~13k words would be far above 100.
    assert float_ppl < 100 and ppl < 100
    assert ppl <= 1.05 * float_ppl, (ppl, float_ppl)


TRICKY = [
    "In the beginning God created the heaven and the earth.",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and flags 🇬🇧",
    "中文，日本語のテキスト、한국어",
    "combining: e\u0301 vs é, ﬁ ligature, Ⅻ, ½, \u00a0nbsp",
    "  two leading spaces, tabs\tand\nnewlines\n\nand trailing   ",
    "digits 1234567890 and punctuation: ¿¡«»—…",
]


@pytest.mark.parametrize("text", TRICKY)
def test_sentencepiece_round_trip(lm, text):
    tok = lm.tokenizer
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY)
def test_streaming_detokenizer_matches_one_decode(lm, text):
    tok = lm.tokenizer
    ids = tok.encode(text, add_bos=False)
    detok = tok.detokenizer()
    chunks = [detok.add(i) for i in ids] + [detok.finish()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids)


def test_two_turn_chat_reuses_the_cached_prefix(lm):
    chat = lm.chat()
    first = chat.send("In the beginning God created the heaven and the earth.", max_tokens=24)
    reply = "".join(first)
    assert reply.strip()
    second = chat.send("And God said, Let there be light: and there was light.", max_tokens=24)
    "".join(second)
    stats = second.stats
    assert stats.prompt_tokens > first.stats.prompt_tokens
    assert stats.prefilled_tokens < stats.prompt_tokens
    # Only the new user turn (and the re-rendered tail of the reply) is run again.
    assert stats.prompt_tokens - stats.prefilled_tokens >= first.stats.prompt_tokens


def test_cli_generate_with_the_default_model(corpus_words):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_PROXY="*")
    out = subprocess.run([sys.executable, "-m", "edge_ds.cli", "generate", "--prompt",
                          "And the LORD spake unto Moses, saying,", "--max-tokens", "40",
                          "--no-chat-template", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    words = re.findall(r"[A-Za-z]+", out.stdout)
    assert len(words) >= 15
    # In the corpus' style: nearly every word it writes is a word of the King James Bible.
    known = sum(w in corpus_words for w in words) / len(words)
    assert known >= 0.9, out.stdout
