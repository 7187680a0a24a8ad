"""Tokenizer loading (tokenizer.json, tokenizer.model or tiktoken.model), chat templates and streaming decode."""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import inspect
import json
import math
import re
import time
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .config import brief
from .errors import EdgeDSError

_REPLACEMENT = "\ufffd"
_SPACE_PIECE = "\u2581"  # sentencepiece's "▁"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece

# Kimi-K2's pre-tokenizer split: TikTokenTokenizer.pat_str in tokenization_kimi.py of
# huggingface.co/moonshotai/Kimi-K2-Instruct. Rust regex syntax (\p{Han}, && class intersection) that
# tiktoken compiles; Python's re cannot.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# Kimi reserves the ids right after the BPE ranks for special tokens (num_reserved_special_tokens).
KIMI_RESERVED_IDS = 256
KIMI_MAX_SPECIAL = 1 << 16  # special ids are made for the whole range up to the highest added one
MAX_TOKEN_ID = 2**31 - 1  # MLX indexes embeddings with 32-bit ids
# tiktoken's regex runs out of backtracking stack on very long runs; Kimi's tokenizer cuts runs of
# whitespace or non-whitespace at this length before encoding, and so do we.
_MAX_RUN = 25_000
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN + 1, _MAX_RUN + 1))


