"""Seeded fuzzing of edge-ds's parsers: whatever the input, each must end in the library's own
error (EdgeDSError; RequestError for the OpenAI request schema) with a message naming the file or
field, never another exception, a hang or a large allocation.

    python benchmarks/fuzz.py --cases 100000                 # every parser, 100,000 cases each
    python benchmarks/fuzz.py --cases 5000 --only config,trace --seed 3
    python benchmarks/fuzz.py --only safetensors --case 1234  # replay one case, with its input

Each case is made from its own generator, seeded by (seed, parser, case number), so any failure
is replayed alone with --case. Each parser runs in a child process: a case that never ends in native
code (where the per-case alarm cannot stop it) or that kills the process is reported as a failure and
the run goes on. tests/test_fuzz.py runs the same parsers in-process with a few thousand cases.
Needs no dev extra: numpy, mlx, tokenizers and tiktoken (edge-ds's own dependencies) only.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import random
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge_ds.checkpoint import _DTYPES, Checkpoint, SafetensorsFile  # noqa: E402
from edge_ds.config import ModelConfig  # noqa: E402
from edge_ds.errors import EdgeDSError  # noqa: E402
from edge_ds.layout import INDEX_FILE  # noqa: E402

CASE_SECONDS = 5.0  # a case running longer is a hang
TEMPLATE_SECONDS = 0.5  # the chat-template time bound while fuzzing (the library's is larger)

# --- the mutator ------------------------------------------------------------------------------

INTERESTING: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
    2**64, -2**63, 10**30, 10**4000, 0.5, -0.0, 1.5, 1e-300, 1e308, float("nan"), float("inf"), float("-inf"),
    "", "x", "0", "12", "-1", "1e3", "NaN", "null", "\ud800", "\udfff", "é日\U0001f916", "\x00", "a\x00b",
    "../outside.safetensors", "/etc/hostname", "A" * 5000, [], [0], [1, 2], [[]], [None], ["x"], {}, {"": None},
    {"content": 1}, {"content": "x"}, {"a": [1, {"b": None}]},
]
# Literals spliced into JSON text in place of a value: some are not JSON at all, or not for Python.
LITERALS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-" + "9" * 4299, "-0",
            "1.0", "1E2", "0x10", "01", "+1", ".5", "true", "null", "\"\\ud800\"", "\"\\u0000\"", "\"\\x\"",
            "[", "{", "]", "}", ",", ":", "\"", "", "'a'", "undefined"]
NESTING = [2, 100, 900, 990, 1100, 5000, 100_000]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
             b"\x00", b"\xef\xbb\xbf", b"\x80\x80\x80"]


class Mutator:
    """Seeded mutations: of bytes (bit flips, truncation, splices), of parsed JSON (wrong types,
    missing and extra keys, huge, negative and non-finite numbers, deep nesting) and of JSON text
    (duplicate keys, NaN/Infinity literals, non-UTF-8 bytes)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, seq: list) -> Any:
        return seq[self.rng.randrange(len(seq))]

    # bytes
    def bytes(self, data: bytes, boundaries: list[int] = ()) -> bytes:
        """1-4 byte-level edits; `boundaries` (region starts/ends) attract truncation and overwrites."""
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(8)
            cut = self._position(len(b), boundaries)
            if op == 0 and b:  # bit flips
                for _ in range(rng.randint(1, 8)):
                    i = rng.randrange(len(b))
                    b[i] ^= 1 << rng.randrange(8)
            elif op == 1:  # truncation, at a region edge or anywhere
                del b[cut:]
            elif op == 2 and b:  # one byte set to an edge value
                b[rng.randrange(len(b))] = self.pick([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
            elif op == 3:  # insert bytes (non-UTF-8 ones too)
                b[cut:cut] = self.pick(BAD_BYTES) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 16))
            elif op == 4 and b:  # delete a span
                del b[cut:cut + rng.randint(1, 64)]
            elif op == 5 and b:  # duplicate a span
                span = b[cut:cut + rng.randint(1, 64)]
                b[cut:cut] = span
            elif op == 6:  # an edge u64 over 8 bytes (lengths, offsets)
                value = self.pick([0, 1, 7, 8, len(b), len(b) - 8, len(b) - 7, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
                                   100 * 1024 * 1024, 100 * 1024 * 1024 + 1])
                b[cut:cut + 8] = struct.pack("<Q", value % 2**64)
            else:  # swap two spans
                i, j = sorted((self._position(len(b), boundaries), self._position(len(b), boundaries)))
                n = min(rng.randint(1, 32), j - i)
                b[i:i + n], b[j:j + n] = b[j:j + n], b[i:i + n]
        return bytes(b)

    def _position(self, n: int, boundaries: list[int]) -> int:
        if boundaries and self.rng.random() < 0.6:
            return max(0, min(n, self.pick(list(boundaries)) + self.rng.randint(-2, 2)))
        return self.rng.randint(0, n)

    # JSON values
    def value(self, obj: Any, keys: list[str] = ()) -> Any:
        """1-3 structural edits of a JSON value (a copy); `keys` are names worth adding."""
        obj = json.loads(json.dumps(obj))
        for _ in range(self.rng.randint(1, 3)):
            obj = self._edit(obj, list(keys))
        return obj

    def _spots(self, obj: Any) -> list[tuple[Any, Any]]:
        """(container, key) of every value in obj, the root as (None, None)."""
        out: list[tuple[Any, Any]] = [(None, None)]
        stack = [obj]
        while stack and len(out) < 2000:
            c = stack.pop()
            items = c.items() if isinstance(c, dict) else enumerate(c) if isinstance(c, list) else ()
            for k, v in items:
                out.append((c, k))
                stack.append(v)
        return out

    def new_value(self, old: Any = None) -> Any:
        rng = self.rng
        r = rng.random()
        if isinstance(old, (int, float)) and not isinstance(old, bool) and r < 0.35:
            if isinstance(old, float) and not math.isfinite(old):
                return 1.0
            edits = [lambda: -old, lambda: old + 1, lambda: old - 1, lambda: old * 2**rng.randint(1, 70), lambda: 0,
                     lambda: str(old), lambda: [old], lambda: float(old), lambda: int(old), lambda: old + 0.5]
            try:
                return self.pick(edits)()
            except (OverflowError, ValueError):  # a number past float range
                return 0
        if isinstance(old, str) and r < 0.35:
            return self.pick([old.upper(), old[:-1], old + "x", old * 2, " " + old,
                              old.encode("utf-8", "surrogatepass").hex(), [old],
                              {"content": old}, None, len(old)])
        if r < 0.45:
            return self.nest(self.pick([[], {}, 1, "x"]), self.pick([2, 50, 200]))  # deeper: in text()
        return copy.deepcopy(self.pick(INTERESTING))  # a copy: later edits must not change the table

    def nest(self, inner: Any, depth: int) -> Any:
        for _ in range(depth):
            inner = [inner] if self.rng.random() < 0.5 else {"a": inner}
        return inner

    def _edit(self, obj: Any, keys: list[str]) -> Any:
        rng = self.rng
        container, key = self.pick(self._spots(obj))
        current = obj if container is None else container[key]
        op = rng.randrange(7)
        if op <= 2:  # a new value, often of the wrong type
            new = self.new_value(current)
        elif op == 3 and container is not None:  # remove
            del container[key]
            return obj
        elif op == 4 and isinstance(current, dict):  # an extra key, often a known one in the wrong place
            current[self.pick(keys) if keys and rng.random() < 0.7 else self.pick(["", "x", "__metadata__",
                                                                                  "\ud800", "a\x00"])] = \
                self.new_value()
            return obj
        elif op == 5 and isinstance(current, list):
            if current and rng.random() < 0.5:
                current.insert(rng.randrange(len(current) + 1), self.pick(current))
            elif current:
                current.pop(rng.randrange(len(current)))
            else:
                current.append(self.new_value())
            return obj
        else:  # another value of the document in this place (aliasing)
            other, k = self.pick(self._spots(obj))
            new = json.loads(json.dumps(obj if other is None else other[k]))
        if container is None:
            return new
        container[key] = new
        return obj

    # JSON text
    def dumps(self, obj: Any) -> str:
        """json.dumps, with NaN/Infinity as JSON's extension writes them and no key sorting."""
        return json.dumps(obj, allow_nan=True, separators=self.pick([(",", ":"), (", ", ": ")]))

    def text(self, text: str) -> bytes:
        """One or two text-level edits of JSON text, returned as bytes (maybe not UTF-8)."""
        rng = self.rng
        for _ in range(rng.randint(1, 2)):
            op = rng.randrange(5)
            if op == 0:  # duplicate a key of some object
                m = self._match(r'\{\s*"((?:[^"\\]|\\.)*)"\s*:', text)
                if m:
                    text = f'{text[:m.end(0) - len(m.group(0)) + 1]}"{m.group(1)}": {self.pick(LITERALS[:8])}, ' \
                           f'{text[m.end(0) - len(m.group(0)) + 1:]}'
            elif op == 1:  # a value replaced by a literal
                m = self._match(r'(?<=[:\[,])\s*(-?\d[\d.eE+-]*|"(?:[^"\\]|\\.)*"|true|false|null)', text)
                if m:
                    text = text[:m.start(1)] + self.pick(LITERALS) + text[m.end(1):]
            elif op == 2:  # deep nesting in place of a value
                m = self._match(r'(?<=[:\[,])\s*(-?\d[\d.eE+-]*|"(?:[^"\\]|\\.)*"|true|false|null)', text)
                d = self.pick(NESTING)
                if m:
                    text = text[:m.start(1)] + "[" * d + "]" * d + text[m.end(1):]
            elif op == 3:  # truncated
                text = text[:rng.randint(0, len(text))]
            else:  # whitespace, BOM or comments around it
                text = self.pick(["\ufeff", " ", "\n", "/* c */", "\x00"]) + text + self.pick(["", " ", "x", "\x00"])
        raw = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.15:
            i = rng.randint(0, len(raw))
            raw = raw[:i] + self.pick(BAD_BYTES) + raw[i:]
        return raw

    def _match(self, pattern: str, text: str) -> re.Match | None:
        found = list(re.finditer(pattern, text[:200_000]))
        return self.pick(found) if found else None

    def json_file(self, obj: Any, keys: list[str] = ()) -> bytes:
        """A mutated JSON document: structural edits, text edits, byte edits, or several."""
        r = self.rng.random()
        if r < 0.5:
            return self.dumps(self.value(obj, keys)).encode("utf-8", "surrogatepass")
        if r < 0.8:
            return self.text(self.dumps(self.value(obj, keys) if self.rng.random() < 0.5 else obj))
        return self.bytes(self.dumps(obj).encode())


