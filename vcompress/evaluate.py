"""Evaluation: MMLU-subset accuracy, and fidelity to a reference model, through any Runner.

Every backend is reached only through `Runner.forward` and its tokenizer, so an HF folder, an ONNX
export or any later runtime is scored by the same prompts, the same token ids and the same code.
An `Evaluator` holds one question set, one MMLU format and one held-out text, and scores each model
once: score several models against one reference and the reference's MMLU answers are computed once;
with `cache`, a model's answers are also kept on disk, keyed by its weights', config's and tokenizer's hashes, the
runtime and its version, the scoring code and the exact prompts, so a teacher is scored once across stages and runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vcompress import __version__
from vcompress.core import scoring
from vcompress.core.data import load_mmlu, pack, resolve_subjects, sample_questions, texts_for
from vcompress.core.errors import InputError
from vcompress.core.models import resolve, tokenizer_hash, weights_hash
from vcompress.core.runner import Runner
from vcompress.core.stage import Progress, no_progress

UNITS = {
    "accuracy": "fraction",
    "agreement": "fraction",
    "top1_agreement": "fraction",
    "kl_mean": "nats",
    "kl_max": "nats",
    "perplexity": "unitless",
    "reference_perplexity": "unitless",
    "tokens": "tokens",
    "seconds": "s",
}


class Evaluator:
    def __init__(
        self,
        *,
        subset: str = "medical",
        shots: int = 0,
        per_subject: int | None = 10,
        mmlu=None,
        data: str | Path | None = None,
        seed: int = 0,
        batch_size: int = 8,
        seq_len: int = 512,
        max_blocks: int = 4,
        threads: int | None = None,
        format: str = "letter",
        cache: bool = False,
        progress: Progress = no_progress,
        log: Callable[[str], None] | None = None,
        open_kwargs: dict | None = None,
    ):
        if not 0 <= shots <= 5:
            raise InputError(f"--shots {shots} is out of range; MMLU has 5 dev questions per subject, use 0 to 5")
        if format not in scoring.FORMATS:
            raise InputError(f"unknown MMLU format {format!r}; use one of: {', '.join(scoring.FORMATS)}")
        self.subset, self.shots, self.per_subject, self.seed = subset, shots, per_subject, seed
        self.format, self.cache = format, cache
        self.mmlu, self.data = mmlu, data
        self.batch_size, self.seq_len, self.max_blocks, self.threads = batch_size, seq_len, max_blocks, threads
        self.progress = progress  # vcompress.progress.progress_bars draws it
        self.log = log or (lambda message: None)
        self.open_kwargs = open_kwargs or {}
        self.subjects = resolve_subjects(subset)
        self._questions = None
        self._dev = None
        self._runners: dict[str, Runner] = {}
        self._logprobs: dict[str, torch.Tensor] = {}
        self._seconds: dict[str, float] = {}

    # --- inputs ---------------------------------------------------------------------------

    @property
    def questions(self):
        if self._questions is None:
            found = load_mmlu(self.mmlu, "test", self.subjects)
            if not found:
                raise InputError(
                    f"the MMLU source holds no test questions for {self.subset!r}; check --mmlu and --subset (JSONL lines need a subject)"
                )
            self._questions = sample_questions(found, self.per_subject or None, self.seed)
        return self._questions

    @property
    def dev(self):
        if self._dev is None:
            self._dev = load_mmlu(self.mmlu, "dev", self.subjects) if self.shots else []
        return self._dev

    def runner(self, spec) -> Runner:
        """A Runner for a path (opened once per evaluator), or the Runner given."""
        if isinstance(spec, Runner):
            return spec
        key = _key(spec)
        if key not in self._runners:
            from vcompress.exporters import detect_backend, open_runner

            backend = "torch" if _is_default(spec) else detect_backend(spec)
            kwargs = self.open_kwargs if backend == "torch" else {}
            self.log(f"loading {'the embedded default model' if _is_default(spec) else spec} ({backend})")
            self._runners[key] = open_runner(None if _is_default(spec) else spec, threads=self.threads, backend=backend, **kwargs)
        return self._runners[key]

    # --- scores ---------------------------------------------------------------------------

    def mmlu_logprobs(self, spec) -> torch.Tensor:
        """[N, 4] answer scores of one model in this evaluator's format, computed once per evaluator
        (and once per machine with `cache`)."""
        key = _key(spec)
        if key not in self._logprobs:
            runner = self.runner(spec)
            questions, dev = self.questions, self.dev  # load before timing
            started = time.perf_counter()
            self._logprobs[key] = scoring.cached_mmlu_logprobs(
                _model_identity(spec, runner) if self.cache else None,
                runner.forward,
                runner.tokenizer,
                questions,
                shots=self.shots,
                dev=dev,
                batch_size=self.batch_size,
                format=self.format,
                max_length=getattr(runner, "max_length", None),
                progress=self.progress,
                label=f"MMLU {_label(runner)}",
                continuation_fn=runner.continuation_logits,
            )
            self._seconds[key] = time.perf_counter() - started
        return self._logprobs[key]

    def text_blocks(self, tokenizer, seq_len: int, max_blocks: int | None = None) -> tuple[torch.Tensor, str]:
        texts = texts_for(self.data, tokenizer, part="heldout", exclude=self.subset, mmlu=self.mmlu, log=self.log)
        source = str(self.data) if self.data else f"MMLU held-out text outside {self.subset}"
        return pack(texts, tokenizer, seq_len, max_blocks or self.max_blocks), source

    def evaluate(self, model=None, reference=None) -> dict:
        """Accuracy with its interval, per subject and per domain; with a reference also the paired accuracy drop,
        answer agreement, KL and text fidelity."""
        runner = self.runner(model)
        logprobs = self.mmlu_logprobs(model)
        report = {
            "model": _label(runner),
            "backend": runner.backend,
            "runtime": runner.runtime,
            "subset": self.subset,
            "subjects": self.subjects,
            "shots": self.shots,
            "per_subject": self.per_subject,
            "seed": self.seed,
            "format": {"name": self.format, **scoring.FORMATS[self.format]},
            "questions": len(self.questions),
            "mmlu": scoring.mmlu_summary(logprobs, self.questions),
            "seconds": {"mmlu": self._seconds.get(_key(model))},
            "units": UNITS,
        }
        if reference is not None:
            ref_runner = self.runner(reference)
            _check_same_vocab(runner, ref_runner)
            ref_logprobs = self.mmlu_logprobs(reference)
            report["reference"] = {
                "model": _label(ref_runner),
                "backend": ref_runner.backend,
                "mmlu": scoring.mmlu_summary(ref_logprobs, self.questions),
                "seconds": {"mmlu": self._seconds.get(_key(reference))},
            }
            report["agreement"] = scoring.answer_agreement(logprobs, ref_logprobs)
            report["drop"] = _drops(ref_logprobs, logprobs, self.questions)
        if reference is not None or self.data:
            ref_runner = self.runner(reference) if reference is not None else None
            # The same token ids go into both models: the reference's tokenizer makes them.
            limits = [r.max_length for r in (runner, ref_runner) if getattr(r, "max_length", None)]
            seq_len, max_blocks = min([self.seq_len, *limits]), self.max_blocks
            if runner.text_positions:  # a slow backend's own, smaller sample: as few blocks as hold it
                seq_len = min(seq_len, runner.text_positions)
                max_blocks = max(1, min(max_blocks, runner.text_positions // seq_len))
            blocks, source = self.text_blocks((ref_runner or runner).tokenizer, seq_len, max_blocks)
            started = time.perf_counter()
            text = scoring.text_fidelity(
                runner.text_logits, blocks, ref_runner.forward if ref_runner else None, batch_size=1, progress=self.progress
            )
            text |= runner.text_report()
            report["text"] = {**text, "source": source, "blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}
            report["seconds"]["text"] = time.perf_counter() - started
        return report

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()


def evaluate(model=None, reference=None, **options) -> dict:
    """One-shot helper: `Evaluator(**options).evaluate(model, reference)`."""
    evaluator = Evaluator(**options)
    try:
        return evaluator.evaluate(model, reference)
    finally:
        evaluator.close()


def _is_default(spec) -> bool:
    """None, "" or "default" (when no such path exists) name the embedded default model."""
    return spec is None or str(spec) == "" or (str(spec) == "default" and not Path("default").exists())


def _key(spec) -> str:
    if isinstance(spec, Runner):
        return f"runner:{id(spec)}"
    if _is_default(spec):
        return "default"
    text = str(spec)
    return text if text.startswith("hf:") else str(Path(text).expanduser().resolve())


def _model_identity(spec, runner: Runner) -> dict | None:
    """What identifies a model's answers beside the prompts, the key of its cached answers: the sha256 of its weight
    files, of config.json and of its tokenizer files, the backend and the runtime that computes the logits with their
    versions, and vcompress's. None where the model is not all in one local place (a hub id, a LoRA adapter over its
    base, a Runner handed in)."""
    if isinstance(spec, Runner) or str(spec).startswith("hf:"):
        return None
    path = resolve(None).path if _is_default(spec) else Path(spec).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return None
    config = path / "config.json" if path.is_dir() else None  # a GGUF file holds its config inside its weights
    return {
        "model_hash": weights_hash(path),
        "config_hash": hashlib.sha256(config.read_bytes()).hexdigest() if config and config.is_file() else None,
        "tokenizer_hash": tokenizer_hash(path),
        "backend": runner.backend,
        "runtime": runner.runtime,
        "vcompress": __version__,
    }


def _drops(reference: torch.Tensor, model: torch.Tensor, questions) -> dict:
    """The paired accuracy drop from reference to model, overall and per vertical domain."""
    ref_hits, hits = scoring.hits(reference, questions), scoring.hits(model, questions)
    return {
        **scoring.paired_drop(ref_hits, hits),
        "domains": {
            d: scoring.paired_drop([ref_hits[i] for i in rows], [hits[i] for i in rows])
            for d, rows in scoring.domains_of(questions).items()
        },
    }


def _label(runner: Runner) -> str:
    return getattr(runner, "label", None) or str(runner.path)


def _check_same_vocab(runner: Runner, reference: Runner) -> None:
    if runner.tokenizer is reference.tokenizer:
        return
    if runner.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise InputError(
            f"{_label(runner)} and the reference {_label(reference)} have different tokenizers; "
            "agreement and KL need the same vocabulary: pass the checkpoint this model was compressed from"
        )
