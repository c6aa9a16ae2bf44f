"""From fp32 step graphs to what the HTP loads: the op check, QDQ quantization calibrated on text, and the
offline compilation into an EPContext model with its context binary (`*_qnn.bin`) for one HTP architecture.

The quantizer is ONNX Runtime's own, configured for QNN (`get_qnn_qdq_config`): uint16 activations
everywhere, so the tensors that are sensitive to 8 bits (attention scores and softmax, the residual stream,
RMSNorm) get 16 bits; weights symmetric per output channel at 8 or 4 bits (the HTP's MatMul takes
(uint16, uint8) and (uint16, int4/int8) pairs: ONNX Runtime's QNN EP documentation, "Supported ONNX operators").
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import onnx

from vcompress.core.errors import Refused

from ._qnn_session import open_step

# The ai.onnx ops the QNN EP places on the HTP (ONNX Runtime QNN EP documentation, "Supported ONNX operators",
# onnxruntime-qnn 2.x): the ones a decoder could use. An op outside it is refused before any work.
HTP_OPS = {
    "Add", "Cast", "Concat", "Cos", "CumSum", "DequantizeLinear", "Div", "Equal", "Exp", "Expand", "Gather", "Gelu", "Gemm",
    "Greater", "Identity", "LayerNormalization", "Less", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Pow",
    "QuantizeLinear", "RMSNormalization", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape",
    "RotaryEmbedding", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
    "Unsqueeze", "Where",
}  # fmt: skip
MS_HTP_OPS = {"FusedMatMul", "Gelu", "QuickGelu", "RotaryEmbedding", "SimplifiedLayerNormalization"}  # com.microsoft, same list


def check_ops(model: onnx.ModelProto, graph: str) -> None:
    """Refuse a graph with a node the HTP does not run, naming the nodes (at export, not when a phone loads it)."""
    runs = lambda n: n.op_type in (MS_HTP_OPS if n.domain == "com.microsoft" else HTP_OPS if not n.domain else ())  # noqa: E731
    bad = [f"{n.name} ({f'{n.domain}:' if n.domain else ''}{n.op_type})" for n in model.graph.node if not runs(n)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise Refused(
            f"the {graph} graph has nodes the QNN HTP backend does not run: {', '.join(bad[:5])}{more}; "
            "nothing was compiled (export to onnx for the CPU, or write the op from supported ones)"
        )


class Feeds:
    """A calibration data reader over recorded feeds (onnxruntime.quantization.CalibrationDataReader's protocol)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.next = feeds, iter(feeds)

    def get_next(self):
        return next(self.next, None)

    def rewind(self):
        self.next = iter(self.feeds)


def quantize(fp32: Path, out: Path, feeds: list[dict], weight_bits: int, float_nodes: list[str] = ()) -> None:
    """The QDQ model of a step graph: activation ranges (MinMax) from `feeds`, weights per channel; `float_nodes`
    stay unquantized (the HTP runs them in fp16: `enable_htp_fp16_precision`, on by default)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize as ort_quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    config = get_qnn_qdq_config(
        str(fp32),
        Feeds(feeds),
        activation_type=QuantType.QUInt16,
        weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
        per_channel=True,
        weight_symmetric=True,
        nodes_to_exclude=list(float_nodes),
    )
    ort_quantize(str(fp32), str(out), config)


def compile_htp(qdq: Path, context: Path, htp_arch: int) -> dict:
    """Compile a QDQ model for the HTP into `context` (an EPContext model) and its `*_qnn.bin`. Whatever the HTP
    does not take stays in the EPContext model as ordinary nodes: these are listed, and the export refused."""
    start = time.perf_counter()
    config = {"ep.context_enable": "1", "ep.context_file_path": str(context), "ep.context_embed_mode": "0"}
    open_step(qdq, "htp", htp_arch, config=config | {"session.disable_cpu_ep_fallback": "0"})
    seconds = time.perf_counter() - start
    source, compiled = onnx.load(str(qdq), load_external_data=False), onnx.load(str(context), load_external_data=False)
    inside = [n for n in compiled.graph.node if n.op_type == "EPContext"]
    # Graph I/O quantization (a Q after a float input, a DQ before a float output) runs on the CPU by the QNN EP's
    # default (offload_graph_io_quantization): it converts the app's float tensors, and is not part of the model's compute.
    io = {i.name for i in source.graph.input} | {o.name for o in source.graph.output}
    outside = [n for n in compiled.graph.node if n.op_type != "EPContext"]
    boundary = [n for n in outside if n.op_type in ("QuantizeLinear", "DequantizeLinear") and io & {*n.input, *n.output}]
    cpu = [n for n in outside if n not in boundary]
    if cpu:
        names = ", ".join(f"{n.name} ({n.op_type})" for n in cpu[:5])
        raise Refused(f"the QNN HTP backend did not take {len(cpu)} nodes of {qdq.name}: {names}; nothing was written")
    nodes = len(source.graph.node)
    return {
        "nodes": nodes,
        "on_htp": nodes - len(boundary),
        "io_quantization_on_cpu": len(boundary),
        "htp_fraction": round((nodes - len(boundary)) / nodes, 4),
        "contexts": len(inside),
        "ops": dict(Counter(n.op_type for n in source.graph.node)),
        "compile_seconds": round(seconds, 1),
    }
