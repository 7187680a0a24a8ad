"""Tool calls in the model's own output format: which format a model writes, the prompt text that
forces a call (tool_choice "required" or a named function), and a streaming parser from generated
text (special tokens kept) to content and OpenAI tool calls.

Each format's special tokens are written here once, in its ToolFormat:

    DeepSeek V3/R1  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    DeepSeek V3.1   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    Kimi-K2         <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>...<|tool_calls_section_end|>

A call that is complete becomes a tool call as soon as its end token arrives (streamed as one delta);
a call that is malformed (no name, no separator, never closed) is given back as content, word for
word, so that nothing the model wrote is lost and nothing raises. Arguments are passed on as the
model wrote them: OpenAI, too, warns that they may not be valid JSON.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Iterable


@dataclass
class ToolCall:
    """One parsed call, in OpenAI's terms."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class ToolFormat:
    """A model family's tool-call tokens. Subclasses parse one call's body (between call_begin and
    call_end) and spell the prefix that forces a call."""

    name = ""
    section_begin = ""
    section_end = ""
    call_begin = ""
    call_end = ""

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every special token of the format (kept in the generated text for the parser)."""
        return tuple(t for t in (self.section_begin, self.section_end, self.call_begin, self.call_end,
                                 getattr(self, "sep", ""), getattr(self, "arg_begin", "")) if t)

    @property
    def starts(self) -> tuple[str, ...]:
        """Text that opens the tool-call part of an answer (a bare call_begin too: models drop the
        section token now and then)."""
        return (self.section_begin, self.call_begin)

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        """The call in `body` (the text between call_begin and call_end), or None if malformed."""
        raise NotImplementedError

    def forced_prefix(self, name: str | None) -> str:
        """Text appended after the generation prompt so that the answer is a call (to `name`)."""
        raise NotImplementedError


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class DeepSeekFormat(ToolFormat):
    """DeepSeek V3/R1 (`function<｜tool▁sep｜>NAME` and a ```json fence) and V3.1 (`NAME<｜tool▁sep｜>ARGS`):
    the same tokens, told apart per call, so one parser reads both."""

    section_begin = "<｜tool▁calls▁begin｜>"
    section_end = "<｜tool▁calls▁end｜>"
    call_begin = "<｜tool▁call▁begin｜>"
    call_end = "<｜tool▁call▁end｜>"
    sep = "<｜tool▁sep｜>"
    _fenced = re.compile(r"\s*([^\n`]+?)\s*\n\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*", re.S)

    def __init__(self, v31: bool):
        self.v31 = v31
        self.name = "deepseek_v3.1" if v31 else "deepseek_v3"

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        head, sep, rest = body.partition(self.sep)
        if not sep:
            return None
        head = head.strip()
        if head == "function" and not self.v31 or (head == "function" and self._fenced.fullmatch(rest)):
            m = self._fenced.fullmatch(rest)  # V3/R1: type, then NAME and the fenced arguments
            if m is None:
                return None
            name, args = m.group(1).strip(), m.group(2).strip()
        else:  # V3.1: NAME<｜tool▁sep｜>ARGS
            name, args = head, rest.strip()
        if not name or any(c.isspace() for c in name):
            return None
        return ToolCall(_call_id(), name, args or "{}")

    def forced_prefix(self, name: str | None) -> str:
        head = self.section_begin + self.call_begin
        if self.v31:
            return head + (f"{name}{self.sep}" if name else "")
        return head + f"function{self.sep}" + (f"{name}\n```json\n" if name else "")


class KimiFormat(ToolFormat):
    """Kimi-K2: the call's id is `functions.NAME:IDX` (IDX counts the conversation's calls); the id
    is kept as the OpenAI tool call id, since Kimi's template writes it back for the tool result."""

    name = "kimi_k2"
    section_begin = "<|tool_calls_section_begin|>"
    section_end = "<|tool_calls_section_end|>"
    call_begin = "<|tool_call_begin|>"
    call_end = "<|tool_call_end|>"
    arg_begin = "<|tool_call_argument_begin|>"
    _id = re.compile(r"\s*(?:functions\.)?([^\s:<>]+)(?::(\d+))?\s*")

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        head, sep, args = body.partition(self.arg_begin)
        m = self._id.fullmatch(head)
        if not sep or m is None:
            return None
        name = m.group(1)
        call_id = f"functions.{name}:{m.group(2) if m.group(2) is not None else index}"
        return ToolCall(call_id, name, args.strip() or "{}")

    def forced_prefix(self, name: str | None) -> str:
        return self.section_begin + self.call_begin + "functions." + (f"{name}:" if name else "")