# --- parsers under test -------------------------------------------------------------------------

@dataclass
class Failure:
    parser: str
    case: int
    kind: str  # "crash": another exception; "message": our error without the file/field; "hang"
    detail: str
    seconds: float

    def __str__(self) -> str:
        return f"[{self.parser} case {self.case}] {self.kind} after {self.seconds:.2f} s: {self.detail}"


class Target:
    """A parser: make() writes one mutated input, parse() runs the parser on it and raises only
    `error` (mentioning the file or field); anything else is a failure."""

    name = ""
    error: type[Exception] = EdgeDSError

    def __init__(self, workdir: Path):
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.input: Any = None  # what the last make() produced, to show with a failure

    def make(self, mut: Mutator) -> None:
        raise NotImplementedError

    def parse(self) -> None:
        raise NotImplementedError

    def named(self, e: Exception) -> bool:
        """Whether the error's message names what was wrong (a file, a field)."""
        return str(self.dir) in str(e)

    def show(self) -> str:
        text = repr(self.input)
        return text if len(text) < 600 else text[:300] + f" ...({len(text)} chars)... " + text[-200:]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    """A safetensors file written by hand (no safetensors package); returns its bytes."""
    codes = {dt: code for code, dt in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data, offset = b"", 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads its header to 8 bytes
    blob = struct.pack("<Q", len(text)) + text + data
    path.write_bytes(blob)
    return blob


def _tensors(rng: random.Random) -> dict[str, np.ndarray]:
    import ml_dtypes

    return {
        "model.embed_tokens.weight": np.arange(24, dtype=np.float32).reshape(4, 6),
        "model.norm.weight": np.ones(6, dtype=ml_dtypes.bfloat16),
        "model.layers.0.mlp.gate.weight": np.full((2, 3), 0.5, dtype=ml_dtypes.float8_e4m3fn),
        "ids": np.array([3, 1, 2], dtype=np.int64),
        "scalar": np.array(7, dtype=np.uint8),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "mask": np.array([True, False]),
    }


class SafetensorsTarget(Target):
    """SafetensorsFile: header length, header JSON, offsets, then reading every tensor."""

    name = "safetensors"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.path = self.dir / "x.safetensors"
        self.tensors = _tensors(random.Random(0))
        self.seed = write_safetensors(self.path, self.tensors, {"format": "pt", "note": "fuzz seed"})
        self.header = json.loads(self.seed[8:8 + struct.unpack("<Q", self.seed[:8])[0]])

    def regions(self, blob: bytes) -> list[int]:
        n = struct.unpack("<Q", blob[:8])[0]
        ends = [8 + n + e["data_offsets"][1] for k, e in self.header.items() if k != "__metadata__"]
        return [0, 4, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, *ends, len(blob)]

    def make(self, mut: Mutator) -> None:
        rng = mut.rng
        r = rng.random()
        if r < 0.3:  # bytes anywhere, truncation at every region
            blob = mut.bytes(self.seed, self.regions(self.seed))
        else:
            header = json.loads(json.dumps(self.header))
            if r < 0.55:
                self._aliasing(header, mut)
            elif r < 0.85:
                header = mut.value(header, ["dtype", "shape", "data_offsets", "__metadata__", *self.header])
            text = mut.dumps(header).encode("utf-8", "surrogatepass") if rng.random() < 0.7 else \
                mut.text(mut.dumps(header))
            length = len(text) if rng.random() < 0.85 else mut.pick(
                [0, 1, len(text) - 1, len(text) + 1, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1, 1 << 40])
            blob = struct.pack("<Q", length % 2**64) + text + self.seed[8 + struct.unpack("<Q", self.seed[:8])[0]:]
            if rng.random() < 0.2:
                blob = mut.bytes(blob, self.regions(self.seed))
        self.path.write_bytes(blob)
        self.input = blob

    def _aliasing(self, header: dict, mut: Mutator) -> None:
        """Offsets that alias, overlap, run backwards or past the end; absurd shapes and dtypes."""
        rng = mut.rng
        names = [k for k in header if k != "__metadata__"]
        a, b = mut.pick(names), mut.pick(names)
        ea, eb = header[a], header[b]
        op = rng.randrange(6)
        if op == 0:
            ea["data_offsets"] = list(eb["data_offsets"])
            if rng.random() < 0.5:
                ea["shape"], ea["dtype"] = eb["shape"], eb["dtype"]
        elif op == 1:
            shift = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
            ea["data_offsets"] = [o + shift for o in ea["data_offsets"]]
        elif op == 2:
            ea["data_offsets"] = ea["data_offsets"][::-1] if rng.random() < 0.5 else \
                [ea["data_offsets"][0], ea["data_offsets"][0] + rng.choice([0, 2**62, 2**64, -1])]
        elif op == 3:
            ea["shape"] = mut.pick([[2**62, 2**62], [0, 2**63], [0, 2**62, 2**62], [0] * 65, [0] * 40, [1] * 100,
                                    [-1], [1.5], ["2"], [True], [2**64], [0, -3], [10**40, 0], [0] * 100_000,
                                    [2**62] * 1000 + [0]])
            if rng.random() < 0.5:
                ea["data_offsets"] = [0, 0]
        elif op == 4:
            ea["dtype"] = mut.pick(["bf16", "F8_E4M3FN", "F4", "I128", 5, None, ["F32"], {"F32": 1}, "F64", "BOOL"])
        else:
            header["__metadata__"] = mut.pick([None, 0, [], "x", {"a": 1}, {"a": None}, {"a": "b"}, False, {1: 2}])

    def parse(self) -> None:
        with SafetensorsFile(self.path) as f:
            for name, info in f.tensors.items():
                a = f.read(name)
                assert a.shape == info.shape and a.nbytes == info.nbytes, (name, a.shape, info)


class IndexTarget(Target):
    """Checkpoint with model.safetensors.index.json: the weight_map, its shards, every tensor."""

    name = "index"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        tensors = _tensors(random.Random(1))
        names = list(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
        for shard, keys in shards.items():
            write_safetensors(self.dir / shard, {k: tensors[k] for k in keys})
        (self.dir / "stray.safetensors").write_bytes(b"not listed, never opened")
        self.index = {"metadata": {"total_size": 123},
                      "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        self.shards = list(shards)

    def make(self, mut: Mutator) -> None:
        index = json.loads(json.dumps(self.index))
        if mut.rng.random() < 0.3:  # shard names: traversal, absolute, missing, stray, empty
            name = mut.pick(list(index["weight_map"]))
            index["weight_map"][name] = mut.pick(
                ["../outside.safetensors", "/etc/hostname", "", ".", "..", "stray.safetensors", "missing.safetensors",
                 "sub/model.safetensors", self.shards[0] + "\x00", self.shards[1], str(self.dir / self.shards[0])])
            data = mut.dumps(index).encode("utf-8", "surrogatepass")
        else:
            data = mut.json_file(index, ["weight_map", "metadata", *self.shards, *index["weight_map"]])
        (self.dir / INDEX_FILE).write_bytes(data)
        self.input = data

    def parse(self) -> None:
        with Checkpoint(self.dir) as ckpt:
            for name in ckpt.names():
                ckpt.read(name)
            ckpt.total_bytes()


def _config_seeds() -> list[dict]:
    from tests.tiny_models import STYLES

    seeds = [dict(s) for s in STYLES.values()]
    seeds.append(dict(STYLES["v3"], model_type="kimi_k2", n_routed_experts=16, n_group=1, topk_group=1))
    rope = dict(STYLES["v3"], rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 128, "mscale": 1.0,
                                               "mscale_all_dim": 1.0})
    del rope["rope_scaling"], rope["rope_theta"]
    seeds.append(rope)
    seeds.append(dict(STYLES["v32"], quantization={"group_size": 64, "bits": 4, "mode": "affine"}))
    from tests.tiny_v4 import STYLES as V4_STYLES

    seeds += [dict(s, model_type="deepseek_v4") for s in V4_STYLES.values()]
    legacy = dict(V4_STYLES["a"], model_type="deepseek_v4", compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2,
                  compress_rate_csa=4, compress_rate_hca=128, qk_rope_head_dim=8, expert_dtype="fp4",
                  rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64})
    for k in ("layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
        legacy.pop(k)
    seeds.append(legacy)
    return seeds


class ConfigTarget(Target):
    """ModelConfig.load on config.json of every family, then every derived property."""

    name = "config"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.seeds = _config_seeds()
        self.keys = sorted({k for s in self.seeds for k in s} | {"factor", "type", "rope_type", "mscale",
                                                                 "mscale_all_dim", "group_size", "bits", "mode",
                                                                 "main", "compress", "rope_theta",
                                                                 "compressed_sparse_attention",
                                                                 "heavily_compressed_attention"})

    def make(self, mut: Mutator) -> None:
        data = mut.json_file(mut.pick(self.seeds), self.keys)
        (self.dir / "config.json").write_bytes(data)
        self.input = data

    def parse(self) -> None:
        cfg = ModelConfig.load(self.dir)
        (cfg.qk_head_dim, cfg.latent_dim, cfg.cache_row_dim, cfg.softmax_scale, cfg.moe_layers,
         cfg.cache_bytes(4096, 2))
        json.dumps(cfg.to_dict())
        assert ModelConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict() or _has_nan(cfg.to_dict())


def _has_nan(obj: Any) -> bool:
    return "NaN" in json.dumps(obj)


def tiny_tokenizer_json(path: Path) -> None:
    """A tokenizer.json with a byte-level BPE of a few merges and the chat specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<s>", "</s>", "<|User|>", "<|Assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    tok.save(str(path))


def tiny_tiktoken_model(path: Path) -> int:
    """A tiktoken ranks file: all 256 bytes and a few merges; returns the number of ranks."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or", b"ld"]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return len(tokens)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\\n' }}{% else %}<|Assistant|>{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)
KIMI_TEMPLATE = (  # the shape of Kimi-K2's: whitespace control, loop.first, a default system turn
    "{%- for message in messages -%}{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <s> there"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "日本 🤖"}]


