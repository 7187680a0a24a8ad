"""The Python API and the CLI on a tiny converted model with a real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_ds
from converters.mlx import convert
from edge_ds.cache import PromptCache
from tiny_models import make_hf_model, save_hf

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def add_tokenizer(d: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, said the user. " * 50], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("api")
    hf = base / "hf"
    save_hf(make_hf_model("v3", vocab_size=300, max_position_embeddings=256), hf)
    add_tokenizer(hf, 300)
    return convert(hf, base / "q4", quant="4bit", dtype="float32")


@pytest.fixture(scope="module")
def lm(model_dir):
    return edge_ds.load(model_dir)


def test_logits_shape_and_type(lm):
    out = lm.logits([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert out.shape == (2, 4, lm.config.vocab_size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    with pytest.raises(edge_ds.EdgeDSError, match="token_ids"):
        lm.logits([[lm.config.vocab_size]])


def test_greedy_generation_equals_full_forward_argmax(lm):
    """Cached decode must pick what a full no-cache forward picks at every step."""
    prompt = lm.tokenizer.encode("the quick brown fox")
    gen = lm.generate(prompt, max_tokens=12)
    seq = list(prompt)
    for _ in range(len(gen.tokens)):
        seq.append(int(lm.logits([seq])[0, -1].argmax()))
    # generation stops early only on EOS, which the full-forward oracle would also produce
    assert gen.tokens == seq[len(prompt):len(prompt) + len(gen.tokens)]
    assert gen.stats.generation_tokens >= len(gen.tokens)
    assert gen.stats.prompt_tokens == len(prompt) == gen.stats.prefilled_tokens


def test_stream_matches_generate_and_decode(lm):
    opts = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=3, chat_template=False)
    s = lm.stream("the lazy dog", **opts)
    chunks = list(s)
    g = lm.generate("the lazy dog", **opts)
    assert "".join(chunks) == s.text == g.text
    assert g.text == lm.tokenizer.decode(g.tokens)
    assert s.stats.generation_tokens > 0 and s.stats.generation_tps > 0


def test_seed_reproducible_and_distinct(lm):
    a = lm.generate("fox", max_tokens=20, temperature=1.0, seed=1, chat_template=False).tokens
    b = lm.generate("fox", max_tokens=20, temperature=1.0, seed=1, chat_template=False).tokens
    c = lm.generate("fox", max_tokens=20, temperature=1.0, seed=2, chat_template=False).tokens
    assert a == b and a != c


def test_stop_string_cuts_text(lm):
    full = lm.generate("the", max_tokens=24, temperature=1.0, seed=5, chat_template=False)
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = lm.generate("the", max_tokens=24, temperature=1.0, seed=5, chat_template=False, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.stats.finish_reason == "stop"


def test_chat_second_turn_reuses_cache(lm):
    chat = lm.chat()
    first = chat.send("hello there", max_tokens=8)
    list(first)
    second = chat.send("and again", max_tokens=8)
    list(second)
    assert 0 < second.stats.prefilled_tokens < second.stats.prompt_tokens
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    chat.reset()
    assert chat.messages == [] and chat.cache.offset == 0


def test_prompt_cache_save_load_continues_identically(lm, tmp_path):
    prompt = lm.tokenizer.encode("the quick brown fox jumps")
    cache = lm.new_cache()
    lm.generate(prompt, max_tokens=1, cache=cache)
    cache.save(tmp_path / "c.safetensors", lm.fingerprint)
    loaded = PromptCache.load(tmp_path / "c.safetensors", lm.config.num_hidden_layers, lm.fingerprint)
    assert loaded.tokens == cache.tokens
    a = lm.generate(prompt + [5, 6], max_tokens=6, cache=cache)
    b = lm.generate(prompt + [5, 6], max_tokens=6, cache=loaded)
    assert a.tokens == b.tokens and a.stats.prefilled_tokens == b.stats.prefilled_tokens < len(prompt)


def test_over_long_prompt_is_a_clear_error(lm):
    with pytest.raises(edge_ds.EdgeDSError, match="max_position_embeddings"):
        lm.generate([1] * 250, max_tokens=10)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_ds.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_generate_info_bench(model_dir):
    r = cli("generate", "--model", str(model_dir), "--prompt", "the fox", "-m", "8", "--no-chat-template")
    assert r.returncode == 0, r.stderr
    assert "Generation:" in r.stderr and "tokens-per-sec" in r.stderr
    r = cli("info", str(model_dir), "--json")
    facts = json.loads(r.stdout)
    assert facts["model_type"] == "deepseek_v3" and facts["active_params"] < facts["total_params"]
    assert facts["cache_bytes_per_token"] == 3 * (32 + 16) * 4
    r = cli("bench", "--model", str(model_dir), "-p", "8", "-g", "4", "-n", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation_tps"] > 0


def record_backend_calls(lm, monkeypatch) -> list[tuple[int, int | None]]:
    """Records each call of lm's backend as (tokens in the call, tokens already in its cache)."""
    calls = []
    real = type(lm.backend).__call__

    def counting(self, tokens, cache=None, **kw):
        calls.append((tokens.shape[1], cache.offset if cache is not None else None))
        return real(self, tokens, cache=cache, **kw)

    monkeypatch.setattr(type(lm.backend), "__call__", counting)
    return calls


