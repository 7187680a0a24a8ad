"""A small ONNX graph builder: named nodes, initializers, inputs and outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"  # onnxruntime's contrib-op domain
OPSET = 23  # RMSNormalization and RotaryEmbedding are opset 23
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 reads at most 13


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count: dict[str, int] = {}
        self._scalars: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        """A shared int64 1-D constant (shapes, axes, split sizes)."""
        key = ("i64",) + values
        if key not in self._scalars:
            self._scalars[key] = self.const(np.array(values, np.int64), "i64")
        return self._scalars[key]

    def scalar(self, value: float) -> str:
        key = ("f32", float(value))
        if key not in self._scalars:
            self._scalars[key] = self.const(np.array(value, np.float32), "f32")
        return self._scalars[key]

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        base = self.fresh(hint or op_type.lower())
        names = [base] if outputs == 1 else [f"{base}.{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=base, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape: list) -> None:
        """Renames the node output `value` to the graph output `name`."""
        for node in self.nodes:
            for i, o in enumerate(node.output):
                if o == value:
                    node.output[i] = name
            for i, x in enumerate(node.input):
                if x == value:
                    node.input[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edge-ds", doc_string=doc)
        model.ir_version = IR_VERSION
        return model
