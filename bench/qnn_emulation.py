"""How long one step of a qnn export takes here: the context binaries on QNN's HTP emulation against the same QDQ
graphs on the CPU execution provider (what sizes the qnn profiles' evaluation; not a phone's speed).

    python bench/qnn_emulation.py ARTIFACT [--threads 2] [--runs 1]

ARTIFACT is a folder written by `vcompress export qnn`. For each graph (decode: 1 token, prefill: `chunk` tokens)
and backend, the session's load time and the median wall time of --runs runs after one warm-up, and the largest
|logit difference| between the two backends on the same feeds (zeros for the cache, a causal bias).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def feeds_for(session, seq: int) -> dict:
    feeds = {i.name: np.zeros([int(x) for x in i.shape], np.float32) for i in session.get_inputs()}
    feeds["input_ids"] = np.full((1, seq), 42, np.int32)
    feeds["position_ids"] = np.arange(seq, dtype=np.int32)[None]
    return feeds


def main() -> None:
    from vcompress.exporters._qnn_session import open_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    print(f"{args.artifact} (HTP v{manifest['htp_arch']}, chunk {manifest['chunk']}, cache {manifest['cache']}), {args.threads} threads")
    print("| graph | backend | load s | step s | max abs logit diff HTP vs CPU |")
    print("|---|---|---|---|---|")
    for graph, seq in (("decode", 1), ("prefill", manifest["chunk"])):
        logits = {}
        for backend, files in (("htp", "htp"), ("cpu", "qdq")):
            started = time.perf_counter()
            session = open_step(args.artifact / manifest["files"][files][graph], backend, manifest["htp_arch"], args.threads)
            load = time.perf_counter() - started
            feeds = feeds_for(session, seq)
            session.run(["logits"], feeds)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                logits[backend] = session.run(["logits"], feeds)[0]
                times.append(time.perf_counter() - started)
            diff = f"{np.abs(logits['htp'] - logits['cpu']).max():.3g}" if backend == "cpu" else ""
            print(f"| {graph} | {backend} | {load:.1f} | {statistics.median(times):.2f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