class TokenizerTarget(Target):
    """Tokenizer.load with mutated tokenizer_config.json, generation_config.json, config.json (and
    tiktoken.model ranks), then encode, decode and the chat template."""

    name = "tokenizer"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.hf, self.tt = self.dir / "hf", self.dir / "tiktoken"
        self.hf.mkdir(exist_ok=True)
        self.tt.mkdir(exist_ok=True)
        tiny_tokenizer_json(self.hf / "tokenizer.json")
        n = tiny_tiktoken_model(self.tt / "tiktoken.model")
        self.ranks = (self.tt / "tiktoken.model").read_bytes()
        self.seeds = {
            self.hf: {"tokenizer_config.json": {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
                                                "add_bos_token": True, "chat_template": CHAT_TEMPLATE},
                      "generation_config.json": {"bos_token_id": 0, "eos_token_id": [1, 3]},
                      "config.json": {"bos_token_id": 0, "eos_token_id": 1}},
            self.tt: {"tokenizer_config.json": {
                "bos_token": "[BOS]", "eos_token": "[EOS]",
                "added_tokens_decoder": {str(n): {"content": "[BOS]", "special": True},
                                         str(n + 1): {"content": "[EOS]", "special": True},
                                         str(n + 2): {"content": "<|User|>", "special": False}},
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": CHAT_TEMPLATE}]},
                "generation_config.json": {"eos_token_id": n + 1}, "config.json": {"bos_token_id": n}},
        }
        for d, files in self.seeds.items():
            for name, obj in files.items():
                (d / name).write_text(json.dumps(obj), encoding="utf-8")
        self.keys = ["bos_token", "eos_token", "add_bos_token", "chat_template", "added_tokens_decoder", "content",
                     "special", "bos_token_id", "eos_token_id", "name", "template", str(n + 3), "-1", "99999999999"]
        self.current = self.hf

    def make(self, mut: Mutator) -> None:
        self.current = d = mut.pick([self.hf, self.hf, self.tt])  # tiktoken takes ~15 ms to load
        files = self.seeds[d]
        if self.input is not None:  # put back the file the last case changed (writing all is slow)
            last_dir, name, _ = self.input
            data = self.ranks if name == "tiktoken.model" else json.dumps(self.seeds[last_dir][name]).encode()
            (last_dir / name).write_bytes(data)
        if d is self.tt and mut.rng.random() < 0.2:
            lines = self.ranks.split(b"\n")
            cut = [sum(len(x) + 1 for x in lines[:k]) for k in (0, 1, 255, 256, 257, len(lines) - 1)]
            self.input = (d, "tiktoken.model", mut.bytes(self.ranks, cut))
        else:
            name = mut.pick(["tokenizer_config.json"] * 3 + ["generation_config.json", "config.json"])
            self.input = (d, name, mut.json_file(files[name], self.keys))
        (d / self.input[1]).write_bytes(self.input[2])

    def parse(self) -> None:
        import edge_ds.tokenizer as tk

        tok = tk.Tokenizer.load(self.current)
        ids = tok.encode("hello <s> world [EOS] <|User|>")
        tok.decode(ids, skip_special=False)
        tok.decode([*ids, 10**6])
        if tok.has_chat_template:
            try:
                tok.encode_chat(MESSAGES)
            except EdgeDSError as e:
                assert str(e).startswith("chat template"), e
        det = tok.detokenizer()
        "".join(det.add(i) for i in ids) + det.finish()


ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}", "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ ''|attr('__class__') }}", "{{ messages.__class__.__base__ }}", "{{ namespace.__init__ }}",
    "{{ joiner.__init__.__globals__ }}", "{{ strftime_now.__globals__ }}", "{{ tojson.__code__ }}",
    "{% import 'os' as os %}", "{% from 'os' import system %}", "{% include '/etc/passwd' %}", "{% extends 'x' %}",
    "{{ __import__('os') }}", "{{ config }}", "{{ request }}", "{{ lipsum(10**9) }}",
    "{% for i in range(10**9) %}x{% endfor %}", "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}", "{% for i in range(99999) %}{{ i }}{% endfor %}",
    "{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}", "{{ [1] * 10**10 }}", "{{ 9 ** (9 ** 9) }}", "{{ 10**100000 }}", "{{ (2**64)**(2**64) }}",
    "{{ '%0999999999d' % 1 }}", "{{ '%*d' % (10**9, 1) }}", "{{ '{:>999999999}'.format(1) }}",
    "{{ '{0:{1}}'.format(1, 10**9) }}", "{{ 'x'.ljust(10**10) }}", "{{ 'x'.center(10**9) }}", "{{ 'x'.zfill(10**9) }}",
    "{{ '\t'.expandtabs(10**9) }}", "{{ 'x'|center(10**9) }}", "{{ 'x\ny'|indent(10**9) }}",
    "{{ ('x' * 4000)|replace('x', 'y' * 4000)|replace('y', 'z' * 4000) }}",
    "{{ (['x' * 30000] * 30000)|join }}", "{{ messages|tojson(indent=10**9) }}",
    "{{ range(10)|batch(10**9, 'x')|list }}", "{{ '%s' % ([('x' * 100000)] * 100000) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('x', 64) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(n=2) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "{% for x in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{{ 1/0 }}", "{{ strftime_now(1) }}", "{{ strftime_now('%Q') }}", "{{ raise_exception('nope') }}",
    "{{ 'é'.encode('ascii') }}", "{{ messages[0].content|int(10**10) }}", "{{ {}|dictsort(by='x') }}",
    "{{ messages|sort(attribute='nope.nope') }}", "{{ 'x'|float + [] }}", "{{ messages.append(1) }}",
    "{{ messages[0].update({'a': 1}) }}", "{% set x = messages.pop() %}", "{{ dict(a=1).clear() }}",
    "{% for %}", "{{", "{% endfor %}", "{{ ((((((((((1)))))))))) }}", "{{ " + "(" * 500 + "1" + ")" * 500 + " }}",
    "{{ " + "[" * 2000 + "]" * 2000 + " }}", "{{ \"\\ud800\" }}", "{{ messages|map(attribute='content')|join }}",
]


