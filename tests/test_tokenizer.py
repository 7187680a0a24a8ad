"""Tokenizer tests on small tokenizers trained at test time (no network, no downloaded files)."""

import json
import random
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from edge_ds.errors import EdgeDSError
from edge_ds.tokenizer import Tokenizer

TRICKY = [
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🤖🎉👍🏽",
    "a  b\tc\n\nd",
    "  leading and trailing spaces  ",
    "Hello world, hello there!",
    "mixed 日本 and 🤖 in one line ½ ÷ ø",
]

# Common words dominate; CJK and emoji are rare so sentencepiece sends them through byte fallback.
CORPUS = "\n".join(
    ["The quick brown fox jumps over the lazy dog. Hello world, hello there!",
     "Streaming detokenizers must never emit broken characters, even for héllo wörld.",
     "Tokens are pieces of text; models predict one token at a time.",
     "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"] * 25
    + ["日本語のテキスト emoji 🤖🎉👍🏽 ½ ÷ ø"]
)

TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% else %}<|Assistant|>{{ m['content'] }}<|EOT|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you?"},
]
EXPECTED = "<s>Be brief.\n<|User|>hi<|Assistant|>hello<|EOT|><|User|>how are you?<|Assistant|>"


def _raw(tok: Tokenizer, text: str) -> str:
    """What decode(skip_special=False) shows for encoded text.

    sentencepiece encodes each stretch between special tokens with its own dummy-prefix "▁"
    (HF's legacy slow-tokenizer behaviour), which shows as a space after each special token.
    """
    if tok.vocab_size == 403:  # the sentencepiece fixture
        return re.sub(r"(<s>|<\|User\|>|<\|Assistant\|>|<\|EOT\|>)(?=[^<])", r"\1 ", text)
    return text


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<s>", "</s>", "<|User|>", "<|Assistant|>", "<|EOT|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    # A post-processor that adds BOS on its own, as many real tokenizer.json files have.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "chat_template": TEMPLATE,
    })
    _write_json(d / "generation_config.json", {"eos_token_id": [tok.token_to_id("</s>"),
                                                                 tok.token_to_id("<|EOT|>")]})
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    corpus.unlink()
    (d / "tokenizer.vocab").unlink()
    # Chat markers live beyond the model's vocabulary, the way HF adds tokens to a slow tokenizer.
    _write_json(d / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>",
        "added_tokens_decoder": {"400": {"content": "<|User|>", "special": True},
                                 "401": {"content": "<|Assistant|>", "special": True},
                                 "402": {"content": "<|EOT|>", "special": True}},
        "chat_template": [{"name": "tool_use", "template": "unused"},
                          {"name": "default", "template": TEMPLATE}],
    })
    return d


@pytest.fixture(scope="module", params=["hf", "sp"])
def tok(request, hf_dir, sp_dir) -> Tokenizer:
    return Tokenizer.load(hf_dir if request.param == "hf" else sp_dir)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    det = tok.detokenizer()
    chunks = [det.add(i) for i in ids]
    chunks.append(det.finish())
    assert det.text == "".join(chunks)
    return chunks


# --- encode / decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_bos_added_once(tok):
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode("hello world", add_bos=False) == ids[1:]
    # BOS written in the text is not doubled.
    assert tok.encode("<s>hello world") == ids


def test_special_tokens_in_text_and_decode(tok):
    ids = tok.encode("<|User|>hi<|Assistant|>", add_bos=False)
    user, assistant = tok.encode("<|User|>", add_bos=False), tok.encode("<|Assistant|>", add_bos=False)
    assert len(user) == 1 and len(assistant) == 1
    assert ids[0] == user[0] and ids[-1] == assistant[0]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == _raw(tok, "<|User|>hi<|Assistant|>")
    assert tok.decode(tok.encode("x"), skip_special=False) == _raw(tok, "<s>x")


