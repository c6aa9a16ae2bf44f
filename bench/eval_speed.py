"""How long MMLU scoring takes: 0-shot, N questions per subject over all 57 subjects, PyTorch backend.

    flock /tmp/vcompress-heavy.lock python bench/eval_speed.py [--model M] [--per-subject 10] [--batch-size 8 ...]

Target (issue 3): 570 questions (10 per subject) with the embedded SmolLM2-135M under 5 minutes on 2 cores.
Prints a table: batch size, questions, wall seconds, CPU seconds (all threads), questions/s, and the
accuracy found (a sanity check).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--subset", default="all")
    parser.add_argument("--per-subject", type=int, default=10)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--mmlu", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vcompress.evaluate import Evaluator
    from vcompress.exporters import open_runner

    started = time.perf_counter()
    runner = open_runner(args.model)
    load_s = time.perf_counter() - started
    rows = []
    for batch_size in args.batch_size:
        evaluator = Evaluator(subset=args.subset, shots=args.shots, per_subject=args.per_subject, mmlu=args.mmlu, batch_size=batch_size)
        questions = evaluator.questions  # loading MMLU is not part of the timing
        started, cpu_started = time.perf_counter(), time.process_time()
        report = evaluator.evaluate(runner)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        rows.append((batch_size, len(questions), seconds, cpu, len(questions) / seconds, report["mmlu"]["accuracy"]))

    print(
        f"model {getattr(runner, 'label', args.model)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.shots}-shot, subset {args.subset}, {args.per_subject} per subject; model load {load_s:.1f} s"
    )
    # CPU seconds over all threads: on a busy machine, wall time overstates what 2 free cores need.
    print(f"{'batch':>5} {'questions':>9} {'seconds':>8} {'cpu_s':>8} {'questions/s':>11} {'accuracy':>8}")
    for batch_size, n, seconds, cpu, rate, accuracy in rows:
        print(f"{batch_size:>5} {n:>9} {seconds:>8.1f} {cpu:>8.1f} {rate:>11.2f} {accuracy:>8.3f}")


if __name__ == "__main__":
    main()
