"""The reasoning part of a chat answer: DeepSeek-R1 and V3.1 (thinking) write it between <think> and
</think> before the answer. The server sends it as `reasoning_content`, apart from `content`, as
vLLM's and llama.cpp's servers do.

An answer is split when the prompt ends inside a think block (the chat template opened it: R1's
newer templates and V3.1's thinking mode) or when the answer itself begins with <think>; otherwise
it is all content. Everything before </think> is reasoning (all of it when </think> never comes),
and the whitespace between </think> and the answer is dropped.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def opens_thinking(prompt_tail: str) -> bool:
    """True when a prompt ending in `prompt_tail` leaves the answer inside a think block."""
    tail = prompt_tail.rstrip()
    return tail.endswith(THINK_START)


def _held(text: str, marker: str) -> int:
    """How many trailing characters of text could begin `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Splits answer text, fed in any pieces, into ("reasoning", str) and ("content", str) events."""

    def __init__(self, inside: bool = False):
        self._state = "reasoning" if inside else "start"  # start, reasoning, after (</think> seen), content
        self._buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._state, self._buf = "reasoning", head[len(THINK_START):]
            elif THINK_START.startswith(head):
                return out  # could still be <think>
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._buf.find(THINK_END)
            if end < 0:
                keep = _held(self._buf, THINK_END)
                self._add(out, "reasoning", self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            self._add(out, "reasoning", self._buf[:end])
            self._state, self._buf = "after", self._buf[end + len(THINK_END):]
        if self._state == "after":
            self._buf = self._buf.lstrip()
            if not self._buf:
                return out
            self._state = "content"
        self._add(out, "content", self._buf)
        self._buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Ends the text: what is held goes out (reasoning when </think> never came)."""
        out: list[tuple[str, str]] = []
        self._add(out, "reasoning" if self._state == "reasoning" else "content",
                  "" if self._state == "after" else self._buf)
        self._buf = ""
        return out

    @staticmethod
    def _add(out: list, kind: str, text: str) -> None:
        if text:
            out.append((kind, text))
