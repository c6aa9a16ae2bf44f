"""What each runtime holds in memory beside the model file's weights, measured on this host: the data behind the
whole-process peak-RAM estimate (core/runtime_memory.json, read by core/roofline_math.py).

    python bench/runtime_ram.py [--layers 4 12] [--out core/runtime_memory.json] [--runtimes gguf ...]

Two random Llama-shaped models that differ only in depth are exported (ONNX INT4, TFLite INT8 with its
LiteRT-LM bundle) and run once, each artifact through each session an app or our loop uses (and the HF folders
through PyTorch), by devices/bench.py in its own process (numpy and the runtime; PyTorch for the HF folders), which
reports the peak RSS (VmHWM) and the RSS after importing the runtime (the baseline). What the runtime holds beside
the file is the peak less the baseline less the arithmetic's own sum (stored weights, KV cache, prefill
activations: roofline_math.peak_ram_bytes): a fixed part (arenas, kernels' scratch) and a part per stored weight
byte (packed or prepacked copies), the line through the two models' points (`fit`), with the larger baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/tiny.py's tokenizer and config

PROMPT, DECODE = 64, 16
ONNX, TFLITE = ["onnx", "--quant", "int4"], ["tflite", "--quant", "int8"]
GGUF = ["gguf", "--quant", "int4"]  # a float model: GPTQ onto Q4_1 first
RUNS = {  # devices/bench.py's session (what an artifact runs through) -> (export flags, bench flags)
    "genai": (ONNX, []),  # ONNX Runtime GenAI, what an app ships for an ONNX folder
    "onnx": (ONNX, ["--backend", "onnxruntime"]),  # ONNX Runtime under our own loop
    "litertlm": (TFLITE, []),  # LiteRT-LM on the folder's model.litertlm, what the adb device runs
    "tflite": (TFLITE, ["--backend", "tflite"]),  # the LiteRT interpreter under our own loop
    "gguf": (GGUF, []),  # llama.cpp on the memory-mapped GGUF (exporters/_gguf_session.py), what an app embedding it holds
    "torch": (None, []),  # the HF folder itself through PyTorch (validate of an unexported model)
}


def build_model(out: Path, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_config, build_tokenizer

    tokenizer = build_tokenizer()
    sizes = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}
    config = build_config("llama", len(tokenizer), layers, **sizes, max_position_embeddings=512, rope_theta=10000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export(model: Path, flags: list[str], out: Path) -> Path:
    if not out.exists():
        command = [sys.executable, "-m", "vcompress", "export", *flags, "--model", str(model), "--out", str(out)]
        if flags[0] == "tflite":
            command += ["--prefill-tokens", str(PROMPT), "--cache-length", str(2 * (PROMPT + DECODE)), "--min-agreement", "0"]
        if flags[0] == "gguf":  # a random model's flat logits: its agreement checks say nothing here
            command += ["--min-agreement", "0", "--heldout-blocks", "0"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def bench(artifact: Path, flags: list[str]) -> dict:
    script = ROOT / "devices" / "bench.py"
    command = [sys.executable, str(script), str(artifact), "--prompt-tokens", str(PROMPT), "--decode-tokens", str(DECODE)]
    done = subprocess.run([*command, "--runs", "1", "--warmup", "0", "--threads", "2", *flags], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def held_beside(artifact: Path, latency: dict) -> dict:
    from vcompress.core.roofline_math import peak_ram_bytes, shapes
    from vcompress.core.units import MIB
    from vcompress.devices.roofline_estimate import artifact_model_files, kv_bytes_per_element, read_config, weight_bytes

    shape = shapes(read_config(artifact))
    weights = weight_bytes(artifact_model_files(artifact), tied=shape["tied"])
    arithmetic = peak_ram_bytes(shape, weights, PROMPT, DECODE, kv_bytes_per_element(artifact)) / MIB
    peak = latency["peak_rss_mb"]
    baseline = peak["runtime_baseline_mib"]
    beside = peak["value"] - baseline - arithmetic
    return {
        "stored_weights_mib": round(weights["stored_bytes"] / MIB, 2),
        "peak_rss_mib": peak["value"],
        "baseline_mib": baseline,
        "arithmetic_mib": round(arithmetic, 2),
        "held_beside_mib": round(beside, 2),
        "runtime": latency.get("runtime"),
    }


def fit(rows: list[dict]) -> dict:
    """What the runtime holds beside the file as a fixed part plus a part per stored weight byte, through the two
    models' points (so it meets both measurements), neither part below zero; the baseline, the larger measured."""
    small, large = sorted(rows, key=lambda r: r["stored_weights_mib"])
    per_mib = max(0.0, (large["held_beside_mib"] - small["held_beside_mib"]) / (large["stored_weights_mib"] - small["stored_weights_mib"]))
    fixed = max(r["held_beside_mib"] - per_mib * r["stored_weights_mib"] for r in rows)
    return {
        "baseline_mib": max(r["baseline_mib"] for r in rows),
        "fixed_mib": round(max(0.0, fixed), 2),
        "held_per_weight_byte": round(per_mib, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 12])
    parser.add_argument("--out", type=Path, default=ROOT / "core" / "runtime_memory.json")
    parser.add_argument(
        "--runtimes", nargs="+", choices=list(RUNS), default=list(RUNS), help="measure these; the others' rows are kept from --out"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vcompress-runtime-ram")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {n: args.work / f"llama-{n}l" for n in args.layers}
    for layers, folder in models.items():
        if not folder.exists():
            build_model(folder, layers)
    kept = json.loads(args.out.read_text())["runtimes"] if args.out.is_file() else {}
    runtimes = {name: kept[name] for name in RUNS if name in kept and name not in args.runtimes}
    for name in args.runtimes:
        export_flags, bench_flags = RUNS[name]
        rows = []
        for layers, folder in models.items():
            artifact = export(folder, export_flags, args.work / f"{export_flags[0]}-{layers}l") if export_flags else folder
            rows.append({"layers": layers, **held_beside(artifact, bench(artifact, bench_flags))})
            print(name, rows[-1], flush=True)
        runtimes[name] = {
            "format": export_flags[0] if export_flags else "torch",
            **fit(rows),
            "measured": rows,
            "date": dt.date.today().isoformat(),
        }
    document = {
        "how": f"bench/runtime_ram.py: devices/bench.py once per artifact ({PROMPT}-token prompt, {DECODE} decoded, 2 threads), "
        "peak RSS (VmHWM) less the RSS after importing the runtime less roofline_math.peak_ram_bytes: a fixed part and one "
        "per stored weight byte through the two models' points",
        "host": f"{platform.machine()} {_cpu_model()}",
        "date": dt.date.today().isoformat(),
        "runtimes": runtimes,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
