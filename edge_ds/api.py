"""The Python API: load a model once, then get logits, generate or stream text, or chat."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .arrays import library
from .backend import Backend, ExpertOptions
from .backends import choose, open_backend
from .config import ModelConfig
from .errors import ContextLengthError, EdgeDSError, OptionError
from .generate import GenerationStats, TokenLogprob, generate_tokens, stop_string_hold
from .options import SamplingOptions, is_int, require
from .resources import default_model_path
from .sampling import Sampler, make_sampler, seed as set_seed
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .cache import PromptCache

Prompt = str | list[dict] | list[int]


class _ThreadStreams:
    """Held in a thread-local; destroyed on its own thread as that thread ends, where it frees
    the thread's MLX streams. MLX aborts the whole process at exit ("terminate called without
    an active exception") if a thread that ran MLX work ended without mx.clear_streams()."""

    def __del__(self) -> None:
        try:
            sys.modules["mlx.core"].clear_streams()
        except Exception:
            pass


_thread_state = threading.local()


def _on_mlx_thread() -> None:
    """Called before model work: a worker thread (a desktop app's, a server's) cleans up after itself
    (where MLX is in use at all: a process without it has no streams to free)."""
    if ("mlx.core" in sys.modules and threading.current_thread() is not threading.main_thread()
            and not hasattr(_thread_state, "streams")):
        _thread_state.streams = _ThreadStreams()


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # with generate(..., logprobs=k): one per token of text


class TextStream:
    """Iterates text chunks as they are generated; `.stats` and `.text` are complete at the end.

    cancel() may be called from any thread (a UI's Stop button): the generating thread stops
    before its next token and the stream ends with finish_reason "cancelled".

    With stream(..., logprobs=k), `.logprobs` holds a TokenLogprob for each token of the text
    returned (`.offset`: where its text starts in `.text`), growing as the stream runs; a token
    that a stop string cut off entirely is left out."""

    def __init__(self, chunks: Iterator[str], stats: GenerationStats):
        self._chunks = chunks
        self.stats = stats
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            self.text += chunk
            yield chunk


def load(path: str | Path | None = None, backend: str | None = None, expert_budget: int | str | None = None, *,
         expert_policy: str = "hybrid", prefetch: bool = False, expert_page_cache: bool = True,
         trace: str | Path | None = None, parallel: str | None = None, **backend_options) -> "LanguageModel":
    """Loads a model directory (or the shipped default model when path is None).

    expert_budget (bytes, "2GB", "512MiB" or "25%" of the routed-expert bytes) keeps the trunk
    resident and reads routed experts on demand into a cache of at most that many bytes; results
    are bit-identical to the fully resident model. expert_page_cache=False keeps expert reads out
    of the OS page cache too (F_NOCACHE on macOS, dropped pages on Linux), so the budget bounds
    all memory the experts take; by default the page cache keeps recently read experts warm.
    On Apple Silicon the weights in memory (trunk and expert slots) are wired. `trace` records
    routing to a JSONL file (implies lazy experts, with the whole model as budget when none is
    given).
    backend: a name from backends.names() ("mlx", "onnx": a directory written by
    `edge-ds export-onnx`, "torch": a Hugging Face checkpoint), or None for
    backends.default_backend(directory). backend_options go to that backend's load() (torch:
    device="cuda"|"cpu", gemm="bf16"|"fp8", dtype="bfloat16"|"float32").
    """
    directory = Path(path).expanduser() if path is not None else default_model_path()
    if not directory.is_dir():
        raise EdgeDSError(f"{directory}: no such model directory")
    experts = None
    if expert_budget is not None or trace is not None:
        experts = ExpertOptions("100%" if expert_budget is None else expert_budget, expert_policy, prefetch,
                                expert_page_cache, trace)
    if parallel is not None:
        if backend not in (None, "mlx"):
            raise OptionError("backend", f"{{option}} {backend!r}: --parallel runs on the mlx backend")
        from .parallel import open_parallel

        driver = open_parallel(directory, parallel, experts)
        if driver is not None:
            lm = LanguageModel(driver, Tokenizer.load(directory), directory)
            lm.backend_reason = f"parallel={parallel} over {driver.link.size} ranks"
            return lm
    name, why = choose(backend, directory, experts)
    lm = LanguageModel(open_backend(name, directory, experts, **backend_options), Tokenizer.load(directory), directory)
    lm.backend_reason = why
    return lm


