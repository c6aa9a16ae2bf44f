"""Our cloze MMLU of the embedded default beside the figure SmolLM2-135M's model card reports.

    flock /tmp/vcompress-heavy.lock python bench/mmlu_reference.py [--per-subject N] [--batch-size 8] [--out F]

The card reports MMLU (cloze, 0-shot) 31.5 for SmolLM2-135M, measured with lighteval's mmlu_cf on the
bf16 base model. Our default is the Q4_1 GGUF of the Instruct model (converted to float32), so expect a
small difference; the prompt is not tuned to hit the number. Without --per-subject the whole test split
is scored (14,042 questions); with it, N per subject, and the run time is extrapolated to the whole split.
Prints the accuracy over all questions and the mean of the 57 subject accuracies (lighteval's average),
each with its 95% interval, the run time and the rate; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

CARD = 31.5  # SmolLM2-135M model card: MMLU (cloze), 0-shot, base model
FULL_SPLIT = 14042


def macro_average(subjects: dict) -> tuple[float, float, float]:
    """The mean of the subject accuracies and its 95% interval (normal approximation: subjects are independent)."""
    accs = [row["accuracy"] for row in subjects.values()]
    mean = sum(accs) / len(accs)
    se = math.sqrt(sum(row["accuracy"] * (1 - row["accuracy"]) / row["n"] for row in subjects.values())) / len(accs)
    return mean, mean - 1.959964 * se, mean + 1.959964 * se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder, .gguf or exported artifact (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--per-subject", type=int, default=None, help="questions per subject, drawn with --seed (default: all)")
    parser.add_argument("--format", default="cloze", choices=["cloze", "letter"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmlu", default=None)
    parser.add_argument("--cache", action="store_true", help="read/keep the answers in the answer cache (a cached run's time is a read)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vcompress.core import scoring
    from vcompress.evaluate import Evaluator
    from vcompress.progress import progress_bars

    with progress_bars() as progress:
        evaluator = Evaluator(
            subset="all",
            per_subject=args.per_subject,
            format=args.format,
            mmlu=args.mmlu,
            seed=args.seed,
            batch_size=args.batch_size,
            threads=args.threads,
            cache=args.cache,
            progress=progress,
        )
        questions = evaluator.questions
        runner = evaluator.runner(args.model)  # loading is not part of the timing
        started = time.perf_counter()
        logprobs = evaluator.mmlu_logprobs(args.model)
        seconds = time.perf_counter() - started
        evaluator.close()
    summary = scoring.mmlu_summary(logprobs, questions)
    macro, macro_low, macro_high = macro_average(summary["subjects"])
    low, high = summary["ci95"]
    rate = len(questions) / seconds
    figures = {
        "model": getattr(runner, "label", str(args.model)),
        "backend": runner.backend,
        "format": args.format,
        "questions": len(questions),
        "subjects": len(summary["subjects"]),
        "seed": args.seed,
        "accuracy": summary["accuracy"],
        "ci95": [low, high],
        "subject_mean": macro,
        "subject_mean_ci95": [macro_low, macro_high],
        "card": CARD,
        "seconds": seconds,
        "questions_per_s": rate,
        "full_split_seconds": FULL_SPLIT / rate,
        "per_subject_accuracy": {subject: row["accuracy"] for subject, row in summary["subjects"].items()},
    }
    print(
        f"{figures['model']} ({runner.backend}), MMLU {args.format} 0-shot, {len(questions)} questions "
        f"over {len(summary['subjects'])} subjects"
    )
    print(f"  ours, over all questions:      {100 * summary['accuracy']:.1f}  (95% CI {100 * low:.1f} - {100 * high:.1f})")
    print(f"  ours, mean of subjects:        {100 * macro:.1f}  (95% CI {100 * macro_low:.1f} - {100 * macro_high:.1f})")
    print(f"  SmolLM2-135M model card:       {CARD:.1f}  (bf16 base model; ours: the Q4_1 GGUF of the Instruct model)")
    print(
        f"  run time {seconds:.0f} s, {rate:.2f} questions/s"
        + ("" if len(questions) == FULL_SPLIT else f"; the whole split ({FULL_SPLIT:,}) would take about {FULL_SPLIT / rate / 60:.0f} min")
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
