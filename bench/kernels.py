"""The ceiling ONNX Runtime's CPU kernels put on a decode step and a prefill, on this host.

    flock /tmp/vcompress-heavy.lock .venv/bin/python bench/kernels.py [--threads 2] [--runs 40] [--rounds 4] [--layers 30]
        [--prefill 256] [--artifact runs/demo/05-export-onnx] [--out bench/results/kernels]

One graph per variant holds every linear of a SmolLM2-135M step (30 layers of qkv 576x960, o 576x576,
gate_up 576x3072, down 1536x576, each reading the graph's input, random weights) and optionally the
576x49152 LM head; ONNX Runtime runs it on --threads threads. Nothing else is in the graph, so its time
is what the linears alone cost: a lower bound on a whole step built from that kernel. Rows:
  sym4             MatMulNBits 4-bit, no zero points, accuracy level 4 (int8 activations)
  sym4+correction  the same plus vcompress's float-zero correction (Reshape, ReduceSum, MatMul, Add per linear)
  sym4+corr-gemm   the correction as groupsum by MatMul with a 0/1 [K, G] matrix, then MatMul, then Add
  sym4-b128        sym4 with blocks of 128 (a grid SmolLM2's Q4_1 weights are not on)
  sym4-fp32act     sym4 at accuracy level 1 (float activations, MLAS's CompFp32 kernel)
  zp4              MatMulNBits 4-bit with uint8 zero points (an integer-zero grid)
  int8             MatMulNBits 8-bit blocks
  fp32             MatMul on float32 weights
  dq-int8          DynamicQuantizeMatMul (ORT dynamic INT8: per-tensor u8 activations, s8 weights)
  head8 / head4    the 576x49152 LM head, 8-bit (vcompress) or 4-bit blocks
With --artifact (an x86-cpu ONNX artifact folder, e.g. runs/demo/05-export-onnx) the same run also measures that
artifact whole, through the runtime an app ships (devices' host bench: ONNX Runtime GenAI's generator, a process
without torch), interleaved with a copy whose float-zero correction nodes are cut out: the copy computes wrong
logits, it only shows what the correction costs in the real step.
For decode (M=1) the table gives the bytes each step reads, ms, GB/s and that as a share of the host's copy
bandwidth (measured in the same run, as bench/peers.py does); for prefill (M=--prefill) GFLOP/s against
the --peak-gflops of the profile. Prints a Markdown table; --out writes it with a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
LAYER = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
HEAD = (576, 49152)
VARIANTS = ["sym4", "sym4+correction", "sym4+corr-gemm", "sym4-b128", "sym4-fp32act", "zp4", "int8", "fp32", "dq-int8", "head8", "head4"]


class Graph:
    """Nodes and initializers of one benchmark graph, with the byte count of its weights."""

    def __init__(self):
        self.nodes, self.inits, self.bytes, self.flops_per_row = [], [], 0, 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        self.bytes += array.nbytes
        return name

    def shared(self, name: str, array: np.ndarray) -> str:
        """An initializer every node of the graph that names it reads (made, and its bytes counted, once)."""
        return name if any(t.name == name for t in self.inits) else self.init(name, array)

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **attrs))
        return name


def _nbits(g: Graph, rng, x: str, k: int, n: int, name: str, bits: int, zero_points: bool, block: int = BLOCK, level: int = 4) -> str:
    blocks = -(-k // block)
    b = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    inputs = [x, g.init(f"{name}.B", b), g.init(f"{name}.scales", rng.uniform(1e-3, 2e-3, (n, blocks)).astype(np.float32))]
    if zero_points:
        per_byte = 8 // bits
        inputs.append(g.init(f"{name}.zp", rng.integers(0, 256, size=(n, -(-blocks // per_byte)), dtype=np.uint8)))
    g.flops_per_row += 2 * k * n
    return g.node("MatMulNBits", inputs, name, domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=level)


def _correction(g: Graph, rng, x: str, main: str, k: int, n: int, name: str, by_gemm: bool) -> str:
    groups = k // BLOCK
    matrix = g.init(f"{name}.corr", rng.normal(0, 1e-2, (groups, n)).astype(np.float32))
    if by_gemm:
        ones = np.kron(np.eye(groups, dtype=np.float32), np.ones((BLOCK, 1), np.float32))  # [K, G], one per K
        sums = g.node("MatMul", [x, g.shared(f"groupsum.{k}", ones)], f"{name}/groupsum")
    else:
        shape = g.init(f"{name}.shape", np.array([0, groups, BLOCK], np.int64))
        grouped = g.node("Reshape", [x, shape], f"{name}/reshape")
        sums = g.node("ReduceSum", [grouped, g.init(f"{name}.axes", np.array([-1], np.int64))], f"{name}/sum", keepdims=0)
    fix = g.node("MatMul", [sums, matrix], f"{name}/fix")
    return g.node("Add", [main, fix], f"{name}/corrected")


def _linear(g: Graph, rng, variant: str, x: str, k: int, n: int, name: str) -> str:
    if variant == "fp32":
        g.flops_per_row += 2 * k * n
        return g.node("MatMul", [x, g.init(f"{name}.W", rng.normal(0, 0.02, (k, n)).astype(np.float32))], name)
    if variant == "dq-int8":
        g.flops_per_row += 2 * k * n
        w = g.init(f"{name}.W", rng.integers(-127, 128, (k, n), dtype=np.int8))
        scale = g.init(f"{name}.scale", np.array([1e-3], np.float32))
        zero = g.init(f"{name}.zero", np.array([0], np.int8))
        return g.node("DynamicQuantizeMatMul", [x, w, scale, zero], name, domain="com.microsoft")
    bits = 8 if variant in ("int8", "head8") else 4
    block = 128 if variant == "sym4-b128" else BLOCK
    level = 1 if variant == "sym4-fp32act" else 4
    y = _nbits(g, rng, x, k, n, name, bits, zero_points=variant == "zp4", block=block, level=level)
    if variant.startswith("sym4+"):
        return _correction(g, rng, x, y, k, n, name, by_gemm=variant == "sym4+corr-gemm")
    return y


def build(variant: str, layers: int, rows: int | str = "rows", seed: int = 0) -> tuple[onnx.ModelProto, Graph]:
    """The variant's graph; `rows` fixes the input's first dimension or names it (one session for M=1 and M=256)."""
    rng = np.random.default_rng(seed)
    g, outputs = Graph(), []
    inputs = {576: "x", 1536: "x_down"}
    if variant.startswith("head"):
        outputs.append(_linear(g, rng, variant, "x", *HEAD, "head"))
    else:
        for i in range(layers):
            for part, (k, n) in LAYER.items():
                outputs.append(_linear(g, rng, variant, inputs[k], k, n, f"l{i}.{part}"))
    used = {node.input[0] for node in g.nodes}
    graph = helper.make_graph(
        g.nodes,
        variant,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, k]) for k, name in inputs.items() if name in used],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return model, g


def open_session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feeds_for(model: onnx.ModelProto, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i.name: rng.normal(0, 1, (rows, i.type.tensor_type.shape.dim[1].dim_value)).astype(np.float32) for i in model.graph.input}


def _timed(session, feeds: dict, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        session.run(None, feeds)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_interleaved(models: dict[str, onnx.ModelProto], args) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per decode run (one row) and per prefill run (--prefill rows) of each variant, timed
    in --rounds rounds that visit every variant in turn, so a slow spell of this shared host falls on every
    variant alike. One session is alive at a time (opened for its visit, warmed up, closed): with every
    variant's session open at once, their idle thread pools and weights slowed whichever ran next by up to 3x."""
    decode = {name: [] for name in models if name != "dq-int8"}  # dynamic INT8 reads int8 weights, 2x sym4's: prefill only
    prefill = {name: [] for name in models} if args.prefill else {}
    serialized = {name: model.SerializeToString() for name, model in models.items()}
    for _ in range(args.rounds):
        for name, model in models.items():
            session = open_session(serialized[name], args.threads)
            if name in decode:
                decode[name] += _timed(session, feeds_for(model, 1), max(1, args.runs // args.rounds), warmup=3)
            if name in prefill:
                prefill[name] += _timed(session, feeds_for(model, args.prefill), max(1, args.runs // 4 // args.rounds), warmup=1)
            del session
    return ({n: statistics.median(v) for n, v in decode.items()}, {n: statistics.median(v) for n, v in prefill.items()})


def without_correction(artifact: Path, out: Path) -> int:
    """A copy of `artifact` in `out` with every .../zero_correction/... node cut out (each Add's output
    rewired to its MatMulNBits input); returns how many nodes were cut."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in artifact.iterdir():
        if f.is_file() and f.name != "model.onnx":
            shutil.copy(f, out / f.name)  # ONNX Runtime refuses external data outside the model's folder
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    cut = [n for n in model.graph.node if "/zero_correction/" in n.name]
    rewire = {n.output[0]: n.input[0] for n in cut if n.op_type == "Add"}
    kept = [n for n in model.graph.node if "/zero_correction/" not in n.name]
    for node in kept:
        node.input[:] = [rewire.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(out / "model.onnx"))
    return len(cut)


def measure_artifacts(artifact: Path, threads: int, runs: int, rounds: int = 2) -> list[dict]:
    """The artifact and its correction-less copy, `rounds` interleaved rounds through the host bench."""
    import tempfile

    from vcompress.devices import measure

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "no-correction"
        cut = without_correction(artifact, bare)
        for round_ in range(rounds):
            for label, folder in (("artifact", artifact), (f"artifact, {cut} correction nodes cut", bare)):
                latency = measure(folder, "host", prompt_tokens=256, decode_tokens=64, runs=runs, warmup=1, threads=threads, estimate=False)
                row = {"variant": label, "round": round_, "ttft_ms": latency["ttft_ms"]["value"]}
                row |= {"decode_tok_s": latency["decode_tokens_per_s"]["value"], "peak_rss_mib": latency["peak_rss_mb"]["value"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def _copy_bandwidth(threads: int) -> dict:
    from vcompress.core.by_path import load_by_path

    return load_by_path("peers", ROOT / "bench" / "peers.py").memory_bandwidth(threads=threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="timed decode runs per variant (prefill: a quarter)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the runs are spread over")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prefill", type=int, default=256, help="rows of the prefill measurement (0: decode only)")
    parser.add_argument("--peak-gflops", type=float, default=192.0, help="the host's fp32 peak (profiles/x86-cpu.yaml)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--artifact", type=Path, help="an ONNX artifact folder to measure whole, with and without its correction")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bandwidth = _copy_bandwidth(args.threads)
    gbs = bandwidth["copy_gbs"]
    variants = args.variants.split(",")
    built = {v: build(v, args.layers) for v in variants}
    decode, prefill = time_interleaved({v: model for v, (model, _) in built.items()}, args)
    results = []
    for variant in variants:
        g = built[variant][1]
        row = {"variant": variant, "nodes": len(g.nodes), "mib": round(g.bytes / 2**20, 1)}
        if variant in decode:
            row |= {"decode_ms": round(decode[variant] * 1e3, 3), "decode_gbs": round(g.bytes / decode[variant] / 1e9, 1)}
            row["decode_pct_copy"] = round(100 * row["decode_gbs"] / gbs, 1)
        if variant in prefill:
            gflops = g.flops_per_row * args.prefill / prefill[variant] / 1e9
            row |= {"prefill_ms": round(prefill[variant] * 1e3, 1), "prefill_gflops": round(gflops, 1)}
            row["prefill_pct_peak"] = round(100 * gflops / args.peak_gflops, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    table = [
        f"ONNX Runtime {ort.__version__}, {args.threads} threads, SmolLM2-135M linears ({args.layers} layers; head rows: the 576x49152 head alone), "
        f"block {BLOCK}; copy bandwidth {gbs} GB/s; prefill {args.prefill} rows against {args.peak_gflops} GFLOP/s peak; "
        f"medians of {args.runs} decode runs per variant in {args.rounds} interleaved rounds.",
        "",
        "| variant | nodes | weights MiB | decode ms | decode GB/s | % copy bw | prefill ms | prefill GFLOP/s | % peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r["variant"], r["nodes"], r["mib"]] + [
            r.get(key, "-") for key in ("decode_ms", "decode_gbs", "decode_pct_copy", "prefill_ms", "prefill_gflops", "prefill_pct_peak")
        ]
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
    artifacts = measure_artifacts(args.artifact, args.threads, 5) if args.artifact else []
    if artifacts:
        table += [
            "",
            f"The whole artifact {args.artifact} (host bench, 256-token prompt, 64 decoded, median of 5; rounds interleaved):",
            "",
        ]
        table += ["| round | variant | TTFT ms | decode tok/s | peak RSS MiB |", "|---|---|---|---|---|"]
        table += [f"| {r['round']} | {r['variant']} | {r['ttft_ms']} | {r['decode_tok_s']} | {r['peak_rss_mib']} |" for r in artifacts]
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.md").write_text("\n".join(table) + "\n")
        (args.out / "kernels.json").write_text(
            json.dumps({"bandwidth": bandwidth, "rows": results, "artifact": artifacts}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
