"""How fast could an export run if its quantized nodes ran back to back at their own speed?

    python benchmarks/onnx_kernels.py --model DIR [-p 128] [-t 2] [--rounds 3]
                                      [--llama-bench PATH --gguf MODEL.gguf]

An upper bound for `edge-ds bench` on an ONNX export. It reads DIR/model.onnx and builds two
graphs holding nothing but copies of its quantized nodes (every MatMulNBits and QMoE, with their
own attributes: bits, block size, compute type), each with random weights of its own, so they
stream from memory as the model's do:
- prompt: the projections on P rows (the head on one: generation keeps one position's logits),
  the routed experts on P tokens picked round-robin (each expert gets P * k / E);
- decode: everything on one token.
Each graph runs in one onnxruntime session with `-t` threads. Everything else the model does
(latent attention and its float32 products, norms, routing, rope) is left out, so the tok/s it
prints are ceilings for this onnxruntime on this machine, not predictions. With --llama-bench
and --gguf it runs llama-bench once per round too, so the ceilings compare with llama.cpp in the
same run. The graphs are built in memory, so models whose weights pass protobuf's 2 GB are out
of its reach.
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


def kernels(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The export's quantized nodes: every MatMulNBits and QMoE."""
    return [n for n in model.graph.node if n.op_type in ("MatMulNBits", "QMoE")]


def kernels_graph(model: onnx.ModelProto, rows: int, threads: int) -> tuple[ort.InferenceSession, dict]:
    """One session running a copy of each quantized node of `model` once on `rows` tokens (the head on
    one: generation keeps one position's logits), with the node's own attributes and random weights
    of its initializers' shapes (each node its own, so they stream from memory as the model's do).
    QMoE's router picks experts round-robin, so every expert gets rows * k / E tokens."""
    rng = np.random.default_rng(0)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes, inits, inputs, outputs, feeds = [], [], {}, [], {}

    def activations(width: int, m: int, three_d: bool) -> str:
        name = f"x_{width}_{m}_{int(three_d)}"
        if name not in inputs:
            shape = [1, m, width] if three_d else [m, width]
            inputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
        return name

    def random_like(source: str, name: str) -> str:
        shape = dims[source]
        value = (rng.integers(0, 256, shape, dtype=np.uint8) if "qweight" in source
                 else rng.random(shape, dtype=np.float32) * np.float32(1e-2))
        inits.append(numpy_helper.from_array(value, name))
        return name

    for i, node in enumerate(kernels(model)):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        out = f"y{i}"
        if node.op_type == "MatMulNBits":
            m = 1 if node.name == "lm_head" else rows
            ins = [activations(a["K"], m, False)] + [random_like(x, f"{out}.{j}") for j, x in enumerate(node.input[1:3])]
        else:
            E, width, k = dims[node.input[2]][0], dims[node.input[5]][1], a["k"]
            probs = np.zeros((rows, E), np.float32)  # token t -> experts t*k .. t*k + k - 1 (mod E)
            for t in range(rows):
                probs[t, (t * k + np.arange(k)) % E] = 1.0 + rng.random(k, dtype=np.float32)
            inits.append(numpy_helper.from_array(probs, f"{out}.router"))
            ins = [activations(width, rows, True), f"{out}.router"]
            ins += [random_like(x, f"{out}.{j}") if x else "" for j, x in enumerate(node.input[2:14], start=2)]
            ins += [f"{out}.router"] + list(node.input[15:])
        nodes.append(helper.make_node(node.op_type, ins, [out], domain=MS, **a))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "kernels", list(inputs.values()), outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    onnx_model.ir_version = IR_VERSION
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]), feeds


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
    prefill = timed(*kernels_graph(model, prompt, threads), 5)
    decode = timed(*kernels_graph(model, 1, threads), 30)
    return {"prompt_tps_ceiling": prompt / prefill, "generation_tps_ceiling": 1.0 / decode,
            "kernels": len(kernels(model))}


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
    print(f"{c['kernels']} quantized nodes (MatMulNBits, QMoE), -p {args.p}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print("| | prompt tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| ceiling: the export's quantized nodes alone | {med('ceiling', 'prompt_tps_ceiling'):.0f} | "
          f"{med('ceiling', 'generation_tps_ceiling'):.0f} |")
    if all("llama_cpp_q4_0" in r for r in rounds):
        print(f"| llama.cpp Q4_0 (llama-bench) | {med('llama_cpp_q4_0', 'prompt_tps'):.0f} | "
              f"{med('llama_cpp_q4_0', 'generation_tps'):.0f} |")
        ratio = {k: statistics.median(r["ceiling"][k + "_ceiling"] / r["llama_cpp_q4_0"][k] for r in rounds)
                 for k in ("prompt_tps", "generation_tps")}
        print(f"| ceiling / llama.cpp (median of the rounds' ratios) | {ratio['prompt_tps']:.2f}x | "
              f"{ratio['generation_tps']:.2f}x |")


if __name__ == "__main__":
    main()