class ChatTemplateTarget(Target):
    """apply_chat_template in the sandbox: attacks spliced into real templates, text mutations."""

    name = "chat_template"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        from edge_ds.tokenizer import Tokenizer

        tiny_tokenizer_json(self.dir / "tokenizer.json")
        (self.dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        self.tok = Tokenizer.load(self.dir)
        self.seeds = [CHAT_TEMPLATE, KIMI_TEMPLATE, "{{ messages[0]['content'] }}"]

    def make(self, mut: Mutator) -> None:
        rng = mut.rng
        t = mut.pick(self.seeds)
        for _ in range(rng.randint(1, 3)):
            i, j = sorted((rng.randint(0, len(t)), rng.randint(0, len(t))))
            op = rng.randrange(4)
            if op <= 1:
                t = t[:i] + mut.pick(ATTACKS) + t[i:]
            elif op == 2:
                t = t[:i] + t[j:]
            else:
                t = t[:i] + t[i:j] * rng.randint(2, 3) + t[j:]
        self.input = t

    def parse(self) -> None:
        self.tok.chat_template, self.tok._compiled = self.input, None
        out = self.tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
        assert isinstance(out, str)

    def named(self, e: Exception) -> bool:
        return str(e).startswith("chat template") or "no chat template" in str(e)  # the latter: emptied


def _json_values(mut: Mutator, depth: int = 0) -> Any:
    """Any JSON value, favouring the request schema's field names."""
    from edge_ds.openai_schema import CHAT_FIELDS, COMPLETION_FIELDS

    rng = mut.rng
    r = rng.random()
    if depth > 3 or r < 0.4:
        return mut.new_value()
    if r < 0.7:
        names = sorted(CHAT_FIELDS | COMPLETION_FIELDS | {"role", "content", "type", "text", "include_usage"})
        return {mut.pick(names) if rng.random() < 0.8 else mut.pick(["", "x", "\ud800"]): _json_values(mut, depth + 1)
                for _ in range(rng.randint(0, 4))}
    return [_json_values(mut, depth + 1) for _ in range(rng.randint(0, 4))]


class SchemaTarget(Target):
    """The OpenAI request schema, as the server runs it on a request body, and each parser alone."""

    name = "schema"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        from edge_ds import openai_schema

        self.error = openai_schema.RequestError
        self.seeds = [
            {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
             "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "stream": True,
             "stream_options": {"include_usage": True}, "seed": 3, "top_k": 5, "min_p": 0.1,
             "repetition_penalty": 1.1, "n": 1, "tool_choice": "none", "response_format": {"type": "text"}},
            {"model": "m", "prompt": "once upon", "max_completion_tokens": 4, "echo": False, "best_of": 1,
             "stop": "x", "logprobs": None},
            {"prompt": [[1, 2, 3]], "presence_penalty": 0, "frequency_penalty": 0.0},
        ]

    def make(self, mut: Mutator) -> None:
        r = mut.rng.random()
        if r < 0.5:
            body = mut.dumps(mut.value(mut.pick(self.seeds), ["messages", "prompt", "role", "content", "type",
                                                              "text", "include_usage", "max_tokens", "stop"]))
            raw = body.encode("utf-8", "surrogatepass")
        elif r < 0.7:
            raw = mut.text(mut.dumps(mut.pick(self.seeds)))
        else:
            raw = mut.dumps(_json_values(mut)).encode("utf-8", "surrogatepass")
        self.input = raw

    def parse(self) -> None:
        from edge_ds import openai_schema as s

        try:
            value = json.loads(self.input)
        except (ValueError, RecursionError):
            value = None
        # Each parser on its own, with whatever JSON value came out (a body, or any part of one).
        for call in (lambda: s.parse_messages(value), lambda: s.parse_prompt(value, 160),
                     lambda: s.parse_options(value), lambda: s.parse_stream(value),
                     lambda: s.check_fields(value, True), lambda: s.check_fields(value, False),
                     lambda: s.check_prompt_size(value, 100, 10, "prompt")):
            try:
                call()
            except s.RequestError as e:
                assert self.named(e), e
        # Then the whole request, as the server does.
        body = s.parse_body(self.input)
        chat = "messages" in body
        s.check_fields(body, chat)
        prompt = s.parse_messages(body.get("messages")) if chat else s.parse_prompt(body.get("prompt"), 160)
        s.check_prompt_size(prompt, 1000, 100, "messages" if chat else "prompt")
        s.parse_options(body)
        s.parse_stream(body)

    def named(self, e: Exception) -> bool:
        root = (e.param or "").split("[")[0].split(".")[0]
        return bool(e.message) and root in e.message


class TraceTarget(Target):
    """load_trace on routing traces (lines cut, edited, dropped), then the replay that reads them."""

    name = "trace"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        from edge_ds.experts.trace import TraceRecorder

        self.path = self.dir / "routing.jsonl"
        rec = TraceRecorder(self.path, dict(model="m", layers=[1, 2], num_experts=8, top_k=2, expert_bytes=1024))
        rng = np.random.default_rng(0)
        for t in range(6):
            for layer in (1, 2):
                tokens = 1 if t else 3
                hints = {2: rng.integers(0, 8, (tokens, 2))} if layer == 1 else None
                rec.record(layer, t, rng.integers(0, 8, (tokens, 2)), prefill=t == 0, hints=hints)
        rec.close()
        self.seed = self.path.read_bytes()
        self.lines = self.seed.decode().splitlines()

    def make(self, mut: Mutator) -> None:
        rng = mut.rng
        r = rng.random()
        lines = list(self.lines)
        if r < 0.4:  # one record (or the header) edited as JSON
            k = rng.randrange(len(lines))
            lines[k] = mut.json_file(json.loads(lines[k]), ["t", "layer", "prefill", "experts", "hints", "layers",
                                                           "num_experts", "top_k", "expert_bytes",
                                                           "edge_ds_trace"]).decode("utf-8", "surrogateescape")
            data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
        elif r < 0.6:  # lines dropped, repeated, swapped, blank
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(lines))
                mut.pick([lambda: lines.pop(k), lambda: lines.insert(k, lines[k]), lambda: lines.insert(k, ""),
                          lambda: lines.insert(k, mut.pick(lines))])()
            data = ("\n".join(lines) + mut.pick(["\n", "", "\r\n"])).encode()
        else:  # cut mid-line (a killed writer), or bytes
            ends = [m.end() for m in re.finditer(b"\n", self.seed)]
            data = self.seed[:rng.randint(0, len(self.seed))] if r < 0.8 else mut.bytes(self.seed, ends)
        self.path.write_bytes(data)
        self.input = data

    def parse(self) -> None:
        from edge_ds.experts.replay import replay
        from edge_ds.experts.trace import load_trace

        tr = load_trace(self.path)
        (tr.expert_bytes, tr.routed_bytes)
        for budget in ("100%", "30%"):
            try:
                replay(tr, budget, policies=("lru", "hybrid", "belady"), prefill=True)
            except EdgeDSError as e:
                assert "budget" in str(e), e  # a budget too small for a step is the replay's own refusal


