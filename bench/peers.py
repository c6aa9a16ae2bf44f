"""vcompress against the tools a user would pick instead, and against the memory-bandwidth limit.

    flock /tmp/vcompress-heavy.lock .venv/bin/python bench/peers.py [--model M] [--threads 2] [--runs 5] [--rounds 5]
        [--out bench/results/peers] [--per-subject 5] [--ours RUN_OR_ARTIFACT] [--tflite ARTIFACT] [--setup]

One run, one host, one input model (default: the embedded SmolLM2-135M-Instruct). Rows:
  pytorch-fp32      transformers model with its KV cache, through vcompress's torch Runner
  optimum-onnx      `optimum-cli export onnx --task text-generation-with-past` (optimum-onnx pins transformers 4.57, so
                    it exports from its own venv, --optimum-python), run on plain onnxruntime (no torch, no optimum)
  ort-int8-dynamic  onnxruntime.quantization.quantize_dynamic of that export, run the same way
  llama.cpp         the model's GGUF through llama-cpp-python (its own venv, --llama-python)
  vcompress-int4    vcompress's x86-cpu artifact (ONNX INT4; --ours, else runs/demo, else an export)
  vcompress-int4-4bit-only  the same artifact without its int8 prompt graph (only when it has one)
  vcompress-int8    `vcompress export onnx --quant int8`
  ort-genai-int4    onnxruntime-genai's own model builder (`-p int4 -e cpu`, its defaults: RTN symmetric block 32,
                    accuracy level 4 on CPU), run by genai's generator, as vcompress-int4 is
  vcompress-tflite  an int8 TFLite artifact, only with --tflite
Each row is measured in subprocesses of its own that import only its runtime (so peak RSS is its own). Speed is a
race: --rounds rounds, each visiting every row in turn (A, B, C, ... then again), one worker process alive at a
time; per visit the model loads, warms up and runs --runs times. A row's time to first token (fixed 256-token
prompt), greedy decode tokens/s and peak RSS (VmHWM) are the median of its rounds' medians with the lowest and
highest round; each ratio to vcompress-int4 is taken round by round and is a "win" or "loss" only when every round
agrees ("undecided" otherwise). Quality, once per row: held-out perplexity (--ppl-blocks blocks of
--ppl-seq-len tokens of MMLU text outside the medical subjects, the text validate uses) and its rise over
pytorch-fp32, top-1 next-token agreement with pytorch-fp32 at those positions, and MMLU answer agreement with pytorch-fp32 and accuracy on a fixed subset (--per-subject questions of each of the 57
subjects, seed 0) in the cloze format the profiles use, beside two floor rows (always the first answer; a seeded
random answer) that a quality column must clear. MMLU uses vcompress.core.scoring's prompts and token ids for every
row: the parent tokenizes, each runtime returns logits on those ids, and scoring reads each answer's log-prob.
llama.cpp scores a sequence in one eval (logits_all).
The host's copy bandwidth is measured in the same run; each row's decode speed is printed as a
fraction of bandwidth / bytes read per token (devices/roofline_estimate.py's weight and KV byte counts).
A row that cannot run shows why instead of numbers. Writes peers.json, peers.md, peers.png.

--setup builds what is missing: the optimum venv (torch 2.13.0 CPU first) and the llama-cpp-python
venv from a wheel built once with GGML_NATIVE under ~/.cache/vcompress/peers (~7 min on 2 cores).
This file is also the per-row worker (`--worker JOB.json`), run by each row's own Python: keep
module-level imports to the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VCOMPRESS_CACHE", Path.home() / ".cache" / "vcompress")) / "peers"
OPTIMUM_PYTHON = Path("/work/venv-optimum/bin/python")
# llama.cpp runs in this venv when the [gguf] extra put llama-cpp-python here, else in its own (--setup)
LLAMA_PYTHON = Path(sys.executable) if importlib.util.find_spec("llama_cpp") else CACHE / "venv-llama" / "bin" / "python"
LLAMA_CPP_VERSION = "0.3.36"
OPTIMUM_REQUIREMENTS = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.*", "onnxruntime==1.31.*"]
OURS = "vcompress-int4"  # the row every ratio is taken against
REFERENCE = "pytorch-fp32"  # the row MMLU agreement is taken against


# =========================================================================================
# Worker side: one engine per runtime, the same timing and logits code for all of them.
# Runs inside the row's own Python (main venv, optimum venv or llama venv).
# =========================================================================================


class TorchEngine:
    """PyTorch fp32 through vcompress's torch Runner (prefill, then one cached step per token)."""

    def __init__(self, target, threads, context, **_):
        from vcompress.exporters import open_runner

        self.runner = open_runner(None if target == "default" else target, threads=threads, backend="torch")

    def prefill(self, ids):
        import torch

        logits, self.state = self.runner.prefill(torch.tensor([ids]))
        return logits.numpy()

    def decode(self, token):
        logits, self.state = self.runner.decode(token, self.state)
        return logits.numpy()

    def logits_at(self, ids, positions):
        import torch

        return self.runner.forward(torch.tensor([ids]), positions=torch.tensor(positions))[0].numpy()


class RunnerEngine(TorchEngine):
    """Any vcompress Runner named by its artifact's manifest (the TFLite row)."""

    def __init__(self, target, threads, context, **_):
        from vcompress.exporters import open_runner

        self.runner = open_runner(target, threads=threads)

    def logits_at(self, ids, positions):
        import torch

        return self.runner.forward(torch.tensor([ids]))[0, positions].numpy()


class SessionEngine:
    """A numpy-level session (prefill(ids) -> logits, state; decode(token, state)) driven one sequence at a time."""

    def prefill(self, ids):
        import numpy as np

        logits, self.state = self.session.prefill(np.array(ids, np.int64))
        return logits

    def decode(self, token):
        logits, self.state = self.session.decode(token, self.state)
        return logits

    def logits_at(self, ids, positions):
        import numpy as np

        return self.session.logits(np.array([ids], np.int64))[0, positions]


class OnnxEngine(SessionEngine):
    """vcompress's ONNX artifact through exporters/_onnx_session.py, numpy only: no torch resident,
    as in an app built on ONNX Runtime (the same loop OnnxRunner wraps)."""

    def __init__(self, target, threads, context, profile_prefix=None, **_):
        from vcompress.core.by_path import load_by_path  # this row runs in the main venv

        module = load_by_path("onnx_session", ROOT / "exporters" / "_onnx_session.py")
        self.session = module.DecoderSession(target, threads=threads)
        if profile_prefix:  # the same session settings, with ONNX Runtime's per-node profiler on
            ort = module.ort
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = self.session.threads, 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
            model_file = Path(target) / self.session.manifest["files"]["model"]
            self.session.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


