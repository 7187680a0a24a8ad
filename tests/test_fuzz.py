"""Fuzzing as tests: every parser, given mutated inputs, ends in the library's own error naming the
file or field (RequestError for the request schema), never another exception, a hang or a large
allocation. benchmarks/fuzz.py holds the mutator and the parsers' harnesses; here each parser runs
a few thousand seeded cases (EDGE_DS_FUZZ_CASES scales them), and every bug the fuzzer found has
its input below as a regression example.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time

import numpy as np
import pytest

from benchmarks import fuzz
from edge_ds.checkpoint import Checkpoint, SafetensorsFile
from edge_ds.config import ModelConfig
from edge_ds.errors import EdgeDSError
from edge_ds.openai_schema import (RequestError, check_fields, check_prompt_size, parse_body, parse_messages,
                                   parse_options, parse_prompt, parse_stream)
from edge_ds.tokenizer import Tokenizer
from tests.tiny_models import STYLES, V3

SCALE = float(os.environ.get("EDGE_DS_FUZZ_CASES", "1"))
# Cases per parser, sized to about 2 s each on one slow core.
CASES = {"safetensors": 2000, "index": 1500, "config": 3000, "tokenizer": 800, "chat_template": 1500,
         "schema": 5000, "trace": 1500, "prompt_cache": 1500}
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jinja, on escapes in mutated templates
@pytest.mark.parametrize("parser", list(fuzz.TARGETS))
def test_fuzz(parser, workdir):
    target = fuzz.TARGETS[parser](workdir)
    report = fuzz.run(target, max(1, int(CASES[parser] * SCALE)), seed=0, max_failures=5)
    assert not report.failures, "\n\n".join(map(str, report.failures)) + (
        f"\n\nreplay one with: python benchmarks/fuzz.py --only {parser} --case N")
    # Both outcomes are reached, or the mutator no longer tests what it should.
    assert report.accepted and report.rejected, report


def test_mutator_is_deterministic():
    a, b = (fuzz.Mutator(fuzz._case_rng(0, "x", 7)) for _ in range(2))
    doc = {"a": [1, 2.5, "x"], "b": {"c": None}}
    assert [a.json_file(doc, ["a", "b"]) for _ in range(20)] == [b.json_file(doc, ["a", "b"]) for _ in range(20)]


# --- regression examples: safetensors and the sharded index -------------------------------------

def _header_file(path, header: dict | str, data: bytes = b"") -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, message", [
    (f'{{"a": {DEEP}}}', "not valid JSON"),  # was RecursionError
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),  # TypeError: unhashable
    ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, "too large"),  # numpy: ValueError
    ({"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, "too large"),
    ({"a": {"dtype": "F32", "shape": [0] * 65, "data_offsets": [0, 0]}}, "too large"),
    ({"a": {"dtype": "F32", "shape": [2**62] * 100_000, "data_offsets": [0, 0]}}, "too large"),
    ({"__metadata__": 0}, "__metadata__"),  # falsy non-objects were taken as no metadata
    ({"__metadata__": []}, "__metadata__"),
])
def test_safetensors_regressions(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    _header_file(path, header, b"\0" * 8)
    with pytest.raises(EdgeDSError, match=message) as e:
        with SafetensorsFile(path) as f:
            for name in f.tensors:
                f.read(name)
    assert str(path) in str(e.value)


def test_safetensors_null_metadata_is_none(tmp_path):
    _header_file(tmp_path / "x.safetensors", {"__metadata__": None})
    assert SafetensorsFile(tmp_path / "x.safetensors").metadata == {}


@pytest.mark.parametrize("shard, message", [
    ("/etc/hostname", "not a file name"),  # read a file outside the model directory
    ("../outside.safetensors", "not a file name"),
    ("", "not a file name"),
    ("A" * 5000, "missing"),  # OSError: file name too long
    ("x\x00.safetensors", "missing"),
])
def test_index_regressions(tmp_path, shard, message):
    fuzz.write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(EdgeDSError, match=message) as e:
        Checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_index_too_deep(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(f'{{"weight_map": {DEEP}}}')
    with pytest.raises(EdgeDSError, match="not a valid safetensors index"):  # was RecursionError
        Checkpoint(tmp_path)


# --- config.json ----------------------------------------------------------------------------------

def _load_config(tmp_path, text: str) -> ModelConfig:
    (tmp_path / "config.json").write_text(text)
    cfg = ModelConfig.load(tmp_path)
    (cfg.softmax_scale, cfg.moe_layers, cfg.cache_row_dim)
    return cfg


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": 2**62}, "num_hidden_layers"),  # moe_layers looped 2**62 times (a hang)
    ({"num_hidden_layers": 100_000}, "over the limit"),
    ({"n_routed_experts": 10**9, "num_experts_per_tok": 1}, "n_routed_experts"),
    ({"vocab_size": 2**40}, "32-bit"),
    ({"rope_theta": 10**400}, "rope_theta"),  # OverflowError in float()
    ({"routed_scaling_factor": 10**400}, "routed_scaling_factor"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"max_position_embeddings": -5}, "max_position_embeddings"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"rope_scaling": dict(V3["rope_scaling"], mscale_all_dim={"a": 1})}, "mscale_all_dim"),  # TypeError later
    ({"rope_scaling": dict(V3["rope_scaling"], mscale_all_dim="1")}, "mscale_all_dim"),
    ({"rope_scaling": dict(V3["rope_scaling"], beta_fast=0)}, "beta_fast"),  # ZeroDivisionError in RoPE
    ({"rope_scaling": dict(V3["rope_scaling"], factor=float("inf"))}, "factor"),
])
def test_config_regressions(tmp_path, edit, message):
    with pytest.raises(EdgeDSError, match=message) as e:
        _load_config(tmp_path, json.dumps(dict(V3, **edit)))
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps", "routed_scaling_factor"])
def test_config_non_finite_numbers(tmp_path, field, literal):
    text = json.dumps(dict(V3, **{field: 12345.0})).replace("12345.0", literal)
    with pytest.raises(EdgeDSError, match=field):
        _load_config(tmp_path, text)


@pytest.mark.parametrize("text", [
    json.dumps(V3)[:-1] + f', "x": {DEEP}}}',  # RecursionError
    json.dumps(V3)[:-1] + ', "x": ' + "1" * 5000 + "}",  # ValueError: over 4300 digits
    b'{"model_type": "deepseek_v3\xff"}',
])
def test_config_unreadable_json(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EdgeDSError, match="not valid JSON"):
        ModelConfig.load(tmp_path)


def test_config_every_family_still_loads(tmp_path):
    for style in STYLES.values():
        _load_config(tmp_path, json.dumps(style))
    _load_config(tmp_path, json.dumps(dict(V3, model_type="kimi_k2", n_routed_experts=16, n_group=1, topk_group=1)))


# --- tokenizer files and chat templates -------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    fuzz.tiny_tokenizer_json(d / "tokenizer.json")
    return d


def _tok_with(d, config: dict | str) -> Tokenizer:
    text = config if isinstance(config, str) else json.dumps(config)
    (d / "tokenizer_config.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    return Tokenizer.load(d)


@pytest.mark.parametrize("config, message", [
    (f'{{"bos_token": {DEEP}}}', "not valid JSON"),  # RecursionError
    ('{"eos_token_id": ' + "9" * 5000 + "}", "not valid JSON"),  # ValueError: over 4300 digits
    ('{"bos_token": "\\ud800"}', "not valid Unicode"),  # UnicodeEncodeError in tokenizers
    ('{"eos_token": {"content": "a\\udfff"}}', "not valid Unicode"),
])
def test_tokenizer_config_regressions(hf_dir, tmp_path, config, message):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with pytest.raises(EdgeDSError, match=message) as e:
        _tok_with(tmp_path, config)
    assert str(tmp_path) in str(e.value)


def test_empty_added_token(tmp_path):
    # Found by the 100,000-case run: tiktoken's encode never returned with a special token "".
    n = fuzz.tiny_tiktoken_model(tmp_path / "tiktoken.model")
    with pytest.raises(EdgeDSError, match=r"added_tokens_decoder\[265\] has empty content"):
        _tok_with(tmp_path, {"added_tokens_decoder": {str(n + 2): ""}})


def test_tiktoken_added_id_far_past_the_ranks(tmp_path):
    n = fuzz.tiny_tiktoken_model(tmp_path / "tiktoken.model")
    start = time.monotonic()
    for key in (str(n + 10**8), "-1", "99999999999999"):  # made 10**8 reserved tokens (a hang); -1 was taken
        with pytest.raises(EdgeDSError, match="added_tokens_decoder"):
            _tok_with(tmp_path, {"added_tokens_decoder": {key: {"content": "[X]"}}})
    assert time.monotonic() - start < 5


def test_encode_refuses_lone_surrogates(hf_dir):
    with pytest.raises(EdgeDSError, match="not valid Unicode"):  # was TypeError from tokenizers
        Tokenizer.load(hf_dir).encode("hi \ud800")


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(10**9) %}x{% endfor %}", "range"),  # OverflowError
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "took over"),  # a hang
    ("{% for c in 'x' * 99999 %}{% for d in 'y' * 99999 %}{% endfor %}{% endfor %}", "took over"),
    ("{{ 'x' * 10**10 }}", "over the limit"),  # MemoryError, or gigabytes allocated
    ("{{ 9 ** (9 ** 9) }}", "over the limit"),
    ("{{ '%0999999999d' % 1 }}", "over the limit"),
    ("{{ '{:>999999999}'.format(1) }}", "over the limit"),
    ("{{ 'x'.ljust(10**9) }}", "over the limit"),
    ("{{ 'x'|center(10**9) }}", "over the limit"),
    ("{{ ('x' * 9999)|replace('x', 'y' * 9999) }}", "over the limit"),
    ("{{ messages|tojson(indent=10**9) }}", "over the limit"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "over the limit"),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
     "over the limit"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% import 'os' as os %}", "no loader"),  # TypeError
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ strftime_now(1) }}", "TypeError"),
    ("{{ lipsum(10**9) }}", "undefined"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ \"\\ud800\" }}", "not valid Unicode"),
])
def test_chat_template_regressions(hf_dir, tmp_path, monkeypatch, template, message):
    import edge_ds.tokenizer as tk

    monkeypatch.setattr(tk, "TEMPLATE_SECONDS", 0.5)
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = _tok_with(tmp_path, {"chat_template": template})
    start = time.monotonic()
    with pytest.raises(EdgeDSError, match=message) as e:
        tok.apply_chat_template(fuzz.MESSAGES)
    assert str(e.value).startswith("chat template")
    assert time.monotonic() - start < 3


def test_chat_template_bounds_leave_real_templates_alone(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = _tok_with(tmp_path, {"chat_template": fuzz.KIMI_TEMPLATE})
    long = [{"role": "user", "content": "x" * 1_000_000}] * 8  # 8 MB of text
    assert len(tok.apply_chat_template(long)) > 8_000_000
    tok.chat_template, tok._compiled = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }} {{ '%5.2f' % 3.14159 }} {{ '{:>6}'.format('a') }} {{ range(3)|join(',') }} "
        "{{ (messages|map(attribute='role')|list * 2)|length }} {{ 'ab'|center(6) }}|"
        "{{ messages|tojson(indent=2)|length > 0 }}"
    ), None
    assert tok.apply_chat_template(fuzz.MESSAGES) == "4  3.14      a 0,1,2 8   ab  |True"


# --- the OpenAI request schema ------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: parse_messages([{"role": ["user"], "content": "x"}]),  # TypeError: unhashable
    lambda: parse_messages([{"role": {"a": 1}, "content": "x"}]),
    lambda: parse_options([1, 2]),  # AttributeError: the server's body check was the only guard
    lambda: parse_stream("x"),
    lambda: check_fields([[1]], True),  # TypeError: unhashable
    lambda: check_fields(None, False),
    lambda: check_prompt_size(5, 10, 10, "prompt"),  # TypeError
    lambda: check_prompt_size([{"role": "user"}] * 11 + ["x" * 11], 10, 10, "prompt") or parse_stream([]),
    lambda: parse_options({"temperature": 10**400}),  # OverflowError in options.is_number
    lambda: parse_options({"top_p": -10**400}),
    lambda: parse_options({"stop": 1, "seed": [[[[]]]]}),
    lambda: parse_messages([{"role": "user", "content": "hi \ud800"}]),  # TypeError later, in tokenizers
    lambda: parse_messages([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
    lambda: parse_prompt("\ud800", 10),
    lambda: parse_body(b"\xff{}"),
    lambda: parse_body(DEEP.encode()),  # RecursionError escaped the server's except
    lambda: parse_body(b'{"n": ' + b"1" * 5000 + b"}"),  # so did ValueError for over 4300 digits
    lambda: parse_body(b"[1, 2]"),
    lambda: parse_options({"max_tokens": json.loads("[" * 900 + "]" * 900)}),  # error message: RecursionError
])
def test_schema_regressions(call):
    with pytest.raises(RequestError) as e:
        call()
    assert e.value.message


def test_schema_accepts_what_it_did():
    body = parse_body(json.dumps({"messages": [{"role": "developer", "content": "é"}],
                                  "temperature": 10**300}).encode())
    assert parse_messages(body["messages"]) == [{"role": "system", "content": "é"}]
    assert parse_options(body)["temperature"] == 10**300
    check_prompt_size([1, 2, 3], 10, 10, "prompt")


# --- routing traces and the prompt cache ---------------------------------------------------------------

HEADER = '{"edge_ds_trace":1,"model":"m","layers":[1],"num_experts":8,"top_k":2,"expert_bytes":4}\n'
RECORD = '{"t":0,"layer":1,"prefill":false,"experts":[[1,2]]}\n'


@pytest.mark.parametrize("text, message", [
    ("[1]\n" + RECORD, "line 1"),  # AttributeError: 'list' object has no attribute 'get'
    (HEADER + RECORD.replace('"t":0', '"t":Infinity'), "line 2: field 't'"),  # OverflowError
    # Found by the 100,000-case run: OverflowError in replay's decayed-frequency policy.
    (HEADER + RECORD.replace('"t":0', '"t":' + "9" * 400), "line 2: field 't'"),
    (HEADER + RECORD.replace('"t":0', '"t":99999') + RECORD, "line 3: field 't' goes back from 99999 to 0"),
    (HEADER + RECORD.replace('"experts"', '"hints":[1],"experts"'), "line 2: field 'hints'"),  # AttributeError
    (HEADER + RECORD.replace("[[1,2]]", "[[1,2.5]]"), "line 2: field 'experts'"),
    (HEADER + RECORD.replace("[[1,2]]", "[[1,99]]"), "not an expert of 0..7"),
    (HEADER + RECORD.replace("[[1,2]]", DEEP), "line 2 is not"),  # RecursionError
    (HEADER.replace(',"expert_bytes":4', ""), "expert_bytes"),  # KeyError in replay
    (HEADER.replace('"expert_bytes":4', '"expert_bytes":0'), "expert_bytes"),  # ZeroDivisionError in replay
    (HEADER.replace('"expert_bytes":4', '"expert_bytes":1' + "0" * 400), "expert_bytes"),  # OverflowError too
    (HEADER + "\n" + RECORD, "line 2 is not"),
    (HEADER + RECORD + RECORD[:20] + "\n", "line 3 is not"),  # a cut line in the middle is corruption
    ("", "empty"),
    (HEADER[:30], "empty"),  # killed while writing its header
])
def test_trace_regressions(tmp_path, text, message):
    from edge_ds.experts.trace import load_trace

    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(EdgeDSError, match=message) as e:
        load_trace(tmp_path / "t.jsonl")
    assert str(tmp_path / "t.jsonl") in str(e.value)


def test_trace_not_utf8(tmp_path):
    from edge_ds.experts.trace import load_trace

    (tmp_path / "t.jsonl").write_bytes(HEADER.encode() + b'{"t":0\xff}\n')
    with pytest.raises(EdgeDSError, match="not UTF-8"):  # UnicodeDecodeError
        load_trace(tmp_path / "t.jsonl")


@pytest.mark.parametrize("cut", [0, 1, 10, len(RECORD) - 2, len(RECORD) - 1])
def test_trace_of_a_killed_writer_reads_to_its_last_complete_line(tmp_path, cut):
    from edge_ds.experts.trace import load_trace

    (tmp_path / "t.jsonl").write_text(HEADER + RECORD + RECORD.replace('"t":0', '"t":1')[:cut])
    steps = load_trace(tmp_path / "t.jsonl").steps
    assert [(s.t, s.experts) for s in steps] == [(0, (1, 2))] + ([(1, (1, 2))] if cut == len(RECORD) - 1 else [])


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    import mlx.core as mx

    from edge_ds.cache import PromptCache

    path = tmp_path_factory.mktemp("cache") / "p.safetensors"
    cache = PromptCache(2)
    for c in cache.layers:
        c.update_and_fetch(mx.ones((1, 1, 3, 4)))
    cache.tokens = [7, 8, 9]
    cache.save(path)
    return path


@pytest.mark.parametrize("meta, shape, message", [
    ({"num_layers": "abc"}, None, "different model"),  # ValueError from int()
    ({"num_layers": "3.0"}, None, "different model"),
    ({"tokens": "{"}, None, "'tokens'"),  # JSONDecodeError
    ({"tokens": "3"}, None, "'tokens'"),  # TypeError: len() of an int
    ({"tokens": '[1, "a"]'}, None, "'tokens'"),
    ({"tokens": DEEP}, None, "'tokens'"),  # RecursionError
    ({"tokens": None}, None, "'tokens'"),  # KeyError
    ({}, [1, 3, 4], "layer 0"),  # ValueError: not enough values to unpack
    ({}, [1, 1, 3, 4, 1], "layer 0"),
    ({}, [1, 3, 1, 4], "layer 0"),  # broadcast error
])
def test_prompt_cache_regressions(cache_file, tmp_path, meta, shape, message):
    from edge_ds.cache import PromptCache

    blob = cache_file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["__metadata__"].update(meta)
    header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if v is not None}
    if shape:
        header["layer.0"]["shape"] = shape
    path = tmp_path / "bad.safetensors"
    _header_file(path, header, blob[8 + n:])
    with pytest.raises(EdgeDSError, match=message) as e:
        PromptCache.load(path, 2)
    assert str(path) in str(e.value)
    assert PromptCache.load(cache_file, 2).tokens == [7, 8, 9]
    assert math.isfinite(float(np.array(PromptCache.load(cache_file, 2).layers[0].state).sum()))