def detect(chat_template: str | None, has_token) -> ToolFormat | None:
    """The tool-call format of a model, from its chat template and vocabulary (`has_token(text)`),
    or None when it writes none that edge-ds reads."""
    template = chat_template or ""
    # The template first (it writes the calls of earlier turns), the vocabulary only without it.
    for found in (lambda t: t in template, has_token):
        if found(KimiFormat.section_begin):
            return KimiFormat()
        if found(DeepSeekFormat.section_begin):
            # V3/R1's template writes the arguments in a ```json fence; V3.1's writes them bare.
            return DeepSeekFormat(v31="```json" not in template and DeepSeekFormat.sep in template)
    return None


def _hold(text: str, markers: Iterable[str]) -> int:
    """How many trailing characters of text could begin one of the markers."""
    hold = 0
    for s in markers:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class ToolCallParser:
    """Splits generated text, fed in any pieces, into content and tool calls.

    feed() and finish() return events: ("content", str) and ("call", ToolCall). Content is held back
    only while it could be the start of a tool-call token."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True, prefix: str = ""):
        self.fmt = fmt
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_section = False
        self._opener = ""  # the section token consumed, given back as content if the section holds no call
        self._section_ok = False  # the open section has held a call
        if prefix:  # a forced prefix: the model's answer starts inside it, and it is not content
            events = self.feed(prefix)
            assert not events, events

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buf += text
        out: list[tuple[str, object]] = []
        fmt = self.fmt
        while self._buf:
            if not self._in_section:
                found = [(i, s) for s in fmt.starts if (i := self._buf.find(s)) >= 0]
                if not found:
                    keep = _hold(self._buf, fmt.starts)
                    self._emit(out, self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                i, s = min(found)
                self._emit(out, self._buf[:i])
                self._in_section = True
                self._opener = s if s == fmt.section_begin else ""
                self._section_ok = False
                # A bare call_begin opens the section and stays in the buffer as the first call's start.
                self._buf = self._buf[i + len(s):] if s == fmt.section_begin else self._buf[i:]
                continue
            stripped = self._buf.lstrip()
            if stripped.startswith(fmt.section_end):
                if not self._section_ok:  # a section with no call in it: content, as written
                    self._emit(out, self._unopened() + self._buf[:len(self._buf) - len(stripped)]
                               + fmt.section_end)
                self._in_section = False
                self._buf = stripped[len(fmt.section_end):]
                continue
            if not stripped.startswith(fmt.call_begin):
                if len(stripped) < max(len(fmt.call_begin), len(fmt.section_end)) and (
                        fmt.call_begin.startswith(stripped) or fmt.section_end.startswith(stripped)):
                    return out  # a token still arriving
                # Text inside the section that is not a call: the section was not what it seemed.
                self._in_section = False
                self._emit(out, self._unopened() + self._buf)
                self._buf = ""
                return out
            end = stripped.find(fmt.call_end)
            if end < 0:
                return out  # the call is still being written
            body = stripped[len(fmt.call_begin):end]
            call = fmt.parse_call(body, len(self.calls))
            raw = stripped[:end + len(fmt.call_end)]
            self._buf = stripped[end + len(fmt.call_end):]
            if call is None:
                self._emit(out, self._unopened() + raw)
            elif self.parallel or not self.calls:
                self._opener = ""
                self._section_ok = True
                self.calls.append(call)
                out.append(("call", call))
        return out

    def finish(self) -> list[tuple[str, object]]:
        """Ends the text: what is still held is content (an unclosed call included, word for word)."""
        out: list[tuple[str, object]] = []
        rest = self._buf
        self._buf = ""
        if self._in_section:
            if rest.strip() in ("", self.fmt.section_end) and self._section_ok:
                rest = ""  # the section's closing whitespace after its calls
            else:
                rest = self._unopened() + rest
        self._in_section = False
        self._emit(out, rest)
        return out

    def _unopened(self) -> str:
        """The section token, once, when what follows it turns out to be content."""
        opener, self._opener = self._opener, ""
        return opener

    @staticmethod
    def _emit(out: list, text: str) -> None:
        if text:
            if out and out[-1][0] == "content":
                out[-1] = ("content", out[-1][1] + text)
            else:
                out.append(("content", text))
