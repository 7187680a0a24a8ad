"""The OpenAI wire format: request fields checked and turned into LanguageModel.stream options,
and the response objects (whole and streamed) of chat and text completions."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .config import brief
from .errors import OptionError
from .options import SamplingOptions, is_int, is_number

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (its legacy completions stop at 5; this server takes 20 there too)

# The request fields of OpenAI's API reference, and this server's extensions. Any other field is
# refused, as OpenAI does: a misspelt option must not be silently ignored. max_completion_tokens
# (chat only at OpenAI) is taken by both endpoints here.
_SHARED_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
                  "stream_options", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                  "seed", "user", "top_k", "min_p", "repetition_penalty"}
CHAT_FIELDS = _SHARED_FIELDS | {
    "messages", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "modalities", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options",
    "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "suffix", "echo", "best_of"}


class RequestError(Exception):
    """A bad request: becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes) -> dict:
    """A request body: a JSON object in UTF-8, else a RequestError saying what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also bad UTF-8, too-long integers, too-deep nesting
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    _require_object(body)
    return body


def _require_object(body: Any) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")


def _show(value: Any) -> str:
    """A value as JSON for an error message, cut short."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        return brief(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _text(value: str, param: str) -> str:
    """Text the tokenizer can encode: no lone surrogates (JSON's "\\ud800" escapes)."""
    m = _SURROGATE.search(value)
    if m:
        raise RequestError(f"'{param}' is not valid Unicode (a lone surrogate at character {m.start()})", param)
    return value


def _is_number(v: Any) -> bool:
    """options.is_number, refusing integers past float range (JSON has them) instead of raising OverflowError."""
    return is_number(v) if not is_int(v) or abs(v) <= sys.float_info.max else False


def _field(body: dict, name: str, check: Callable[[Any], bool], need: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"'{name}' must be {need}, got {_show(value)}", name)
    return value


