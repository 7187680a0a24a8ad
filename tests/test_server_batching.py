"""Continuous batching (`--max-concurrency`): requests decoded together over caches of different
lengths, joining and leaving between steps, give each request what it gets alone (greedy)."""

from __future__ import annotations

import json
import queue
import socket
import threading
import urllib.error
import urllib.request

import pytest

import edge_ds
from edge_ds.batching import BatchEngine, Row, supported
from edge_ds.sampling import make_sampler
from edge_ds.server import BatchWorker, ModelWorker, make_server

PROMPTS = ["In the beginning", "And the LORD spake unto Moses, saying, Speak unto the children of Israel",
           "Blessed are the meek", "Thou shalt", "And God said, Let there be light: and there was light.",
           "Jesus wept.", "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures",
           "Vanity of vanities, saith the Preacher"]


@pytest.fixture(scope="module")
def lm():
    return edge_ds.load(backend="mlx")


@pytest.fixture(scope="module")
def lm_onnx(tmp_path_factory):
    """The shipped model exported with float32 activations (accuracy level 0; its graph takes per-row
    positions and attention masks). A batch then matches a lone run to float rounding: the int8
    activations of the shipped export (level 4) can turn that rounding into a whole quantization step."""
    from converters.onnx import export_onnx
    from edge_ds.resources import default_model_path

    out = export_onnx(default_model_path(), tmp_path_factory.mktemp("onnx") / "exact", accuracy_level=0)
    return edge_ds.load(out, backend="onnx")


@pytest.fixture(params=["mlx", "onnx"])
def either(request, lm, lm_onnx):
    return lm if request.param == "mlx" else lm_onnx


@pytest.fixture(scope="module")
def server_onnx(lm_onnx):
    srv = make_server(lm_onnx, "127.0.0.1", 0, quiet=True, max_concurrency=4)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture(params=["mlx", "onnx"])
def served(request, lm, lm_onnx, server, server_onnx):
    """(a batching server with 4 rows, its model) on each backend."""
    return (server, lm) if request.param == "mlx" else (server_onnx, lm_onnx)


@pytest.fixture(scope="module")
def server(lm):
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, max_concurrency=4)
    srv.start()
    yield srv
    srv.close()


def post(srv, path: str, body: dict):
    req = urllib.request.Request(srv.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if body.get("stream"):
            return [json.loads(line[6:]) for line in (raw.decode().strip() for raw in r)
                    if line.startswith("data: ") and line != "data: [DONE]"]
        return json.loads(r.read())


def together(fns) -> list:
    out: list = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_the_engine_joins_and_drops_rows_between_steps(either):
    """Rows of different lengths join while others decode (prefill in chunks of 4 tokens) and leave at
    different steps; every row's tokens are the lone greedy run's (MLX; the ONNX export's graph)."""
    lm = either
    assert supported(lm) is None
    eos = set(lm.tokenizer.eos_ids)
    want = [lm.generate(p, max_tokens=20 + 3 * i, chat_template=False).tokens for i, p in enumerate(PROMPTS)]
    engine = BatchEngine(lm, max_rows=5, prefill_step=4)
    rows = [Row(ids=lm.tokenizer.encode(p), sampler=make_sampler(0.0), max_tokens=20 + 3 * i, penalty=None,
                penalty_context=64, logprobs=None, eos=eos, out=queue.Queue(), cancelled=threading.Event())
            for i, p in enumerate(PROMPTS)]
    engine.add(rows[0])
    engine.add(rows[1])
    steps, widths = 0, []
    while engine.busy:
        engine.step()
        steps += 1
        widths.append(len(engine.rows))
        if steps in (2, 5, 9):
            for r in rows[2 + (steps > 2) * 2 + (steps > 5) * 2:][:2]:
                engine.add(r)
    # several rows decode together, newcomers join while others decode, rows leave one by one
    assert max(widths) == 5 and widths[-1] == 0 and sorted(set(widths)) == list(range(6))
    for r, w in zip(rows, want):
        got = []
        while (item := r.out.get_nowait()) is not None:
            got.append(item[0])
        assert [t for t in got if t not in eos] == w


def test_eight_concurrent_requests_equal_their_lone_answers(either):
    lm = either
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, max_concurrency=8)
    srv.start()
    try:
        assert isinstance(srv.worker, BatchWorker)
        want = [lm.generate(p, max_tokens=8 + 5 * i, chat_template=False).text for i, p in enumerate(PROMPTS)]

        def ask(i):
            body = {"prompt": PROMPTS[i], "max_tokens": 8 + 5 * i, "temperature": 0, "stream": i % 2 == 1}
            out = post(srv, "/v1/completions", body)
            return "".join(c["choices"][0]["text"] for c in out) if body["stream"] else out["choices"][0]["text"]

        assert together([lambda i=i: ask(i) for i in range(8)]) == want
    finally:
        srv.close()


