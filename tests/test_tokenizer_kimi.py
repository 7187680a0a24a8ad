"""The tiktoken backend (Kimi-K2's tiktoken.model) on a small BPE trained at test time (no network).

The oracle is a tiktoken.Encoding built here straight from the trained ranks, Kimi's pattern and
Kimi's special-token layout, bypassing edge-ds's ranks reader and backend.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from edge_ds.errors import EdgeDSError
from edge_ds.tokenizer import KIMI_PATTERN, ByteStreamingDetokenizer, Tokenizer
from test_tokenizer import _stream

# Common words, some CJK and a few emoji; anything not here is spelled in single-byte tokens.
CORPUS = " ".join(
    ["the quick brown fox jumps over the lazy dog. Hello world, hello there! I'm sure they're fine.",
     "Streaming must never emit broken characters: héllo wörld, naïve café.",
     "日本語のテキストです。中文文本也可以。 한국어 텍스트",
     "emoji 🤖🎉👍🏽 and numbers 12345 67890\n\tindented\n\n"] * 20
)
MERGES = 300

# Kimi-K2's tokenizer_config.json layout: offsets past the BPE ranks; (content, special).
SPECIAL_OFFSETS = {0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
                   4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 9: ("[EOT]", True),
                   10: ("<|im_system|>", True), 11: ("<|tool_calls_section_begin|>", False),
                   17: ("<|im_middle|>", True)}

# The shape of Kimi-K2's chat template.
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

TEXTS = [
    "Hello world, hello there!",
    "日本語のテキスト、中文和한국어",
    "emoji 🤖🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 rainbow 🏳️‍🌈",
    "combining: e\u0301 a\u0308 Z\u0324\u0354\u0367\u0311 ñ vs n\u0303",
    "a  b\t\tc\n\n\nd\r\n e   ",
    "   leading, trailing and   runs of spaces   ",
    "I'm sure THEY'LL say 1234567 ½ ÷ ø",
    "🦀 crab and 鬱 are not in the corpus",
    "",
]


@lru_cache(maxsize=None)
def _train_ranks(corpus: str = CORPUS, merges: int = MERGES) -> dict[bytes, int]:
    """All 256 single bytes, then `merges` most-frequent-pair merges inside words (with their space)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in Counter(re.findall(r" ?\S+|\s+", corpus)).items()}
    for _ in range(merges):
        pairs: Counter = Counter()
        for seq, count in words.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = {}
        for seq, count in words.items():
            out, k = [], 0
            while k < len(seq):
                if seq[k:k + 2] == (a, b):
                    out.append(a + b)
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return ranks


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _kimi_config(n: int, **extra) -> dict:
    added = {str(n + k): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": s} for k, (c, s) in SPECIAL_OFFSETS.items()}
    return {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]",
            "chat_template": TEMPLATE, "tokenizer_class": "TikTokenTokenizer", **extra}


def write_kimi_tokenizer(d: Path) -> int:
    """tiktoken.model + tokenizer_config.json (+ generation_config.json) in d; returns the rank count."""
    ranks = _train_ranks()
    _write_ranks(d / "tiktoken.model", ranks)
    n = len(ranks)
    _write_json(d / "tokenizer_config.json", _kimi_config(n))
    _write_json(d / "generation_config.json", {"eos_token_id": n + 2})  # <|im_end|> ends a turn
    return n


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kimi")
    write_kimi_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def n() -> int:
    return len(_train_ranks())


@pytest.fixture(scope="module")
def tok(kimi_dir) -> Tokenizer:
    return Tokenizer.load(kimi_dir)


@pytest.fixture(scope="module")
def oracle(n):
    import tiktoken

    names = {k: c for k, (c, _) in SPECIAL_OFFSETS.items()}
    special = {names.get(k, f"<|reserved_token_{n + k}|>"): n + k for k in range(256)}
    return tiktoken.Encoding(name="oracle", pat_str=KIMI_PATTERN, mergeable_ranks=_train_ranks(),
                             special_tokens=special)


# --- the pattern --------------------------------------------------------------------------------

