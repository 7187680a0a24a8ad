"""Tool calls: the parsers on outputs written from each published format (whole, streamed at every
split point, malformed), and the server's round trip with a scripted model (a fake backend that
answers a given token sequence) behind DeepSeek V3/R1-, V3.1-, Kimi-K2- and V4-style chat templates.
Streamed, calls are parsed incrementally (the name, then the arguments as they are written): the
deltas put together must equal the whole parse at every split point."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

from edge_ds.api import LanguageModel
from edge_ds.cache import PromptCache
from edge_ds.server import make_server
from edge_ds.tokenizer import Tokenizer
from edge_ds.tool_calls import DeepSeekFormat, DSMLFormat, KimiFormat, ToolCallParser, detect

# --- recorded outputs, written from the published formats ----------------------------------------

V3 = ("Let me look that up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
      "```json\n{\"city\": \"Paris\", \"unit\": \"celsius\"}\n```<｜tool▁call▁end｜>\n"
      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"zone\": \"CET\"}\n```<｜tool▁call▁end｜>"
      "<｜tool▁calls▁end｜>")
V31 = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"unit\": "
       "\"celsius\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{\"zone\": \"CET\"}"
       "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
KIMI = ("I'll check. <|tool_calls_section_begin|> <|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>{\"city\": \"Paris\", \"unit\": \"celsius\"}<|tool_call_end|> "
        "<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{\"zone\": \"CET\"}<|tool_call_end|> "
        "<|tool_calls_section_end|>")
# DeepSeek V4 (encoding_dsv4.py in its release): a DSML block after the content, one parameter per
# argument, string="true" for a string written as is.
V4 = ("Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"get_time\">\n<｜DSML｜parameter name=\"zone\" string=\"true\">CET</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]
RECORDED = [(DeepSeekFormat(v31=False), V3, "Let me look that up."), (DeepSeekFormat(v31=True), V31, ""),
            (KimiFormat(), KIMI, "I'll check. "), (DSMLFormat(), V4, "Let me check.\n\n")]
IDS = ["v3", "v3.1", "kimi", "v4"]


def parse(fmt, pieces, **kw) -> tuple[str, list]:
    p = ToolCallParser(fmt, **kw)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "call"]
    assert calls == p.calls
    return content, calls


def parse_streamed(fmt, pieces, **kw) -> tuple[str, list[tuple[str, str]], int]:
    """Incremental parsing, put together as an OpenAI client does: (content, [(name, arguments)],
    how many argument deltas came)."""
    p = ToolCallParser(fmt, incremental=True, **kw)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    calls: list[list[str]] = []
    for kind, value in events:
        if kind in ("call", "call_begin"):  # an opened call's arguments fill in later (its deltas)
            calls.append([value.name, value.arguments if kind == "call" else ""])
        elif kind == "arguments":
            index, more = value
            calls[index][1] += more
    assert [tuple(c) for c in calls] == [(c.name, c.arguments) for c in p.calls]  # .calls agrees at the end
    return ("".join(v for k, v in events if k == "content"), [tuple(c) for c in calls],
            sum(k == "arguments" for k, _ in events))


@pytest.mark.parametrize("fmt, text, content", RECORDED, ids=IDS)
def test_recorded_output_parses_whole(fmt, text, content):
    got, calls = parse(fmt, [text])
    assert got == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    if isinstance(fmt, KimiFormat):  # Kimi's own ids, which its template writes back
        assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]
    else:
        assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("fmt, text, content", RECORDED, ids=IDS)
def test_every_split_point_and_every_chunk_size_give_the_same(fmt, text, content):
    want = [(c.name, c.arguments) for c in parse(fmt, [text])[1]]
    for i in range(len(text) + 1):
        got, calls = parse(fmt, [text[:i], text[i:]])
        assert (got, [(c.name, c.arguments) for c in calls]) == (content, want), i
    for size in (1, 2, 3, 5, 7):
        got, calls = parse(fmt, [text[i:i + size] for i in range(0, len(text), size)])
        assert (got, [(c.name, c.arguments) for c in calls]) == (content, want), size
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert parse(fmt, pieces)[0] == content


@pytest.mark.parametrize("fmt, text, content", RECORDED, ids=IDS)
def test_streamed_arguments_come_as_written_and_add_up_to_the_whole_call(fmt, text, content):
    want = [(c.name, c.arguments) for c in parse(fmt, [text])[1]]
    got, calls, deltas = parse_streamed(fmt, list(text))  # a character at a time
    assert (got, calls) == (content, want) and deltas > 2 * len(want)  # arguments in many pieces
    for i in range(len(text) + 1):
        assert parse_streamed(fmt, [text[:i], text[i:]])[:2] == (content, want), i
    rng = random.Random(2)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), 9))
        assert parse_streamed(fmt, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])[:2] == (content, want)


def test_a_streamed_call_is_opened_once_its_name_is_complete():
    p = ToolCallParser(DeepSeekFormat(v31=True), incremental=True)
    assert p.feed("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_wea") == []
    (kind, call), = p.feed("ther<｜tool▁sep｜>")
    assert kind == "call_begin" and (call.name, call.arguments) == ("get_weather", "")
    assert p.feed('{"city": "Pa') == [("arguments", (0, '{"city": "Pa'))]
    assert p.feed('ris"}<｜tool▁call') == [("arguments", (0, 'ris"}'))]  # the end token's start is held
    assert p.feed("▁end｜><｜tool▁calls▁end｜>") == [] and p.finish() == []
    assert p.calls[0].arguments == '{"city": "Paris"}'


def test_streamed_calls_cut_short_or_broken_after_their_name():
    # never closed (max_tokens): the call keeps the arguments sent
    content, calls, _ = parse_streamed(DeepSeekFormat(v31=True), list(
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Par'))
    assert (content, calls) == ("", [("get_weather", '{"city": "Par')])
    # a parameter written twice: the call keeps what was sent, its text comes back as content
    body = ('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="a" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>')
    content, calls, _ = parse_streamed(DSMLFormat(), list("<｜DSML｜tool_calls>\n" + body + "\n</｜DSML｜tool_calls>"))
    assert calls == [("f", '{"a": 1')] and content == "\n" + body  # word for word


def test_v4_parameters_become_json_arguments():
    """string="true": the text as a JSON string (quotes, backslashes, newlines escaped); string="false":
    the JSON literal as written (numbers, booleans, arrays, objects)."""
    text = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="run">\n'
            '<｜DSML｜parameter name="code" string="true">print("a\\b")\nx = 1</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="opts" string="false">{"deep": [true, null]}</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    want = {"code": 'print("a\\b")\nx = 1', "n": 3, "opts": {"deep": [True, None]}}
    (call,) = parse(DSMLFormat(), [text])[1]
    assert json.loads(call.arguments) == want
    assert parse_streamed(DSMLFormat(), list(text))[1] == [("run", call.arguments)]
    empty = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="now">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    assert [(c.name, c.arguments) for c in parse(DSMLFormat(), [empty])[1]] == [("now", "{}")]


def test_content_is_streamed_not_held_to_the_end():
    p = ToolCallParser(KimiFormat())
    assert p.feed("In the beginning ") == [("content", "In the beginning ")]
    assert p.feed("<|tool_calls") == []  # could be the section token: held
    assert p.feed("x") == [("content", "<|tool_callsx")]  # was not


@pytest.mark.parametrize("fmt, text", [
    (DeepSeekFormat(v31=True), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    (DeepSeekFormat(v31=False), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather {}"
                                "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),  # no fence, and a space in the name
    (DeepSeekFormat(v31=True), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜><｜tool▁sep｜>{}<｜tool▁call▁end｜>"),
    (DeepSeekFormat(v31=True), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": "),
    (DeepSeekFormat(v31=True), "<｜tool▁calls▁begin｜>just words<｜tool▁calls▁end｜>"),
    (KimiFormat(), "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0{}<|tool_call_end|>"),
    (KimiFormat(), "<|tool_calls_section_begin|><|tool_call_begin|>functions.get weather:0"
                   "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"),
    (KimiFormat(), "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                   "<|tool_call_argument_begin|>{\"city\""),
    (DSMLFormat(), "<｜DSML｜tool_calls>\n<｜DSML｜invoke>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),  # no name
    (DSMLFormat(), "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\">1"
                   "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),  # no string="..."
    (DSMLFormat(), "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\nwords\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),
    (DSMLFormat(), "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
                   "string=\"true\">never closed"),
])
def test_malformed_calls_come_back_as_content_word_for_word(fmt, text):
    for pieces in ([text], list(text)):
        content, calls = parse(fmt, pieces)
        assert calls == [] and content == text


def test_a_malformed_call_beside_good_ones_and_arguments_as_written():
    bad = "<｜tool▁call▁begin｜>oops<｜tool▁call▁end｜>"
    text = V31.replace("<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time", "<｜tool▁call▁end｜>" + bad
                       + "<｜tool▁call▁begin｜>get_time")
    content, calls = parse(DeepSeekFormat(v31=True), [text])
    assert [c.name for c in calls] == ["get_weather", "get_time"] and content == bad
    # Arguments are passed on as the model wrote them, valid JSON or not (OpenAI does the same).
    text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{city: Paris<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    assert parse(DeepSeekFormat(v31=True), [text])[1][0].arguments == "{city: Paris"


def test_random_garbage_never_raises():
    rng = random.Random(1)
    alphabet = ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
                "<｜tool▁calls▁end｜>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>", "function",
                "f", "functions.f:0", "\n```json\n", "```", "{}", " ", "<", "｜", "x"]
    alphabet += ["<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke", ' name="f">', "</｜DSML｜invoke>",
                 '<｜DSML｜parameter name="a" string="true">', '<｜DSML｜parameter name="b" string="false">',
                 "</｜DSML｜parameter>", "\n", '"']
    for fmt in (DeepSeekFormat(True), DeepSeekFormat(False), KimiFormat(), DSMLFormat()):
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            content, calls = parse(fmt, [text[i:i + 3] for i in range(0, len(text), 3)])
            assert len(content) <= len(text)
            parse_streamed(fmt, [text[i:i + 2] for i in range(0, len(text), 2)])


def test_parallel_false_keeps_the_first_call():
    assert [c.name for c in parse(KimiFormat(), [KIMI], parallel=False)[1]] == ["get_weather"]


def test_detect_from_template_then_vocabulary():
    none = lambda t: False  # noqa: E731
    assert isinstance(detect("... <|tool_calls_section_begin|> ...", none), KimiFormat)
    assert detect("<｜tool▁calls▁begin｜>{{ c.type }}<｜tool▁sep｜>{{ c.function.name }}\n```json\n", none).v31 is False
    assert detect("<｜tool▁calls▁begin｜>{{ name }}<｜tool▁sep｜>{{ args }}", none).v31 is True
    assert detect("no tools here", none) is None
    assert isinstance(detect("plain", lambda t: t == "<｜tool▁calls▁begin｜>"), DeepSeekFormat)
    v4 = detect('{{ "<｜DSML｜tool_calls>" }}<｜DSML｜invoke name="{{ c.function.name }}">', none)
    assert isinstance(v4, DSMLFormat) and v4.name == "deepseek_v4" and v4.section_begin == "<｜DSML｜tool_calls>"
    v32 = detect("<｜DSML｜function_calls>", none)  # V3.2: the same tags, the block named function_calls
    assert v32.name == "deepseek_v3.2" and v32.section_end == "</｜DSML｜function_calls>"


# --- the round trip through the server, with a scripted model ------------------------------------

MARKERS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
           "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<|tool_calls_section_begin|>",
           "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
           "<|im_end|>"]
_MSGS = ("{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}"
         "{% elif m.role == 'assistant' %}<|Assistant|>{{ m.content or '' }}{% if m.tool_calls %}CALLS{% endif %}</s>"
         "{% elif m.role == 'tool' %}TOOL{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}")
_TOOLS = ("{% if tools %}## Tools{% for t in tools %}\n### {{ t.function.name }}\nParameters: "
          "{{ t.function.parameters | tojson }}{% endfor %}\n{% endif %}")
# Chat templates modeled on the published ones: how each writes earlier calls and tool results.
TEMPLATES = {
    "v3": _TOOLS + _MSGS.replace("CALLS", "<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}<｜tool▁call▁begin｜>"
                                 "{{ c.type }}<｜tool▁sep｜>{{ c.function.name }}\n```json\n{{ c.function.arguments }}"
                                 "\n```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>").replace(
        "TOOL", "<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>"),
    "v3.1": _TOOLS + _MSGS.replace("CALLS", "<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}<｜tool▁call▁begin｜>"
                                   "{{ c.function.name }}<｜tool▁sep｜>{{ c.function.arguments }}<｜tool▁call▁end｜>"
                                   "{% endfor %}<｜tool▁calls▁end｜>").replace(
        "TOOL", "<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>"),
    "kimi": _TOOLS + _MSGS.replace("CALLS", "<|tool_calls_section_begin|>{% for c in m.tool_calls %}"
                                   "<|tool_call_begin|>{{ c.id }}<|tool_call_argument_begin|>{{ c.function.arguments }}"
                                   "<|tool_call_end|>{% endfor %}<|tool_calls_section_end|>").replace(
        "TOOL", "## Return of {{ m.tool_call_id }}\n{{ m.content }}<|im_end|>"),
    # V4's release encodes messages in Python (encoding_dsv4.py); a template in its terms: DSML calls
    # (arguments as one parameter here: Jinja cannot take the JSON apart) and <tool_result> blocks.
    "v4": _TOOLS + _MSGS.replace("CALLS", "\n\n<｜DSML｜tool_calls>\n{% for c in m.tool_calls %}<｜DSML｜invoke "
                                 "name=\"{{ c.function.name }}\">\n<｜DSML｜parameter name=\"arguments\" "
                                 "string=\"false\">{{ c.function.arguments }}</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                                 "{% endfor %}</｜DSML｜tool_calls>").replace(
        "TOOL", "<tool_result>{{ m.content }}</tool_result>"),
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<s>", "</s>", "<|User|>", "<|Assistant|>", *MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([V3, V31, KIMI, V4, "What is the weather in Paris? It is sunny, 21 degrees."] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


class ScriptedBackend:
    """Answers each generation with the tokens of `script` (then EOS), and records the prompts."""

    name = "scripted"
    device = "cpu"
    experts = None

    def __init__(self, vocab: int, eos: int):
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096, num_attention_heads=1,
                                      to_dict=lambda: {"v": vocab})  # what generation reads of a ModelConfig
        self.eos = eos
        self.script: list[int] = []
        self.prompts: list[list[int]] = []
        self._step = 0

    def make_cache(self) -> PromptCache:
        return PromptCache(1)

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory_bytes(self) -> int:
        return 0

    def __call__(self, tokens: mx.array, cache: PromptCache | None = None) -> mx.array:
        ids = tokens.tolist()[0]
        if cache is not None:
            if cache[0].offset == 0:  # a new generation (the server runs without its prompt cache here)
                self.prompts.append(ids)
                self._step = 0
            cache[0].update_and_fetch(mx.zeros((1, 1, len(ids), 1)))
        nxt = self.script[self._step] if self._step < len(self.script) else self.eos
        self._step += 1
        logits = mx.zeros((1, len(ids), self.config.vocab_size))
        return logits + mx.eye(self.config.vocab_size)[nxt] * 100.0


@pytest.fixture(params=IDS)
def scripted(request, tokenizer_json, tmp_path):
    import shutil

    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATES[request.param]}), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    backend = ScriptedBackend(tok.vocab_size, tok.eos_ids[0])
    srv = make_server(LanguageModel(backend, tok, tmp_path), "127.0.0.1", 0, quiet=True, prompt_cache=False)
    srv.start()
    yield SimpleNamespace(kind=request.param, srv=srv, tok=tok, backend=backend,
                          say=lambda text: setattr(backend, "script", tok.encode(text, add_bos=False)))
    srv.close()


def post(srv, body: dict) -> tuple[int, dict | list]:
    req = urllib.request.Request(srv.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            if body.get("stream"):
                return r.status, [json.loads(line[6:]) for line in (raw.decode().strip() for raw in r)
                                  if line.startswith("data: ") and line != "data: [DONE]"]
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answer(kind: str) -> str:
    return {"v3": V3, "v3.1": V31, "kimi": KIMI, "v4": V4}[kind]


def test_tools_go_through_the_template_and_calls_come_back(scripted):
    scripted.say(answer(scripted.kind))
    status, out = post(scripted.srv, {"messages": USER, "tools": TOOLS, "max_tokens": 200})
    assert status == 200, out
    prompt = scripted.tok.decode(scripted.backend.prompts[-1], skip_special=False)
    assert "### get_weather" in prompt and '"city"' in prompt  # the template rendered the tools
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    want_content = {"v3": "Let me look that up.", "v3.1": None, "kimi": "I'll check. ",
                    "v4": "Let me check.\n\n"}[scripted.kind]
    assert msg["role"] == "assistant" and msg["content"] == want_content  # null when the answer is only calls
    calls = msg["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", n, a) for n, a in CALLS]
    assert len({c["id"] for c in calls}) == 2


def test_streamed_tool_call_deltas(scripted):
    scripted.say(answer(scripted.kind))
    status, chunks = post(scripted.srv, {"messages": USER, "tools": TOOLS, "max_tokens": 200, "stream": True})
    assert status == 200
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    content = "".join(d.get("content") or "" for d in deltas)
    assert "<" not in content  # no marker leaks into the text
    # Accumulate as OpenAI clients do: by index, the first delta of a call brings id and name.
    acc: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = acc.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "arguments": ""})
            entry["name"] += tc.get("function", {}).get("name") or ""
            entry["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert [(e["name"], json.loads(e["arguments"])) for e in acc.values()] == CALLS
    assert all(e["id"] for e in acc.values())
    # the arguments arrive as the model writes them, not in one piece per call
    pieces = [tc for d in deltas for tc in d.get("tool_calls", []) if tc.get("function", {}).get("arguments")]
    assert len(pieces) > 2 * len(CALLS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_results_are_fed_back_through_the_template(scripted):
    scripted.say("It is sunny in Paris.")
    call_id = "functions.get_weather:0" if scripted.kind == "kimi" else "call_abc"
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 degrees"}]
    status, out = post(scripted.srv, {"messages": messages, "tools": TOOLS, "max_tokens": 50})
    assert status == 200, out
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny in Paris."}
    assert out["choices"][0]["finish_reason"] == "stop"
    prompt = scripted.tok.decode(scripted.backend.prompts[-1], skip_special=False)
    fmt = scripted.tok.tool_format
    assert fmt.section_begin in prompt and "get_weather" in prompt and '{"city": "Paris"}' in prompt
    assert "sunny, 21 degrees" in prompt
    if scripted.kind == "v4":
        assert "<tool_result>sunny, 21 degrees</tool_result>" in prompt
    if scripted.kind == "kimi":
        assert "## Return of functions.get_weather:0" in prompt


def test_tool_choice_forces_a_call(scripted):
    fmt = scripted.tok.tool_format
    assert fmt.name == {"v3": "deepseek_v3", "v3.1": "deepseek_v3.1", "kimi": "kimi_k2",
                        "v4": "deepseek_v4"}[scripted.kind]
    # The model continues from the forced prefix: only the arguments and the closing tokens.
    rest = {"v3": "{\"zone\": \"CET\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "v3.1": "{\"zone\": \"CET\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "kimi": "0<|tool_call_argument_begin|>{\"zone\": \"CET\"}<|tool_call_end|><|tool_calls_section_end|>",
            "v4": "<｜DSML｜parameter name=\"zone\" string=\"true\">CET</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                  "</｜DSML｜tool_calls>"}
    scripted.say(rest[scripted.kind])
    choice = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        status, out = post(scripted.srv, {"messages": USER, "tools": TOOLS, "tool_choice": choice, "stream": stream})
        assert status == 200, out
        prompt = scripted.tok.decode(scripted.backend.prompts[-1], skip_special=False)
        assert prompt.endswith(fmt.forced_prefix("get_time"))
        if not stream:
            calls = out["choices"][0]["message"]["tool_calls"]
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_time", '{"zone": "CET"}')]
            assert out["choices"][0]["message"]["content"] is None
    # tool_choice "none": the tools are not rendered and markers are not parsed
    scripted.say("Plain words.")
    status, out = post(scripted.srv, {"messages": USER, "tools": TOOLS, "tool_choice": "none"})
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Plain words."}
    assert "### get_weather" not in scripted.tok.decode(scripted.backend.prompts[-1], skip_special=False)


def test_malformed_model_output_is_content_not_an_error(scripted):
    fmt = scripted.tok.tool_format
    broken = f"Oops {fmt.section_begin}{fmt.call_begin}get_weather no separator"
    scripted.say(broken)
    for stream in (False, True):
        status, out = post(scripted.srv, {"messages": USER, "tools": TOOLS, "stream": stream})
        assert status == 200
        if stream:
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in out) == broken
            assert out[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            assert out["choices"][0]["message"] == {"role": "assistant", "content": broken}
            assert out["choices"][0]["finish_reason"] == "stop"


def test_other_special_tokens_stay_out_of_the_text(scripted):
    """With tools the markers must reach the parser, but no other special token may reach the client."""
    scripted.say("Hello<|User|> there<|Assistant|>")
    for body in ({"messages": USER, "tools": TOOLS}, {"messages": USER}):
        status, out = post(scripted.srv, body)
        assert status == 200 and out["choices"][0]["message"]["content"] == "Hello there", out


# --- the request side: tools, tool_choice, tool messages -------------------------------------------

def test_tool_request_fields_fuzzed_raise_only_request_errors():
    """Any JSON in any tool-related place is one RequestError naming its field, never another exception."""
    from edge_ds import openai_schema as s

    rng = random.Random(2)
    atoms = [None, True, 0, -1, 1.5, 10 ** 30, "", "x", "auto", "none", "required", "function", "a b", [], {},
             [1], {"a": 1}, {"type": "function"}, {"name": "f"}, "\ud800"]

    def value(depth: int = 0):
        r = rng.random()
        if depth > 2 or r < 0.5:
            return rng.choice(atoms)
        if r < 0.75:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        return {k: value(depth + 1) for k in rng.sample(["type", "function", "name", "arguments", "id",
                                                          "parameters", "description"], rng.randrange(4))}

    good_tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    good_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for _ in range(3000):
        body = {"tools": rng.choice([value(), [good_tool, value()], [good_tool]]),
                "tool_choice": rng.choice([value(), "required", {"type": "function", "function": {"name": value()}}]),
                "parallel_tool_calls": value(), "logprobs": value(), "top_logprobs": value()}
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": value(), "tool_calls": rng.choice([value(), [good_call, value()]])},
                    {"role": "tool", "content": rng.choice(["r", value()]), "tool_call_id": value(), "name": value()}]
        for call in (lambda: s.parse_tools(body), lambda: s.parse_logprobs(body, True),
                     lambda: s.parse_logprobs(body, False), lambda: s.parse_messages(messages),
                     lambda: s.check_prompt_size(messages, 10 ** 6, 10, "messages")):
            try:
                call()
            except s.RequestError as e:
                root = (e.param or "").split("[")[0].split(".")[0]
                assert e.message and root in e.message, e.message


def test_tool_messages_reach_the_template_as_templates_read_them():
    from edge_ds.openai_schema import parse_messages

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}
    out = parse_messages([{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": [{"type": "text", "text": "2"}]}])
    # content None with calls: DeepSeek's templates test `content is none` to write the calls
    assert out[0] == out[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert out[2] == {"role": "tool", "content": "2", "tool_call_id": "call_1", "name": "f"}