def test_bench_depth_times_the_prompt_after_a_filled_cache(lm, monkeypatch):
    """bench -d D (llama-bench's depth): each trial fills a fresh cache with D tokens untimed, then
    prefills the P prompt tokens on top of them and generates G."""
    from edge_ds.bench import run_bench

    calls = record_backend_calls(lm, monkeypatch)
    result = run_bench(lm, prompt_tokens=12, generation_tokens=5, trials=2, depth=40)
    assert result["depth"] == 40 and result["prompt_tps"] > 0
    one_trial = [(40, 0), (12, 40)] + [(1, 52 + i) for i in range(4)]
    assert calls == one_trial * 3  # the warm-up and two timed trials
    with pytest.raises(edge_ds.EdgeDSError, match="max_position_embeddings"):
        run_bench(lm, prompt_tokens=12, generation_tokens=5, depth=lm.config.max_position_embeddings)


def test_prefill_chunks_shrink_as_the_context_grows(lm, monkeypatch):
    """Past SCORES_BUDGET (one layer's attention scores, [heads, chunk, context] float32) a prompt is
    prefilled in smaller chunks the longer the context gets, and generates what one chunk does."""
    from edge_ds import generate

    rng = np.random.default_rng(3)
    prompt = rng.integers(2, lm.config.vocab_size, 150).tolist()
    want = lm.generate(prompt, max_tokens=6).tokens
    calls = record_backend_calls(lm, monkeypatch)
    heads = lm.config.num_attention_heads
    monkeypatch.setattr(generate, "SCORES_BUDGET", 4 * heads * generate.PREFILL_STEP * 64)  # 64 tokens at first
    got = lm.generate(prompt, max_tokens=6, cache=lm.new_cache()).tokens
    sizes = [n for n, _ in calls]
    prefill = sizes[:-5]  # then 5 single-token decode steps
    assert prefill[0] == 64 and all(a > b for a, b in zip(prefill, prefill[1:])) and sum(prefill) == 150
    assert all(n == 1 for n in sizes[-5:])
    assert got == want


def test_cli_chat_session(model_dir):
    r = cli("chat", "--model", str(model_dir), "-m", "4", stdin="hi\n/reset\nhello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "conversation reset" in r.stderr


@pytest.mark.parametrize("args", [
    ("generate", "--model", "/nonexistent/model", "--prompt", "x"),
    ("info", "/nonexistent/model"),
    ("convert", "/nonexistent/src", "/tmp/edge-ds-never-written"),
])
def test_cli_user_errors_are_one_line(args):
    r = cli(*args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "/nonexistent" in r.stderr


def test_split_decode_matvec_matches_unsplit(lm, monkeypatch):
    """Decode splits wide quantized matvecs over two CPU streams; force it on the tiny head."""
    import mlx.core as mx

    from edge_ds.models import layers

    monkeypatch.setattr(layers, "SPLIT_ROWS", 64)  # the head has 300 rows
    prompt = lm.tokenizer.encode("the quick brown fox")
    cache = lm.new_cache()
    lm.backend(mx.array([prompt[:-1]]), cache=cache)
    step = np.array(lm.backend(mx.array([prompt[-1:]]), cache=cache))[0, -1]  # one row: split path
    full = lm.logits([prompt])[0, -1]  # several rows: one kernel call
    assert np.abs(step - full).max() / np.abs(full).max() < 1e-5


def test_generation_on_a_worker_thread_exits_cleanly():
    """A desktop app generates on its own thread, which then ends: the process must still exit 0
    (MLX aborts at exit unless each thread that ran it frees its streams; the API does that)."""
    import textwrap

    code = textwrap.dedent("""
        import threading
        import edge_ds
        lm = edge_ds.load(backend="mlx")  # MLX's streams on a worker thread (the default may be onnx)
        out = []
        def work():
            out.append(lm.generate("In the beginning", max_tokens=8).text)
        t = threading.Thread(target=work)
        t.start()
        t.join()
        print(len(out))
    """)
    for _ in range(3):  # without the clean-up, 8 of 10 such runs aborted here
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "terminate" not in r.stderr, r.stderr[-2000:]
        assert r.stdout.split() == ["1"]


def test_token_ids_outside_the_vocabulary_are_refused(model_dir, tmp_path):
    """A tokenizer whose ids run past the model's vocabulary (another model's) is an error, not a
    read past the embedding (which crashed the process)."""
    import shutil

    from edge_ds.perplexity import perplexity

    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    lm = edge_ds.load(small)
    lm.config.vocab_size = 200  # as if config.json said 200 for a 300-token tokenizer
    ids = lm.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    assert max(ids) >= 200 and cfg["vocab_size"] == 300
    with pytest.raises(edge_ds.EdgeDSError, match="outside the model's vocabulary"):
        lm.generate("the quick brown fox jumps over the lazy dog", max_tokens=2, chat_template=False)
    with pytest.raises(edge_ds.EdgeDSError, match="outside the model's vocabulary"):
        perplexity(lm, "the quick brown fox jumps over the lazy dog " * 4, window=8)
