"""A vcompress GGUF export beside llama.cpp's own GGUF of the same model, both measured as validate measures the
verdict: devices/bench.py in a process of its own, opening the file through the exporter's session
(exporters/_gguf_session.py: numpy and llama_cpp), with the same prompt, decode length, runs and threads.

    python bench/gguf_rss.py RUN_OR_EXPORT [--gguf FILE] [--rounds 3] [--out bench/results/gguf_rss]

llama.cpp's own file (default: the embedded SmolLM2-135M-Instruct's GGUF, which is llama.cpp's Q4_1) opens through a
folder holding a link to it and the export's manifest.json, so the session and the bench are the same code. The
rounds alternate the two (ours, llama.cpp's, ours, ...); each figure is the median of the rounds, with the spread.
Prints a table and writes gguf_rss.json and gguf_rss.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"peak_rss_mb": "peak RSS MiB", "ttft_ms": "TTFT ms", "decode_tokens_per_s": "decode tok/s"}


def export_folder(path: Path) -> Path:
    """The GGUF export folder: the path itself, or a run folder's NN-export-gguf."""
    if (path / "manifest.json").is_file():
        return path
    found = sorted(p for p in path.glob("[0-9][0-9]-export-gguf") if (p / "manifest.json").is_file())
    if not found:
        raise SystemExit(f"{path}: neither a GGUF export (manifest.json) nor a run folder with an NN-export-gguf folder")
    return found[-1]


def bench(folder: Path, args) -> dict:
    command = [sys.executable, "-m", "vcompress.devices.bench", str(folder), "--prompt-tokens", str(args.prompt_tokens)]
    command += ["--decode-tokens", str(args.decode_tokens), "--runs", str(args.runs), "--warmup", "1", "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return {key: result[key]["value"] for key in FIGURES} | {"modules": result["modules_imported"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours", type=Path, help="a `vcompress export gguf` folder, or a run folder holding one")
    parser.add_argument("--gguf", type=Path, default=None, help="llama.cpp's own GGUF (default: the embedded model's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_rss")
    args = parser.parse_args()
    import peers  # bench/peers.py, beside this script

    from vcompress.core.models import default_gguf

    ours = export_folder(args.ours)
    own = args.gguf or default_gguf()
    with tempfile.TemporaryDirectory() as work:
        manifest = json.loads((ours / "manifest.json").read_text())
        rows = {"vcompress-gguf": ours, "llama.cpp": peers.gguf_folder(own, Path(work) / "llama-cpp-own", manifest)}
        rounds = {name: [] for name in rows}
        for n in range(args.rounds):
            for name, folder in rows.items():
                print(f"round {n + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                rounds[name].append(bench(folder, args))
    files = {"vcompress-gguf": ours / json.loads((ours / "manifest.json").read_text())["files"]["model"], "llama.cpp": own}
    table = []
    for name, measured in rounds.items():
        row = {"row": name, "file": str(files[name]), "size_mib": round(files[name].stat().st_size / 2**20, 2)}
        for key in FIGURES:
            values = [m[key] for m in measured]
            row[key], row[f"{key}_spread"] = statistics.median(values), [min(values), max(values)]
        row["torch_resident"] = any("torch" in m["modules"] for m in measured)
        table.append(row)
    ratio = round(table[0]["peak_rss_mb"] / table[1]["peak_rss_mb"], 4)
    settings = {k: getattr(args, k) for k in ("rounds", "runs", "prompt_tokens", "decode_tokens", "threads")}
    lines = ["| row | size MiB | " + " | ".join(FIGURES.values()) + " |", "|---" * (2 + len(FIGURES)) + "|"]
    for row in table:
        cells = [f"{row[k]} ({row[f'{k}_spread'][0]}-{row[f'{k}_spread'][1]})" for k in FIGURES]
        lines.append(f"| {row['row']} | {row['size_mib']} | " + " | ".join(cells) + " |")
    lines.append(f"\npeak RSS, vcompress-gguf / llama.cpp: {ratio} (median of {args.rounds} alternating rounds; settings {settings})")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/gguf_rss.py " + " ".join(sys.argv[1:])
    (args.out / "gguf_rss.json").write_text(
        json.dumps({"command": command, "settings": settings, "rows": table, "rss_ratio": ratio}, indent=2)
    )
    (args.out / "gguf_rss.md").write_text(f"`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
