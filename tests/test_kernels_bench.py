"""bench/kernels.py's graphs and its correction cut, on small inputs. No timings asserted."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import load_bench
from vcompress.exporters.onnx import OnnxRunner, export

QUIET = dict(log=lambda _: None, threads=1)


@pytest.fixture(scope="module")
def kernels():
    return load_bench("kernels")


def _run(model: onnx.ModelProto, rows: int) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.random.default_rng(0).normal(0, 1, (rows, i.type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)
        for i in model.graph.input
    }
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(None, feeds))) | feeds


@pytest.mark.parametrize("variant", ["sym4", "sym4+correction", "sym4+corr-gemm", "sym4-b128", "zp4", "int8", "dq-int8", "head8"])
def test_every_variant_runs_and_counts_the_bytes_it_reads(kernels, variant):
    model, g = kernels.build(variant, layers=1, rows=3)
    out = _run(model, 3)
    widths = [kernels.HEAD[1]] if variant.startswith("head") else [n for _, n in kernels.LAYER.values()]
    assert sorted(v.shape[-1] for k, v in out.items() if not k.startswith("x")) == sorted(widths)
    assert all(np.isfinite(v).all() for v in out.values())
    layer_weights = sum(k * n for k, n in kernels.LAYER.values())
    if variant == "sym4":  # 4-bit codes + one float32 scale per block of 32
        assert g.bytes == layer_weights // 2 + layer_weights // 32 * 4
    extra = g.bytes - kernels.build("sym4", layers=1, rows=3)[1].bytes
    if variant == "sym4+correction":  # + a float32 [G, N] correction per linear, + two tiny shape tensors each
        assert extra == layer_weights // 32 * 4 + 4 * (3 + 1) * 8
    if variant == "sym4+corr-gemm":  # + the corrections, + one 0/1 [K, G] matrix per input width, shared
        assert extra == layer_weights // 32 * 4 + (576 * 18 + 1536 * 48) * 4


def test_the_two_correction_forms_compute_the_same(kernels):
    """groupsum by Reshape + ReduceSum (the exporter's form) and by a 0/1 MatMul give one result."""
    a, b = (_run(kernels.build(v, layers=1, rows=2)[0], 2) for v in ("sym4+correction", "sym4+corr-gemm"))
    for name in ("l0.qkv/corrected", "l0.down/corrected"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-4)


def test_fp32_rows_are_a_plain_matmul(kernels):
    model, _ = kernels.build("fp32", layers=1, rows=2)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = _run(model, 2)
    np.testing.assert_allclose(out["l0.gate_up"], out["x"] @ weights["l0.gate_up.W"], rtol=1e-4, atol=1e-5)


def test_cutting_the_correction_removes_four_nodes_per_matmul_and_changes_the_logits(kernels, tiny_models, tmp_path):
    from vcompress.cli import main

    folder = tmp_path / "float-zero"
    args = ["quantize", "--model", tiny_models["llama"], "--out", folder, "--method", "rtn", "--group-size", "32", "--zero-point", "float"]
    assert main([str(a) for a in args]) == 0
    artifact = tmp_path / "artifact"
    export(folder, artifact, "int4", accuracy_level=0, table_bits=0, **QUIET)
    nbits = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph.node)
    bare = tmp_path / "bare"
    assert kernels.without_correction(artifact, bare) == 4 * nbits
    model = onnx.load(str(bare / "model.onnx"), load_external_data=False)
    assert not any("zero_correction" in n.name for n in model.graph.node)
    ids = torch.randint(5, 300, (1, 10), generator=torch.Generator().manual_seed(3))
    full, cut = OnnxRunner(artifact, threads=1).forward(ids), OnnxRunner(bare, threads=1).forward(ids)
    assert cut.shape == full.shape and not torch.allclose(cut, full, atol=1e-3)
