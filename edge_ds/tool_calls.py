"""Tool calls in the model's own output format: which format a model writes, the prompt text that
forces a call (tool_choice "required" or a named function), and a streaming parser from generated
text (special tokens kept) to content and OpenAI tool calls.

Each format's special tokens are written here once, in its ToolFormat:

    DeepSeek V3/R1  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    DeepSeek V3.1   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    Kimi-K2         <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>...<|tool_calls_section_end|>
    DeepSeek V4     <｜DSML｜tool_calls>\n<｜DSML｜invoke name="NAME">\n<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>\n...</｜DSML｜invoke>\n...</｜DSML｜tool_calls>
                    (V3.2 writes the same with function_calls for tool_calls; a string="true" value is
                    the string as is, string="false" a JSON literal: the arguments are that JSON object)

Whole (incremental=False), a call that is complete becomes a tool call when its end token arrives;
a call that is malformed (no name, no separator, never closed) is given back as content, word for
word, so that nothing the model wrote is lost and nothing raises. Streamed (incremental=True), a
call is opened as soon as its name is complete and its arguments follow as they are written (the
deltas OpenAI clients concatenate); a call that turns out malformed after its name keeps the
arguments sent so far and its text is also given as content. Arguments are passed on as the
model wrote them: OpenAI, too, warns that they may not be valid JSON.
"""

from __future__ import annotations

import json
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

    def head(self, body: str, index: int) -> tuple[str, str | None, int] | None:
        """While a call is being written (`body` so far): (name, id or None, where its arguments
        start) once the name is complete, else None (then the call is sent whole when it ends)."""
        return None

    def partial_arguments(self, body: str, start: int) -> str:
        """The arguments certain so far from `body` (which may end in part of call_end): always a
        prefix of what parse_call gives once the call ends."""
        return ""

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

    _fence_head = re.compile(r"\s*([^\n`]+?)\s*\n\s*```(?:json)?[ \t]*\n")

    def head(self, body: str, index: int) -> tuple[str, str | None, int] | None:
        head, sep, rest = body.partition(self.sep)
        if not sep:
            return None
        start = len(head) + len(sep)
        if head.strip() == "function":  # V3/R1 (or V3.1 calling a tool named function: sent whole)
            m = self._fence_head.match(rest)
            if m is None:
                return None
            name, start = m.group(1).strip(), start + m.end()
        elif self.v31:
            name = head.strip()
        else:
            return None
        return None if not name or any(c.isspace() for c in name) else (name, None, start)

    def partial_arguments(self, body: str, start: int) -> str:
        raw = body[start:]
        raw = raw[:len(raw) - _hold(raw, [self.call_end])].lstrip()
        fenced = body.partition(self.sep)[0].strip() == "function"
        return raw.rstrip(" \t\r\n`") if fenced else raw.rstrip()  # the closing fence is not arguments

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

    def head(self, body: str, index: int) -> tuple[str, str | None, int] | None:
        head, sep, _ = body.partition(self.arg_begin)
        m = self._id.fullmatch(head)
        if not sep or m is None:
            return None
        name = m.group(1)
        return name, f"functions.{name}:{m.group(2) if m.group(2) is not None else index}", len(head) + len(sep)

    def partial_arguments(self, body: str, start: int) -> str:
        raw = body[start:]
        return raw[:len(raw) - _hold(raw, [self.call_end])].strip()

    def forced_prefix(self, name: str | None) -> str:
        return self.section_begin + self.call_begin + "functions." + (f"{name}:" if name else "")


class DSMLFormat(ToolFormat):
    """DeepSeek V4 (and V3.2, whose block is named function_calls): XML-like DSML tags, one
    parameter per argument. Arguments become the JSON object {"K": V, ...} in the order written:
    a string="true" value as a JSON string, a string="false" one as the JSON literal it is."""

    _dsml = "｜DSML｜"
    call_begin = f"<{_dsml}invoke"
    call_end = f"</{_dsml}invoke>"
    _head = re.compile(r'\s*name="([^"\n<>]*)"\s*>')
    _param_open = re.compile(rf'\s*<{_dsml}parameter\s+name="([^"\n<>]*)"\s+string="(true|false)"\s*>')
    _param_end = f"</{_dsml}parameter>"

    def __init__(self, block: str = "tool_calls"):
        self.block = block
        self.name = "deepseek_v4" if block == "tool_calls" else "deepseek_v3.2"
        self.section_begin = f"<{self._dsml}{block}>"
        self.section_end = f"</{self._dsml}{block}>"

    @staticmethod
    def _value(value: str, string: str) -> str:
        return json.dumps(value, ensure_ascii=False) if string == "true" else value.strip()

    def _params(self, body: str, pos: int) -> tuple[list[str], set[str], int]:
        """The complete parameters from pos, as '"K": V' JSON members, their names, and where they stop."""
        members: list[str] = []
        names: set[str] = set()
        while (m := self._param_open.match(body, pos)) is not None:
            end = body.find(self._param_end, m.end())
            if end < 0 or m.group(1) in names:
                break
            names.add(m.group(1))
            value = self._value(body[m.end():end], m.group(2))
            members.append(f"{json.dumps(m.group(1), ensure_ascii=False)}: {value}")
            pos = end + len(self._param_end)
        return members, names, pos

    def parse_call(self, body: str, index: int) -> ToolCall | None:
        m = self._head.match(body)
        if m is None or not m.group(1) or any(c.isspace() for c in m.group(1)):
            return None
        members, _, pos = self._params(body, m.end())
        if body[pos:].strip():  # something that is not a parameter (or a parameter twice)
            return None
        return ToolCall(_call_id(), m.group(1), "{" + ", ".join(members) + "}")

    def head(self, body: str, index: int) -> tuple[str, str | None, int] | None:
        m = self._head.match(body)
        if m is None or not m.group(1) or any(c.isspace() for c in m.group(1)):
            return None
        return m.group(1), None, m.end()

    def partial_arguments(self, body: str, start: int) -> str:
        members, names, pos = self._params(body, start)
        m = self._param_open.match(body, pos)
        if m is not None and m.group(1) not in names:
            raw = body[m.end():]
            raw = raw[:len(raw) - _hold(raw, [self._param_end])]
            value = '"' + json.dumps(raw, ensure_ascii=False)[1:-1] if m.group(2) == "true" else raw.strip()
            members.append(f"{json.dumps(m.group(1), ensure_ascii=False)}: {value}")
        return "{" + ", ".join(members)

    def forced_prefix(self, name: str | None) -> str:
        return f"{self.section_begin}\n{self.call_begin}" + (f' name="{name}">\n' if name else "")


