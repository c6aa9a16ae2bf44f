"""Finished run folders written directly in the run format (docs: docs/run_format.md), for tests of
history, report and package without running the pipeline."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

BUDGETS = {
    "max_model_size_mb": 512,
    "max_peak_ram_mb": 2048,
    "max_ttft_ms": 500,
    "min_decode_tokens_per_s": 20,
    "max_mmlu_drop_points": 2,
    "max_perplexity_rise_pct": 5,
    "min_answer_agreement": 0.9,
}
VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0", "onnxruntime": "1.31.1"}
MODEL_HASH = hashlib.sha256(b"tiny-medical-model").hexdigest()
SIGNATURE_INPUTS = [
    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
]
SIGNATURE_OUTPUTS = [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 49152]}]


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _recipe(folder: Path, stage: str, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump({"stage": stage, "vcompress": "0.1.0", "config": config, "source": "default", "seed": 0}, sort_keys=False)
    )
    _write(folder / "metrics.json", {"stage": stage, "seconds": 1.0})


def _figure(value, unit, device, samples=None):
    out = {"value": value, "unit": unit, "source": "measured", "device": device}
    if samples is not None:
        out["samples"] = samples
    return out


def make_run(
    root: Path,
    *,
    started: datetime,
    ttft_samples: list[float],
    decode_samples: list[float],
    size_mb: float = 95.0,
    rss_mb: float = 210.0,
    accuracy: float = 0.29,
    teacher_accuracy: float = 0.30,
    agreement: float = 0.93,
    perplexity: float = 17.9,
    profile: str = "x86-cpu",
    device: str = "x86-64 host",
    model_label: str = "SmolLM2-135M-Instruct",
    model_hash: str = MODEL_HASH,
    fmt: str = "onnx",
    git_commit: str = "0123456789abcdef0123456789abcdef01234567",
    seed: int = 0,
    host: dict | None = None,
) -> Path:
    """A finished run folder whose verdict follows the x86-cpu budgets from the figures given; `host`: the measuring
    host's fingerprint in latency.json (devices/fingerprint.py), none when not given (runs before it existed)."""
    root.mkdir(parents=True, exist_ok=True)
    finished = started + timedelta(minutes=30)
    ttft = sorted(ttft_samples)[len(ttft_samples) // 2]
    decode = sorted(decode_samples)[len(decode_samples) // 2]
    teacher_ppl = 17.3
    rise = round(100 * (perplexity - teacher_ppl) / teacher_ppl, 2)
    drop = round(100 * (teacher_accuracy - accuracy), 2)
    text = (
        (importlib.resources.files("vcompress.profiles") / f"{profile}.yaml").read_text() if profile == "x86-cpu" else f"name: {profile}\n"
    )
    stages = [("analyze", "01-analyze"), ("quantize", "04-quantize"), ("export", f"05-export-{fmt}"), ("validate", "06-validate")]
    _write(
        root / "run.json",
        {
            "vcompress": "0.1.0",
            "profile": {"name": profile, "path": None, "sha256": hashlib.sha256(text.encode()).hexdigest()},
            "model": {"spec": None, "label": model_label, "hash": model_hash},
            "seed": seed,
            "git_commit": git_commit,
            "started": _iso(started),
            "finished": _iso(finished),
            "stages": [{"name": n, "folder": f, "state": "done", "seconds": 10.0} for n, f in stages],
            "versions": VERSIONS,
        },
    )
    _recipe(root / "01-analyze", "analyze", {"samples": 8})
    _recipe(root / "04-quantize", "quantize", {"method": "gptq", "bits": 4, "group_size": 128})
    export = root / f"05-export-{fmt}"
    _recipe(export, f"export-{fmt}", {"opset": 18})
    rng = random.Random(f"{seed}-{started.isoformat()}")
    model_file = "model.onnx" if fmt == "onnx" else "model.tflite"
    (export / model_file).write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    if fmt == "onnx":
        (export / "model.onnx.data").write_bytes(bytes(rng.getrandbits(8) for _ in range(8192)))
        _write(export / "genai_config.json", {"model": {"type": "llama", "decoder": {"filename": "model.onnx"}}})  # what ORT GenAI opens
    app_runtime = {}
    if fmt == "tflite":
        (export / "model.litertlm").write_bytes(b"LITERTLM" + bytes(rng.getrandbits(8) for _ in range(4096)))  # what LiteRT-LM opens
        app_runtime = {"app_runtime": {"name": "litert-lm", "version": "0.18.1", "bundle": "model.litertlm"}}
    _write(
        export / "manifest.json",
        {
            "format": fmt,
            "files": sorted(p.name for p in export.glob("model*")),
            "inputs": SIGNATURE_INPUTS,
            "outputs": SIGNATURE_OUTPUTS,
            "quant": "int4",
            **app_runtime,
        },
    )
    _write(export / "tokenizer.json", {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}})
    _write(export / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"})
    _write(export / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 64})
    (export / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    validate = root / "06-validate"
    _recipe(validate, "validate", {"runs": len(ttft_samples), "warmup": 1})
    _write(
        validate / "latency.json",
        {
            "device": device,
            "device_kind": "host",
            "backend": fmt,
            "source": "measured",
            "threads": 2,
            "prompt_tokens": 256,
            "decode_tokens": 64,
            "runs": len(ttft_samples),
            "warmup": 1,
            "ttft_ms": _figure(ttft, "ms", device, ttft_samples),
            "decode_tokens_per_s": _figure(decode, "tokens/s", device, decode_samples),
            "peak_rss_mb": _figure(rss_mb, "MB", device),
            "model_size_mb": {"value": size_mb, "unit": "MB", "source": "measured"},
            "estimate": {
                "ttft_ms": {"value": 61.0, "unit": "ms", "source": "estimated"},
                "decode_tokens_per_s": {"value": 210.0, "unit": "tokens/s", "source": "estimated"},
                "ratio_measured_to_estimated": round(ttft / 61.0, 3),
            },
            **({"host": host} if host else {}),
        },
    )
    _write(
        validate / "eval.json",
        {
            "subset": "medical",
            "shots": 0,
            "per_subject": 10,
            "n": 80,
            "teacher": {
                "accuracy": teacher_accuracy,
                "ci95": [0.21, 0.41],
                "subjects": {"anatomy": {"accuracy": 0.3, "n": 10}, "virology": {"accuracy": 0.3, "n": 10}},
            },
            "student": {
                "accuracy": accuracy,
                "ci95": [0.2, 0.4],
                "subjects": {"anatomy": {"accuracy": 0.3, "n": 10}, "virology": {"accuracy": 0.28, "n": 10}},
            },
            "answer_agreement": agreement,
            "answer_kl_mean": 0.01,
            "perplexity": {"teacher": teacher_ppl, "student": perplexity, "rise_pct": rise},
            "top1_agreement": 0.95,
            "kl_mean": 0.02,
        },
    )
    checks = [
        {"budget": "max_model_size_mb", "value": size_mb, "unit": "MB"},
        {"budget": "max_peak_ram_mb", "value": rss_mb, "unit": "MB", "device": device},
        {"budget": "max_ttft_ms", "value": ttft, "unit": "ms", "device": device, "samples": ttft_samples},
        {"budget": "min_decode_tokens_per_s", "value": decode, "unit": "tokens/s", "device": device, "samples": decode_samples},
        {"budget": "max_mmlu_drop_points", "value": drop, "unit": "points"},
        {"budget": "max_perplexity_rise_pct", "value": rise, "unit": "%"},
        {"budget": "min_answer_agreement", "value": agreement, "unit": "fraction"},
    ]
    for check in checks:
        limit = BUDGETS[check["budget"]]
        check.update(
            limit=limit,
            source="measured",
            passed=check["value"] >= limit if check["budget"].startswith("min_") else check["value"] <= limit,
        )
    _write(
        validate / "verdict.json",
        {
            "profile": profile,
            "device": device,
            "backend": fmt,
            "format": fmt,
            "model": {"label": model_label, "hash": model_hash},
            "artifact": export.name,
            "passed": all(c["passed"] for c in checks),
            "checks": checks,
            "accuracy": {"teacher": teacher_accuracy, "student": accuracy, "unit": "fraction"},
            "created": _iso(finished),
            "vcompress": "0.1.0",
        },
    )
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / "run.log").write_text("done\n")
    return root


def nightly(
    root: Path,
    nights: int = 10,
    *,
    slow_night: int | None = None,
    slowdown: float = 0.20,
    seed: int = 0,
    end: datetime | None = None,
    hosts: list[dict | None] | None = None,
    **kwargs,
) -> list[Path]:
    """`nights` nightly runs, one a day up to `end` (default: 2 hours ago), with realistic noise.

    Each night's level drifts ~1% (machine state), each of its 5 samples ~2% around that. On
    `slow_night` (an index) decoding is `slowdown` slower (tokens/s down, TTFT unchanged). `hosts`: the measuring
    host's fingerprint per night.
    """
    rng = random.Random(seed)
    end = end or datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    runs = []
    for night in range(nights):
        started = end - timedelta(days=nights - 1 - night)
        level_ttft = 87.0 * rng.gauss(1, 0.01)
        level_decode = 140.0 * rng.gauss(1, 0.01)
        if night == slow_night:
            level_decode *= 1 - slowdown
        ttft = [round(level_ttft * rng.gauss(1, 0.02), 2) for _ in range(5)]
        decode = [round(level_decode * rng.gauss(1, 0.02), 2) for _ in range(5)]
        rss = round(210 * rng.gauss(1, 0.005), 1)
        accuracy = 0.30 - rng.choice([0, 1, 1]) / 80  # the same 80 questions every night: one answer flips at most
        runs.append(
            make_run(
                root / f"night-{night:02d}",
                started=started,
                ttft_samples=ttft,
                decode_samples=decode,
                rss_mb=rss,
                accuracy=round(accuracy, 4),
                seed=night,
                host=hosts[night] if hosts else None,
                **kwargs,
            )
        )
    return runs