def _text_content(content: Any, param: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"'{param}[{k}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                   "this server takes text only", f"{param}[{k}]")
            parts.append(_text(part["text"], f"{param}[{k}].text"))
        return "".join(parts)
    raise RequestError(f"'{param}' must be a string or a list of text parts", param)


def _tool_calls(value: Any, param: str) -> list[dict]:
    """An assistant message's tool_calls, as chat templates read them (arguments: JSON text)."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"'{param}' must be a non-empty list of tool calls", param)
    out = []
    for k, call in enumerate(value):
        p = f"{param}[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise RequestError(f"'{p}' must be {{\"type\": \"function\", \"id\": ..., \"function\": {{\"name\", "
                               "\"arguments\"}}", p)
        name, args, call_id = fn.get("name"), fn.get("arguments", "{}"), call.get("id", f"call_{k}")
        if not isinstance(name, str) or not name:
            raise RequestError(f"'{p}.function.name' must be a non-empty string", f"{p}.function.name")
        if not isinstance(args, str):
            raise RequestError(f"'{p}.function.arguments' must be a string of JSON", f"{p}.function.arguments")
        if not isinstance(call_id, str):
            raise RequestError(f"'{p}.id' must be a string", f"{p}.id")
        out.append({"id": _text(call_id, f"{p}.id"), "type": "function",
                    "function": {"name": _text(name, f"{p}.function.name"),
                                 "arguments": _text(args, f"{p}.function.arguments")}})
    return out


def parse_messages(value: Any) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content"}] for the chat template ("developer" is "system").

    An assistant message's tool_calls pass through (its content None when it has none, which is what
    DeepSeek's templates test); a "tool" message keeps tool_call_id (and name)."""
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RequestError(f"'messages[{i}]' must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {_show(role)}",
                               f"messages[{i}].role")
        if role == "assistant" and m.get("tool_calls") not in (None, []):
            content = m.get("content")
            msg = {"role": "assistant",
                   "content": None if content in (None, "") else _text_content(content, f"messages[{i}].content"),
                   "tool_calls": _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")}
        else:
            msg = {"role": ROLES[role], "content": _text_content(m.get("content"), f"messages[{i}].content")}
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise RequestError(f"'messages[{i}].tool_call_id' must be a string: the id of the call it answers",
                                   f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = _text(call_id, f"messages[{i}].tool_call_id")
            if isinstance(m.get("name"), str):
                msg["name"] = _text(m["name"], f"messages[{i}].name")
        out.append(msg)
    return out


@dataclass
class ToolRequest:
    """A request's tools: the list for the chat template, and what tool_choice asks."""

    tools: list[dict]
    choice: str  # "auto", "required" or "function" (one named function)
    name: str | None = None  # the function tool_choice names
    parallel: bool = True


def parse_tools(body: dict) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`; None when no tool may be called (no tools, or
    tool_choice "none"). The legacy `functions` is refused with the name of its successor."""
    _require_object(body)
    if body.get("functions") not in (None, []):
        raise RequestError("'functions' is deprecated and not supported; use 'tools'", "functions")
    if body.get("function_call") not in (None, "none", "auto"):
        raise RequestError("'function_call' is deprecated and not supported; use 'tool_choice'", "function_call")
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = _field(body, "parallel_tool_calls", lambda v: isinstance(v, bool), "true or false", True)
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise RequestError(f"'tool_choice' {_show(choice)} needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    names = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise RequestError(f"'tools[{k}]' must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}",
                               f"tools[{k}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise RequestError(f"'tools[{k}].function.name' must be 1-64 letters, digits, '_', '.' or '-', "
                               f"got {_show(name)}", f"tools[{k}].function.name")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"'tools[{k}].function.description' must be a string", f"tools[{k}].function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(f"'tools[{k}].function.parameters' must be a JSON Schema object",
                               f"tools[{k}].function.parameters")
        names.append(name)
    if choice in (None, "auto"):
        return ToolRequest(tools, "auto", parallel=parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tools, "required", parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise RequestError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise RequestError(f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice")
    return ToolRequest(tools, "function", name, parallel)


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to report per token (0: the chosen token's only), or None for no
    logprobs. Chat: `logprobs` true and `top_logprobs` N; completions: `logprobs` N (legacy)."""
    _require_object(body)
    top_ok = lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS  # noqa: E731
    if chat:
        on = _field(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
        top = _field(body, "top_logprobs", top_ok, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if top is not None and not on:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if on else None
    return _field(body, "logprobs", top_ok, f"an integer in [0, {MAX_TOP_LOGPROBS}]")


def check_fields(body: dict, chat: bool) -> None:
    """Refuse fields neither OpenAI's endpoint nor this server defines, with OpenAI's message."""
    _require_object(body)
    unknown = [name for name in body if name not in (CHAT_FIELDS if chat else COMPLETION_FIELDS)]
    if len(unknown) == 1:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if unknown:
        raise RequestError(f"Unrecognized request arguments supplied: {', '.join(unknown)}")


def _call_chars(calls: Any) -> int:
    """Characters of text in an assistant message's tool_calls (names and arguments); 0 for anything else."""
    if not isinstance(calls, list):
        return 0
    fns = [c.get("function") for c in calls if isinstance(c, dict)]
    return sum(len(v) for fn in fns if isinstance(fn, dict) for v in (fn.get("name"), fn.get("arguments"))
               if isinstance(v, str))


def check_prompt_size(prompt: str | list, max_chars: int, context: int, param: str) -> None:
    """Refuse, before tokenizing it, a text prompt (or messages) of more than max_chars characters,
    which cannot fit a context window of `context` tokens."""
    if isinstance(prompt, str):
        n = len(prompt)
    elif isinstance(prompt, list):  # messages, or token ids (no text: the runtime counts them)
        n = sum(len(m["content"]) for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str))
        n += sum(_call_chars(m.get("tool_calls")) for m in prompt if isinstance(m, dict))
    else:
        raise RequestError(f"'{param}' must be text, token ids or messages", param)
    if n > max_chars:
        raise RequestError(f"'{param}' holds {n} characters of text, over the limit of {max_chars} for this "
                           f"model's context window of {context} tokens", param, code="context_length_exceeded")


def parse_prompt(value: Any, vocab_size: int) -> str | list[int]:
    """A completion prompt: text or token ids, one prompt per request."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # ["text"] or [[ids]]: one prompt in a batch of one
    if isinstance(value, str):
        if not value:
            raise RequestError("'prompt' is empty", "prompt")
        return _text(value, "prompt")
    if isinstance(value, list) and value and all(is_int(t) for t in value):
        if not all(0 <= t < vocab_size for t in value):
            raise RequestError(f"'prompt' token ids must be in [0, {vocab_size})", "prompt")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise RequestError("'prompt' holds several prompts; this server takes one per request", "prompt")
    raise RequestError("'prompt' must be a non-empty string or a list of token ids", "prompt")


def _unsupported(body: dict) -> None:
    """Reject options that would change the answer's meaning if silently ignored."""
    n = _field(body, "n", is_int, "an integer", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1 (this server generates one choice per request), got {n}", "n")
    best_of = _field(body, "best_of", is_int, "an integer", 1)
    if best_of != 1:
        raise RequestError(f"'best_of' must be 1, got {best_of}", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, _is_number, "a number", 0) != 0:
            raise RequestError(f"'{name}' is not supported (use 'repetition_penalty')", name)
    for name in ("echo", "suffix", "logit_bias", "audio"):
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise RequestError(f"'{name}' is not supported by this server", name)
    if body.get("web_search_options") is not None:  # even {}: it asks for a search
        raise RequestError("'web_search_options' is not supported: this server does not search the web",
                           "web_search_options")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError("'response_format' supports only {\"type\": \"text\"}", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError("'modalities' supports only [\"text\"]", "modalities")


def parse_options(body: dict) -> dict:
    """The sampling options of a request, as keyword arguments of LanguageModel.stream
    (max_tokens None: the rest of the context window, as OpenAI does). JSON types are checked
    here, values by SamplingOptions, the runtime's own check, with its message in our field names."""
    _require_object(body)
    _unsupported(body)
    _field(body, "model", lambda v: isinstance(v, str), "a string")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                            and all(isinstance(s, str) for s in stop))):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    options = dict(
        max_tokens=_field(body, max_name, is_int, "an integer"),
        temperature=_field(body, "temperature", _is_number, "a number", 1.0),
        top_p=_field(body, "top_p", _is_number, "a number", 1.0),
        top_k=_field(body, "top_k", is_int, "an integer", 0),
        min_p=_field(body, "min_p", _is_number, "a number", 0.0),
        repetition_penalty=_field(body, "repetition_penalty", _is_number, "a number"),
        seed=_field(body, "seed", is_int, "an integer"),
        stop=stop or (),
    )
    try:
        checked = SamplingOptions(**options)
    except OptionError as e:
        name = max_name if e.option == "max_tokens" else e.option
        raise RequestError(e.spelled(f"'{name}'"), name) from None
    return {k: getattr(checked, k) for k in options}


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    _require_object(body)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    opts = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return stream, usage


def _token_text(data: bytes) -> str:
    """A token as OpenAI shows it: its text, or "bytes:\\xNN..." for part of a character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _logprob(value: float) -> float:
    # JSON has no -inf; a token the model gives no mass at all (float32 underflow) is reported as
    # the most negative float, as OpenAI does for such tokens.
    return value if value > -sys.float_info.max else -9999.0


def chat_logprobs(entries: list, token_bytes: Callable[[int], bytes]) -> dict:
    """choices[].logprobs of a chat completion (or one chunk's) for TokenLogprob entries."""
    def item(token: int, logprob: float) -> dict:
        data = token_bytes(token)
        return {"token": _token_text(data), "logprob": _logprob(logprob), "bytes": list(data)}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list, token_bytes: Callable[[int], bytes]) -> dict:
    """choices[].logprobs of a (legacy) text completion: tokens, token_logprobs, top_logprobs (the
    top alternatives and the chosen token, by text) and text_offset (into the completion's text)."""
    tops = []
    for e in entries:
        top: dict[str, float] = {}
        for t, lp in [*e.top, (e.token, e.logprob)]:
            top.setdefault(_token_text(token_bytes(t)), _logprob(lp))  # two ids spelt alike: the likelier
        tops.append(top)
    return {"tokens": [_token_text(token_bytes(e.token)) for e in entries],
            "token_logprobs": [_logprob(e.logprob) for e in entries], "top_logprobs": tops,
            "text_offset": [e.offset for e in entries]}


@dataclass
class Result:
    """What one generation produced, for the usage block and finish_reason."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", or "cancelled" (the client went away)
    prefilled_tokens: int
    prompt_tps: float
    generation_tps: float


class Reply:
    """Builds the OpenAI response objects of one completion."""

    def __init__(self, model_id: str, fingerprint: str, chat: bool):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model_id, self.fingerprint = model_id, fingerprint

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def usage(r: Result) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def whole(self, text: str, r: Result, logprobs: dict | None = None, tool_calls: list[dict] | None = None,
              reasoning: str | None = None) -> dict:
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            if reasoning is not None:  # the <think> part (reasoning.py), as vLLM's and llama.cpp's servers send it
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": r.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason}
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage(r)}

    def chunk(self, delta: str | dict, finish_reason: str | None, include_usage: bool,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            if isinstance(delta, str):
                delta = {"content": delta} if delta else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        out = {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, r: Result) -> dict:
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage(r)}
