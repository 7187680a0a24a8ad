"""The datacenter leg on a GPU (issue 17): one command, meant to finish in under 5 minutes on an H200.

    PYTHONPATH=. python3 benchmarks/cuda_check.py [--json FILE]

For each model (the shipped model's FP8 build when Package.resources has it, and a V3-shaped
benchmark model: random FP8 weights at DeepSeek-V3's per-layer sizes, hidden 7168, 128 heads,
q_lora 1536, kv_lora 512, 2048-wide experts, vocabulary 129280, with 3 layers and 32 experts
top-8 so that it is written and loaded in seconds):
  1. gemm fp8 on CUDA against the CPU emulation of the same numerics: max absolute and relative
     logit difference, mean KL(cpu || cuda), top-1 agreement; and the CUDA kernel against the
     same emulation run on the GPU;
  2. which kernel served the FP8 GEMMs, and why torch's blockwise _scaled_mm did or did not
     serve each weight shape;
  3. prefill and decode tokens/s on the GPU with gemm fp8 and gemm bf16 (DeepSeek's default:
     dequantized weights, bf16 matmuls), bf16 activations;
  4. the same for transformers' own fine-grained FP8 integration (Triton block-FP8 linears)
     loading the checkpoint itself, with its KL against the CPU emulation: which is faster.
Needs torch with CUDA and transformers only (no MLX, no ml_dtypes): it runs from a source
checkout on a bare GPU image. `--device cpu --tiny` is a dry run of the whole script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# edge_ds's import loads a system OpenBLAS for MLX (edge_ds/_blas.py); nothing here runs MLX.
os.environ.setdefault("EDGE_DS_BLAS", "off")

from edge_ds.backends import torch as torch_backend  # noqa: E402
from edge_ds.datacenter import fp8 as fp8_module  # noqa: E402

SHIPPED_FP8 = ROOT / "Package.resources" / "edge-ds-tiny-fp8"
V3_SHAPED = dict(  # DeepSeek-V3's per-layer sizes; fewer layers and experts
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=32,
    num_experts_per_tok=8, n_group=8, topk_group=4, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
    qk_nope_head_dim=128, v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True, topk_method="noaux_tc",
    scoring_func="sigmoid", max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu",
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [128, 128]},
)
TINY = dict(V3_SHAPED, vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=192,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
            qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, max_position_embeddings=4096, rope_scaling=None)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (e4m3 [N, K], float32 scale_inv [ceil(N/128), ceil(K/128)]), DeepSeek's layout."""
    N, K = w.shape
    nb, kb = -(-N // 128), -(-K // 128)
    padded = torch.zeros(nb * 128, kb * 128, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w
    blocks = padded.view(nb, 128, kb, 128)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(nb * 128, kb * 128)[:N, :K].contiguous(), s


def write_random_fp8(cfg: dict, path: Path, device: str, seed: int = 0) -> Path:
    """A checkpoint in DeepSeek's FP8 layout with random weights (trained-model-like spreads), in
    shards of about 2 GB with an index, written from transformers' own parameter list."""
    import transformers
    from safetensors.torch import save_file

    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    names: list[tuple[str, tuple]] = []
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            E, two_i, H = t.shape
            prefix = name.removesuffix("gate_up_proj")
            for e in range(E):
                names += [(f"{prefix}{e}.gate_proj.weight", (two_i // 2, H)), (f"{prefix}{e}.up_proj.weight", (two_i // 2, H))]
        elif name.endswith("mlp.experts.down_proj"):
            E, H, I = t.shape
            names += [(f"{name.removesuffix('down_proj')}{e}.down_proj.weight", (H, I)) for e in range(E)]
        else:
            names.append((name, tuple(t.shape)))
    g = torch.Generator(device=device).manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size, weight_map = 0, {}

    def put(name: str, t: torch.Tensor) -> None:
        nonlocal size
        if size > 2e9:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu().contiguous()
        size += t.numel() * t.element_size()

    for name, shape in names:
        if name.endswith("e_score_correction_bias"):
            put(name, (torch.rand(shape, generator=g, device=device) * 0.1 - 0.05).float())
        elif len(shape) == 1:
            put(name, (1 + 0.1 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16))
        elif name.endswith("embed_tokens.weight"):
            put(name, torch.randn(shape, generator=g, device=device).to(torch.bfloat16))
        elif name == "lm_head.weight" or name.endswith("mlp.gate.weight"):
            w = torch.randn(shape, generator=g, device=device) * (3.0 / math.sqrt(shape[1]))
            put(name, w.to(torch.bfloat16))
        else:  # every decoder projection: FP8 with block scales, as DeepSeek ships them
            scale = 0.3 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            q, s = quantize_blocks(torch.randn(shape, generator=g, device=device) * (scale / math.sqrt(shape[1])))
            put(name, q)
            put(name + "_scale_inv", s)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for f, part in zip(files, shards):
        save_file(part, str(path / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """ref, got: logits [B, T, V] -> max abs / relative difference, mean KL(ref || got), top-1 agreement."""
    ref, got = ref.double().cpu(), got.double().cpu()
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"max_abs": float((ref - got).abs().max()), "max_rel": float((ref - got).abs().max() / ref.abs().max()),
            "kl_mean": float(kl.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).double().mean())}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed(lm, device: str, prompt: int, steps: int, vocab: int) -> dict:
    """Prefill tok/s (one prompt of `prompt` tokens) and decode tok/s (`steps` tokens after it)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, prompt), generator=g)
    lm.forward(ids[:, :16], lm.make_cache(), logits_to_keep=1)  # warm-up (kernel choice, allocator)
    sync(device)
    cache = lm.make_cache()
    t0 = time.perf_counter()
    logits = lm.forward(ids, cache, logits_to_keep=1)
    sync(device)
    t1 = time.perf_counter()
    token = logits[:, -1].argmax(-1, keepdim=True).cpu()
    for _ in range(steps):
        token = lm.forward(token, cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True).cpu()
    sync(device)
    t2 = time.perf_counter()
    return {"prefill_tps": prompt / (t1 - t0), "decode_tps": steps / (t2 - t1), "prompt": prompt, "steps": steps}


def transformers_fp8(path: Path, device: str, ids: torch.Tensor, prompt: int, steps: int, vocab: int) -> dict:
    """transformers' own fine-grained FP8 integration on the same checkpoint (its Triton block-FP8
    linears on CUDA; on a CPU it dequantizes): logits [1, T, V] and tok/s, for "which is faster"
    (a failure is reported, not raised: it is the comparison, not the reference)."""
    import transformers

    try:
        # No device_map: that needs accelerate, which a bare GPU image may lack.
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(device).eval()
        kinds = sorted({type(m).__name__ for m in model.modules() if "fp8" in type(m).__name__.lower()})
        with torch.inference_mode():
            logits = model(ids.to(device)).logits.float()
            g = torch.Generator().manual_seed(1)
            p = torch.randint(0, vocab, (1, prompt), generator=g).to(device)
            model(p[:, :16])
            sync(device)
            t0 = time.perf_counter()
            out = model(p, use_cache=True, logits_to_keep=1)
            sync(device)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            t2 = time.perf_counter()
        del model
        return {"logits": logits.cpu(), "fp8_modules": kinds, "prefill_tps": prompt / (t1 - t0),
                "decode_tps": steps / (t2 - t1)}
    except Exception as e:  # transformers' integration raises many kinds; say which and go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def check_model(name: str, path: Path, device: str, vocab: int, tokens: int, prompt: int, steps: int) -> dict:
    out: dict = {"model": name}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    t = time.perf_counter()
    gpu = torch_backend.load(path, device=device, gemm="fp8", dtype="bfloat16")
    out["load_s"] = time.perf_counter() - t
    fp8_module.KERNELS.clear()
    gpu_logits = gpu.forward(ids)
    out["kernels"] = gpu.kernels()
    out["device"] = gpu.device
    out["speed_fp8"] = speed(gpu, device, prompt, steps, vocab)
    emulated = torch_backend.load(path, device=device, gemm="fp8", dtype="bfloat16", kernel="emulated")
    out["cuda_kernel_vs_emulation_on_device"] = compare(emulated.forward(ids), gpu_logits)
    del emulated
    cpu = torch_backend.load(path, device="cpu", gemm="fp8", dtype="bfloat16")
    cpu_logits = cpu.forward(ids)
    out["cuda_vs_cpu_emulation"] = compare(cpu_logits, gpu_logits)
    del cpu
    del gpu
    bf16 = torch_backend.load(path, device=device, gemm="bf16", dtype="bfloat16")
    out["fp8_vs_bf16_gemm"] = compare(bf16.forward(ids), gpu_logits)
    out["speed_bf16"] = speed(bf16, device, prompt, steps, vocab)
    del bf16
    theirs = transformers_fp8(path, device, ids, prompt, steps, vocab)
    if "logits" in theirs:
        theirs["vs_cpu_emulation"] = compare(cpu_logits, theirs.pop("logits"))
    out["transformers_fp8"] = theirs
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    ap.add_argument("--tiny", action="store_true", help="a small benchmark model instead of the V3-shaped one")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_check: this torch sees no CUDA GPU")
    started = time.perf_counter()
    results = {"torch": torch.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "capability": list(torch.cuda.get_device_capability()) if args.device == "cuda" else None,
               "models": []}
    if SHIPPED_FP8.is_dir():
        results["models"].append(check_model("edge-ds-tiny (FP8 build)", SHIPPED_FP8, args.device, 4096, 64, 512, 64))
    cfg = TINY if args.tiny else V3_SHAPED
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = write_random_fp8(cfg, Path(tmp) / "v3_shaped", args.device)
        write_s = time.perf_counter() - t
        r = check_model("V3-shaped (3 layers, 32 experts, random FP8)", path, args.device, cfg["vocab_size"], 32,
                        64 if args.tiny else 1024, 8 if args.tiny else 32)
        r["write_s"] = write_s
        results["models"].append(r)
    results["total_s"] = time.perf_counter() - started
    print(json.dumps(results, indent=1))
    print("\n| model | kernel calls | CUDA vs CPU emulation: max rel / KL / top-1 | fp8 prefill / decode tok/s "
          "| bf16 prefill / decode tok/s | transformers FP8 prefill / decode tok/s, KL vs emulation |"
          "\n|---|---|---|---|---|---|")
    for m in results["models"]:
        c, f, b, t = m["cuda_vs_cpu_emulation"], m["speed_fp8"], m["speed_bf16"], m["transformers_fp8"]
        theirs = (t["error"] if "error" in t else f"{t['prefill_tps']:.0f} / {t['decode_tps']:.1f}, "
                  f"{t['vs_cpu_emulation']['kl_mean']:.2e}")
        print(f"| {m['model']} | {m['kernels']['calls']} | {c['max_rel']:.2e} / {c['kl_mean']:.2e} / {c['top1']:.3f} "
              f"| {f['prefill_tps']:.0f} / {f['decode_tps']:.1f} | {b['prefill_tps']:.0f} / {b['decode_tps']:.1f} "
              f"| {theirs} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