def _read_json(path: Path) -> dict:
    """Read an optional JSON object file; a missing file reads as {}."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # also bad UTF-8, too-long integers, too-deep nesting
        raise EdgeDSError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeDSError(f"{path}: expected a JSON object at the top level")
    return data


def _token_content(value: Any, path: Path, field: str) -> str | None:
    # HF configs store special tokens either as plain strings or as AddedToken dicts.
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise EdgeDSError(f"{path}: {field} must be a string or {{\"content\": ...}}, got {brief(value)}")
    _require_unicode(content, f"{path}: {field}")
    return content


def _require_unicode(text: str, what: str) -> None:
    """Refuses text with lone surrogates (JSON's "\\ud800"): no tokenizer can encode it."""
    m = _SURROGATE.search(text)
    if m:
        raise EdgeDSError(f"{what} is not valid Unicode (a lone surrogate {m.group()!r} at {m.start()})")


def _id_list(value: Any, path: Path, field: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise EdgeDSError(f"{path}: {field} must be an int or a list of ints, got {brief(value)}")
    return list(items)


class _HFBackend:
    """tokenizer.json through the `tokenizers` library."""

    adds_bos = True  # when tokenizer_config.json does not say

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise EdgeDSError(f"{path}: cannot load tokenizer ({e})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.default_bos: int | None = None
        self.default_eos: int | None = None

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False keeps the post-processor from adding BOS; Tokenizer does that.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class _SPBackend:
    """tokenizer.model through sentencepiece, plus added tokens from tokenizer_config.json."""

    adds_bos = True  # when tokenizer_config.json does not say

    def __init__(self, path: Path, added: dict[int, tuple[str, bool]]) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on version
            raise EdgeDSError(f"{path}: cannot load sentencepiece model ({e})") from e
        sp = self._sp
        n = sp.get_piece_size()
        # sentencepiece never matches control pieces (<s>, </s>) in input text, so we split them out
        # ourselves; same for tokens that tokenizer_config.json adds on top of the model.
        self._text_to_id: dict[str, int] = {}
        self._added_pieces: dict[int, str] = {}
        self._special: set[int] = set()
        for i in range(n):
            if sp.is_control(i):
                self._text_to_id[sp.id_to_piece(i)] = i
                self._special.add(i)
        for i, (content, special) in added.items():
            if i >= n:
                self._added_pieces[i] = content
            self._text_to_id[content] = i
            if special:
                self._special.add(i)
        self.vocab_size = max([n, *(i + 1 for i in self._added_pieces)])
        self.default_bos = sp.bos_id() if sp.bos_id() >= 0 else None
        self.default_eos = sp.eos_id() if sp.eos_id() >= 0 else None
        specials = sorted(self._text_to_id, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.encode(text, out_type=int)
        ids: list[int] = []
        # re.split with a capture group alternates plain text (even) and special tokens (odd).
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._text_to_id[part])
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        n = self._sp.get_piece_size()
        # Ids past the vocabulary (models pad their embeddings) decode to nothing, as in `tokenizers`.
        # Dropping special ids up front is harmless: sentencepiece renders control pieces as "".
        ids = [i for i in ids if (0 <= i < n or i in self._added_pieces)
               and not (skip_special and i in self._special)]
        if skip_special and not self._added_pieces:
            return self._sp.decode(ids)
        # Decode runs of model pieces separately and splice added/special tokens in between.
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self._sp.decode(run)
                # sentencepiece strips the leading "▁" of a decode's first piece; only the very
                # first run of the output should lose it.
                if out and self._sp.id_to_piece(run[0]).startswith(_SPACE_PIECE) and not text.startswith(" "):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids:
            if i in self._added_pieces or i in self._special:
                flush()
                out.append(self._added_pieces.get(i) or self._sp.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._text_to_id:
            return self._text_to_id[token]
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added_pieces:
            return self._added_pieces[token_id]
        if 0 <= token_id < self._sp.get_piece_size():
            return self._sp.id_to_piece(token_id)
        return None


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file ("<base64 token> <rank>" per line) as {token bytes: rank}."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise EdgeDSError(f"{path}: cannot read ({e})") from e
    ranks: dict[bytes, int] = {}
    line_of: dict[int, int] = {}  # rank -> 1-based line number
    for number, raw in enumerate(lines, 1):
        fields = raw.decode("latin-1").split()
        if not fields:
            continue  # tiktoken's own loader skips blank lines too

        def bad(what: str) -> EdgeDSError:
            return EdgeDSError(f"{path}: line {number}: {what}")

        if len(fields) != 2:
            raise bad("expected '<base64 token> <rank>'")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"token {fields[0][:40]!r} is not valid base64") from None
        if not token:
            raise bad("empty token")
        if not (fields[1].isascii() and fields[1].isdigit()):
            raise bad(f"rank {fields[1][:40]!r} is not a non-negative integer")
        rank = int(fields[1])
        if rank in line_of:
            raise bad(f"rank {rank} is already given on line {line_of[rank]}")
        if token in ranks:
            raise bad(f"token {fields[0]!r} is already given on line {line_of[ranks[token]]}")
        ranks[token] = rank
        line_of[rank] = number
    if not ranks:
        raise EdgeDSError(f"{path}: no tokens")
    top = max(line_of)
    if top >= len(ranks):
        raise EdgeDSError(f"{path}: line {line_of[top]}: rank {top} leaves a gap ({len(ranks)} tokens "
                          f"must have ranks 0..{len(ranks) - 1})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise EdgeDSError(f"{path}: byte 0x{missing[0]:02x} has no token (a byte-level BPE ranks file "
                          "ranks all 256 single bytes)")
    return ranks


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies spell tokens."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def _cut_long_runs(text: str) -> list[str]:
    """text in pieces with no run of more than _MAX_RUN (non-)whitespace characters (Kimi's cut)."""
    cuts = [c for m in _LONG_RUN.finditer(text) for c in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


class _TiktokenBackend:
    """tiktoken.model through `tiktoken` with Kimi-K2's split pattern and special-token layout."""

    adds_bos = False  # Kimi's tokenizer never prepends BOS itself

    def __init__(self, path: Path, added: dict[int, tuple[str, bool]], config_path: Path) -> None:
        import tiktoken

        ranks = _read_ranks(path)
        n = len(ranks)
        low = [i for i in added if i < n]
        if low:
            raise EdgeDSError(f"{config_path}: added_tokens_decoder id {low[0]} is a BPE token of {path} "
                              f"(special tokens start at {n})")
        # Every id between the ranks and the highest added one gets a reserved token: bound the gap.
        far = [i for i in added if i >= n + KIMI_MAX_SPECIAL]
        if far:
            raise EdgeDSError(f"{config_path}: added_tokens_decoder id {far[0]} is more than {KIMI_MAX_SPECIAL} past "
                              f"the {n} tokens of {path}")
        # Kimi's rule: ids n .. n+255 are all special tokens, named by added_tokens_decoder or else
        # <|reserved_token_{id}|>. Added ids past that range extend it.
        top = max([n + KIMI_RESERVED_IDS, *(i + 1 for i in added)])
        names = {i: added[i][0] if i in added else f"<|reserved_token_{i}|>" for i in range(n, top)}
        self._special_ids: dict[str, int] = {}
        for i, content in names.items():
            if content in self._special_ids:
                raise EdgeDSError(f"{config_path}: added_tokens_decoder gives {content!r} to ids "
                                  f"{self._special_ids[content]} and {i}")
            self._special_ids[content] = i
        # Reserved ids are special; named ones as tokenizer_config.json says (tool-call markers are not).
        self._skip = {i for i in names if i not in added or added[i][1]}
        self._ranks = ranks
        self._n = n
        self._bytes = [b""] * top  # id -> the bytes it decodes to
        for token, rank in ranks.items():
            self._bytes[rank] = token
        for i, content in names.items():
            self._bytes[i] = content.encode("utf-8")
        try:
            self._enc = tiktoken.Encoding(name=path.name, pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self._special_ids)
        except ValueError as e:
            raise EdgeDSError(f"{path}: cannot build a tiktoken encoding ({e})") from e
        self.vocab_size = top
        self.default_bos = self._special_ids.get("[BOS]")
        self.default_eos = self._special_ids.get("[EOS]")

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text become their ids, as with the other backends and
        # Kimi's own encode (allowed_special="all").
        return [i for piece in _cut_long_runs(text) for i in self._enc.encode(piece, allowed_special="all")]

    def decode_bytes(self, ids: list[int], skip_special: bool) -> bytes:
        """The raw bytes of ids; ids past the vocabulary give nothing."""
        table = self._bytes
        return b"".join(table[i] for i in ids
                        if 0 <= i < len(table) and not (skip_special and i in self._skip))

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", "replace")

    def token_to_id(self, token: str) -> int | None:
        """Special tokens by content; BPE tokens spelled in GPT-2's byte alphabet (as HF shows them)."""
        if token in self._special_ids:
            return self._special_ids[token]
        try:
            return self._ranks.get(bytes(_CHAR_TO_BYTE[c] for c in token))
        except KeyError:
            return None

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < len(self._bytes):
            return None
        if token_id >= self._n:
            return self._bytes[token_id].decode("utf-8")
        return "".join(_BYTE_TO_CHAR[b] for b in self._bytes[token_id])


def _added_tokens(config: dict, path: Path) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json's added_tokens_decoder as {id: (content, special)}."""
    raw = config.get("added_tokens_decoder") or {}
    if not isinstance(raw, dict):
        raise EdgeDSError(f"{path}: added_tokens_decoder must be an object")
    added = {}
    for key, value in raw.items():
        content = _token_content(value, path, f"added_tokens_decoder[{key}]")
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if not 0 <= token_id <= MAX_TOKEN_ID:
            raise EdgeDSError(f"{path}: added_tokens_decoder key {brief(key)} is not a token id in [0, {MAX_TOKEN_ID}]")
        if content == "":  # would match between any two characters (tiktoken then never finishes encoding)
            raise EdgeDSError(f"{path}: added_tokens_decoder[{key}] has empty content")
        special = bool(value.get("special", True)) if isinstance(value, dict) else True
        if content is not None:
            added[token_id] = (content, special)
    return added


def _pick_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        # Multi-template configs: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                if not isinstance(template, str):
                    raise EdgeDSError(f"{path}: chat_template 'default' entry has no template string")
                return template
        return None
    raise EdgeDSError(f"{path}: chat_template must be a string or a list of {{name, template}}")


def _raise_exception(message: str) -> None:
    raise EdgeDSError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's built-in tojson escapes non-ASCII and HTML characters; chat templates expect neither.
    if isinstance(indent, int) and indent > 64:  # written once per nesting level per item
        raise _limit(f"tojson indent={indent} is over the limit of 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Tokenizer:
    """Encodes/decodes text for one model directory and renders its chat template."""

    def __init__(self, backend: Any, *, bos_id: int | None, eos_ids: list[int], add_bos_token: bool,
                 bos_token: str | None, eos_token: str | None, chat_template: str | None) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos_token = add_bos_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.vocab_size: int = backend.vocab_size
        self._compiled: Any = None

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Load from a model directory (tokenizer.json, else tokenizer.model, else tiktoken.model, plus
        optional configs)."""
        d = Path(directory)
        if not d.is_dir():
            raise EdgeDSError(f"{d}: not a directory")
        tcfg_path, gcfg_path, mcfg_path = (d / "tokenizer_config.json", d / "generation_config.json",
                                           d / "config.json")
        tcfg, gcfg, mcfg = _read_json(tcfg_path), _read_json(gcfg_path), _read_json(mcfg_path)

        if (d / "tokenizer.json").is_file():
            backend: Any = _HFBackend(d / "tokenizer.json")
        elif (d / "tokenizer.model").is_file():
            backend = _SPBackend(d / "tokenizer.model", _added_tokens(tcfg, tcfg_path))
        elif (d / "tiktoken.model").is_file():
            # Kimi-K2; its tokenization_kimi.py is never imported, only its rules are in _TiktokenBackend.
            backend = _TiktokenBackend(d / "tiktoken.model", _added_tokens(tcfg, tcfg_path), tcfg_path)
        else:
            raise EdgeDSError(f"{d}: no tokenizer.json, tokenizer.model or tiktoken.model found")

        def check_id(token_id: int, path: Path, field: str) -> int:
            if not 0 <= token_id < backend.vocab_size:
                raise EdgeDSError(f"{path}: {field} {token_id} is outside the vocabulary "
                                  f"(size {backend.vocab_size})")
            return token_id

        def lookup(token: str, field: str) -> int:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise EdgeDSError(f"{tcfg_path}: {field} {token!r} is not in the vocabulary")
            return token_id

        # BOS: tokenizer_config.json is authoritative when it has the key (an explicit null means
        # "this tokenizer adds no BOS"); otherwise fall back to the model configs.
        bos_token = _token_content(tcfg.get("bos_token"), tcfg_path, "bos_token")
        bos_id: int | None = lookup(bos_token, "bos_token") if bos_token is not None else None
        if "bos_token" not in tcfg:
            for path, cfg in ((gcfg_path, gcfg), (mcfg_path, mcfg)):
                ids = _id_list(cfg.get("bos_token_id"), path, "bos_token_id")
                if ids:
                    bos_id = check_id(ids[0], path, "bos_token_id")
                    break
            else:
                bos_id = backend.default_bos
            if bos_id is not None:
                bos_token = backend.id_to_token(bos_id)

        # EOS: every id any config names stops generation; config.json only as a last resort.
        eos_token = _token_content(tcfg.get("eos_token"), tcfg_path, "eos_token")
        eos_ids = [lookup(eos_token, "eos_token")] if eos_token is not None else []
        eos_ids += [check_id(i, gcfg_path, "eos_token_id")
                    for i in _id_list(gcfg.get("eos_token_id"), gcfg_path, "eos_token_id")]
        if not eos_ids:
            eos_ids = [check_id(i, mcfg_path, "eos_token_id")
                       for i in _id_list(mcfg.get("eos_token_id"), mcfg_path, "eos_token_id")]
        if not eos_ids and backend.default_eos is not None:
            eos_ids = [backend.default_eos]
        eos_ids = list(dict.fromkeys(eos_ids))
        if eos_token is None and eos_ids:
            eos_token = backend.id_to_token(eos_ids[0])

        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and backend.adds_bos
        elif not isinstance(add_bos, bool):
            raise EdgeDSError(f"{tcfg_path}: add_bos_token must be true or false, got {add_bos!r}")

        template_file = d / "chat_template.jinja"
        if template_file.is_file():
            try:
                chat_template: str | None = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise EdgeDSError(f"{template_file}: cannot read ({e})") from e
        else:
            chat_template = _pick_template(tcfg.get("chat_template"), tcfg_path)

        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos_token=add_bos,
                   bos_token=bos_token, eos_token=eos_token, chat_template=chat_template)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for text; BOS is prepended once when asked for and the model uses one."""
        _require_unicode(text, "the text to encode")
        ids = self._backend.encode(text)
        if add_bos and self.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text for token ids, dropping special tokens unless skip_special is False."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render messages with the model's chat template; extra keyword args become template variables."""
        if not self.chat_template:
            raise EdgeDSError("this model has no chat template (no chat_template in tokenizer_config.json "
                              "or chat_template.jinja); give the prompt as text, with chat_template=False")
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        deadline = _deadline.set(time.monotonic() + TEMPLATE_SECONDS)
        try:
            if self._compiled is None:
                self._compiled = _template_env().from_string(self.chat_template)
            out, n = [], 0
            for piece in self._compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                                 **variables):
                n += len(piece)
                if n > TEMPLATE_MAX_CHARS:
                    raise _limit(f"the output passed the limit of {TEMPLATE_MAX_CHARS} characters")
                _tick()
                out.append(piece)
            text = "".join(out)
            _require_unicode(text, "chat template: the output")
            return text
        except EdgeDSError:
            raise
        except SecurityError as e:
            raise EdgeDSError(f"chat template: blocked unsafe operation ({e})") from e
        except TemplateError as e:
            raise EdgeDSError(f"chat template: {e}") from e
        except Exception as e:  # the template's own failure: 1/0, a method given wrong types, endless recursion
            raise EdgeDSError(f"chat template: {type(e).__name__}: {e}") from e
        finally:
            _deadline.reset(deadline)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **variables: Any) -> list[int]:
        """Render and encode a conversation, with exactly one BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt, **variables)
        # Most templates write bos_token themselves; adding another would double it.
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_bos=not has_bos)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own (logprobs report them): a byte-fallback or
        byte-level piece that is part of a character gives its raw bytes, not U+FFFD."""
        cache = self.__dict__.setdefault("_token_bytes", {})
        if token_id in cache:
            return cache[token_id]
        backend = self._backend
        if hasattr(backend, "decode_bytes"):
            out = backend.decode_bytes([token_id], False)
        else:
            text = backend.decode([token_id], False)
            piece = backend.id_to_token(token_id) or ""
            if _REPLACEMENT not in text:
                # A lone sentencepiece piece decodes without its leading "▁"; the token has the space.
                if piece.startswith(_SPACE_PIECE) and not text.startswith(" "):
                    text = " " + text
                out = text.encode("utf-8")
            elif _BYTE_PIECE.fullmatch(piece):
                out = bytes([int(piece[3:5], 16)])
            elif piece and all(c in _CHAR_TO_BYTE for c in piece):  # GPT-2's byte alphabet (byte-level BPE)
                out = bytes(_CHAR_TO_BYTE[c] for c in piece)
            else:
                out = text.encode("utf-8")
        if len(cache) < 1 << 20:
            cache[token_id] = out
        return out

    def detokenizer(self, skip_special: bool = True) -> "StreamingDetokenizer":
        """A streaming decoder; skip_special=False keeps special tokens (tool-call markers) in the text."""
        if hasattr(self._backend, "decode_bytes"):
            return ByteStreamingDetokenizer(self, skip_special)
        return StreamingDetokenizer(self, skip_special)

    # --- tools ---

    def is_special(self, token_id: int) -> bool:
        """Whether decoding drops this token by default (a special token: BOS, EOS, chat markers...)."""
        cache = self.__dict__.setdefault("_is_special", {})
        if token_id not in cache:
            cache[token_id] = (self._backend.decode([token_id], True) == ""
                               and self._backend.decode([token_id], False) != "")
        return cache[token_id]

    def token_id(self, text: str) -> int | None:
        """The id of a token spelt `text` (a special token's content), or None if it has none."""
        return self._backend.token_to_id(text)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable (DeepSeek V3.1's and Kimi-K2's do;
        DeepSeek V3/R1's published template does not)."""
        if not self.chat_template:
            return False
        if "_renders_tools" not in self.__dict__:  # parsed once: templates run to kilobytes
            from jinja2 import TemplateError, meta
            try:
                found = "tools" in meta.find_undeclared_variables(_template_env().parse(self.chat_template))
            except TemplateError:
                found = False  # the template does not parse; rendering it will say so
            self._renders_tools = found
        return self._renders_tools

    @property
    def tool_format(self) -> Any:
        """The tool-call format this model writes (tool_calls.ToolFormat), or None."""
        if "_tool_format" not in self.__dict__:
            from .tool_calls import detect
            self._tool_format = detect(self.chat_template, lambda t: self.token_id(t) is not None)
        return self._tool_format


# --- the chat-template sandbox ---------------------------------------------------------------------
# A chat template is code from the model's author, run on every chat request. It runs in jinja's
# immutable sandbox (no internals, no imports, no mutating its arguments) and within bounds, so that a
# template that loops or grows without end fails fast with a clear error instead of hanging or
# exhausting memory: a time limit counted at every loop step, call and piece of output; range() and
# the output capped; operations that build a big value in one step (`*`, `**`, `%`, str.format,
# padding and replacing) refused before they run when the result would pass the cap.
TEMPLATE_SECONDS = 5.0  # one render
TEMPLATE_MAX_CHARS = 1 << 25  # the output, and any value the template builds (characters or items)
TEMPLATE_MAX_RANGE = 100_000  # jinja's own bound, as our error rather than its OverflowError
_MAX_INT_BITS = 1 << 16  # integers the template computes

_deadline: ContextVar[float] = ContextVar("edge_ds_template_deadline", default=math.inf)


def _limit(what: str) -> EdgeDSError:
    return EdgeDSError(f"chat template: {what}")


def _tick() -> None:
    if time.monotonic() > _deadline.get():
        raise _limit(f"rendering took over {TEMPLATE_SECONDS:g} s (a loop without end?)")


def _size(value: Any) -> int:
    """Roughly what rendering `value` writes: a string's characters, a container's items and theirs
    (a shared item counted where it appears); an int's digits. Counts each container once."""
    memo: dict[int, int] = {}

    def size(v: Any) -> int:
        if isinstance(v, str):
            return len(v)
        if isinstance(v, int):
            return v.bit_length() // 3 + 1
        if not isinstance(v, (list, tuple, dict)):
            return 1
        if id(v) not in memo:
            memo[id(v)] = 1  # a cycle counts once
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            memo[id(v)] = len(v) + sum(map(size, items))
        return memo[id(v)]

    return size(value)


def _refuse_over(n: int, what: str) -> None:
    if n > TEMPLATE_MAX_CHARS:
        raise _limit(f"{what} would build a value of about {n} characters, over the limit of {TEMPLATE_MAX_CHARS}")


def _checked(value: Any, what: str) -> Any:
    """value, unless it is over the size bound (stops a template growing a value step by step)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise _limit(f"{what} built an integer of {value.bit_length()} bits, over the limit of {_MAX_INT_BITS}")
    _refuse_over(_size(value), what)
    return value


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?([-#0 +*.\d]*)")  # %(name)-08.3f: the flags, width, precision
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # {0:>{w}}: what follows the colon


def _format_size(fmt: str, values: list, percent: bool) -> int:
    """An upper bound of what `fmt % values` (percent) or `fmt.format(*values)` writes: each field at
    most as wide as the widest value plus the widths its spec writes, or takes from the arguments."""
    specs = (_PERCENT_SPEC if percent else _BRACE_SPEC).findall(fmt)
    widths = sum(int(d) if len(d) < 19 else 2**63 for spec in specs for d in re.findall(r"\d+", spec))
    passed = any(("*" if percent else "{") in spec for spec in specs)  # %*d, {:{}}
    widest = max((abs(v) for v in values if isinstance(v, int)), default=0) if passed else 0
    return len(fmt) + widths + len(specs) * (max(map(_size, values), default=0) + widest)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _str_method_size(s: str, name: str, args: tuple, kwargs: dict) -> int:
    """What calling the str method `name` of s would write, for the methods that can make it much longer."""
    first = args[0] if args else next(iter(kwargs.values()), 0)
    if name in ("center", "ljust", "rjust", "zfill"):
        return first if isinstance(first, int) else 0
    if name == "expandtabs":
        return len(s) + s.count("\t") * (first if isinstance(first, int) else 8)
    if name == "replace":
        return _replace_size(s, *args[:3])
    if name == "join":
        return _size(first) + len(s) * len(first) if isinstance(first, (list, tuple)) else 0
    if name in ("format", "format_map"):
        if name == "format_map":
            args = tuple(first.values()) if isinstance(first, dict) else ()
        return _format_size(s, [*args, *kwargs.values()], percent=False)
    return 0


def _wrap_size(s: str, width: Any, wrapstring: Any) -> int:
    lines = len(s) // max(width if isinstance(width, int) else 1, 1) + 1
    return len(s) + lines * len(str(wrapstring or "\n"))


# Filters that can write far more than they are given: the size of their result from their arguments.
_FILTER_SIZES: dict[str, Callable[[dict], int]] = {
    "center": lambda a: a.get("width", 80) if isinstance(a.get("width", 80), int) else 0,
    "indent": lambda a: len(str(a["s"])) + (a.get("width", 4) if isinstance(a.get("width", 4), int)
                                            else len(str(a.get("width")))) * (str(a["s"]).count("\n") + 1),
    "replace": lambda a: _replace_size(a["s"], a["old"], a["new"], a.get("count")),
    "join": lambda a: _size(a["value"]) + len(str(a.get("d", ""))) * len(a["value"])
    if isinstance(a["value"], (list, tuple)) else 0,
    "format": lambda a: _format_size(str(a["value"]), [*a.get("args", ()), *a.get("kwargs", {}).values()], True),
    "batch": lambda a: a["linecount"] if isinstance(a["linecount"], int) and a.get("fill_with") is not None else 0,
    "wordwrap": lambda a: _wrap_size(str(a["s"]), a.get("width", 79), a.get("wrapstring")),
}


def _sized_filter(name: str, f: Callable) -> Callable:
    sig = inspect.signature(f) if name in _FILTER_SIZES else None

    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if sig is not None:
            try:
                bound = sig.bind(*args, **kwargs).arguments
            except TypeError:
                pass  # wrong arguments: the filter's own call says so
            else:
                _refuse_over(_FILTER_SIZES[name](bound), f"the {name} filter")
        return _checked(f(*args, **kwargs), f"the {name} filter")

    return checked


def _range(*args: Any) -> range:
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:  # longer than sys.maxsize
        n = math.inf
    if n > TEMPLATE_MAX_RANGE:
        raise _limit(f"range() of {n} numbers is over the limit of {TEMPLATE_MAX_RANGE}")
    return r


def _steps(iterable: Any) -> Iterator[Any]:
    """A loop's items, each step counted against the time limit."""
    for item in iterable:
        _tick()
        yield item


def _concat(pieces: Any) -> str:
    """`a ~ b`, a macro's or a block's output: joined after checking the size."""
    pieces = [p if isinstance(p, str) else str(p) for p in pieces]
    _refuse_over(sum(map(len, pieces)), "joining text")
    return "".join(pieces)


@functools.lru_cache(maxsize=1)
def _template_env() -> Any:
    """The sandbox every chat template renders in (one, shared: rendering keeps no state in it)."""
    from jinja2 import nodes
    from jinja2.runtime import Namespace
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedNamespace(Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            super().__setitem__(name, _checked(value, f"namespace attribute {name!r}"))

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})  # the operators that build a big value in one step

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            # Every loop steps through _steps (the time limit), every `~` through _concat (the size limit).
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, "_steps", [], [], None, None, lineno=loop.lineno)
            for node in tree.find_all(nodes.Concat):
                node.nodes = [nodes.Filter(nodes.List(node.nodes), "_concat", [], [], None, None, lineno=node.lineno)]
            return tree

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _tick()
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            if isinstance(getattr(method, "__self__", None), str):
                _refuse_over(_str_method_size(method.__self__, method.__name__, args, kwargs),
                             f"str.{method.__name__}()")
            return _checked(super().call(__context, __obj, *args, **kwargs), "a call")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            ints = isinstance(left, int) and isinstance(right, int)
            if operator == "*" and ints:
                bits = left.bit_length() + right.bit_length()
            elif operator == "*":
                bits = 0
                count, seq = (left, right) if isinstance(left, int) else (right, left)
                if isinstance(count, int) and isinstance(seq, (str, list, tuple)):
                    _refuse_over(_size(seq) * max(count, 0), "`*`")
            elif operator == "**" and ints and right > 0 and abs(left) > 1:
                bits = left.bit_length() * right
            elif operator == "%" and isinstance(left, str):
                bits = 0
                values = list(right.values()) if isinstance(right, dict) else list(right) if isinstance(right, tuple) \
                    else [right]
                _refuse_over(_format_size(left, values, percent=True), "`%` formatting")
            else:
                bits = 0
            if bits > _MAX_INT_BITS:
                raise _limit(f"`{operator}` would build an integer of about {bits} bits, over the limit of "
                             f"{_MAX_INT_BITS}")
            return _checked(super().call_binop(context, operator, left, right), f"`{operator}`")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _sized_filter(name, f) for name, f in env.filters.items()}
    env.filters["_steps"], env.filters["_concat"] = _steps, _concat
    env.concat = _concat
    env.globals.pop("lipsum", None)  # placeholder text: no chat template needs it, its size is unbounded
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_range,
                       namespace=BoundedNamespace)
    return env


class StreamingDetokenizer:
    """Turns token ids into text chunks as they arrive, never emitting broken UTF-8.

    Only a short window of ids is decoded per token: ids[:read] were already emitted and decode
    to prefix_text; the window is re-decoded with the new id and whatever it adds beyond
    prefix_text is emitted once it no longer ends in U+FFFD (a partial UTF-8 character). Keeping
    one emitted token at the window's start keeps context-dependent decoding (sentencepiece's
    leading-space strip, byte fallback) identical to decoding the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special)

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        chunk = new_text[len(self._prefix_text):]
        # Slide: the not-yet-prefix ids become the new prefix for the next token.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._chunks.append(chunk)
        return chunk

    def finish(self) -> str:
        """Flush whatever is held back (e.g. an incomplete character at the end) and end the stream."""
        new_text = self._decode(self._ids)
        chunk = new_text[len(self._prefix_text):]
        self._ids, self._read, self._prefix_text = [], 0, ""
        if chunk:
            self._chunks.append(chunk)
        return chunk


class ByteStreamingDetokenizer(StreamingDetokenizer):
    """Streaming decode for byte-level tokens (tiktoken): each token's bytes go through an
    incremental UTF-8 decoder, which holds back exactly the bytes of an unfinished character and
    yields what one decode of all the bytes would (U+FFFD only for bytes that are invalid)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        super().__init__(tokenizer, skip_special)
        self._bytes_of = tokenizer._backend.decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _emit(self, data: bytes, final: bool) -> str:
        chunk = self._utf8.decode(data, final)
        if chunk:
            self._chunks.append(chunk)
        return chunk

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (possibly "")."""
        return self._emit(self._bytes_of([int(token_id)], self._skip_special), False)

    def finish(self) -> str:
        """Flush held-back bytes of an incomplete character (as U+FFFD) and end the stream."""
        chunk = self._emit(b"", True)
        self._utf8.reset()
        return chunk