def test_chat_stop_strings_and_logprobs_in_a_batch(served):
    server, lm = served
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    full = [lm.generate(c, max_tokens=20, logprobs=2) for c in chats]
    stops = [g.text.split()[2] for g in full]

    def ask(i):
        return post(server, "/v1/chat/completions", {"messages": chats[i], "max_tokens": 20, "temperature": 0,
                                                      "stop": [stops[i]], "logprobs": True, "top_logprobs": 2})

    for out, g, stop in zip(together([lambda i=i: ask(i) for i in range(4)]), full, stops):
        choice = out["choices"][0]
        assert choice["message"]["content"] == g.text[:g.text.index(stop)] and choice["finish_reason"] == "stop"
        entries = choice["logprobs"]["content"]
        assert [e["token"] for e in entries] == [lm.tokenizer.token_bytes(e.token).decode()
                                                 for e in g.logprobs[:len(entries)]]
        for e, w in zip(entries, g.logprobs):  # a batch's several-row kernels round differently
            assert abs(e["logprob"] - w.logprob) < 1e-3


def test_reasoning_content_in_a_batch():
    """A template that opens a think block: the batched worker splits the answer like the queued one
    (the shipped model never closes it, so all of its answer is reasoning)."""
    lm = edge_ds.load(backend="mlx")  # its own: the chat template is changed
    lm.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}<think>"
    lm.tokenizer._compiled = None
    want = lm.generate([{"role": "user", "content": PROMPTS[0]}], max_tokens=12).text
    srv = make_server(lm, "127.0.0.1", 0, quiet=True, max_concurrency=2)
    srv.start()
    try:
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 12, "temperature": 0}
        out = together([lambda: post(srv, "/v1/chat/completions", body),
                        lambda: post(srv, "/v1/chat/completions", {**body, "stream": True})])
        assert out[0]["choices"][0]["message"] == {"role": "assistant", "content": "", "reasoning_content": want}
        deltas = [c["choices"][0]["delta"] for c in out[1]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == want
        assert not "".join(d.get("content") or "" for d in deltas)
    finally:
        srv.close()


def test_more_requests_than_rows_wait_their_turn(served):
    server, lm = served
    want = [lm.generate(p, max_tokens=12, chat_template=False).text for p in PROMPTS]
    got = together([lambda p=p: post(server, "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
                    for p in PROMPTS])
    assert [o["choices"][0]["text"] for o in got] == want


def test_a_client_leaving_cancels_only_its_own_row(served):
    server, lm = served
    want = [lm.generate(p, max_tokens=40, chat_template=False).text for p in PROMPTS[:2]]
    host, port = server.server_address[:2]

    def leaver():
        body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 200, "stream": True, "temperature": 0}).encode()
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            seen = b""
            while b"data:" not in seen:  # its first token, then the client goes
                chunk = s.recv(4096)
                assert chunk, seen
                seen += chunk
        return "left"

    got = together([lambda: post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0}),
                    leaver,
                    lambda: post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0})])
    assert got[1] == "left"
    assert [got[0]["choices"][0]["text"], got[2]["choices"][0]["text"]] == want
    assert server.worker.wait_idle(30)  # the 200-token request was dropped, not run to its end
    assert server.worker._engine.rows == [] and server.worker._engine.waiting == []