class LanguageModel:
    """A loaded model (on one backend) and its tokenizer."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, path: Path):
        self.backend = backend
        self.backend_reason = ""  # why load() picked this backend
        self.tokenizer = tokenizer
        self.path = path
        self.config: ModelConfig = backend.config

    @property
    def experts(self):
        """The lazy expert cache (experts.ExpertCache), or None when every expert is resident."""
        return self.backend.experts

    def expert_stats(self) -> dict:
        """Hits, misses, hit rate per layer, bytes read per decoded token, read GB/s, resident
        expert bytes (see experts/stats.py). Only for models loaded with an expert budget."""
        if self.experts is None:
            raise EdgeDSError("expert_stats: this model was loaded without expert_budget (all experts resident)")
        return self.experts.stats_dict()

    @property
    def fingerprint(self) -> str:
        """Identifies the weights a prompt cache was made with."""
        cfg = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(f"{self.path.resolve()}|{cfg}".encode()).hexdigest()[:16]

    def new_cache(self) -> PromptCache:
        return self.backend.make_cache()

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full forward with no cache: token ids [batch, seq] -> float32 logits [batch, seq, vocab]."""
        _on_mlx_thread()
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise EdgeDSError(f"token_ids must be integers shaped [batch, seq], got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise EdgeDSError(f"token_ids must be in [0, {self.config.vocab_size})")
        xp = library(self.backend)
        out = self.backend(xp.array(tokens.astype(np.int32)))
        return np.array(out.astype(xp.float32))

    def check_ids(self, ids: list[int]) -> list[int]:
        """ids, unless one is outside the model's vocabulary: the model would read past its
        embedding (a tokenizer of another model in the directory)."""
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise EdgeDSError(f"{self.path}: token id {bad} is outside the model's vocabulary "
                              f"(vocab_size {self.config.vocab_size}); is the tokenizer this model's?")
        return ids

    def encode_prompt(self, prompt: Prompt, chat_template: bool | None = None,
                      tools: list[dict] | None = None) -> list[int]:
        """Token ids for a prompt: ids as given; messages through the chat template; a string
        through the chat template when the model has one (unless chat_template=False). `tools`
        (OpenAI tool definitions) go to the chat template's `tools` variable."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt, **({"tools": tools} if tools else {}))
        if not isinstance(prompt, str):
            raise EdgeDSError("prompt must be a string, a list of messages or a list of token ids")
        use_template = self.tokenizer.has_chat_template if chat_template is None else chat_template
        if use_template:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(self, prompt: Prompt, *, max_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, repetition_penalty: float | None = None,
               seed: int | None = None, stop: Sequence[str] = (), chat_template: bool | None = None,
               cache: PromptCache | None = None, logprobs: int | None = None,
               keep_special: Sequence[str] = ()) -> TextStream:
        """Generates text chunk by chunk (max_tokens None: up to the end of the context window).
        Pass a PromptCache to reuse it across calls. logprobs=k (0 or more) records each token's
        log-probability and the k most likely alternatives in `stream.logprobs` (TokenLogprob).
        keep_special: special tokens to keep in the text (tool-call markers); others are dropped."""
        opts = SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        if logprobs is not None:
            require("logprobs", is_int(logprobs) and 0 <= logprobs <= self.config.vocab_size,
                    f"None or an integer in [0, {self.config.vocab_size}]", logprobs)
        sampler = make_sampler(opts.temperature, opts.top_p, opts.top_k, opts.min_p)
        set_seed(opts.seed)
        ids = self.check_ids(self.encode_prompt(prompt, chat_template))
        if opts.max_tokens is None:
            # At least 1, so that a full window is reported like any other over-long prompt.
            opts = replace(opts, max_tokens=max(1, self.config.max_position_embeddings - len(ids)))
        cache = cache if cache is not None else self.new_cache()
        stats = GenerationStats()
        stream = TextStream(iter(()), stats)
        stream._chunks = self._chunks(ids, cache, sampler, opts, stats, stream.tokens, stream._cancel,
                                      logprobs, stream.logprobs, frozenset(keep_special))
        return stream

    def generate(self, prompt: Prompt, **options) -> Generation:
        """Generates text to completion; same options as stream()."""
        s = self.stream(prompt, **options)
        for _ in s:
            pass
        return Generation(s.text, s.tokens, s.stats, s.logprobs if options.get("logprobs") is not None else None)

    def chat(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)

    def _chunks(self, ids: list[int], cache: PromptCache, sampler: Sampler, opts: SamplingOptions,
                stats: GenerationStats, tokens_out: list[int], cancel: threading.Event,
                logprobs: int | None = None, logprobs_out: list[TokenLogprob] | None = None,
                keep_special: frozenset[str] = frozenset(),
                source: Callable[[list], Iterator[int]] | None = None) -> Iterator[str]:
        """The text of a generation. source(raw): where the token ids come from when not from
        generate_tokens here (the server's batch engine), appending each token's logprob entry to raw."""
        if source is None:  # this thread runs the model
            _on_mlx_thread()
        tok = self.tokenizer
        detok = tok.detokenizer(skip_special=not keep_special)
        eos = set(self.tokenizer.eos_ids)
        stops = list(opts.stop)
        pending = ""  # text held back because it might begin a stop string
        produced = 0  # characters decoded so far (returned or pending): where the next token's text starts
        raw: list[TokenLogprob] = []  # generate_tokens' entries, EOS included
        stats.finish_reason = "length"
        try:
            tokens = source(raw) if source is not None else generate_tokens(
                self.backend, ids, cache, sampler, opts.max_tokens, stats, opts.repetition_penalty,
                opts.repetition_context_size, logprobs=logprobs, logprobs_out=raw if logprobs is not None else None)
            for t in tokens:
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if t in eos:
                    stats.finish_reason = "stop"
                    break
                tokens_out.append(t)
                # With keep_special the detokenizer keeps special tokens; those not asked for are dropped here.
                dropped = bool(keep_special) and tok.is_special(t) and tok.decode([t], False) not in keep_special
                piece = "" if dropped else detok.add(t)
                if logprobs_out is not None and raw:
                    raw[-1].offset = produced
                    logprobs_out.append(raw[-1])
                produced += len(piece)
                pending += piece
                if stops:
                    hit = min((pending.find(s) for s in stops if s in pending), default=-1)
                    if hit >= 0:
                        stats.finish_reason = "stop"
                        cut = produced - len(pending) + hit  # the returned text ends here
                        if logprobs_out:  # tokens wholly inside the stop string are not in the text
                            logprobs_out[:] = [e for e in logprobs_out if e.offset < cut]
                        pending = pending[:hit]
                        break
                    hold = stop_string_hold(pending, stops)
                    out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                else:
                    out, pending = pending, ""
                if out:
                    yield out
            else:
                pending += detok.finish()
        except KeyboardInterrupt:
            stats.finish_reason = "interrupted"
            raise
        finally:
            if pending and stats.finish_reason not in ("interrupted", "cancelled"):
                if stops:
                    hit = min((pending.find(s) for s in stops if s in pending), default=-1)
                    pending = pending if hit < 0 else pending[:hit]
        if pending and not cancel.is_set():
            yield pending


class ChatSession:
    """A multi-turn conversation; each turn prefills only what the cache does not hold yet.

    When the conversation outgrows the context window (leaving room for max_tokens), the oldest
    turns are dropped and the system prompt kept, as llama.cpp and Ollama do; `dropped_turns`
    counts the user turns dropped so far."""

    def __init__(self, lm: LanguageModel, system: str | None = None):
        self.lm = lm
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.lm.new_cache()
        self.dropped_turns = 0

    def send(self, text: str, **options) -> TextStream:
        """Streams the assistant's reply to `text`; the reply joins the history when the stream ends.
        A message that does not fit the context even alone raises ContextLengthError and leaves the
        history as it was."""
        max_tokens = options.get("max_tokens", 256)
        messages = self._fit(self.messages + [{"role": "user", "content": text}],
                             self.lm.config.max_position_embeddings - (max_tokens or 1))
        stream = self.lm.stream(list(messages), cache=self.cache, **options)
        self.messages = messages
        inner = stream._chunks

        def record() -> Iterator[str]:
            try:
                yield from inner
            finally:
                self.messages.append({"role": "assistant", "content": stream.text})

        stream._chunks = record()
        return stream

    def _fit(self, messages: list[dict], room: int) -> list[dict]:
        """`messages` without their oldest turns, so that the prompt takes at most `room` tokens."""
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(head):]
        dropped = 0
        while len(self.lm.encode_prompt(head + turns)) > room:
            if len(turns) == 1:
                n = len(self.lm.encode_prompt(head + turns))
                raise ContextLengthError(f"the message ({n} prompt tokens with the system prompt) + max_tokens does not "
                                         f"fit the context window ({self.lm.config.max_position_embeddings} tokens) "
                                         "even without earlier turns")
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # a history starts with a user turn
                turns = turns[1:]
            dropped += 1
        self.dropped_turns += dropped
        return head + turns
