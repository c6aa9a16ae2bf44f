"""Is an ONNX graph TensorRT-ready? Every node walked against TensorRT 10's operator support matrix.

The matrix is onnx-tensorrt's docs/operators.md, its rows for the operators we emit (and a few neighbours) copied
into tensorrt_operators.json with their source and version. A node fails when its domain is not standard ONNX,
its operator is not in the recorded rows (we refuse what we have not recorded rather than guess), the row says
N, the dtype of its data input is not in the row's types, or a restriction is broken (an axes input that is
not a constant, a non-zero DequantizeLinear zero point, present KV outputs on Attention). The graph's opsets
must lie in the matrix's range. One failing node and the graph is not TensorRT-ready; the report names it.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MATRIX_FILE = Path(__file__).with_name("tensorrt_operators.json")
TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT4: "INT4",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8",
}


@cache
def matrix() -> dict:
    return json.loads(MATRIX_FILE.read_text())


def check(model: onnx.ModelProto | str | Path) -> dict:
    """{"tensorrt_ready", "matrix", "nodes", "ops", "unsupported": [{"node", "op", "domain", "problems"}], "opset_problems"}"""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = matrix()
    low, high = table["opsets"]
    opset_problems = [
        f"opset {o.version} of domain {o.domain or 'ai.onnx'!r} is outside TensorRT's {low}-{high}"
        if o.domain in table["domains"]
        else f"opset domain {o.domain!r} is not standard ONNX"
        for o in model.opset_import
        if o.domain not in table["domains"] or not low <= o.version <= high
    ]
    types, constants, initializers = _graph_facts(model)
    failed = []
    for node in model.graph.node:
        problems = node_problems(node, table["operators"], table["domains"], types, constants, initializers)
        if problems:
            failed.append(
                {"node": node.name or node.output[0], "op": node.op_type, "domain": node.domain or "ai.onnx", "problems": problems}
            )
    return {
        "tensorrt_ready": not failed and not opset_problems,
        "matrix": table["version"],
        "matrix_source": table["source"],
        "nodes": len(model.graph.node),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "opset_problems": opset_problems,
        "unsupported": failed,
    }


def summary(report: dict) -> str:
    """One line: ready, or the first failing nodes named."""
    if report["tensorrt_ready"]:
        return f"TensorRT-ready: all {report['nodes']} nodes are in {report['matrix']}'s operator matrix"
    named = "; ".join(f"{f['node']} ({f['domain']}:{f['op']}: {', '.join(f['problems'])})" for f in report["unsupported"][:3])
    more = len(report["unsupported"]) - 3
    return "not TensorRT-ready: " + "; ".join(report["opset_problems"] + [named] + ([f"and {more} more nodes"] if more > 0 else []))


def node_problems(node, operators: dict, domains: list, types: dict, constants: set, initializers: dict) -> list[str]:
    if node.domain not in domains:
        return [f"domain {node.domain} is not standard ONNX; TensorRT's ONNX parser takes standard operators only"]
    spec = operators.get(node.op_type)
    if spec is None:
        return ["not in the recorded TensorRT operator rows (exporters/tensorrt_operators.json)"]
    if spec.get("supported") is False:
        return ["TensorRT does not support this operator"]
    problems = []
    typed = spec.get("typed_input", 0)
    names = [node.input[typed]] if len(node.input) > typed else []
    if node.op_type == "Cast":
        names.append(node.output[0])
    for name in names:
        kind = TYPE_NAMES.get(types.get(name), "unknown")
        if kind not in spec["types"]:
            problems.append(f"dtype {kind} of {name} not in {'/'.join(spec['types'])}")
    for index in spec.get("constant_inputs", []):
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            problems.append(f"input {index} ({node.input[index]}) must be a constant: {spec['restriction']}")
    if spec.get("zero_point_zero") and len(node.input) > 2 and node.input[2]:
        zero = initializers.get(node.input[2])
        if zero is None or zero.data_location == TensorProto.EXTERNAL or np.any(numpy_helper.to_array(zero)):
            problems.append(f"zero point {node.input[2]} is not a stored all-zero tensor: {spec['restriction']}")
    used = [o for o in node.output if o]
    if len(used) > spec.get("max_outputs", len(used)):
        problems.append(f"{len(used)} outputs: {spec['restriction']}")
    given = [i for i in node.input if i]
    if "max_inputs" in spec and len(node.input) > spec["max_inputs"] and any(node.input[spec["max_inputs"] :]):
        problems.append(f"{len(given)} inputs: {spec['restriction']}")
    return problems


def _graph_facts(model: onnx.ModelProto) -> tuple[dict, set, dict]:
    """Element type of every value (shape inference), the constant names, the initializers by name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {t.name: t for t in model.graph.initializer}
    types.update({name: t.data_type for name, t in initializers.items()})
    constants = set(initializers) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return types, constants, initializers