class OrtGraphEngine:
    """An optimum-format decoder graph (input_ids, attention_mask, position_ids, past_key_values.N.key/value in;
    logits, present.N.* out) on plain onnxruntime and numpy: the process holds no torch and no optimum, as an
    app built on ONNX Runtime would (optimum's ORTModelForCausalLM would bring both)."""

    def __init__(self, target, threads, context, file_name="model.onnx", **_):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(target) / file_name), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past]

    def _run(self, ids, past):
        import numpy as np

        start = 0 if past is None else past[0].shape[2]
        length = start + len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, length), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, length, dtype=np.int64)[None]
        for i, name in enumerate(self.past):
            shape = self.inputs[name].shape  # [batch, kv heads, past, head dim]
            feeds[name] = past[i] if past is not None else np.zeros((1, shape[1], 0, shape[3]), np.float32)
        logits, *self.cache = self.session.run(self.outputs, feeds)
        return logits[0]

    def prefill(self, ids):
        return self._run(ids, None)[-1]

    def decode(self, token):
        return self._run([token], self.cache)[-1]

    def logits_at(self, ids, positions):
        return self._run(ids, None)[positions]


class LlamaEngine(SessionEngine):
    """A GGUF folder (vcompress's export, or llama.cpp's own file linked by gguf_folder) through exporters/_gguf_session.py, numpy and
    llama_cpp only: the session the host bench measures a GGUF export with (prompt in one batch, then one eval per
    token; on an AMX host llama.cpp's extra buffer types off, where this build crashes)."""

    def __init__(self, target, threads, context, logits_all=False, **_):
        from vcompress.core.by_path import load_by_path  # the session imports vcompress.core: the llama venv holds it too

        module = load_by_path("gguf_session", ROOT / "exporters" / "_gguf_session.py")
        self.session = module.Session(target, threads=threads, context=context, all_logits=logits_all)


class GenaiEngine(SessionEngine):
    """An onnxruntime-genai model folder (vcompress's ONNX export, or genai's own model builder's) through
    genai's generator (exporters/_genai_session.py), numpy and onnxruntime_genai only: what an app ships."""

    def __init__(self, target, threads, context, **_):
        from vcompress.core.by_path import load_by_path  # this row runs in the main venv

        module = load_by_path("genai_session", ROOT / "exporters" / "_genai_session.py")
        self.session = module.Session(target, threads=threads)
        self.session.headroom = context

    def logits_at(self, ids, positions):
        """The generator hands out the newest position's logits: the prompt up to the first wanted
        position in one call, then one token at a time."""
        import numpy as np

        wanted = sorted(positions)
        rows = {wanted[0]: self.prefill(ids[: wanted[0] + 1]).copy()}
        for at in range(wanted[0] + 1, wanted[-1] + 1):
            logits = self.decode(ids[at])
            if at in positions:
                rows[at] = logits.copy()
        return np.stack([rows[p] for p in positions])


ENGINES = {
    "torch": TorchEngine,
    "runner": RunnerEngine,
    "onnx": OnnxEngine,
    "genai": GenaiEngine,
    "ort": OrtGraphEngine,
    "llama": LlamaEngine,
}


def time_generation(engine, prompt: list[int], decode_tokens: int, runs: int, warmup: int) -> dict:
    """Time to first token and greedy decode tokens/s, per run (devices/bench.py's one_run, on numpy)."""
    import numpy as np

    ttft_ms, decode_tps, tokens = [], [], []
    for i in range(warmup + runs):
        start = time.perf_counter()
        token = int(np.argmax(engine.prefill(prompt)))
        first = time.perf_counter()
        generated = [token]
        for _ in range(decode_tokens):
            token = int(np.argmax(engine.decode(token)))
            generated.append(token)
        end = time.perf_counter()
        if i >= warmup:
            ttft_ms.append(round((first - start) * 1e3, 2))
            decode_tps.append(round(decode_tokens / (end - first), 2))
            tokens = generated[:8]
    return {
        "ttft_ms": statistics.median(ttft_ms),
        "ttft_ms_samples": ttft_ms,
        "decode_tokens_per_s": statistics.median(decode_tps),
        "decode_tokens_per_s_samples": decode_tps,
        "first_tokens": tokens,
    }


