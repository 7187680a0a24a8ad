"""How fast could an export run if its quantized products ran back to back at their own speed?

    python benchmarks/onnx_kernels.py --model DIR [-p 128] [-t 2] [--rounds 3]
                                      [--llama-bench PATH --gguf MODEL.gguf]

An upper bound for `edge-ds bench` on an ONNX export. It reads DIR/model.onnx and builds two
graphs holding nothing but its 4/8-bit products (MatMulNBits with the export's bits, block size
and compute type, random weights; each routed expert as its two products), every product with
its own weights so they stream from memory as the model's do:
- prompt: the projections on P rows (the head on one: generation keeps one position's logits),
  every expert once on P * k / E rows (uniform routing);
- decode: the projections and the head on one row, k experts per MoE layer on one row.
Each graph runs in one onnxruntime session with `-t` threads. Everything else the model does
(attention, norms, routing, rope, QMoE's gathering) is left out, so the tok/s it prints are
ceilings for this onnxruntime on this machine, not predictions. With --llama-bench and --gguf it
runs llama-bench once per round too, so the ceilings compare with llama.cpp in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converters.onnx.builder import IR_VERSION, MS  # noqa: E402


def products(model: onnx.ModelProto, prompt: int) -> list[dict]:
    """Every quantized product in the graph: N, K, bits, block, level, rows at prefill and how many
    times it runs at prefill and at decode."""
    out = []
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "MatMulNBits":
            head = node.name == "lm_head"
            out.append(dict(name=node.name, N=a["N"], K=a["K"], bits=a["bits"], block=a["block_size"],
                            level=a.get("accuracy_level", 0), prefill_rows=1 if head else prompt, prefill_count=1,
                            decode_count=1))
        elif node.op_type == "QMoE":
            E, k, bits = shapes[node.input[2]][0], a["k"], a["expert_weight_bits"]
            fc1, fc2 = shapes[node.input[2]], shapes[node.input[5]]  # [E, 2I, D * bits / 8], [E, D, I * bits / 8]
            rows = max(1, round(prompt * k / E))
            for fc, (n, packed) in (("fc1", fc1[1:]), ("fc2", fc2[1:])):
                out.append(dict(name=f"{node.name}.{fc}", N=n, K=packed * 8 // bits, bits=bits,
                                block=a.get("block_size", packed * 8 // bits), level=a.get("accuracy_level", 0),
                                prefill_rows=rows, prefill_count=E, decode_count=k))
    return out


def products_graph(plist: list[dict], phase: str, threads: int) -> tuple[ort.InferenceSession, dict]:
    """One session running every product of `phase` ("prefill" or "decode") once, each with its own
    random weights (so they stream from memory as the model's do), all reading one input per K."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs, feeds = [], [], {}, [], {}
    for p in plist:
        n, k, bits, block = p["N"], p["K"], p["bits"], p["block"]
        rows = p["prefill_rows"] if phase == "prefill" else 1
        a = f"A_{k}_{rows}"
        if a not in inputs:
            inputs[a] = helper.make_tensor_value_info(a, TensorProto.FLOAT, [rows, k])
            feeds[a] = rng.standard_normal((rows, k), dtype=np.float32)
        blocks = -(-k // block)
        for i in range(p[phase + "_count"]):
            name = f"{p['name']}.{i}"
            inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
                                              name + ".B"),
                      numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 1e-2, name + ".S")]
            nodes.append(helper.make_node("MatMulNBits", [a, name + ".B", name + ".S"], [name], domain=MS, K=k, N=n,
                                          bits=bits, block_size=block, accuracy_level=p["level"]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(nodes, phase, list(inputs.values()), outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = IR_VERSION
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), feeds


def timed(sess: ort.InferenceSession, feeds: dict, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(model_dir: Path, prompt: int, threads: int) -> dict:
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    plist = products(model, prompt)
    prefill = timed(*products_graph(plist, "prefill", threads), 5)
    decode = timed(*products_graph(plist, "decode", threads), 30)
    macs = sum(p["N"] * p["K"] * p["prefill_rows"] * p["prefill_count"] for p in plist)
    return {"prompt_tps_ceiling": prompt / prefill, "generation_tps_ceiling": 1.0 / decode,
            "prefill_gmacs_per_s": macs / prefill / 1e9,
            "products": sum(p["prefill_count"] for p in plist)}


def llama_bench(binary: str, gguf: str, prompt: int, threads: int) -> dict:
    rows = json.loads(subprocess.run([binary, "-m", gguf, "-p", str(prompt), "-n", "64", "-t", str(threads), "-r", "3",
                                      "-o", "json"], check=True, capture_output=True, text=True).stdout)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == 64 and r["n_prompt"] == 0)
    return {"prompt_tps": pp["avg_ts"], "generation_tps": tg["avg_ts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="An `edge-ds export-onnx` (or convert) directory.")
    ap.add_argument("-p", type=int, default=128, help="Prompt tokens.")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bench", help="A llama-bench binary, to compare in the same run.")
    ap.add_argument("--gguf", help="The same model as a Q4_0 GGUF (with --llama-bench).")
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        r = {"ceiling": ceilings(args.model, args.p, args.threads)}
        if args.llama_bench and args.gguf:
            r["llama_cpp_q4_0"] = llama_bench(args.llama_bench, args.gguf, args.p, args.threads)
        rounds.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)

    def med(engine: str, key: str) -> float:
        return statistics.median(r[engine][key] for r in rounds)

    c = rounds[0]["ceiling"]
    print(f"{c['products']} quantized products at prefill, -p {args.p}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print("| | prompt tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| ceiling: the export's quantized products alone | {med('ceiling', 'prompt_tps_ceiling'):.0f} "
          f"({med('ceiling', 'prefill_gmacs_per_s'):.0f} GMAC/s) | {med('ceiling', 'generation_tps_ceiling'):.0f} |")
    if all("llama_cpp_q4_0" in r for r in rounds):
        print(f"| llama.cpp Q4_0 (llama-bench) | {med('llama_cpp_q4_0', 'prompt_tps'):.0f} | "
              f"{med('llama_cpp_q4_0', 'generation_tps'):.0f} |")
        ratio = {k: statistics.median(r["ceiling"][k + "_ceiling"] / r["llama_cpp_q4_0"][k] for r in rounds)
                 for k in ("prompt_tps", "generation_tps")}
        print(f"| ceiling / llama.cpp (median of the rounds' ratios) | {ratio['prompt_tps']:.2f}x | "
              f"{ratio['generation_tps']:.2f}x |")


if __name__ == "__main__":
    main()
