"""The torch backend: Hugging Face checkpoints (BF16/F32, or FP8 + `weight_scale_inv`) computed the
way DeepSeek's datacenter serving computes them, on CUDA or (emulated exactly) on the CPU.

The model is transformers' own DeepseekV2/V3/V32ForCausalLM built from config.json (no remote
code), with weights read by edge-ds's checkpoint reader (shards, scales in another shard, ragged
128x128 blocks by the fixed rule: transformers' own FP8 loading infers the block from the shape
and gets ragged blocks wrong). With gemm="fp8" every linear whose checkpoint weight is e4m3 is
replaced by datacenter.FP8Linear (routed experts by FP8Experts), except kv_b_proj, which DeepSeek
dequantizes for its absorbed attention; router, norms, embeddings and head stay as stored.
gemm="bf16" (DeepSeek's own default, `gemm_impl = "bf16"`) dequantizes every FP8 weight.

Light on purpose: the backend registry imports this module to call detect(), so torch and
transformers are imported when a model loads, never at import; MLX is never imported (a CUDA
server has none). __call__ answers in the array library it was asked in (torch, numpy, or the
tokens' own array type, e.g. MLX's in edge-ds's generation loop).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelConfig
from ..errors import ContextLengthError, EdgeDSError, OptionError

if TYPE_CHECKING:  # for annotations only
    import torch

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

DEVICES = ("cpu", "cuda")
GEMMS = ("bf16", "fp8")
DTYPES = ("bfloat16", "float32")
# transformers' class names per model_type (kimi_k2 is the V3 architecture).
ARCH = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "kimi_k2": "DeepseekV3", "deepseek_v32": "DeepseekV32",
        "deepseek_v4": "DeepseekV4"}
# FP8 weights DeepSeek dequantizes instead of running through the FP8 GEMM (absorbed MLA).
# V4's grouped o_a_proj (one product per head group) is not a plain linear: dequantized too.
DEQUANTIZED_FP8 = ("kv_b_proj", "o_a_proj")


class _Layer:
    """One layer's view of a TorchCache, for code written against PromptCache's layers."""

    state = None  # nothing for MLX to evaluate

    def __init__(self, cache: "TorchCache"):
        self._cache = cache

    @property
    def offset(self) -> int:
        return self._cache.offset

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes // max(1, len(self._cache.layers))

    def rewind(self, n: int) -> None:  # the cache rewinds as a whole (TorchCache.rewind)
        pass


class TorchCache:
    """PromptCache's interface (tokens, offset, rewind, reuse_prefix, per-layer views) over a
    transformers cache. `ids` [B, T] are the token ids it holds; transformers' cache holds the
    first `held` of them. A rewind crops a plain DynamicCache; other caches (V3.2's indexed one)
    are dropped and the held tokens recomputed on the next call."""

    def __init__(self, num_layers: int):
        self.layers = [_Layer(self) for _ in range(num_layers)]
        self.tokens: list[int] = []  # kept by the generation loop, as in PromptCache
        self.ids = None  # torch.LongTensor [B, T] on the CPU, or None when empty
        self.past: Any = None  # transformers' cache object
        self.held = 0

    @property
    def offset(self) -> int:
        return 0 if self.ids is None else int(self.ids.shape[1])

    def __getitem__(self, i: int) -> _Layer:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __bool__(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.past, "layers", []) or []:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                total += t.numel() * t.element_size() if t is not None and hasattr(t, "numel") else 0
        return total

    def rewind(self, n: int) -> None:
        n = min(n, self.offset)
        if not n:
            return
        keep = self.offset - n
        self.ids = self.ids[:, :keep]
        if n <= len(self.tokens):
            del self.tokens[len(self.tokens) - n:]
        if self.held > keep:
            if type(self.past).__name__ == "DynamicCache" and all(
                    type(layer).__name__ == "DynamicLayer" for layer in self.past.layers):
                self.past.crop(keep - self.held)  # a negative count removes tokens in every transformers 5.x
                self.held = keep
            else:
                self.past, self.held = None, 0

    def reuse_prefix(self, tokens: list[int]) -> int:
        """Rewinds to the longest common prefix with `tokens` and returns its length (at least one
        token is left to prefill), as PromptCache.reuse_prefix."""
        if self.offset != len(self.tokens):
            self.rewind(self.offset)  # interrupted mid-step: nothing in it can be trusted
            self.tokens.clear()
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        self.rewind(len(self.tokens) - common)
        return common

    def save(self, path, model_fingerprint: str = "") -> None:
        raise EdgeDSError("prompt cache files are written by the MLX backend only")


def _no_init():
    """transformers' context that skips random initialisation (its module moved across 5.x)."""
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(module, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def router_fix_needed(cfg: ModelConfig) -> str | None:
    """Why transformers' router would not compute what config.json says (None: it would).
    Its V2 router never renormalises (norm_topk_prob); its V3 router always scores with a
    sigmoid, adds the correction bias and limits groups (scoring_func, topk_method)."""
    if cfg.model_type == "deepseek_v4":  # its routers score in the activation dtype (DeepSeek's gate: float32)
        return "float32 scores" + (", no renormalisation after softmax" if cfg.scoring_func == "softmax" else "")
    if cfg.model_type == "deepseek_v2" and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        return "norm_topk_prob"
    if cfg.model_type != "deepseek_v2" and (cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc"):
        return f"scoring_func {cfg.scoring_func}, topk_method {cfg.topk_method}"
    return None


def _config_router(cfg: ModelConfig, has_bias: bool) -> Any:
    """DeepSeek's gate as config.json describes it, with transformers' router's call:
    hidden [..., H] -> (router logits [N, E], weights [N, k], expert indices [N, k]). Scores in
    float32: softmax or sigmoid; greedy, group_limited_greedy (group score = best expert) or
    noaux_tc (choice = score + correction bias, group score = sum of the top two); unchosen
    groups excluded; weights from the scores, renormalised if norm_topk_prob, times
    routed_scaling_factor (as edge_ds/models/moe.py)."""
    import torch
    from torch import nn

    class ConfigRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
            if has_bias:
                self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

        def forward(self, hidden: torch.Tensor):
            logits = nn.functional.linear(hidden.reshape(-1, cfg.hidden_size).float(), self.weight.float())
            scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
            choice = scores
            if cfg.topk_method == "noaux_tc" and has_bias:
                choice = scores + self.e_score_correction_bias.float()
            if cfg.topk_method != "greedy" and cfg.n_group > 1:
                grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
                group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if cfg.topk_method == "noaux_tc"
                                else grouped.amax(-1))
                keep = torch.zeros_like(group_scores, dtype=torch.bool)
                keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1)[1], True)
                choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, cfg.n_routed_experts)
            indices = choice.topk(cfg.num_experts_per_tok, dim=-1)[1]
            weights = scores.gather(1, indices)
            if cfg.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights * cfg.routed_scaling_factor, indices

    return ConfigRouter()


