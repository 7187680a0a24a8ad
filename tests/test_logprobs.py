"""logprobs / top_logprobs: the API's TokenLogprob entries and the server's OpenAI shapes, checked
against the model's own logits computed here (a full forward without cache on the same tokens)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

import edge_ds
from edge_ds import generate as generate_mod
from edge_ds.server import make_server

PROMPT = "And the LORD spake unto Moses, saying,"
CHAT = [{"role": "user", "content": "In the beginning God created the heaven and the earth."}]
TOL = 1e-4  # float32 log-softmax in MLX vs float64 here, on the same logits


@pytest.fixture(scope="module", params=["mlx", "onnx"])
def lm(request):
    """The shipped model on each backend that runs it here (its directory holds an ONNX export)."""
    return edge_ds.load(backend=request.param)


@pytest.fixture(scope="module")
def server(lm):
    # Without the prompt cache each prompt is prefilled in one piece, as the oracle runs it: a prefix
    # reused from an earlier request would change float32 rounding (not the meaning).
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, prompt_cache=False)
    srv.start()
    yield srv
    srv.close()


def oracle(lm, prompt_ids: list[int], generated: list[int], penalty: float | None = None,
           context: int = 64) -> np.ndarray:
    """log-softmax rows [len(generated), vocab] of the model's next-token distribution at each
    generated position, in float64, with the CTRL repetition penalty applied here by hand. The
    model runs here as generation runs it (the prompt, then one token at a time on a cache), so the
    logits are the same numbers; check_full_forward compares with one forward without cache too."""
    import mlx.core as mx

    cache = lm.new_cache()
    steps = [lm.backend(mx.array([prompt_ids]), cache=cache)[0, -1]]
    for t in generated[:-1]:
        steps.append(lm.backend(mx.array([[t]]), cache=cache)[0, -1])
    logits = np.array(mx.stack(steps).astype(mx.float32)).astype(np.float64)
    rows = []
    for i, row in enumerate(logits):
        if penalty:
            seen = np.array(sorted(set((prompt_ids + generated[:i])[-context:])))
            row[seen] = np.where(row[seen] < 0, row[seen] * penalty, row[seen] / penalty)
        m = row.max()
        rows.append(row - m - np.log(np.exp(row - m).sum()))
    return np.array(rows)


def check_full_forward(lm, prompt_ids: list[int], entries) -> None:
    """The same numbers from one forward pass without cache (another numerical path: loosely)."""
    tokens = [e.token for e in entries]
    logits = lm.logits([prompt_ids + tokens])[0].astype(np.float64)[len(prompt_ids) - 1:-1]
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose([e.logprob for e in entries], logits[np.arange(len(tokens)), tokens] - lse,
                               atol=2e-2)


def check_entries(entries, want: np.ndarray, k: int) -> None:
    assert len(entries) == len(want)
    for e, row in zip(entries, want):
        assert abs(e.logprob - row[e.token]) < TOL
        assert len(e.top) == k
        ids = [t for t, _ in e.top]
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
        np.testing.assert_allclose([lp for _, lp in e.top], row[ids], atol=TOL)
        # The k most likely: nothing left out is likelier than the least likely reported.
        assert np.sort(row)[::-1][k - 1] <= min(lp for _, lp in e.top) + TOL


def test_api_logprobs_are_the_model_distribution(lm):
    ids = lm.tokenizer.encode(PROMPT)
    g = lm.generate(PROMPT, max_tokens=12, chat_template=False, logprobs=4)
    assert g.logprobs is not None and [e.token for e in g.logprobs] == g.tokens
    want = oracle(lm, ids, g.tokens)
    check_entries(g.logprobs, want, 4)
    check_full_forward(lm, ids, g.logprobs)
    assert all(e.top[0][0] == e.token for e in g.logprobs)  # greedy: the chosen token is the likeliest
    # offsets: where each token's text starts in the returned text
    assert [e.offset for e in g.logprobs] == [len(lm.tokenizer.decode(g.tokens[:i])) for i in range(len(g.tokens))]


def test_api_logprobs_ignore_temperature_and_filters_but_see_the_penalty(lm):
    ids = lm.tokenizer.encode(PROMPT)
    g = lm.generate(PROMPT, max_tokens=10, chat_template=False, logprobs=2, temperature=1.5, top_k=3,
                    top_p=0.9, seed=3, repetition_penalty=1.3)
    check_entries(g.logprobs, oracle(lm, ids, g.tokens, penalty=1.3), 2)
    g0 = lm.generate(PROMPT, max_tokens=4, chat_template=False, logprobs=0)
    assert all(e.top == [] for e in g0.logprobs)
    assert lm.generate(PROMPT, max_tokens=4, chat_template=False).logprobs is None
    with pytest.raises(edge_ds.OptionError, match="logprobs"):
        lm.generate(PROMPT, max_tokens=4, logprobs=-1)


def test_the_normal_decode_path_computes_no_logprobs(lm, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("log-softmax computed without logprobs")
    monkeypatch.setattr(generate_mod, "token_logprob", refuse)
    assert lm.generate(PROMPT, max_tokens=6, chat_template=False).text


def test_stop_string_leaves_out_tokens_inside_it(lm):
    full = lm.generate(PROMPT, max_tokens=16, chat_template=False)
    stop = full.text.split()[3]
    g = lm.generate(PROMPT, max_tokens=16, chat_template=False, stop=[stop], logprobs=1)
    assert g.text == full.text[:full.text.index(stop)]
    assert all(e.offset < len(g.text) for e in g.logprobs)
    assert len(g.logprobs) == len([o for o in (len(lm.tokenizer.decode(full.tokens[:i]))
                                               for i in range(len(full.tokens))) if o < len(g.text)])


def post(server, path: str, body: dict):
    req = urllib.request.Request(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        if body.get("stream"):
            return [json.loads(line[6:]) for line in (raw.decode().strip() for raw in r)
                    if line.startswith("data: ") and line != "data: [DONE]"]
        return json.loads(r.read())


def test_chat_logprobs_shape_and_values(server, lm):
    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    out = post(server, "/v1/chat/completions", body)
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    # one entry per token of the answer (an EOS that ended it is not part of the text)
    assert len(content) == out["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    prompt_ids = lm.tokenizer.encode_chat(CHAT)
    gen = lm.generate(CHAT, max_tokens=10, logprobs=3)
    want = oracle(lm, prompt_ids, gen.tokens)
    for entry, tok, row in zip(content, gen.tokens, want):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]) == lm.tokenizer.token_bytes(tok) and entry["token"] == bytes(entry["bytes"]).decode()
        assert abs(entry["logprob"] - row[tok]) < TOL
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
    # The tokens spell the content (sentencepiece drops the first token's leading space from the text).
    assert "".join(t["token"] for t in content).lstrip() == choice["message"]["content"].lstrip()
    # without top_logprobs: each entry's list is empty; without logprobs: null
    out = post(server, "/v1/chat/completions", {**body, "top_logprobs": None})
    assert all(t["top_logprobs"] == [] for t in out["choices"][0]["logprobs"]["content"])
    assert post(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}
                )["choices"][0]["logprobs"] is None


def test_streamed_chat_logprobs_add_up_to_the_whole(server):
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = post(server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    chunks = post(server, "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == whole
    # each token's entry comes with (or before) the chunk carrying its text, never after
    text = ""
    seen = []
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        seen += [e["token"] for e in (lp or {}).get("content") or []]
        text += c["choices"][0]["delta"].get("content") or ""
        assert len("".join(seen).lstrip()) >= len(text.lstrip())


def test_completion_logprobs_legacy_shape(server, lm):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    choice = post(server, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    gen = lm.generate(PROMPT, max_tokens=8, chat_template=False, logprobs=2)
    want = oracle(lm, lm.tokenizer.encode(PROMPT), gen.tokens)
    assert lp["tokens"] == [lm.tokenizer.token_bytes(t).decode() for t in gen.tokens]
    np.testing.assert_allclose(lp["token_logprobs"], [row[t] for row, t in zip(want, gen.tokens)], atol=TOL)
    for top, row in zip(lp["top_logprobs"], want):
        assert len(top) == 2
        best = np.argsort(-row)[:2]
        assert list(top) == [lm.tokenizer.token_bytes(int(t)).decode() for t in best]
        np.testing.assert_allclose(list(top.values()), row[best], atol=TOL)
    assert lp["text_offset"] == [e.offset for e in gen.logprobs]
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][off:].startswith(tok.lstrip() if off == 0 else tok)
    streamed = post(server, "/v1/completions", {**body, "stream": True})
    parts = [c["choices"][0]["logprobs"] for c in streamed if c["choices"][0]["logprobs"]]
    assert sum((p["tokens"] for p in parts), []) == lp["tokens"]
    assert sum((p["text_offset"] for p in parts), []) == lp["text_offset"]


def test_streamed_logprobs_with_a_stop_string_match_the_whole_answer(server, lm):
    full = lm.generate(CHAT, max_tokens=16).text
    stop = full.split()[4]
    body = {"messages": CHAT, "max_tokens": 16, "temperature": 0, "logprobs": True, "stop": [stop]}
    whole = post(server, "/v1/chat/completions", body)["choices"][0]
    assert whole["message"]["content"] == full[:full.index(stop)] and whole["finish_reason"] == "stop"
    chunks = post(server, "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == whole["logprobs"]["content"]
    # Every token starts inside the answer: one that lies wholly in the stop string is left out (one
    # that the stop string only ends, " unto" for a stop "unto", keeps its entry).
    text = whole["message"]["content"].lstrip()
    assert len("".join(e["token"] for e in streamed[:-1]).lstrip()) < len(text)
    assert len("".join(e["token"] for e in streamed).lstrip()) <= len(text) + len(stop)
