"""reasoning_content: the <think>...</think> part of an answer (DeepSeek-R1, V3.1 thinking) sent apart
from content, whole and as streamed reasoning deltas. The splitter on written answers at every split
point; the server with a scripted model behind R1- and V3.1-style templates."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from edge_ds.api import LanguageModel
from edge_ds.reasoning import ReasoningSplitter, opens_thinking
from edge_ds.server import make_server
from edge_ds.tokenizer import Tokenizer
from tests.test_tool_calls import TOOLS, USER, V31, ScriptedBackend, post, tokenizer_json  # noqa: F401

THOUGHT = "The user asks about Paris.\nI should answer briefly."
ANSWER = "It is sunny in Paris."


def split(pieces, inside=False) -> tuple[str, str]:
    s = ReasoningSplitter(inside)
    events = [e for p in pieces for e in s.feed(p)] + s.finish()
    assert all(k in ("reasoning", "content") and v for k, v in events)
    return "".join(v for k, v in events if k == "reasoning"), "".join(v for k, v in events if k == "content")


@pytest.mark.parametrize("text, inside, want", [
    (f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", False, (f"\n{THOUGHT}\n", ANSWER)),  # R1: the answer opens it
    (f"{THOUGHT}</think>{ANSWER}", True, (THOUGHT, ANSWER)),  # the template opened it
    (f"  <think>{THOUGHT}</think>", False, (THOUGHT, "")),
    (f"{THOUGHT} and never ends", True, (f"{THOUGHT} and never ends", "")),  # cut short: all reasoning
    (ANSWER, False, ("", ANSWER)),  # no think block: all content
    ("<thin", False, ("", "<thin")),
    (f"{ANSWER} <think>not reasoning</think>", False, ("", f"{ANSWER} <think>not reasoning</think>")),
])
def test_split_at_every_point(text, inside, want):
    assert split([text], inside) == want
    for i in range(len(text) + 1):
        assert split([text[:i], text[i:]], inside) == want, i
    assert split(list(text), inside) == want
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        assert split([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], inside) == want


def test_reasoning_is_streamed_as_it_comes():
    s = ReasoningSplitter(inside=True)
    assert s.feed("Let me think") == [("reasoning", "Let me think")]
    assert s.feed(" more</thi") == [("reasoning", " more")]  # the end marker's start is held
    assert s.feed("nk>\n\nDone") == [("content", "Done")]


def test_prompts_that_open_a_think_block():
    assert opens_thinking("<｜Assistant｜><think>\n") and opens_thinking("<think>")
    assert not opens_thinking("<｜Assistant｜></think>") and not opens_thinking("<｜Assistant｜>")


# R1-0528-style: the generation prompt opens the think block; V3.1-style thinking mode the same, with tools.
_MSGS = ("{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}"
         "{% elif m.role == 'assistant' %}<|Assistant|>{{ m.content or '' }}</s>{% endif %}{% endfor %}")
TEMPLATES = {
    "r1": _MSGS + "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}",
    "plain": _MSGS + "{% if add_generation_prompt %}<|Assistant|>{% endif %}",
    "v3.1-thinking": "{% if tools %}## Tools{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                     + _MSGS + "{% if add_generation_prompt %}<|Assistant|><think>{% endif %}"
                     "{# its calls: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS #}",
}


@pytest.fixture
def serve(tokenizer_json, tmp_path):  # noqa: F811
    """serve(template name) -> (server, say): a scripted model behind that chat template."""
    servers = []

    def start(kind: str):
        d = tmp_path / kind
        d.mkdir()
        shutil.copy(tokenizer_json, d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATES[kind]}), encoding="utf-8")
        tok = Tokenizer.load(d)
        backend = ScriptedBackend(tok.vocab_size, tok.eos_ids[0])
        srv = make_server(LanguageModel(backend, tok, d), "127.0.0.1", 0, quiet=True, prompt_cache=False)
        srv.start()
        servers.append(srv)
        return srv, lambda text: setattr(backend, "script", tok.encode(text, add_bos=False))

    yield start
    for srv in servers:
        srv.close()


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_reasoning_content_whole_and_streamed(serve, kind):
    srv, say = serve(kind)
    opened = kind != "plain"
    say((THOUGHT if opened else f"<think>{THOUGHT}") + "</think>\n\n" + ANSWER)
    status, out = post(srv, {"messages": USER, "max_tokens": 200})
    assert status == 200, out
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}
    status, chunks = post(srv, {"messages": USER, "max_tokens": 200, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert "".join(reasoning) == THOUGHT and len(reasoning) > 3  # as it is written, not at the end
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])


def test_no_think_block_no_reasoning_content(serve):
    srv, say = serve("plain")
    say(ANSWER)
    status, out = post(srv, {"messages": USER, "max_tokens": 50})
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}


def test_a_tool_call_after_the_reasoning(serve):
    """V3.1 thinking: reasoning, then the call; the call's markers never reach reasoning_content."""
    srv, say = serve("v3.1-thinking")
    say(f"{THOUGHT}</think>{V31}")
    for stream in (False, True):
        status, out = post(srv, {"messages": USER, "tools": TOOLS, "max_tokens": 300, "stream": stream})
        assert status == 200, out
        if stream:
            deltas = [c["choices"][0]["delta"] for c in out]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == THOUGHT
            names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
            assert names == ["get_weather", "get_time"] and out[-1]["choices"][0]["finish_reason"] == "tool_calls"
        else:
            msg = out["choices"][0]["message"]
            assert msg["reasoning_content"] == THOUGHT and msg["content"] is None
            assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "get_time"]