def _v4_router(cfg: ModelConfig, hashed: bool) -> Any:
    """DeepSeek-V4's gate with the call of transformers' V4 routers: hidden [..., H] (and, for a
    hash layer, input_ids) -> (router logits [N, E], weights [N, k], expert indices [N, k]).
    DeepSeek's V4 Gate (inference/model.py): logits and scores in float32 whatever the activation
    dtype (transformers' routers compute them in the activation dtype): sqrtsoftplus, sigmoid or
    softmax; a top-k layer chooses by score + e_score_correction_bias, a hash layer takes the
    token's row of tid2eid; weights are the chosen scores, over their sum unless the scoring is
    softmax (transformers' routers, and edge_ds/models/deepseek_v4.py's Router, always
    renormalise), times routed_scaling_factor."""
    import torch
    from torch import nn

    class V4Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
            if hashed:
                self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
            else:
                self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

        def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None):
            logits = nn.functional.linear(hidden.reshape(-1, cfg.hidden_size).float(), self.weight.float())
            if cfg.scoring_func == "sqrtsoftplus":
                scores = nn.functional.softplus(logits).sqrt()
            elif cfg.scoring_func == "sigmoid":
                scores = logits.sigmoid()
            else:
                scores = logits.softmax(dim=-1)
            if hashed:
                indices = self.tid2eid[input_ids.reshape(-1)].long()
            else:
                indices = (scores + self.e_score_correction_bias.float()).topk(cfg.num_experts_per_tok, dim=-1)[1]
            weights = scores.gather(1, indices)
            if cfg.scoring_func != "softmax":
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights * cfg.routed_scaling_factor, indices

    return V4Router()