def test_pattern_splits_like_kimi():
    import regex  # tiktoken's own dependency; V1 gives the && class intersection Rust regex has

    text = "Hello 日本語 I'm 12345 HTTPServer  x\n\n y éte"
    assert regex.findall(KIMI_PATTERN, text, flags=regex.V1) == [
        "Hello", " ", "日本語", " I'm", " ", "123", "45", " HTTPServer", " ", " x", "\n\n", " y", " éte"]


# --- encode / decode against the oracle ---------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_matches_tiktoken(tok, oracle, text):
    ids = tok.encode(text)
    assert ids == oracle.encode(text, allowed_special="all")
    assert tok.decode(ids) == oracle.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text


def test_merges_are_used(tok, oracle):
    ids = tok.encode("the quick brown fox 日本語")
    assert len(ids) < len("the quick brown fox 日本語".encode())
    assert ids == oracle.encode("the quick brown fox 日本語")


def test_long_runs_are_cut_not_an_error(tok):
    text = " " * 60_000 + "x" + "a" * 60_000
    assert tok.decode(tok.encode(text)) == text


# --- special tokens -----------------------------------------------------------------------------

def test_special_token_ids(tok, n):
    assert tok.vocab_size == n + 256
    for k, (content, _) in SPECIAL_OFFSETS.items():
        assert tok._backend.token_to_id(content) == n + k
        assert tok._backend.id_to_token(n + k) == content
    reserved = f"<|reserved_token_{n + 5}|>"
    assert tok._backend.token_to_id(reserved) == n + 5 and tok._backend.id_to_token(n + 5) == reserved
    assert tok._backend.id_to_token(n + 256) is None and tok._backend.id_to_token(-1) is None
    assert tok._backend.token_to_id("<|no such token|>") is None


def test_bpe_tokens_spelled_in_byte_alphabet(tok):
    ids = tok.encode(" the")
    assert len(ids) == 1
    assert tok._backend.id_to_token(ids[0]) == "\u0120the"  # GPT-2's "Ġ" for the space byte
    assert tok._backend.token_to_id("\u0120the") == ids[0]
    assert tok._backend.id_to_token(10) == "\u010a" and tok._backend.token_to_id("\u010a") == 10  # "\n"


def test_bos_eos_and_no_implicit_bos(tok, n):
    assert tok.bos_id == n and tok.bos_token == "[BOS]"
    assert tok.eos_ids == [n + 1, n + 2] and tok.eos_token == "[EOS]"
    # Kimi's tokenizer adds no BOS by itself; tokenizer_config.json can ask for one.
    assert tok.encode("hi")[:1] != [n]