class PromptCacheTarget(Target):
    """PromptCache.load of a saved cache: its header, metadata (tokens, format) and arrays."""

    name = "prompt_cache"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        import mlx.core as mx

        from edge_ds.cache import PromptCache

        self.path = self.dir / "p.safetensors"
        cache = PromptCache(3)
        for c in cache.layers:
            c.update_and_fetch(mx.random.normal((1, 1, 5, 8)))
        cache.tokens = [5, 1, 4, 1, 5]
        cache.save(self.path, "fp-1")
        self.seed = self.path.read_bytes()
        n = struct.unpack("<Q", self.seed[:8])[0]
        self.header = json.loads(self.seed[8:8 + n])
        self.data = self.seed[8 + n:]

    def make(self, mut: Mutator) -> None:
        rng = mut.rng
        r = rng.random()
        if r < 0.3:
            blob = mut.bytes(self.seed, [0, 8, len(self.seed) - len(self.data), len(self.seed)])
        else:
            header = json.loads(json.dumps(self.header))
            meta = header["__metadata__"]
            if r < 0.6:  # the metadata's own values, tokens being JSON text inside a string
                key = mut.pick(["format", "num_layers", "tokens", "model"])
                if key == "tokens" and rng.random() < 0.6:
                    meta[key] = mut.json_file(json.loads(meta[key])).decode("utf-8", "surrogateescape")
                else:
                    meta[key] = mut.pick(["", "3", "-1", "1e9", "3.0", " 3", "99999999999999999999", "abc", "[1]",
                                          "NaN", str(2**63), "edge-ds-prompt-cache-v1", "fp-2"])
            elif r < 0.8:
                layer = header[mut.pick([k for k in header if k.startswith("layer.")])]
                if rng.random() < 0.5:
                    layer["shape"] = mut.pick([[5, 8], [1, 5, 8], [1, 1, 5, 8, 1], [2, 1, 5, 4], [1, 2, 5, 4],
                                               [1, 1, 10, 4], [1, 1, 40, 1], [1, 1, 0, 8], [0, 1, 5, 0]])
                else:
                    layer["dtype"] = mut.pick(["F16", "I32", "U8", "BOOL", "F8_E4M3", "BF16", "F64", "I64"])
                nbytes = math.prod(layer["shape"]) * _DTYPES[layer["dtype"]].itemsize
                layer["data_offsets"] = [layer["data_offsets"][0], layer["data_offsets"][0] + nbytes]
                if rng.random() < 0.5:  # and the other tensors moved along, to stay consistent
                    _repack(header)
            else:
                header = mut.value(header, ["format", "num_layers", "tokens", "model", "layer.0", "layer.3"])
            text = mut.dumps(header).encode("utf-8", "surrogatepass")
            blob = struct.pack("<Q", len(text)) + text + self.data
        self.path.write_bytes(blob)
        self.input = blob

    def parse(self) -> None:
        from edge_ds.cache import PromptCache

        cache = PromptCache.load(self.path, 3, "fp-1")
        assert all(c.offset == len(cache.tokens) for c in cache.layers)


