"""The library names its arguments in errors; the CLI says the same with its flags, and the
server with its JSON fields (test_server.py). One validator serves all three."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edge_ds.cli import FLAGS, main as cli
from edge_ds.errors import EdgeDSError, OptionError
from edge_ds.options import SamplingOptions
from edge_ds.resources import default_model_path

BAD = [
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temp", "-0.1"], "--temp must be a finite number >= 0, got -0.1"),
    (["--temp", "inf"], "--temp must be a finite number >= 0, got inf"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
    (["--stop", ""], "--stop must be non-empty strings, got ['']"),
    (["--seed", "-1"], "--seed must be an integer in [0, 18446744073709551615], got -1"),
    (["--seed", str(2**64)], f"--seed must be an integer in [0, 18446744073709551615], got {2**64}"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_generate_names_the_flag(args, message):
    r = CliRunner().invoke(cli, ["generate", "--prompt", "In the beginning", "--quiet", *args])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [f"edge-ds: error: {message}"]


def test_library_names_the_argument():
    with pytest.raises(OptionError, match=r"^top_p must be in \(0, 1\], got 1.5$") as e:
        SamplingOptions(top_p=1.5)
    assert e.value.option == "top_p" and e.value.spelled(FLAGS["top_p"]) == "--top-p must be in (0, 1], got 1.5"


def test_every_sampling_option_has_a_flag():
    """A SamplingOptions field that the CLI exposes must render as a flag, not as an argument name."""
    exposed = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"}
    assert exposed <= set(FLAGS) and all(FLAGS[o].startswith("--") for o in exposed)


def test_budget_and_backend_errors_name_flags(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--expert-budget", "lots"])
    assert r.exit_code == 1 and "--expert-budget: expected bytes" in r.output, r.output
    r = CliRunner().invoke(cli, ["trace", "replay", str(tmp_path / "none.jsonl"), "--budget", "10%"])
    assert r.exit_code == 1 and "none.jsonl" in r.output  # a file error names the file


def test_chat_without_a_template_points_to_no_chat_template(tmp_path):
    model = tmp_path / "plain"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("recipe"))


    d = json.loads((model / "tokenizer_config.json").read_text())
    d.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(d))
    r = CliRunner().invoke(cli, ["chat", "--model", str(model)], input="hi\n")
    assert r.exit_code == 1
    assert "no chat template" in r.output and "--no-chat-template" in r.output, r.output


# --- rough edges a new user met -------------------------------------------------------------

@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The shipped model with a 160-token context, so a few turns fill it."""
    model = tmp_path_factory.mktemp("short") / "tiny-160"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("recipe"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 160
    (model / "config.json").write_text(json.dumps(cfg))
    return model


LONG = "And God said, Let there be light: and there was light, and the evening and the morning were the day. "


def test_chat_outlives_its_context(short_context):
    import edge_ds

    lm = edge_ds.load(short_context)
    chat = lm.chat(system="Thou art terse.")
    for turn in range(6):
        reply = chat.send(LONG * 2, max_tokens=16)
        assert "".join(reply) == reply.text
    assert chat.dropped_turns > 0
    assert chat.messages[0] == {"role": "system", "content": "Thou art terse."}
    assert chat.messages[1]["role"] == "user" and chat.cache.offset <= 160
    before = list(chat.messages)
    with pytest.raises(EdgeDSError, match="context window"):
        chat.send(LONG * 20, max_tokens=16)  # too long even alone
    assert chat.messages == before  # the session survives a refused turn


def test_cli_chat_keeps_going_and_says_so_once(short_context):
    lines = "/help\n/nonsense\n" + f"{LONG * 2}\n" * 6 + f"{LONG * 20}\nhi\n/exit\n"
    r = CliRunner().invoke(cli, ["chat", "--model", str(short_context), "-m", "16"], input=lines)
    assert r.exit_code == 0, r.output
    assert "/reset" in r.output and "unknown command /nonsense" in r.output
    assert r.output.count("the oldest turns are dropped") == 1
    assert r.output.count("edge-ds: error:") == 1 and "context window" in r.output


def test_api_refuses_bad_seeds_in_its_own_words():
    import edge_ds

    lm = edge_ds.load()
    for seed in (-1, 2**64):
        with pytest.raises(OptionError, match=r"^seed must be an integer") as e:
            lm.generate("x", max_tokens=2, seed=seed)
        assert e.value.option == "seed"
    assert lm.generate("x", max_tokens=2, seed=2**64 - 1).tokens  # the whole range works


def test_load_expands_the_home_directory(tmp_path, monkeypatch):
    import edge_ds

    shutil.copytree(default_model_path(), tmp_path / "models" / "tiny", ignore=shutil.ignore_patterns("recipe"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert edge_ds.load("~/models/tiny").path == tmp_path / "models" / "tiny"


def test_perplexity_window_must_fit_the_context(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(LONG * 40)
    r = CliRunner().invoke(cli, ["perplexity", "--file", str(text), "--window", "2000"])
    assert r.exit_code == 1 and "--window (2000) + 1 tokens exceed the model's max_position_embeddings" in r.output
    r = CliRunner().invoke(cli, ["perplexity", "--file", str(text), "--window", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["tokens"] > 64


def test_converting_a_converted_model_says_so(tmp_path):
    r = CliRunner().invoke(cli, ["convert", str(default_model_path()), str(tmp_path / "again")])
    assert r.exit_code == 1 and "already an edge-ds / mlx-lm model" in r.output, r.output
    assert not (tmp_path / "again").exists()


def test_generate_says_which_backend_ran_and_why():
    from edge_ds.backends import apple_silicon

    r = CliRunner().invoke(cli, ["generate", "--prompt", "In the beginning", "-m", "4"])
    want = ("Backend: mlx (Apple Silicon" if apple_silicon() else
            "Backend: onnx (the directory holds its onnx export, faster than MLX on this CPU)")
    assert r.exit_code == 0 and want in r.output, r.output
    r = CliRunner().invoke(cli, ["generate", "--prompt", "In the beginning", "-m", "4", "--backend", "mlx"])
    assert "Backend: mlx (asked for)" in r.output


def test_huge_integers_are_refused_not_overflowed():
    """math.isfinite(10**400) raises OverflowError; the validator must answer in its own words."""
    with pytest.raises(OptionError, match="^temperature must be a finite number"):
        SamplingOptions(temperature=10**400)