@pytest.mark.parametrize("kind", ["v32", "v32wide"])
def test_v32_rows_past_index_topk_batch_like_lone_runs(zoo, kind):
    """DeepSeek-V3.2's indexer in a batch: rows below and past index_topk (8 / 12) decode together,
    each row's padding masked out of its choice and of the chosen rows; every row's greedy tokens are
    the lone run's."""
    from types import SimpleNamespace

    import numpy as np

    from edge_ds.backends import mlx as mlx_backend
    from edge_ds.generate import GenerationStats, generate_tokens

    backend = mlx_backend.load(zoo.converted(kind, "none"))
    lm = SimpleNamespace(backend=backend)
    assert supported(lm) is None
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, backend.config.vocab_size, size=n).tolist() for n in (3, 5, 9, 2, 14, 7, 4, 11)]
    lengths = [12 + 2 * i for i in range(8)]
    want = [list(generate_tokens(backend, p, backend.make_cache(), make_sampler(0.0), n, GenerationStats()))
            for p, n in zip(prompts, lengths)]
    engine = BatchEngine(lm, max_rows=8, prefill_step=4)
    rows = [Row(ids=p, sampler=make_sampler(0.0), max_tokens=n, penalty=None, penalty_context=64, logprobs=None,
                eos=set(), out=queue.Queue(), cancelled=threading.Event()) for p, n in zip(prompts, lengths)]
    for r in rows[:3]:
        engine.add(r)
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
        if steps == 3:
            for r in rows[3:]:
                engine.add(r)
    assert max(len(p) + n for p, n in zip(prompts, lengths)) > 2 * backend.config.index_topk
    for r, w in zip(rows, want):
        got = []
        while (item := r.out.get_nowait()) is not None:
            got.append(item[0])
        assert got == w


def test_v4_caches_queue_and_say_why():
    from types import SimpleNamespace

    from edge_ds.cache import PromptCache
    from edge_ds.models.compressor import V4LayerCache

    v4 = SimpleNamespace(name="mlx", model=SimpleNamespace(layers=[]),
                         make_cache=lambda: PromptCache(2, lambda: V4LayerCache(8, ())))
    assert "DeepSeek-V4" in supported(SimpleNamespace(backend=v4))


def test_an_onnx_export_without_per_row_inputs_queues_and_says_why(lm_onnx, tmp_path, capsys):
    """An export whose onnx.json does not list per-row position_ids / attention_mask is served one
    request at a time, with the reason said at start."""
    from edge_ds.resources import default_model_path

    src = default_model_path()
    for f in src.iterdir():
        if f.is_file():
            (tmp_path / f.name).symlink_to(f)
    manifest = json.loads((src / "onnx.json").read_text())
    manifest["inputs"]["position_ids"] = [1, "seq"]
    (tmp_path / "onnx.json").unlink()
    (tmp_path / "onnx.json").write_text(json.dumps(manifest))
    old = edge_ds.load(tmp_path, backend="onnx")
    why = supported(old)
    assert "position_ids" in why and "re-export" in why
    srv = make_server(old, "127.0.0.1", 0, quiet=False, max_concurrency=4)
    try:
        assert type(srv.worker) is ModelWorker
        assert f"not batching ({why}); one request at a time" in capsys.readouterr().err
        assert supported(lm_onnx) is None  # a current export's manifest lists them
        srv2 = make_server(lm_onnx, "127.0.0.1", 0, quiet=True, max_concurrency=4)
        assert isinstance(srv2.worker, BatchWorker)
        srv2.close()
    finally:
        srv.close()


def test_other_backends_queue_instead(lm):
    from types import SimpleNamespace

    torch_like = SimpleNamespace(backend=SimpleNamespace(name="torch", config=lm.config))
    assert "torch backend decodes one request at a time" in supported(torch_like)


def test_ids_outside_the_vocabulary_are_a_500_not_a_crash(server, lm, monkeypatch):
    encode = lm.tokenizer.encode
    monkeypatch.setattr(lm.tokenizer, "encode", lambda *a, **k: encode(*a, **k) + [10 ** 6])
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 500 and "outside the model's vocabulary" in json.loads(e.value.read())["error"]["message"]
    monkeypatch.undo()
    assert post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})["choices"][0]["text"]


def test_a_backend_that_hides_its_model_is_not_batched(lm):
    """--parallel's driver forwards every call to every rank: the engine must not go around it."""
    from types import SimpleNamespace

    driver = SimpleNamespace(name="mlx", config=lm.config, make_cache=lm.backend.make_cache)
    assert "--parallel" in supported(SimpleNamespace(backend=driver))