def _hf_config(raw: dict, source: Path) -> Any:
    """transformers' config object for a checkpoint's config.json (no remote code)."""
    import transformers

    arch = ARCH[raw["model_type"]]
    cls = getattr(transformers, f"{arch}Config", None)
    if cls is None:
        raise EdgeDSError(f"{source}: model_type {raw['model_type']} needs a transformers with {arch} "
                          f"(this one is {transformers.__version__})")
    d = {k: v for k, v in raw.items() if k not in ("quantization_config", "quantization", "auto_map", "architectures")}
    d["model_type"] = cls.model_type
    if raw["model_type"] == "deepseek_v4" and d.get("scoring_func") == "softmax":
        # transformers' V4 routers have no softmax (ACT2FN lacks it); edge-ds's gate replaces them
        # and reads scoring_func from config.json itself.
        d["scoring_func"] = "sqrtsoftplus"
    return cls(**d)


class TorchModel:
    """A Hugging Face DeepSeek checkpoint in transformers' modules: __call__(tokens [B, L], cache)
    -> float32 logits [B, L, V] (the last position only while a cache is filled)."""

    name = "torch"
    arrays = "numpy"  # the generation loop and sampling run in numpy: no MLX on a CUDA server (arrays.py)
    experts = None  # every expert is resident

    def __init__(self, directory: str | Path, device: str | None = None, gemm: str = "bf16",
                 dtype: str = "bfloat16", kernel: str = "auto"):
        import torch
        import transformers

        directory = Path(directory)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in DEVICES:
            raise OptionError("device", f"{{option}} must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise OptionError("device", "{option} cuda: this torch sees no CUDA GPU")
        if gemm not in GEMMS:
            raise OptionError("gemm", f"{{option}} must be one of {', '.join(GEMMS)}, got {gemm!r}")
        if dtype not in DTYPES:
            raise OptionError("dtype", f"{{option}} must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = ModelConfig.load(directory)
        raw = self.config.raw
        if raw.get("model_type") not in ARCH:
            raise EdgeDSError(f"{directory / 'config.json'}: model_type {raw.get('model_type')!r} does not run on the "
                              f"torch backend yet (it runs {', '.join(ARCH)})")
        if raw.get("quantization") is not None:
            raise EdgeDSError(f"{directory / 'config.json'}: an MLX conversion ('quantization'); the torch backend "
                              "reads Hugging Face checkpoints (BF16/F32 or FP8), e.g. the source of the conversion")
        qc = raw.get("quantization_config") or {}
        if qc and qc.get("quant_method") != "fp8":
            raise EdgeDSError(f"{directory / 'config.json'}: quantization_config.quant_method "
                              f"{qc.get('quant_method')!r} is not supported (fp8 with 128x128 blocks is)")
        if qc and list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
            raise EdgeDSError(f"{directory / 'config.json'}: quantization_config.weight_block_size "
                              f"{qc.get('weight_block_size')} is not supported (DeepSeek's is [128, 128])")
        self.scale_fmt = qc.get("scale_fmt")
        self.device_name, self.gemm, self.kernel = device, gemm, kernel
        self.dtype = getattr(torch, dtype)
        self.path = directory

        self.v4 = raw["model_type"] == "deepseek_v4"
        if self.v4:
            _refuse_official_v4(directory)
        hf_cfg = _hf_config(raw, directory / "config.json")
        # eager is the attention transformers' parity tests use; SDPA on the GPU (V4: eager only,
        # transformers' SDPA path has no attention sinks).
        hf_cfg._attn_implementation = "sdpa" if device == "cuda" and not self.v4 else "eager"
        cls = getattr(transformers, f"{ARCH[raw['model_type']]}ForCausalLM")
        # Kept in float32 whatever the activation dtype, as transformers' bf16 loading keeps them
        # (V4: hyper-connections, sinks, pooling biases, norms; V3: the correction bias).
        self._float32_modules = tuple(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(self.dtype)
            with _no_init(), torch.device(device):
                model = cls(hf_cfg)
        finally:
            torch.set_default_dtype(previous)
        # Where transformers' router ignores a config field, DeepSeek's gate as the config says.
        self.router_fix = router_fix_needed(self.config)
        if self.router_fix:
            for name, module in list(model.named_modules()):
                if name.endswith(".mlp.gate") and hasattr(module, "weight"):
                    with torch.device(device):
                        router = (_v4_router(self.config, hasattr(module, "tid2eid")) if self.v4 else
                                  _config_router(self.config, hasattr(module, "e_score_correction_bias")))
                    self._swap(model, name, router)
        self.fp8_layers = self._load_weights(model, directory, torch.device(device))
        self.model = model.eval()
        self.device = self._describe()

    # --- loading -----------------------------------------------------------------------------
    def _load_weights(self, model: Any, directory: Path, device: "torch.device") -> int:
        """Reads every tensor the transformers model has from the checkpoint; returns how many
        modules were replaced by FP8 ones."""
        import torch
        from torch import nn

        from ..datacenter import FP8Experts, FP8Linear, weight_dequant
        from ..datacenter.io import TorchCheckpoint

        ckpt = TorchCheckpoint(directory)
        # Names and shapes only: each tensor replaces its empty placeholder as it is read, so
        # loading holds the model once, not twice.
        state = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        integer = {k for k, v in state.items() if not v.is_floating_point()}  # V4's tid2eid
        del state
        fp8 = self.gemm == "fp8"
        replaced: set[str] = set()  # module paths swapped for FP8 modules
        loaded: set[str] = set()

        read = ckpt.read

        def weight(name: str, dtype: torch.dtype) -> torch.Tensor:
            """A float weight, FP8 ones dequantized by the fixed 128 rule."""
            t = read(name)
            if not t.is_floating_point():
                raise EdgeDSError(f"{directory}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, not a float "
                                  "weight (packed FP4 experts, as in DeepSeek-V4's release, are not supported on "
                                  "torch: use a BF16 or FP8 checkpoint)")
            if t.dtype == torch.float8_e4m3fn:
                return weight_dequant(t, read(name + "_scale_inv"), torch.float32, name).to(dtype)
            return t.to(dtype)

        def fp8_linear(name: str) -> FP8Linear:
            return FP8Linear(read(name).to(device), read(name + "_scale_inv").to(device), scale_fmt=self.scale_fmt,
                             kernel=self.kernel, name=name)

        for key, target in shapes.items():
            path, _, leaf = key.rpartition(".")
            if any(key.startswith(p + ".") for p in replaced):
                continue
            if path.endswith(".mlp.experts") and leaf in ("gate_up_proj", "down_proj") and f"{key}" not in ckpt:
                prefix = f"{path}."
                E = target[0]
                names = [[f"{prefix}{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")] for e in range(E)]
                if fp8 and ckpt.is_fp8(names[0][0]):
                    module = model.get_submodule(path)
                    experts = [tuple(fp8_linear(n) for n in trio) for trio in names]
                    # V4's swiglu_limit clamps gate and up (transformers' V4 experts' `limit`)
                    self._swap(model, path, FP8Experts(experts, module.act_fn, getattr(module, "limit", None)))
                    replaced.add(path)
                    continue
                if leaf == "gate_up_proj":
                    t = torch.stack([torch.cat([weight(g, self.dtype), weight(u, self.dtype)]) for g, u, _ in names])
                else:
                    t = torch.stack([weight(d, self.dtype) for _, _, d in names])
            else:
                module = model.get_submodule(path) if path else model
                is_fp8_weight = ckpt.is_fp8(key)
                if (fp8 and is_fp8_weight and leaf == "weight" and type(module) is nn.Linear
                        and not path.endswith(DEQUANTIZED_FP8)):
                    self._swap(model, path, fp8_linear(key))
                    replaced.add(path)
                    continue
                if key not in ckpt and leaf == "weight" and path == "lm_head" and self.config.tie_word_embeddings:
                    continue  # tied to the embeddings
                if key in integer:  # an index table (V4's tid2eid): its values, in the placeholder's dtype
                    t = read(key)
                    if t.is_floating_point():
                        raise EdgeDSError(f"{directory}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; "
                                          "it must hold integer expert ids")
                    t = t.to(torch.long)
                else:
                    # The correction bias is float32 in DeepSeek's checkpoints and code (and V4's sinks,
                    # pooling biases, hyper-connections and norms in transformers'); the rest in the compute dtype.
                    t = weight(key, torch.float32 if self._keeps_float32(key) else self.dtype)
            if tuple(t.shape) != target:
                raise EdgeDSError(f"{directory}: tensor {key!r} has shape {list(t.shape)}, the config needs "
                                  f"{list(target)}")
            owner = model.get_submodule(path) if path else model
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(t.to(device), requires_grad=False)
            else:
                owner._buffers[leaf] = t.to(device)
            loaded.add(key)
        missing = [k for k in shapes if k not in loaded and not any(k.startswith(p + ".") for p in replaced)]
        if self.config.tie_word_embeddings:
            model.tie_weights()
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing:
            raise EdgeDSError(f"{directory}: tensors not loaded: {', '.join(missing[:5])}")
        return len(replaced)

    def _keeps_float32(self, key: str) -> bool:
        """Whether tensor `key` stays float32 whatever the activation dtype: the correction bias and
        V4's float32 tensors (layout.keeps_float32), and whatever transformers' own bf16 loading keeps
        in float32 (its class's `_keep_in_fp32_modules_strict`, matched as transformers matches it:
        as a substring of the name)."""
        from .. import layout

        return (key.endswith("e_score_correction_bias") or layout.keeps_float32(key)
                or any(m in key for m in self._float32_modules))

    @staticmethod
    def _swap(model: Any, path: str, module: Any) -> None:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    def _describe(self) -> str:
        import torch

        where = self.device_name
        if where == "cuda":
            where = f"cuda ({torch.cuda.get_device_name()})"
        mode = f"gemm {self.gemm}" + (f" on {self.fp8_layers} FP8 modules" if self.gemm == "fp8" else "")
        return f"torch {torch.__version__} {where}, {mode}, {str(self.dtype).removeprefix('torch.')} activations"

    def kernels(self) -> dict:
        """Which FP8 GEMM kernels served calls so far, and why the blockwise _scaled_mm was or was not
        used per weight shape (see datacenter.fp8)."""
        from ..datacenter import fp8

        return {"calls": dict(fp8.KERNELS), "scaled_mm": fp8.scaled_mm_status()}

    # --- the backend interface ---------------------------------------------------------------
    def make_cache(self) -> TorchCache:
        return TorchCache(self.config.num_hidden_layers)

    def reset_peak_memory(self) -> None:
        import torch

        if self.device_name == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        """CUDA: torch's peak allocation; CPU: the process's peak resident set."""
        import torch

        if self.device_name == "cuda":
            return int(torch.cuda.max_memory_allocated())
        if resource is None:
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def __call__(self, tokens: Any, cache: TorchCache | None = None) -> Any:
        """int tokens [B, L] (torch, numpy or another array library's) -> float32 logits [B, L, V]
        in the same library (the last position only with a cache)."""
        import torch

        if isinstance(tokens, torch.Tensor):
            ids = tokens.to(torch.long)
        else:
            ids = torch.from_numpy(np.asarray(tokens).astype(np.int64))
        logits = self.forward(ids, cache, logits_to_keep=1 if cache is not None else 0)
        if isinstance(tokens, torch.Tensor):
            return logits
        out = logits.cpu().numpy()
        # Another library's array type (MLX's: a caller that hands MLX arrays) rebuilt from numpy;
        # its module is never imported here.
        return out if isinstance(tokens, np.ndarray) else type(tokens)(out)

    def forward(self, ids: "torch.Tensor", cache: TorchCache | None = None, logits_to_keep: int = 0
                ) -> "torch.Tensor":
        """ids [B, L] int64 -> float32 logits [B, L or logits_to_keep, V] on the model's device;
        with a cache, the tokens follow what it holds and are appended to it."""
        import torch

        B, L = ids.shape
        limit = self.config.max_position_embeddings
        start = cache.offset if cache is not None else 0
        if start + L > limit:
            raise ContextLengthError(f"{start + L} positions exceed the model's max_position_embeddings ({limit})")
        with torch.inference_mode():
            if cache is None:
                out = self.model(input_ids=ids.to(self.device_name), use_cache=False, logits_to_keep=logits_to_keep)
                return out.logits.float()
            if cache.ids is not None and cache.ids.shape[0] != B:
                if cache.offset:
                    raise EdgeDSError(f"the cache holds a batch of {cache.ids.shape[0]}, got {B} rows")
                cache.ids = None
            ids = ids.cpu()
            pending = cache.ids[:, cache.held:] if cache.ids is not None else ids[:, :0]
            run = torch.cat([pending, ids], dim=1)
            keep = logits_to_keep if logits_to_keep else L
            out = self.model(input_ids=run.to(self.device_name), past_key_values=cache.past, use_cache=True,
                             logits_to_keep=keep)
            cache.past = out.past_key_values
            cache.ids = ids if cache.ids is None else torch.cat([cache.ids, ids], dim=1)
            cache.held = cache.offset
            return out.logits.float()


def _refuse_official_v4(directory: Path) -> None:
    """DeepSeek's own V4 release layout (unprefixed `embed.weight`, `layers.N.attn.*`, `.scale`
    companions, packed FP4 experts) is not read here: one message saying what to use instead."""
    from ..datacenter.io import TorchCheckpoint

    names = TorchCheckpoint(directory).names()
    if "embed.weight" in names or any(n.startswith("layers.") for n in names):
        raise EdgeDSError(f"{directory}: DeepSeek's official V4 release layout (embed.weight, layers.N.attn.*); the "
                          "torch backend reads the transformers-format checkpoint (transformers' tensor names, as "
                          "DeepseekV4ForCausalLM.save_pretrained writes them). `edge-ds convert` reads the release "
                          "layout for the MLX backend.")


def detect(directory: Path) -> bool:
    """Never the default: the torch backend runs only when asked for (it is the reference)."""
    return False


def load(directory: Path, experts: Any = None, *, device: str | None = None, gemm: str = "bf16",
         dtype: str = "bfloat16", kernel: str = "auto") -> TorchModel:
    """A Hugging Face checkpoint on torch. device: "cuda" or "cpu" (default: cuda when torch sees a
    GPU); gemm: "bf16" (dequantized weights, DeepSeek's default) or "fp8" (DeepSeek's FP8 GEMM for
    e4m3 weights); dtype: activations, "bfloat16" as DeepSeek serves or "float32"; kernel: "auto"
    or "emulated" (the CPU emulation even on a GPU)."""
    if experts is not None:
        raise OptionError("expert_budget", "{option} and trace need the mlx backend (torch keeps every expert "
                                           "resident)")
    return TorchModel(directory, device=device, gemm=gemm, dtype=dtype, kernel=kernel)