def _repack(header: dict) -> None:
    """Data offsets laid end to end again after a shape or dtype change (the data may now be short)."""
    offset = 0
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            span = entry["data_offsets"][1] - entry["data_offsets"][0]
            entry["data_offsets"] = [offset, offset + span]
            offset += span


TARGETS: dict[str, type[Target]] = {t.name: t for t in (
    SafetensorsTarget, IndexTarget, ConfigTarget, TokenizerTarget, ChatTemplateTarget, SchemaTarget, TraceTarget,
    PromptCacheTarget)}


# --- the runner ---------------------------------------------------------------------------------

class _Hang(BaseException):
    """Raised by the alarm in a case that runs past CASE_SECONDS (BaseException: no parser catches it)."""


@dataclass
class Report:
    parser: str
    cases: int = 0
    accepted: int = 0
    rejected: int = 0  # ended in the library's own error, naming the file or field
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    slowest: float = 0.0
    peak_rss_mb: float = 0.0


def _case_rng(seed: int, parser: str, case: int) -> random.Random:
    return random.Random(f"{seed}/{parser}/{case}")


def run(target: Target, cases: int | range, seed: int = 0, on_failure: Callable[[Failure], None] | None = None,
        max_failures: int = 20, on_case: Callable[[int, str, float], None] | None = None) -> Report:
    """Runs `cases` (a count, or a range of case numbers) against one parser, in this process.
    on_case(number, "accepted" | "rejected" | "failures", seconds) follows each case."""
    import edge_ds.tokenizer as tk

    report = Report(target.name)
    numbers = range(cases) if isinstance(cases, int) else cases
    start = time.perf_counter()

    def alarm(*_: Any) -> None:
        raise _Hang()

    old_handler = signal.signal(signal.SIGALRM, alarm)
    old_seconds, tk.TEMPLATE_SECONDS = getattr(tk, "TEMPLATE_SECONDS", None), TEMPLATE_SECONDS
    try:
        for i in numbers:
            target.make(Mutator(_case_rng(seed, target.name, i)))
            t0 = time.perf_counter()
            failure, outcome_ok = None, False
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                target.parse()
                report.accepted += 1
                outcome_ok = True
            except _Hang:
                failure = Failure(target.name, i, "hang", f"over {CASE_SECONDS} s; input {target.show()}", 0)
            except target.error as e:
                if target.named(e):
                    report.rejected += 1
                else:
                    failure = Failure(target.name, i, "message", f"{e!r} does not name the file or field; "
                                                                 f"input {target.show()}", 0)
            except Exception as e:  # noqa: BLE001 - any other exception is what this looks for
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]).strip()
                failure = Failure(target.name, i, "crash", f"{type(e).__name__}: {e}\n{tb}\ninput {target.show()}", 0)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.perf_counter() - t0
            report.slowest = max(report.slowest, dt)
            report.cases += 1
            if failure is not None:
                failure.seconds = dt
                report.failures.append(failure)
                if on_failure:
                    on_failure(failure)
            if on_case:
                on_case(i, "failures" if failure else "accepted" if outcome_ok else "rejected", dt)
            if len(report.failures) >= max_failures:
                break
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_seconds is not None:
            tk.TEMPLATE_SECONDS = old_seconds
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def supervise(name: str, cases: int, seed: int, watchdog: float, workdir: Path) -> Report:
    """Runs one parser's cases in a child process, restarted after a case that never ends where
    the alarm cannot reach it (native code) or that kills the process: that case is a failure."""
    report = Report(name)
    start, todo = time.perf_counter(), 0
    while todo < cases:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--only", name, "--seed", str(seed),
                                 "--start", str(todo), "--cases", str(cases), "--workdir", str(workdir)],
                                stdout=subprocess.PIPE)
        buf, fd, ready = b"", proc.stdout.fileno(), False
        while True:
            if not select.select([fd], [], [], watchdog if ready else max(watchdog, 300))[0]:  # start-up: imports
                proc.kill()
                proc.wait()
                failure = Failure(name, todo, "hang", f"no end after {watchdog:g} s, in native code (the alarm "
                                                      f"cannot stop it); replay with --case {todo}", watchdog)
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                failure = None if proc.wait() == 0 else Failure(
                    name, todo, "crash", f"the process died (exit {proc.returncode}); replay with --case {todo}", 0)
                todo = cases if failure is None else todo
                break
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                kind, _, rest = line.decode().partition(" ")
                ready = True
                if kind == "R":
                    continue
                if kind == "F":
                    report.failures.append(Failure(**json.loads(rest)))
                    print(report.failures[-1], file=sys.stderr, flush=True)
                    continue
                i, outcome, seconds = rest.split()
                if outcome != "failures":  # those came on their "F" line
                    setattr(report, outcome, getattr(report, outcome) + 1)
                report.cases, report.slowest, todo = report.cases + 1, max(report.slowest, float(seconds)), int(i) + 1
        proc.stdout.close()
        if failure is not None:
            report.failures.append(failure)
            print(failure, file=sys.stderr, flush=True)
            report.cases, todo = report.cases + 1, todo + 1
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=100_000, help="cases per parser (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help=f"comma-separated parsers: {', '.join(TARGETS)}")
    p.add_argument("--case", type=int, default=None, help="replay this one case (and print its input)")
    p.add_argument("--watchdog", type=float, default=60.0, help="seconds without a result before a case is a hang")
    p.add_argument("--json", default=None, help="also write the reports here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # supervise()'s worker
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # the parent's: a killed child leaves files
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown parser {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if args.child or args.case is not None:
        with tempfile.TemporaryDirectory(prefix="edge-ds-fuzz-") as tmp:
            target = TARGETS[names[0]](Path(args.workdir or tmp))
            if args.child:
                print("R", flush=True)  # set up: from now on the watchdog counts
            if args.case is not None:
                r = run(target, range(args.case, args.case + 1), args.seed,
                        on_failure=lambda f: print(f, file=sys.stderr, flush=True))
                print(f"input: {target.input!r}"[:4000])
                return 1 if r.failures else 0
            run(target, range(args.start, args.cases), args.seed, max_failures=10**9,
                on_failure=lambda f: print("F", json.dumps(f.__dict__), flush=True),
                on_case=lambda i, outcome, dt: print(f"C {i} {outcome} {dt:.4f}", flush=True))
        return 0
    reports = []
    with tempfile.TemporaryDirectory(prefix="edge-ds-fuzz-") as tmp:
        for name in names:
            r = supervise(name, args.cases, args.seed, args.watchdog, Path(tmp))
            reports.append(r)
            print(f"{name:14s} {r.cases:8d} cases  {r.accepted:7d} accepted  {r.rejected:8d} rejected  "
                  f"{len(r.failures):4d} failures  {r.seconds:7.1f} s  slowest {r.slowest * 1000:6.0f} ms  "
                  f"peak RSS {r.peak_rss_mb:6.0f} MB", flush=True)
    total = sum(len(r.failures) for r in reports)
    print(f"{sum(r.cases for r in reports)} cases, {total} failures")
    if args.json:
        Path(args.json).write_text(json.dumps([{**r.__dict__, "failures": [str(f) for f in r.failures]}
                                               for r in reports], indent=2))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