def detect(chat_template: str | None, has_token) -> ToolFormat | None:
    """The tool-call format of a model, from its chat template and vocabulary (`has_token(text)`),
    or None when it writes none that edge-ds reads."""
    template = chat_template or ""
    # The template first (it writes the calls of earlier turns), the vocabulary only without it.
    for found in (lambda t: t in template, has_token):
        if found(DSMLFormat._dsml) or found(f"<{DSMLFormat._dsml}"):
            return DSMLFormat("function_calls" if "function_calls" in template else "tool_calls")
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

    feed() and finish() return events: ("content", str) and ("call", ToolCall) (a whole call); with
    incremental=True also ("call_begin", ToolCall) (its name known, its arguments "" so far) and
    ("arguments", (index, str)) (more of call `index`'s arguments). Content is held back only while
    it could be the start of a tool-call token. `calls` lists every call, its arguments complete
    once the call has ended."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True, prefix: str = "", incremental: bool = False):
        self.fmt = fmt
        self.parallel = parallel
        self.incremental = incremental
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_section = False
        self._opener = ""  # the section token consumed, given back as content if the section holds no call
        self._section_ok = False  # the open section has held a call
        self._open: ToolCall | None = None  # incremental: the call being written, its name sent
        self._start = 0  # where its arguments start in its body
        self._sent = ""  # its arguments sent so far
        self._pending: list[tuple[str, object]] = []  # a forced prefix's events, sent with the first feed
        if prefix:  # a forced prefix: the model's answer starts inside it, and it is not content
            self._pending = self.feed(prefix)
            assert all(kind != "content" for kind, _ in self._pending), self._pending

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buf += text
        out, self._pending = self._pending, []
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
            if end < 0:  # the call is still being written
                if self.incremental:
                    self._stream(out, stripped[len(fmt.call_begin):])
                return out
            body = stripped[len(fmt.call_begin):end]
            opened = self._open
            call = fmt.parse_call(body, len(self.calls) - (opened is not None))
            raw = self._buf[:len(self._buf) - len(stripped)] + stripped[:end + len(fmt.call_end)]  # as written
            self._buf = stripped[end + len(fmt.call_end):]
            if opened is not None:
                self._open = None
                if call is not None and call.name == opened.name and call.arguments.startswith(self._sent):
                    self._send(out, call.arguments)
                else:  # malformed after its name: its arguments end as sent, its text is content too
                    self._emit(out, raw)
                opened.arguments, self._sent = self._sent, ""
            elif call is None:
                self._emit(out, self._unopened() + raw)
            elif self.parallel or not self.calls:
                self._opener = ""
                self._section_ok = True
                self.calls.append(call)
                out.append(("call", call))
        return out

    def _stream(self, out: list, body: str) -> None:
        """Opens the call being written once its name is complete, then sends its arguments' new part."""
        if self._open is None:
            if not (self.parallel or not self.calls) or (head := self.fmt.head(body, len(self.calls))) is None:
                return
            name, call_id, self._start = head
            self._open = ToolCall(call_id or _call_id(), name, "")
            self._opener = ""
            self._section_ok = True
            self.calls.append(self._open)
            out.append(("call_begin", self._open))
        self._send(out, self.fmt.partial_arguments(body, self._start))

    def _send(self, out: list, arguments: str) -> None:
        if len(arguments) > len(self._sent) and arguments.startswith(self._sent):
            out.append(("arguments", (len(self.calls) - 1, arguments[len(self._sent):])))
            self._sent = arguments

    def finish(self) -> list[tuple[str, object]]:
        """Ends the text: what is still held is content (an unclosed call included, word for word;
        an unclosed call already opened keeps the arguments sent)."""
        out, self._pending = self._pending, []
        rest = self._buf
        self._buf = ""
        if self._open is not None:
            self._open.arguments, self._open, self._sent = self._sent, None, ""
            rest = ""
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
