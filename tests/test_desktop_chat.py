"""apps/desktop_chat.py driven headless: its ChatController, with the shipped model."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "apps"))

from desktop_chat import ChatController, Event, describe  # noqa: E402


class Recorder:
    """Collects events; wait(kind) blocks until that many `done`/`error` events have arrived."""

    def __init__(self):
        self.events: list[Event] = []
        self.ended = threading.Semaphore(0)
        self.first_chunk = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind == "chunk":
            self.first_chunk.set()
        if event.kind in ("loaded", "done", "error"):
            self.ended.release()

    def wait(self) -> Event:
        assert self.ended.acquire(timeout=120), [e.kind for e in self.events]
        return [e for e in self.events if e.kind in ("loaded", "done", "error")][-1]


@pytest.fixture()
def chat():
    rec = Recorder()
    controller = ChatController(rec, max_tokens=48)
    controller.open()
    loaded = rec.wait()
    assert loaded.kind == "loaded", loaded.text
    yield controller, rec
    assert controller.close()


def test_reply_streams_in_order_and_reports_its_figures(chat):
    controller, rec = chat
    from edge_ds.backends import apple_silicon

    # The shipped model's default backend: MLX on Apple Silicon, its ONNX export elsewhere.
    want = "mlx" if apple_silicon() else "onnx"
    assert "resident" in describe(rec.events[1]) and rec.events[1].data["backend"] == want
    controller.send("And God said")
    done = rec.wait()
    kinds = [e.kind for e in rec.events]
    assert kinds[:3] == ["loading", "loaded", "reply"] and kinds[-1] == "done"
    assert all(k == "chunk" for k in kinds[3:-1]) and len(kinds) > 5
    assert "".join(e.text for e in rec.events if e.kind == "chunk") == done.text
    assert done.data["generation_tps"] > 0 and "tok/s generation" in describe(done)


def test_stop_ends_the_reply_at_once(chat):
    controller, rec = chat
    controller.options["max_tokens"] = 400
    controller.send("Tell me of the generations of Adam")
    assert rec.first_chunk.wait(60)
    controller.stop()
    done = rec.wait()
    assert done.data["finish_reason"] == "cancelled" and done.data["generation_tokens"] < 400
    assert "(stopped)" in describe(done)
    controller.send("And the evening")  # the session goes on after a stop
    assert rec.wait().kind == "done"


def test_second_turn_reuses_the_cache(chat):
    controller, rec = chat
    controller.send("In the beginning")
    first = rec.wait()
    controller.send("And the earth was without form")
    second = rec.wait()
    assert second.data["prompt_tokens"] > first.data["prompt_tokens"]
    # At least the whole first prompt comes from the cache (how much of the reply does depends on
    # how the model's tokens re-tokenize inside the template).
    assert 0 < second.data["prefilled_tokens"] <= second.data["prompt_tokens"] - first.data["prompt_tokens"]


def test_a_corrupt_model_is_an_error_in_the_window(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    rec = Recorder()
    controller = ChatController(rec)
    controller.open(str(tmp_path))
    event = rec.wait()
    assert event.kind == "error" and "config.json" in event.text and "Traceback" not in event.text
    controller.send("hello")  # no model: an error, not a crash
    assert rec.wait().kind == "error"
    assert controller.close()


def test_quitting_while_generating_exits_cleanly():
    script = f"""
import sys, threading
sys.path.insert(0, {str(ROOT / 'apps')!r})
from desktop_chat import ChatController
chunk = threading.Event()
c = ChatController(lambda e: e.kind == "chunk" and chunk.set(), max_tokens=400)
c.open()
c.send("Tell me of the generations of Adam")
assert chunk.wait(120)
assert c.close()
"""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "terminate" not in r.stderr, r.stderr[-2000:]