def test_ids_past_vocabulary_decode_to_nothing(tok):
    # Models pad their embedding tables, so sampling can produce ids the tokenizer lacks.
    ids = tok.encode("hi there", add_bos=False)
    assert tok.decode([*ids, tok.vocab_size + 7]) == "hi there"
    assert tok.decode([*ids, tok.vocab_size + 7], skip_special=False) == "hi there"


def test_hf_ids_and_config(hf_dir):
    t = Tokenizer.load(hf_dir)
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert t.bos_id == ref.token_to_id("<s>")
    assert t.eos_ids == [ref.token_to_id("</s>"), ref.token_to_id("<|EOT|>")]
    assert t.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    assert t.has_chat_template


def test_sp_ids_and_config(sp_dir):
    t = Tokenizer.load(sp_dir)
    assert t.bos_id == 1 and t.eos_ids == [2]
    assert t.vocab_size == 403  # 400 model pieces + 3 added tokens
    assert t.has_chat_template


def test_sp_defaults_without_configs(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    t = Tokenizer.load(tmp_path)
    assert t.bos_id == 1 and t.eos_ids == [2] and not t.has_chat_template
    assert t.encode("hello")[0] == 1


def test_config_json_fallback(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    _write_json(tmp_path / "config.json", {"bos_token_id": 0, "eos_token_id": [1, 4]})
    t = Tokenizer.load(tmp_path)
    assert t.bos_id == 0 and t.eos_ids == [1, 4]
    assert t.bos_token == "<s>" and t.eos_token == "</s>"
    assert t.encode("hi")[0] == 0


def test_explicit_null_bos_and_add_bos_false(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    _write_json(tmp_path / "config.json", {"bos_token_id": 0, "eos_token_id": 1})
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": None})
    assert Tokenizer.load(tmp_path).bos_id is None
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": False})
    t = Tokenizer.load(tmp_path)
    assert t.bos_id == 0 and t.encode("hi")[:1] != [0]


# --- streaming detokenizer ---------------------------------------------------------------------

@pytest.mark.parametrize("text", TRICKY)
def test_stream_matches_decode(tok, text):
    for ids in (tok.encode(text), tok.encode(text, add_bos=False)):
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)


def test_stream_random_texts(tok):
    rng = random.Random(0)
    words = ["hello", " world", "日本", "語", "🤖", "👍🏽", "  ", "\n", "\t", "é", "x", " ", "½", "<|EOT|>"]
    for _ in range(50):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("text", ["ok 🤖", "日本語のテキスト", "👍🏽!"])
def test_stream_holds_partial_characters(tok, text):
    ids = tok.encode(text, add_bos=False)
    det = tok.detokenizer()
    chunks = [det.add(i) for i in ids]
    partial = [k for k in range(len(ids)) if tok.decode(ids[: k + 1]).endswith("\ufffd")]
    assert partial, "expected a character spelled by several byte tokens"
    for k in partial:
        assert chunks[k] == ""
    assert "".join(chunks) + det.finish() == text


def test_stream_sentencepiece_byte_fallback(sp_dir):
    t = Tokenizer.load(sp_dir)
    ids = t.encode("ok 🤖", add_bos=False)
    # The emoji is rare enough to be spelled as 4 byte tokens; nothing shows until the last one.
    assert [t.decode([i]) for i in ids[-4:]] == ["\ufffd"] * 4
    det = t.detokenizer()
    chunks = [det.add(i) for i in ids]
    assert chunks[-4:-1] == ["", "", ""] and chunks[-1].endswith("🤖")


def test_stream_sentencepiece_leading_space(sp_dir):
    t = Tokenizer.load(sp_dir)
    ids = t.encode("hello world")
    assert t._backend._sp.id_to_piece(ids[1]).startswith("\u2581")
    chunks = _stream(t, ids)
    assert chunks[1].startswith("h")  # the first word's dummy-prefix space is not emitted
    assert "".join(chunks) == "hello world"


def test_stream_finish_flushes_incomplete_bytes(sp_dir):
    t = Tokenizer.load(sp_dir)
    ids = t.encode("🤖", add_bos=False)[:-1]  # cut the emoji short
    det = t.detokenizer()
    assert "".join(det.add(i) for i in ids) == ""
    assert det.finish() == t.decode(ids)


def test_stream_window_stays_small(tok, monkeypatch):
    ids = tok.encode(CORPUS)
    longest = 0
    decode = tok.decode

    def spy(ids, skip_special=True):
        nonlocal longest
        longest = max(longest, len(ids))
        return decode(ids, skip_special)

    monkeypatch.setattr(tok, "decode", spy)
    chunks = _stream(tok, ids)
    monkeypatch.undo()
    assert "".join(chunks) == tok.decode(ids)
    assert len(ids) > 500 and longest <= 8


# --- chat template ----------------------------------------------------------------------------

def test_chat_template_render(tok):
    assert tok.apply_chat_template(MESSAGES) == EXPECTED
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == EXPECTED[:-len("<|Assistant|>")]


def test_encode_chat_single_bos(tok):
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids, skip_special=False) == _raw(tok, EXPECTED)


def test_encode_chat_adds_bos_when_template_does_not(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    shutil.copy(hf_dir / "tokenizer_config.json", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    t = Tokenizer.load(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"  # .jinja file wins
    ids = t.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == t.bos_id and ids.count(t.bos_id) == 1


def _with_template(hf_dir: Path, tmp_path: Path, template: str) -> Tokenizer:
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                      "chat_template": template})
    return Tokenizer.load(tmp_path)


def test_chat_template_helpers(hf_dir, tmp_path):
    t = _with_template(hf_dir, tmp_path, "{{ messages[0] | tojson }}|{{ strftime_now('%Y') }}|{{ eos_token }}")
    out = t.apply_chat_template([{"role": "user", "content": "日本 <b>"}])
    assert out == f'{{"role": "user", "content": "日本 <b>"}}|{datetime.now().year}|</s>'


def test_chat_template_raise_exception(hf_dir, tmp_path):
    t = _with_template(hf_dir, tmp_path, "{% if messages[0]['role'] != 'user' %}"
                                         "{{ raise_exception('Conversation must start with user') }}"
                                         "{% endif %}ok")
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(EdgeDSError, match="Conversation must start with user"):
        t.apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",
])
def test_chat_template_sandbox(hf_dir, tmp_path, template):
    t = _with_template(hf_dir, tmp_path, template)
    with pytest.raises(EdgeDSError, match="chat template: blocked unsafe operation"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_sandbox_hides_single_unsafe_attribute(hf_dir, tmp_path):
    # One blocked lookup yields an undefined value (prints as ""); it never exposes the object.
    t = _with_template(hf_dir, tmp_path, "[{{ raise_exception.__globals__ }}]")
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "[]"


def test_chat_template_syntax_error(hf_dir, tmp_path):
    t = _with_template(hf_dir, tmp_path, "{% for m in messages %}")
    with pytest.raises(EdgeDSError, match="chat template"):
        t.apply_chat_template(MESSAGES)


def test_missing_chat_template(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    t = Tokenizer.load(tmp_path)
    assert not t.has_chat_template
    with pytest.raises(EdgeDSError, match="no chat template.*chat_template=False"):
        t.apply_chat_template(MESSAGES)


# --- load errors ------------------------------------------------------------------------------

def test_load_empty_directory(tmp_path):
    with pytest.raises(EdgeDSError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(EdgeDSError, match="not a directory"):
        Tokenizer.load(tmp_path / "nope")


def test_load_bad_files(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(EdgeDSError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(EdgeDSError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<nope>"})
    with pytest.raises(EdgeDSError, match="tokenizer_config.json: bos_token"):
        Tokenizer.load(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {})
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": 10**6})
    with pytest.raises(EdgeDSError, match="generation_config.json: eos_token_id"):
        Tokenizer.load(tmp_path)