def test_add_bos_token_from_config(kimi_dir, tmp_path, n):
    shutil.copy(kimi_dir / "tiktoken.model", tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", _kimi_config(n, add_bos_token=True))
    t = Tokenizer.load(tmp_path)
    assert t.encode("hi")[0] == n and t.encode("[BOS]hi") == t.encode("hi")


def test_defaults_without_bos_eos_in_config(kimi_dir, tmp_path, n):
    shutil.copy(kimi_dir / "tiktoken.model", tmp_path)
    cfg = _kimi_config(n)
    del cfg["bos_token"], cfg["eos_token"]
    _write_json(tmp_path / "tokenizer_config.json", cfg)
    t = Tokenizer.load(tmp_path)
    assert t.bos_id == n and t.eos_ids == [n + 1] and t.bos_token == "[BOS]"


def test_special_tokens_in_text_and_decode(tok, n):
    ids = tok.encode("<|im_user|>user<|im_middle|>hi<|im_end|>")
    assert ids[0] == n + 3 and ids[-1] == n + 2 and n + 17 in ids
    assert tok.decode(ids) == "userhi"
    assert tok.decode(ids, skip_special=False) == "<|im_user|>user<|im_middle|>hi<|im_end|>"
    # A marker tokenizer_config.json calls non-special survives skip_special; reserved ids do not.
    marker = tok.encode("<|tool_calls_section_begin|>")
    assert marker == [n + 11] and tok.decode(marker) == "<|tool_calls_section_begin|>"
    assert tok.decode([n + 5]) == "" and tok.decode([n + 5], skip_special=False) == f"<|reserved_token_{n + 5}|>"


def test_ids_past_vocabulary_decode_to_nothing(tok):
    ids = tok.encode("hi there")
    assert tok.decode([*ids, tok.vocab_size + 7, -3]) == "hi there"
    assert tok.decode([*ids, tok.vocab_size], skip_special=False) == "hi there"


# --- streaming ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all(isinstance(c, str) and "\ufffd" not in c for c in chunks)


@pytest.mark.parametrize("text", ["ok 🦀", "鬱 x", "👨‍👩‍👧‍👦!"])
def test_stream_holds_split_characters(tok, text):
    ids = tok.encode(text)
    det = tok.detokenizer()
    chunks = [det.add(i) for i in ids]
    partial = [k for k in range(len(ids)) if tok.decode(ids[: k + 1]).endswith("\ufffd")]
    assert len(partial) >= 2, "expected a character spelled by several byte tokens"
    assert all(chunks[k] == "" for k in partial)
    assert "".join(chunks) == text and det.finish() == ""


def test_stream_token_spanning_two_characters(tok):
    # A merged token that is not UTF-8 on its own: the end of one character and the start of the next.
    spanning = [i for i in range(256, tok.vocab_size - 256) if "\ufffd" in tok.decode([i])]
    assert spanning, "expected a merge across a character boundary (CJK / emoji in the corpus)"
    text = "日本語のテキストです。中文文本也可以。 한국어 텍스트 🤖🎉👍🏽"
    ids = tok.encode(text)
    assert set(ids) & set(spanning)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_stream_random_ids_match_decode(tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size + 3) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            det = ByteStreamingDetokenizer(tok, skip_special=skip)
            chunks = [det.add(i) for i in ids] + [det.finish()]
            assert "".join(chunks) == tok.decode(ids, skip_special=skip)
            for c in chunks:
                c.encode("utf-8")  # a valid string: no lone surrogates


def test_stream_finish_flushes_incomplete_bytes(tok):
    ids = tok.encode("🦀")[:-1]
    det = tok.detokenizer()
    assert "".join(det.add(i) for i in ids) == ""
    assert det.finish() == tok.decode(ids) == "\ufffd"
    assert det.add(tok.encode("a")[0]) == "a"  # the stream starts over cleanly


# --- load and chat template ---------------------------------------------------------------------

def test_load_and_chat_template(tok, n):
    messages = [{"role": "user", "content": "hi 日本"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                    "<|im_user|>user<|im_middle|>hi 日本<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>hello<|im_end|>"
                    "<|im_user|>user<|im_middle|>again<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>")
    ids = tok.encode_chat(messages)
    assert ids[0] == n + 10 and ids[-1] == n + 17 and n not in ids  # <|im_system|> ... <|im_middle|>
    assert ids.count(n + 2) == 4 and tok.decode(ids, skip_special=False) == text


def test_tokenizer_json_wins_over_tiktoken(kimi_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    shutil.copy(kimi_dir / "tiktoken.model", tmp_path)
    HFTokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(tmp_path).vocab_size == 0


# --- malformed files ----------------------------------------------------------------------------

GOOD = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


@pytest.mark.parametrize("bad_line, line, message", [
    ("!!!notbase64 256", 257, "token '!!!notbase64' is not valid base64"),
    ("YWJj", 257, "expected '<base64 token> <rank>'"),
    ("YWJj 256 7", 257, "expected '<base64 token> <rank>'"),
    ("YWJj 2.5e2", 257, "rank '2.5e2' is not a non-negative integer"),
    ("YWJj -256", 257, "rank '-256' is not a non-negative integer"),
    ("YWJj 7", 257, "rank 7 is already given on line 8"),
    ("YQ== 256", 257, "token 'YQ==' is already given on line 98"),
    ("YWJj 300", 257, r"rank 300 leaves a gap \(257 tokens must have ranks 0..256\)"),
])
def test_malformed_ranks_file(tmp_path, bad_line, line, message):
    path = tmp_path / "tiktoken.model"
    path.write_text("\n".join([*GOOD, bad_line]) + "\n", encoding="ascii")
    with pytest.raises(EdgeDSError, match=f"^{re.escape(str(path))}: line {line}: {message}$"):
        Tokenizer.load(tmp_path)


def test_ranks_file_missing_a_byte_or_empty(tmp_path):
    path = tmp_path / "tiktoken.model"
    path.write_text("\n".join(GOOD[:65] + [f"{GOOD[65].split()[0]} 300"] + GOOD[66:] + ["YWJj 65"]),
                    encoding="ascii")
    with pytest.raises(EdgeDSError, match="tiktoken.model: line 66: rank 300 leaves a gap"):
        Tokenizer.load(tmp_path)
    path.write_text("\n".join(GOOD[:65] + GOOD[66:] + ["YWJj 65"]), encoding="ascii")
    with pytest.raises(EdgeDSError, match=r"tiktoken.model: byte 0x41 has no token"):
        Tokenizer.load(tmp_path)
    path.write_text("\n\n", encoding="ascii")
    with pytest.raises(EdgeDSError, match="tiktoken.model: no tokens"):
        Tokenizer.load(tmp_path)


def test_bad_added_tokens(kimi_dir, tmp_path, n):
    shutil.copy(kimi_dir / "tiktoken.model", tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"added_tokens_decoder": {"5": {"content": "<x>"}}})
    with pytest.raises(EdgeDSError, match="tokenizer_config.json: added_tokens_decoder id 5 is a BPE token"):
        Tokenizer.load(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"added_tokens_decoder": {
        str(n): {"content": "<x>"}, str(n + 1): {"content": "<x>"}}})
    with pytest.raises(EdgeDSError, match=f"gives '<x>' to ids {n} and {n + 1}"):
        Tokenizer.load(tmp_path)
    # Added ids past Kimi's 256 reserved ones extend the vocabulary.
    _write_json(tmp_path / "tokenizer_config.json", {"added_tokens_decoder": {str(n + 300): {"content": "<y>"}}})
    t = Tokenizer.load(tmp_path)
    assert t.vocab_size == n + 301 and t.encode("<y>") == [n + 300]


# --- end to end: a tiny kimi_k2 model -----------------------------------------------------------

@pytest.mark.slow
def test_tiny_kimi_k2_generates(tmp_path):
    import edge_ds
    from edge_ds.info import model_info
    from tiny_models import make_hf_model, save_hf

    n = len(_train_ranks())
    d = tmp_path / "kimi-k2-tiny"
    save_hf(make_hf_model("v3", vocab_size=n + 256, max_position_embeddings=256), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (d / "config.json").write_text(json.dumps(cfg))
    write_kimi_tokenizer(d)

    assert model_info(d)["family"] == "Kimi-K2"
    lm = edge_ds.load(d)
    assert lm.config.model_type == "kimi_k2" and lm.tokenizer.vocab_size == n + 256
    out = lm.generate([{"role": "user", "content": "hello 日本"}], max_tokens=8, seed=0)
    assert out.stats.prompt_tokens == len(lm.tokenizer.encode_chat([{"role": "user", "content": "hello 日本"}]))
    assert out.text == lm.tokenizer.decode(out.tokens)
    assert 0 < len(out.tokens) <= 8 or out.stats.finish_reason == "stop"
    # `edge-ds convert` carries tiktoken.model over; the model directory's Python never is
    from converters.mlx import convert

    (d / "tokenization_kimi.py").write_text("raise SystemExit('never run')\n")
    converted = convert(d, tmp_path / "kimi-4bit", quant="4bit", group_size=32)
    assert (converted / "tiktoken.model").is_file() and not (converted / "tokenization_kimi.py").exists()
    again = edge_ds.load(converted)
    assert again.tokenizer.encode("hello 日本") == lm.tokenizer.encode("hello 日本")
    assert model_info(converted)["family"] == "Kimi-K2"


def test_kimi_k2_config_loads():
    """Kimi-K2's published config.json (384 experts, 64 heads, YaRN to 128k) parses and lays out."""
    from edge_ds import layout
    from edge_ds.config import ModelConfig

    cfg = ModelConfig.from_dict({
        "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
        "num_key_value_heads": 64, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.827, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "max_position_embeddings": 131072, "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": False,
    })
    assert len(cfg.moe_layers) == 60 and cfg.cache_row_dim == 576
    shapes = layout.hf_shapes(cfg)
    assert sum(1 for n in shapes if n.startswith("model.layers.1.mlp.experts.")) == 384 * 3
    assert shapes["model.layers.1.self_attn.kv_b_proj.weight"] == (64 * 256, 512)
