"""The library names its arguments in errors; the CLI says the same with its flags, and the
server with its JSON fields (test_server.py). One validator serves all three."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edge_ds.cli import FLAGS, main as cli
from edge_ds.errors import OptionError
from edge_ds.options import SamplingOptions
from edge_ds.resources import default_model_path

BAD = [
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temp", "-0.1"], "--temp must be >= 0, got -0.1"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0, got 0.0"),
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