def profile_steps(engine, prompt: list[int], decode_tokens: int, top: int = 8) -> dict:
    """Where an ONNX Runtime engine spends its time: one prefill, then `decode_tokens` decode
    steps, with node times summed by operator type (per prefill, and per decoded token)."""
    import numpy as np

    token = int(np.argmax(engine.prefill(prompt)))
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(np.argmax(engine.decode(token)))
    wall_ms = (time.perf_counter() - start) * 1e3 / decode_tokens
    events = json.loads(Path(engine.session.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < 2:
        return {"error": "the profile holds no decode runs"}
    prefill = _ops_between(events, runs[0]["ts"], runs[0]["ts"] + runs[0]["dur"], 1, top)
    decode = _ops_between(events, runs[1]["ts"], float("inf"), decode_tokens, top)
    run_ms = sum(e["dur"] for e in runs[1:]) / 1e3 / decode_tokens
    return {
        "prefill": {"run_ms": round(runs[0]["dur"] / 1e3, 3), **prefill},
        "decode": {
            "wall_ms_per_token": round(wall_ms, 3),
            "run_ms_per_token": round(run_ms, 3),
            "outside_nodes_share": round(1 - decode["node_ms"] / wall_ms, 3),
            **decode,
        },
    }


def _ops_between(events, begin: float, end: float, steps: int, top: int) -> dict:
    ops: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and begin <= e["ts"] <= end and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"] / 1e3 / steps
    total = sum(ops.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    return {"node_ms": round(total, 3), "ops": [{"op": op, "ms": round(ms, 3), "share": round(ms / total, 3)} for op, ms in ranked]}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM, KiB) in MiB; read here because devices/bench.py imports
    vcompress, which the peers' venvs lack."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise SystemExit("no VmHWM in /proc/self/status: peak RSS is read on Linux only")


def worker(job_file: Path) -> dict:
    """One row's measurement, in this process: speed and peak RSS, or MMLU logits (to an .npy file)."""
    import numpy as np

    job = json.loads(job_file.read_text())
    start = time.perf_counter()
    engine = ENGINES[job["engine"]](job["target"], job["threads"], job["context"], **job.get("options", {}))
    out = {"load_s": round(time.perf_counter() - start, 2)}
    if job.get("speed"):
        s = job["speed"]
        out.update(time_generation(engine, s["prompt"], s["decode_tokens"], s["runs"], s["warmup"]))
        out["peak_rss_mb"] = peak_rss_mib()
    if job.get("profile"):
        out["profile"] = profile_steps(engine, job["profile"]["prompt"], job["profile"]["decode_tokens"])
    if job.get("ppl"):
        out["ppl"] = heldout_nll(engine, job["ppl"]["blocks"])
    if job.get("mmlu"):
        rows = [np.asarray(engine.logits_at(ids, positions), np.float32) for ids, positions in job["mmlu"]["calls"]]
        np.save(job["mmlu"]["out"], np.concatenate(rows))
        out["mmlu_positions"] = sum(len(r) for r in rows)
    return out


def heldout_nll(engine, blocks: list[list[int]]) -> dict:
    """Summed negative log-likelihood of each block's next tokens, how many were scored, and the
    runtime's top-1 next token at each scored position (for top-1 agreement with the fp32 row)."""
    import numpy as np

    nll, tokens, top1 = 0.0, 0, []
    for ids in blocks:
        logits = np.asarray(engine.logits_at(ids, list(range(len(ids) - 1))), np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        tokens += len(ids) - 1
        top1 += logits.argmax(-1).tolist()
    return {"nll": nll, "tokens": tokens, "top1": top1}


# =========================================================================================
# Parent side: prepare each row's model, run its workers, compare.
# =========================================================================================


def memory_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> dict:
    """Copy bandwidth of a `gib` GiB buffer, best of `repeats`, `threads` threads each copying a
    slice (numpy drops the GIL for plain copies). Counts read + write bytes, as STREAM's Copy does."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.ones(int(gib * 2**30) // 8)
    dst = np.zeros_like(src)  # both touched before timing: page faults are not bandwidth
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    seconds = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            seconds.append(time.perf_counter() - start)
    best = min(seconds)
    return {
        "copy_gbs": round(2 * src.nbytes / best / 1e9, 2),
        "buffer_gib": gib,
        "threads": threads,
        "repeats": repeats,
        "samples_gbs": [round(2 * src.nbytes / s / 1e9, 2) for s in seconds],
        "method": "numpy copyto, best of repeats, (read + write) bytes / s",
    }


class Recorder:
    """A scoring LogitsFn that first records the (ids, positions) scoring asks for, then replays
    the logits a runtime computed for exactly those calls, so that every runtime is scored by
    vcompress.core.scoring itself on the same token ids."""

    def __init__(self, vocab: int):
        self.vocab, self.calls, self.logits, self.used = vocab, [], None, 0

    def __call__(self, ids, attention_mask=None, positions=None):
        import torch

        if ids.shape[0] != 1:
            raise ValueError("the recorder scores one question per call (batch_size=1)")
        wanted = positions.tolist() if positions is not None else list(range(ids.shape[1]))
        if self.logits is None:
            self.calls.append((ids[0].tolist(), wanted))
            return torch.zeros(1, len(wanted), self.vocab)
        block = torch.from_numpy(self.logits[self.used : self.used + len(wanted)])
        self.used += len(wanted)
        return block.unsqueeze(0)


def mmlu_questions(per_subject: int, seed: int, mmlu=None):
    from vcompress.core.data import load_mmlu, resolve_subjects, sample_questions

    return sample_questions(load_mmlu(mmlu, "test", resolve_subjects("all")), per_subject, seed)


def mmlu_calls(tokenizer, questions, vocab: int) -> list:
    recorder = Recorder(vocab)
    _score(recorder, tokenizer, questions)
    return recorder.calls


def mmlu_logprobs_from(logits, tokenizer, questions, vocab: int):
    recorder = Recorder(vocab)
    recorder.logits = logits
    logprobs = _score(recorder, tokenizer, questions)
    if recorder.used != len(logits):
        raise ValueError(f"replayed {recorder.used} logit rows of {len(logits)}: the runtime answered other calls than scoring asked")
    return logprobs


def _score(fn, tokenizer, questions):
    """Cloze, the format the profiles evaluate in (each answer text's log-probability after the question): on the
    letter prompt SmolLM2 answers "A" nearly always, and a constant answer would out-agree every row."""
    from vcompress.core import scoring

    return scoring.mmlu_logprobs(fn, tokenizer, questions, batch_size=1, format="cloze")


def run_worker(python: Path, job: dict, work: Path, timeout: int = 1800) -> dict:
    """Run this file as a worker under `python`; its last stdout line is the result JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
        json.dump(job, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    try:
        done = subprocess.run([str(python), __file__, "--worker", f.name], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker ran past {timeout} s") from None
    finally:
        os.unlink(f.name)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"worker exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the rows: each prepares its model and says how to run it --------------------------------
# A row is {"name", "runtime", "engine", "target", "python", "options", "kv_bytes", "weights_path"}
# or {"name", "runtime", "error"} when it cannot run here.


class Skip(Exception):
    """This row cannot run here; the message says why and how to fix it."""


def _row(runtime: str, engine: str, target, *, kv_bytes: int = 4, python=None, **more) -> dict:
    """A row's run: its weights are counted from its target unless `more` names `weights_path`."""
    run = {"runtime": runtime, "engine": engine, "target": target, "python": python or sys.executable, "kv_bytes": kv_bytes}
    return run | {"weights_path": target} | more


def row_pytorch(ctx) -> dict:
    return _row(
        f"PyTorch {ctx['versions'].get('torch')} (vcompress torch Runner, KV cache)", "torch", ctx["model_arg"], weights_path=ctx["hf_dir"]
    )


def row_optimum(ctx) -> dict:
    folder = optimum_export(ctx)
    return _row(
        f"optimum-onnx 0.1.0 export, plain onnxruntime {ctx['versions'].get('onnxruntime')} (no torch in the process)", "ort", folder
    )


def row_ort_int8(ctx) -> dict:
    source = optimum_export(ctx)
    folder = ctx["work"] / "ort-int8-dynamic"
    if not (folder / "model.onnx").is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log(f"quantize_dynamic {source} -> {folder}")
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
        quantize_dynamic(source / "model.onnx", tmp / "model.onnx", weight_type=QuantType.QInt8)
        tmp.rename(folder)
    return _row(
        f"onnxruntime quantize_dynamic (QInt8, defaults) of that export, plain onnxruntime {ctx['versions'].get('onnxruntime')}",
        "ort",
        folder,
    )


def gguf_folder(gguf: Path, folder: Path, manifest: dict) -> Path:
    """A folder that opens a bare GGUF (llama.cpp's own file) as the gguf export's session opens an export: `manifest`
    (at least max_positions) with the file linked as its model."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "model.gguf"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(gguf).resolve())
    files = {**manifest.get("files", {}), "model": link.name}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "gguf", "files": files, "source": str(gguf)}, indent=2))
    return folder


def row_llama(ctx, folder: Path | None = None) -> dict:
    """llama.cpp's own GGUF of the model (or `folder`, a vcompress GGUF export) through the gguf export's session."""
    gguf = ctx["gguf"]
    if gguf is None:
        raise Skip("no GGUF of this model: pass --model FILE.gguf (llama.cpp's convert_hf_to_gguf.py makes one)")
    python = ctx["llama_python"]
    if not Path(python).is_file():
        raise Skip(f"no llama-cpp-python venv at {python}; run with --setup (builds llama-cpp-python {LLAMA_CPP_VERSION} once, ~7 min)")
    version = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    if folder is None:
        positions = json.loads((ctx["hf_dir"] / "config.json").read_text())["max_position_embeddings"]
        folder = gguf_folder(gguf, ctx["work"] / f"llama-cpp-{gguf.stem}", {"max_positions": positions})
    return _row(
        f"llama.cpp via llama-cpp-python {version} (GGML_NATIVE), {gguf.name}",
        "llama",
        folder,
        kv_bytes=2,
        python=python,
        weights_path=gguf,
        score_options={"logits_all": True},
    )  # llama.cpp's KV cache is f16


def row_ours_int4(ctx) -> dict:
    folder = ctx["ours"] or ours_artifact(ctx)
    genai = (Path(folder) / "genai_config.json").is_file()  # what an app ships; an older export: our own loop
    through = f"onnxruntime-genai {ctx['versions'].get('onnxruntime-genai')} generator" if genai else "vcompress's loop"
    # scored by our loop on the same graphs: a whole sequence in one run, through the int8 prompt graph where the
    # artifact has one (genai hands out only the newest position's logits: the rest would go through the 4-bit graph)
    return _row(
        f"ONNX Runtime {ctx['versions'].get('onnxruntime')}, {_quant_label(folder)}, {through}",
        "genai" if genai else "onnx",
        folder,
        kv_bytes=_kv_bytes(folder),
        score_engine="onnx",
    )


def row_ours_4bit_only(ctx) -> dict:
    """The same artifact without its int8 prompt graph (when it has one): the 4-bit graph runs the prompt too."""
    folder = Path(ctx["ours"] or ours_artifact(ctx))
    manifest = json.loads((folder / "manifest.json").read_text())
    if "prefill_model" not in manifest["files"]:
        raise Skip(f"{folder} has no int8 prompt graph (export with --prefill-graph int8): {OURS} is already 4-bit alone")
    copy = ctx["work"] / "vcompress-int4-4bit-only"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for file in folder.iterdir():
        if file.is_file() and not file.name.startswith("model_prefill") and file.name not in ("manifest.json", "genai_config.json"):
            (copy / file.name).symlink_to(file.resolve())
    for key in ("prefill_model", "prefill_weights"):
        manifest["files"].pop(key)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    genai = json.loads((folder / "genai_config.json").read_text())
    genai["model"]["decoder"].pop("pipeline")
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    genai["model"]["type"] = "decoder" if model_type == "gpt2" else model_type  # as _onnx_genai writes a single graph
    (copy / "genai_config.json").write_text(json.dumps(genai, indent=1))
    return {**row_ours_int4({**ctx, "ours": copy}), "weights_path": copy}


def row_ours_int8(ctx) -> dict:
    folder = vcompress_export(ctx, "int8")
    return _row(f"ONNX Runtime {ctx['versions'].get('onnxruntime')}, {_quant_label(folder)}", "onnx", folder, kv_bytes=_kv_bytes(folder))


def row_genai_builder(ctx) -> dict:
    """onnxruntime-genai's own model builder on the same fp32 checkpoint, its defaults on CPU (RTN,
    symmetric, block 32, accuracy level 4, 4-bit tied embedding): the strongest ONNX peer."""
    folder = ctx["work"] / "ort-genai-int4"
    if not (folder / "genai_config.json").is_file():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ctx["hf_dir"]), "-o", str(tmp)]
        command += ["-p", "int4", "-e", "cpu", "-c", str(ctx["work"] / "genai-builder-cache")]
        log(" ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise Skip(f"onnxruntime-genai's model builder failed: {lines[-1] if lines else done.returncode}")
        tmp.rename(folder)
    return _row(
        f"onnxruntime-genai {ctx['versions'].get('onnxruntime-genai')} model builder int4 (defaults), its generator", "genai", folder
    )


def row_tflite(ctx) -> dict:
    folder = ctx["tflite"]
    if not (Path(folder) / "manifest.json").is_file():
        raise Skip(f"{folder} has no manifest.json; pass a folder written by `vcompress export tflite`")
    return _row("LiteRT, vcompress TFLite int8", "runner", folder, kv_bytes=_kv_bytes(folder))


def row_ours_gguf(ctx) -> dict:
    """vcompress's GGUF (the x86-cpu-gguf run's export: our GPTQ codes as Q4_1 blocks) through the same llama.cpp
    engine and venv as llama.cpp's own row."""
    found = sorted((ROOT / "runs" / "demo-gguf").glob("[0-9][0-9]-export-gguf/manifest.json"))
    if not found:
        raise Skip("no vcompress GGUF: run `vcompress run --profile x86-cpu-gguf --out runs/demo-gguf` first")
    gguf = found[-1].parent / json.loads(found[-1].read_text())["files"]["model"]
    return row_llama({**ctx, "gguf": gguf}, found[-1].parent)


ROWS = {
    "pytorch-fp32": row_pytorch,
    "optimum-onnx": row_optimum,
    "ort-int8-dynamic": row_ort_int8,
    "llama.cpp": row_llama,
    "vcompress-gguf": row_ours_gguf,
    OURS: row_ours_int4,
    "vcompress-int4-4bit-only": row_ours_4bit_only,
    "vcompress-int8": row_ours_int8,
    "ort-genai-int4": row_genai_builder,
    "vcompress-tflite": row_tflite,
}


def optimum_export(ctx) -> Path:
    if not Path(ctx["optimum_python"]).is_file():
        raise Skip(f"no optimum venv at {ctx['optimum_python']}; run with --setup or pass --optimum-python")
    folder = ctx["work"] / "optimum-fp32"
    if (folder / "model.onnx").is_file():
        return folder
    cli = Path(ctx["optimum_python"]).parent / "optimum-cli"
    if not cli.is_file():
        raise Skip(f"no optimum-cli at {cli}; run with --setup (a venv with {' '.join(OPTIMUM_REQUIREMENTS)}) or pass --optimum-python")
    if ctx["hf_dir"] is None:
        raise Skip("optimum exports a Hugging Face folder; pass one as --model")
    log(f"optimum-cli export onnx --task text-generation-with-past -> {folder}")
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source = legacy_config_copy(Path(ctx["hf_dir"]), ctx["work"] / "hf-transformers4")
    done = subprocess.run(
        [str(cli), "export", "onnx", "--model", str(source), "--task", "text-generation-with-past", str(tmp)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode or not (tmp / "model.onnx").is_file():
        raise Skip(f"optimum-cli export failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    want, got = (json.loads((f / "config.json").read_text()).get("rope_theta") for f in (source, tmp))
    if want != got:
        raise Skip(f"the optimum export read rope theta {got}, the model has {want}; check {source}/config.json")
    tmp.rename(folder)
    return folder


def legacy_config_copy(hf_dir: Path, out: Path) -> Path:
    """The checkpoint as transformers 4.x reads it: 5.x writes rope theta only inside
    `rope_parameters`, which 4.57 ignores, silently building the model with theta 10000
    (SmolLM2 uses 100000). Weights and tokenizer are linked, config.json gets `rope_theta`."""
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        config["rope_theta"] = rope["rope_theta"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for file in hf_dir.iterdir():
        if file.is_file() and file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def ours_artifact(ctx) -> Path:
    """The x86-cpu run's ONNX export if the demo run has one, else a plain INT4 export."""
    for candidate in sorted((ROOT / "runs" / "demo").glob("[0-9][0-9]-export-*")):  # not a stage's hidden temp folder
        if (candidate / "manifest.json").is_file():
            return candidate
    return vcompress_export(ctx, "int4")


def vcompress_export(ctx, quant: str) -> Path:
    folder = ctx["work"] / f"vcompress-{quant}"
    if not (folder / "manifest.json").is_file():
        from vcompress.exporters.onnx import export

        log(f"vcompress export onnx --quant {quant} -> {folder}")
        export(
            ctx["model_arg"] if ctx["model_arg"] != "default" else None,
            folder,
            quant,
            force=True,
            threads=ctx["threads"],
            log=lambda m: log(f"  {m}"),
        )
    return folder


def _quant_label(folder: Path) -> str:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    quant = manifest.get("quant", {})
    parts = [quant.get("scheme"), quant.get("method"), f"block {quant['block_size']}" if quant.get("block_size") else None]
    return f"{Path(folder).name}: " + " ".join(str(p) for p in parts if p)


def _kv_bytes(folder) -> int:
    from vcompress.devices.roofline_estimate import kv_bytes_per_element

    return kv_bytes_per_element(folder)


# --- measuring a row --------------------------------------------------------------------------


def prepare_row(name: str, ctx) -> dict:
    """The row's model, made if missing, with its size on disk and its roofline (or why it cannot run)."""
    from vcompress.core.export_manifest import model_files
    from vcompress.core.units import mib
    from vcompress.devices import roofline_estimate as roofline

    try:
        row = {"name": name, **ROWS[name](ctx)}
    except Skip as e:
        return {"name": name, "error": str(e)}
    row = {k: str(v) if isinstance(v, Path) else v for k, v in row.items()}
    # optimum's ONNX folders have no vcompress manifest: their model files are the graph and its data
    files = model_files(row["weights_path"]) or sorted(Path(row["weights_path"]).glob("*.onnx*"))
    row["size_mb"] = mib(sum(p.stat().st_size for p in files), 1)
    weights = roofline.weight_bytes(files, tied=ctx["shape"]["tied"])
    line = roofline.roofline(ctx["shape"], weights, ctx["host"], ctx["prompt_tokens"], ctx["decode_tokens"], row["kv_bytes"])
    row["roofline"] = {k: line[k] for k in ("decode_ceiling_tokens_per_s", "bytes_read_per_decode_token", "weight_bytes_per_token")}
    return row


def _job(row: dict, ctx, score: bool = False) -> dict:
    options = {**row.get("options", {}), **(row.get("score_options", {}) if score else {})}
    engine = row.get("score_engine", row["engine"]) if score else row["engine"]
    return {"engine": engine, "target": row["target"], "threads": ctx["threads"], "options": options}


def race(rows: list[dict], ctx) -> None:
    """Every row's speed in --rounds rounds, each round visiting the rows in turn (A, B, C, ... then again), one
    worker process (one session) alive at a time, so a slow spell of the host falls on every row alike. Each visit
    loads the model, warms up and times --runs runs; a row's figure per round is that visit's median."""
    live = [r for r in rows if "error" not in r]
    for r in live:
        r["rounds"] = []
    for round_no in range(ctx["rounds"]):
        for row in live:
            if "error" in row:
                continue
            log(f"round {round_no + 1}/{ctx['rounds']}: {row['name']}")
            speed = {"prompt": ctx["prompt"], "decode_tokens": ctx["decode_tokens"], "runs": ctx["runs"], "warmup": ctx["warmup"]}
            job = {**_job(row, ctx), "context": ctx["prompt_tokens"] + ctx["decode_tokens"] + 16, "speed": speed}
            try:
                out = run_worker(row["python"], job, ctx["work"])
            except RuntimeError as e:
                row["error"] = f"speed run failed in round {round_no + 1}: {e}"
                continue
            row["rounds"].append({k: out[k] for k in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "load_s")})
    for row in live:
        if "error" in row:
            continue
        for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb"):
            values = [r[key] for r in row["rounds"]]
            row[key], row[f"{key}_spread"] = statistics.median(values), [min(values), max(values)]
        row["roofline_fraction"] = round(row["decode_tokens_per_s"] / row["roofline"]["decode_ceiling_tokens_per_s"], 4)


def measure_quality(row: dict, ctx) -> None:
    """The row's cloze MMLU logits and held-out perplexity, each in a worker of its own."""
    if "error" in row:
        return
    if ctx["per_subject"]:
        log(f"{row['name']}: MMLU cloze ({len(ctx['questions'])} questions)")
        out = ctx["work"] / f"logits-{row['name']}.npy"
        try:
            job = {**_job(row, ctx, score=True), "context": ctx["mmlu_context"], "mmlu": {"calls": ctx["calls"], "out": str(out)}}
            run_worker(row["python"], job, ctx["work"])
            row["mmlu_logprobs"] = mmlu_logprobs_from(_load(out), ctx["tokenizer"], ctx["questions"], ctx["vocab"])
        except (RuntimeError, ValueError) as e:
            row["mmlu_error"] = str(e)
        finally:
            out.unlink(missing_ok=True)
    if ctx["ppl_blocks"]:
        log(f"{row['name']}: held-out perplexity ({len(ctx['ppl_blocks'])} x {len(ctx['ppl_blocks'][0])} tokens)")
        try:
            job = {**_job(row, ctx, score=True), "context": len(ctx["ppl_blocks"][0]) + 8, "ppl": {"blocks": ctx["ppl_blocks"]}}
            ppl = run_worker(row["python"], job, ctx["work"])["ppl"]
            row["perplexity"] = round(math.exp(ppl["nll"] / ppl["tokens"]), 4)
            row["heldout_top1_ids"] = ppl.get("top1")
        except RuntimeError as e:
            row["ppl_error"] = str(e)


def add_perplexity_rise(rows: list[dict]) -> None:
    """Each row's held-out perplexity rise over the fp32 row, in percent."""
    reference = next((r.get("perplexity") for r in rows if r["name"] == REFERENCE), None)
    for row in rows:
        if reference and row.get("perplexity"):
            row["perplexity_rise_pct"] = round(100 * (row["perplexity"] / reference - 1), 2)


def add_top1_agreement(rows: list[dict]) -> None:
    """Each row's top-1 next-token agreement with the fp32 row over the held-out positions (the ids are dropped)."""
    reference = next((r.get("heldout_top1_ids") for r in rows if r["name"] == REFERENCE), None)
    for row in rows:
        ids = row.pop("heldout_top1_ids", None)
        if reference and ids and len(ids) == len(reference):
            row["top1_agreement"] = round(sum(a == b for a, b in zip(ids, reference)) / len(ids), 4)


def _load(path: Path):
    import numpy as np

    return np.load(path)


def add_mmlu_scores(rows: list[dict], questions) -> None:
    """Accuracy for each row, and answer agreement with the fp32 row (logprobs replaced by scores)."""
    from vcompress.core import scoring

    reference = next((r.get("mmlu_logprobs") for r in rows if r["name"] == REFERENCE), None)
    for row in rows:
        logprobs = row.pop("mmlu_logprobs", None)
        if logprobs is None:
            continue
        summary = scoring.mmlu_summary(logprobs, questions)
        row["mmlu"] = {
            "accuracy": summary["accuracy"],
            "ci95": summary["ci95"],
            "n": summary["n"],
            "predicted_letters": summary["predicted_letters"],
        }
        if reference is not None:
            agreement = scoring.answer_agreement(logprobs, reference)
            row["mmlu"].update(agreement=agreement["agreement"], agreement_ci95=agreement["ci95"], answer_kl_mean=agreement["kl_mean"])
    if reference is not None:
        rows += floor_rows(reference, questions)


def floor_rows(reference, questions, seed: int = 0) -> list[dict]:
    """What a model that ignores the question scores: always the first answer, and a seeded random answer.
    A row's agreement with fp32 means something only above these."""
    import torch

    from vcompress.core import scoring

    n = len(questions)
    picks = {
        "floor: always A": torch.zeros(n, dtype=torch.long),
        "floor: random answer": torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed)),
    }
    out = []
    for name, pick in picks.items():
        logprobs = torch.full((n, 4), -10.0).scatter(1, pick[:, None], 0.0)  # a one-hot answer: its score is the pick
        summary = scoring.mmlu_summary(logprobs, questions)
        agreement = scoring.answer_agreement(logprobs, reference)
        mmlu = {
            "accuracy": summary["accuracy"],
            "n": summary["n"],
            "agreement": agreement["agreement"],
            "agreement_ci95": agreement["ci95"],
        }
        out.append({"name": name, "floor": True, "runtime": "no model (the floor a quality column must clear)", "mmlu": mmlu})
    return out


def profile_ours(rows: list[dict], ctx, force: bool = False) -> dict | None:
    """ONNX Runtime's profile of vcompress's prefill and decode step, when a peer beats it (or forced)."""
    base = next((r for r in rows if r["name"] == OURS and "error" not in r), None)
    if base is None:
        return None
    g = gaps(rows)
    losses = []
    if (g.get("best_decode_peer") or {}).get("peer_over_ours", 0) > 1:
        losses.append(f"decode: {g['best_decode_peer']['peer']} is {g['best_decode_peer']['peer_over_ours']:.2f}x faster")
    if (g.get("best_ttft_peer") or {}).get("ours_over_peer", 0) > 1:
        losses.append(f"TTFT: ours takes {g['best_ttft_peer']['ours_over_peer']:.2f}x {g['best_ttft_peer']['peer']}'s")
    if not losses and not force:
        return None
    log(f"{OURS}: ONNX Runtime profile ({'; '.join(losses) or 'asked for'})")
    job = {
        "engine": "onnx",
        "target": base["target"],
        "threads": ctx["threads"],
        "context": ctx["prompt_tokens"] + ctx["decode_tokens"] + 16,
        "options": {"profile_prefix": str(ctx["work"] / "ort-profile")},
        "profile": {"prompt": ctx["prompt"], "decode_tokens": ctx["decode_tokens"]},
    }
    try:
        found = run_worker(Path(sys.executable), job, ctx["work"])["profile"]
    except RuntimeError as e:
        found = {"error": str(e)}
    for trace in ctx["work"].glob("ort-profile*.json"):
        trace.unlink()
    return {"row": OURS, "losses": losses, **found}


# --- comparing --------------------------------------------------------------------------------


def ratios(rows: list[dict], ours: str = OURS) -> list[dict]:
    """vcompress against each measured peer: >1 means vcompress is better (faster, smaller, leaner). Speed ratios
    are taken round by round (the rows of one round ran minutes apart): the median, the spread, and a verdict
    that is "win" or "loss" only when every round agrees."""
    base = next((r for r in rows if r["name"] == ours and "error" not in r), None)
    if base is None:
        return []
    out = []
    for row in _measured(rows):
        if row["name"] == ours:
            continue
        pairs = list(zip(base["rounds"], row["rounds"]))
        out.append(
            {
                "peer": row["name"],
                "decode_speedup": _per_round([a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in pairs]),
                "ttft_speedup": _per_round([b["ttft_ms"] / a["ttft_ms"] for a, b in pairs]),
                "size_ratio": _ratio(row["size_mb"], base["size_mb"]),
                "rss_ratio": _ratio(row["peak_rss_mb"], base["peak_rss_mb"]),
                "agreement_points": _points((base.get("mmlu") or {}).get("agreement"), (row.get("mmlu") or {}).get("agreement")),
                "accuracy_points": _points((base.get("mmlu") or {}).get("accuracy"), (row.get("mmlu") or {}).get("accuracy")),
                # the peer's perplexity rise minus ours: > 0 means vcompress lost less
                "ppl_rise_points": _difference(row.get("perplexity_rise_pct"), base.get("perplexity_rise_pct")),
            }
        )
    return out


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and r.get("rounds")]


def _per_round(values: list[float]) -> dict | None:
    if not values:
        return None
    verdict = "win" if all(v > 1 for v in values) else "loss" if all(v < 1 for v in values) else "undecided"
    return {"median": round(statistics.median(values), 3), "spread": [round(min(values), 3), round(max(values), 3)], "verdict": verdict}


def gaps(rows: list[dict], ours: str = OURS) -> dict:
    """The largest shortfall of vcompress: to the best peer on decode and TTFT, and to the roofline."""
    base = next((r for r in _measured(rows) if r["name"] == ours), None)
    peers = [r for r in _measured(rows) if not r["name"].startswith("vcompress")]
    if base is None:
        return {}
    out = {"roofline_fraction": base["roofline_fraction"]}
    if peers:
        fastest = max(peers, key=lambda r: r["decode_tokens_per_s"])
        quickest = min(peers, key=lambda r: r["ttft_ms"])
        out["best_decode_peer"] = {
            "peer": fastest["name"],
            "peer_over_ours": _ratio(fastest["decode_tokens_per_s"], base["decode_tokens_per_s"]),
        }
        out["best_ttft_peer"] = {"peer": quickest["name"], "ours_over_peer": _ratio(base["ttft_ms"], quickest["ttft_ms"])}
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _points(a, b):
    return round(100 * (a - b), 1) if a is not None and b is not None else None


def _difference(a, b):
    return round(a - b, 2) if a is not None and b is not None else None


# --- printing ---------------------------------------------------------------------------------

COLUMNS = (
    "row",
    "size MiB",
    "TTFT ms",
    "decode tok/s",
    "% roofline",
    "peak RSS MiB",
    "held-out ppl (rise)",
    "top-1 agree fp32",
    "MMLU acc",
    "agree fp32 (answer KL)",
    "runtime",
)


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["name"], "-", "-", "-", "-", "-", "-", "-", "-", "-", f"not run: {r['error']}"])
            continue
        mmlu = r.get("mmlu") or {}
        if r.get("floor"):
            out.append(
                [r["name"], "-", "-", "-", "-", "-", "-", "-", _fraction(mmlu.get("accuracy")), _agreement(mmlu, None), r["runtime"]]
            )
            continue
        out.append(
            [
                r["name"],
                f"{r['size_mb']:.1f}",
                _spread(r, "ttft_ms"),
                _spread(r, "decode_tokens_per_s"),
                f"{100 * r['roofline_fraction']:.1f}%",
                _spread(r, "peak_rss_mb", 0),
                _perplexity(r),
                _fraction(r.get("top1_agreement")),
                _fraction(mmlu.get("accuracy")),
                _agreement(mmlu, r.get("mmlu_error")),
                r["runtime"],
            ]
        )
    return out


RATIO_COLUMNS = (
    "vcompress vs",
    "decode x",
    "TTFT x",
    "size x",
    "peak RSS x",
    "agreement pts",
    "accuracy pts",
    "ppl rise, peer - ours (pts)",
)


def ratio_rows(ratio_list: list[dict]) -> list[list[str]]:
    return [
        [
            r["peer"],
            _verdict(r["decode_speedup"]),
            _verdict(r["ttft_speedup"]),
            _times(r["size_ratio"]),
            _times(r["rss_ratio"]),
            _signed(r["agreement_points"]),
            _signed(r["accuracy_points"]),
            _signed(r.get("ppl_rise_points"), 2),
        ]
        for r in ratio_list
    ]


def _agreement(mmlu: dict, error: str | None) -> str:
    if error:
        return f"failed: {error[:60]}"
    if mmlu.get("agreement") is None:
        return "-"
    kl = mmlu.get("answer_kl_mean")
    return f"{mmlu['agreement']:.3f}" + (f" (KL {kl:.4f})" if kl is not None else "")


def _perplexity(row: dict) -> str:
    if row.get("ppl_error"):
        return f"failed: {row['ppl_error'][:60]}"
    if row.get("perplexity") is None:
        return "-"
    rise = row.get("perplexity_rise_pct")
    return f"{row['perplexity']:.3f}" + (f" ({rise:+.2f}%)" if rise is not None else "")


def _spread(row: dict, key: str, digits: int = 1) -> str:
    low, high = row[f"{key}_spread"]
    return f"{row[key]:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def _verdict(ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    low, high = ratio["spread"]
    return f"{ratio['median']:.2f}x [{low:.2f}-{high:.2f}] {ratio['verdict']}"


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _signed(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def markdown(header, rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    s = result["settings"]
    bw = result["bandwidth"]
    head = (
        f"# vcompress vs peers: {result['model']}\n\n"
        f"Host {result['host']}, {s['threads']} threads, prompt {s['prompt_tokens']} tokens, {s['decode_tokens']} decoded greedily, "
        f"{s['rounds']} interleaved rounds (each row once per round, one process at a time), {s['runs']} runs after {s['warmup']} warm-up per visit: "
        f"median of the rounds' medians [lowest-highest round]; MMLU {s['questions']} questions ({s['per_subject']} per subject, seed {s['seed']}, 0-shot, cloze).\n"
        f"Memory bandwidth (copy, {bw['threads']} threads, {bw['buffer_gib']} GiB): {bw['copy_gbs']} GB/s; "
        f"% roofline = decode tok/s / (bandwidth / bytes read per token: weights + KV cache at the mean context).\n\n"
    )
    body = markdown(COLUMNS, table_rows(result["rows"]))
    ratio = (
        markdown(RATIO_COLUMNS, ratio_rows(result["ratios"]))
        if result["ratios"]
        else f"(no ratios: {result.get('ours', OURS)} or every peer did not run)"
    )
    g = result["gaps"]
    lines = [f"- vcompress reaches {100 * g['roofline_fraction']:.1f}% of the roofline"] if g else []
    if g.get("best_decode_peer"):
        lines.append(f"- fastest peer decode: {g['best_decode_peer']['peer']}, {g['best_decode_peer']['peer_over_ours']:.2f}x ours")
        lines.append(
            f"- quickest peer TTFT: {g['best_ttft_peer']['peer']}; ours takes {g['best_ttft_peer']['ours_over_peer']:.2f}x its time"
        )
    return (
        head
        + body
        + profile_markdown(result.get("profile"))
        + f"\n\nRatios, {result.get('ours', OURS)} against each peer (x > 1: vcompress is faster / smaller / leaner):\n\n"
        + ratio
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )


def profile_markdown(profile: dict | None) -> str:
    if not profile:
        return ""
    if "error" in profile:
        return f"\n\nProfile of {profile['row']}: failed ({profile['error']})"
    d, p = profile["decode"], profile["prefill"]
    lines = [
        f"\n\nProfile of {profile['row']} (ONNX Runtime profiler; {'; '.join(profile['losses']) or 'asked for'}):",
        f"- decode: {d['wall_ms_per_token']:.2f} ms/token wall, {d['run_ms_per_token']:.2f} ms in session runs, "
        f"{d['node_ms']:.2f} ms in nodes ({100 * d['outside_nodes_share']:.0f}% outside nodes: ORT dispatch, Python, argmax); top ops: "
        + ", ".join(f"{o['op']} {o['ms']:.2f} ms ({100 * o['share']:.0f}%)" for o in d["ops"]),
        f"- prefill: {p['run_ms']:.1f} ms run, {p['node_ms']:.1f} ms in nodes; top ops: "
        + ", ".join(f"{o['op']} {o['ms']:.1f} ms ({100 * o['share']:.0f}%)" for o in p["ops"]),
    ]
    return "\n".join(lines)


def print_tables(result: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(report_markdown(result))
        return
    console = Console(width=200)
    tables = [
        (
            f"{result['model']}: {result['settings']['threads']} threads, copy bandwidth {result['bandwidth']['copy_gbs']} GB/s",
            COLUMNS,
            table_rows(result["rows"]),
        )
    ]
    if result["ratios"]:
        tables.append(
            (f"{result.get('ours', OURS)} against each peer (x > 1: vcompress better)", RATIO_COLUMNS, ratio_rows(result["ratios"]))
        )
    for title, header, rows in tables:
        table = Table(title=title)
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if result.get("profile"):
        console.print(profile_markdown(result["profile"]).strip())
    g = result["gaps"]
    if g:
        console.print(
            f"vcompress at {100 * g['roofline_fraction']:.1f}% of the roofline"
            + (
                f"; fastest peer decode {g['best_decode_peer']['peer']} at {g['best_decode_peer']['peer_over_ours']:.2f}x ours; "
                f"ours TTFT {g['best_ttft_peer']['ours_over_peer']:.2f}x {g['best_ttft_peer']['peer']}'s"
                if "best_decode_peer" in g
                else ""
            )
        )


def chart(result: dict, path: Path) -> Path | None:
    """Decode tok/s and TTFT of every row relative to vcompress-int4 (= 1), and the roofline share."""
    rows = _measured(result["rows"])
    base = next((r for r in rows if r["name"] == OURS), None)
    if base is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    colors = ["tab:orange" if r["name"].startswith("vcompress") else "tab:gray" for r in rows]
    panels = (
        (
            "decode tok/s relative to vcompress-int4 (higher is faster)",
            [r["decode_tokens_per_s"] / base["decode_tokens_per_s"] for r in rows],
        ),
        ("TTFT at 256 tokens relative to vcompress-int4 (lower is faster)", [r["ttft_ms"] / base["ttft_ms"] for r in rows]),
        ("decode as a share of the bandwidth roofline", [r["roofline_fraction"] for r in rows]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(rows) + 2))
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"{result['model']}, {result['host']}, {result['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- setup ------------------------------------------------------------------------------------


def setup(optimum_python: Path, llama_python: Path) -> None:
    """Create the peers' venvs that are missing (never a CUDA torch: torch==2.13.0 goes first)."""
    if not optimum_python.is_file():
        venv = optimum_python.parents[1]
        log(f"creating {venv} ({' '.join(OPTIMUM_REQUIREMENTS)})")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(optimum_python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(optimum_python), "-m", "pip", "install", "-q", *OPTIMUM_REQUIREMENTS], check=True)
    if not llama_python.is_file():
        wheels = CACHE / "wheels"
        if not list(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl")):
            log(f"building llama-cpp-python {LLAMA_CPP_VERSION} with GGML_NATIVE (about 7 minutes on 2 cores)")
            subprocess.run(
                [
                    "nice",
                    "-n",
                    "15",
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--no-deps",
                    "--no-cache-dir",
                    "-w",
                    str(wheels),
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                ],
                check=True,
                env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"},
            )
        venv = llama_python.parents[1]
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheel = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))[-1]
        subprocess.run([str(llama_python), "-m", "pip", "install", "-q", str(wheel), "numpy"], check=True)
        subprocess.run([str(llama_python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True)  # the session's core


# --- main -------------------------------------------------------------------------------------


def context(args) -> dict:
    """Everything the rows share: the model, the prompt, the MMLU calls, the host's bandwidth."""
    import platform

    import numpy as np
    import onnxruntime
    import torch
    import transformers
    from transformers import AutoTokenizer

    from vcompress.core.models import default_gguf, resolve
    from vcompress.core.profiles import load_profile
    from vcompress.devices import roofline_estimate as roofline
    from vcompress.devices.bench import prompt_ids

    source = resolve(args.model)
    hf_dir = Path(source.path) if source.kind == "hf" else None
    gguf = Path(source.path) if source.kind == "gguf" else (default_gguf() if args.model is None else None)
    config_dir = hf_dir or Path(source.path).parent
    shape = roofline.shapes(roofline.read_config(hf_dir)) if hf_dir else None
    if shape is None:
        raise SystemExit("the bench needs a Hugging Face folder (config.json) for the model's shapes; pass one as --model")
    tokenizer = AutoTokenizer.from_pretrained(str(config_dir))
    vocab = shape["vocab_size"]
    log(f"measuring memory bandwidth ({args.threads} threads)")
    bandwidth = memory_bandwidth(args.threads)
    host = load_profile("x86-cpu").device.model_copy(
        update={
            "memory_bandwidth_gbs": bandwidth["copy_gbs"],
            "prefill_efficiency": 1.0,
            "decode_efficiency": 1.0,
            "threads": args.threads,
            "name": f"{platform.machine()} host",
        }
    )
    ctx = {
        "model_arg": str(args.model) if args.model else "default",
        "hf_dir": hf_dir,
        "gguf": gguf,
        "shape": shape,
        "tokenizer": tokenizer,
        "vocab": vocab,
        **run_settings(args),
        "prompt": prompt_ids(vocab, args.prompt_tokens, args.seed)[0].tolist(),
        "work": args.work,
        "ours": args.ours,
        "tflite": args.tflite,
        "host": host,
        "bandwidth": bandwidth,
        "optimum_python": args.optimum_python,
        "llama_python": args.llama_python,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime-genai": _version("onnxruntime-genai"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    if args.per_subject:
        ctx["questions"] = mmlu_questions(args.per_subject, args.seed, args.mmlu)
        ctx["calls"] = mmlu_calls(tokenizer, ctx["questions"], vocab)
        ctx["mmlu_context"] = max(len(ids) for ids, _ in ctx["calls"]) + 8
    ctx["ppl_blocks"] = heldout_blocks(tokenizer, args) if args.ppl_blocks else []
    return ctx


def heldout_blocks(tokenizer, args) -> list[list[int]]:
    """The held-out text validate measures perplexity on (MMLU text outside the medical subjects), as token blocks."""
    from vcompress.core.data import pack, texts_for

    texts = texts_for(None, tokenizer, part="heldout", exclude="medical", mmlu=args.mmlu, log=lambda _: None)
    return pack(texts, tokenizer, args.ppl_seq_len, args.ppl_blocks).tolist()


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def resolve_ours(path: Path | None) -> Path | None:
    """--ours: an ONNX artifact folder, or a run folder holding one (NN-export-onnx)."""
    if path is None:
        return None
    if (path / "manifest.json").is_file():
        return path
    found = sorted(p for p in path.glob("[0-9][0-9]-export-*") if (p / "manifest.json").is_file())
    if not found:
        raise SystemExit(f"--ours {path}: neither an exported artifact (manifest.json) nor a run folder with an NN-export-* folder")
    return found[0]


def run_settings(args) -> dict:
    """The options that shape the measurement, as the workers read them and peers.json records them."""
    return {key: getattr(args, key) for key in ("threads", "runs", "rounds", "warmup", "prompt_tokens", "decode_tokens", "per_subject")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (every row once per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--per-subject", type=int, default=5, help="MMLU questions per subject (57 subjects); 0 skips MMLU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MMLU sample and of the prompt ids")
    parser.add_argument("--ppl-blocks", type=int, default=8, help="held-out blocks for perplexity; 0 skips it")
    parser.add_argument("--ppl-seq-len", type=int, default=256, help="tokens per held-out block")
    parser.add_argument("--mmlu", default=None, help="MMLU copy (default: $VCOMPRESS_MMLU, else the copy packaged with vcompress)")
    parser.add_argument("--rows", default=",".join(n for n in ROWS if n != "vcompress-tflite"), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument(
        "--ours",
        type=Path,
        default=None,
        help="vcompress's x86-cpu artifact or run folder (default: runs/demo's export, else an INT4 export)",
    )
    parser.add_argument("--tflite", type=Path, default=None, help="a vcompress TFLite artifact folder (adds the vcompress-tflite row)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers")
    parser.add_argument("--work", type=Path, default=CACHE / "work", help="exports kept between runs")
    parser.add_argument("--optimum-python", type=Path, default=OPTIMUM_PYTHON)
    parser.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON)
    parser.add_argument("--profile", action="store_true", help="profile vcompress's prefill and decode step even where no peer beats it")
    parser.add_argument("--setup", action="store_true", help="create the optimum and llama-cpp-python venvs if missing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if args.tflite and "vcompress-tflite" not in names:
        names.append("vcompress-tflite")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.setup:
        setup(args.optimum_python, args.llama_python)
    args.ours = resolve_ours(args.ours)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    ctx = context(args)
    rows = [prepare_row(name, ctx) for name in names]
    # ratios against vcompress-int4, else the first vcompress row asked for (--rows llama.cpp,vcompress-gguf)
    ours = OURS if OURS in names else next((n for n in names if n.startswith("vcompress")), OURS)
    race(rows, ctx)
    for row in rows:
        measure_quality(row, ctx)
    if args.per_subject:
        add_mmlu_scores(rows, ctx["questions"])
    add_perplexity_rise(rows)
    add_top1_agreement(rows)
    import platform

    result = {
        "model": resolve_label(args.model),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            **run_settings(args),
            "seed": args.seed,
            "questions": len(ctx.get("questions", [])),
        },
        "bandwidth": ctx["bandwidth"],
        "versions": ctx["versions"],
        "rows": rows,
        "ours": ours,
        "ratios": ratios(rows, ours),
        "gaps": gaps(rows, ours),
        "profile": profile_ours(rows, ctx, force=args.profile),
        "units": {
            "size_mb": "MiB",
            "ttft_ms": "ms",
            "decode_tokens_per_s": "tokens/s",
            "peak_rss_mb": "MiB",
            "copy_gbs": "GB/s",
            "roofline_fraction": "fraction",
            "accuracy": "fraction",
            "agreement": "fraction",
        },
    }
    (args.out / "peers.json").write_text(json.dumps(result, indent=2))
    (args.out / "peers.md").write_text(report_markdown(result))
    chart(result, args.out / "peers.png")
    print_tables(result)
    log(f"wrote {args.out}/peers.json, peers.md, peers.png")
    return 0


def resolve_label(model) -> str:
    from vcompress.core.models import resolve

    return resolve(model).label or str(model)


if __name__ == "__main__":
    sys.exit(main())
