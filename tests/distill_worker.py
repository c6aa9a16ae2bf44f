"""distill() as a process of a test's `torchrun` job: argv[1] is a JSON object of distill()'s keyword
arguments, plus "stop_at": rank 0 fails right after that training step (and its checkpoint), as a crash would."""

from __future__ import annotations

import json
import sys

from vcompress.compress.distill import distill


def main() -> None:
    kwargs = json.loads(sys.argv[1])
    stop_at = kwargs.pop("stop_at", None)

    def progress(label: str, done: int, total: int) -> None:
        if label == "distill" and done == stop_at:
            raise SystemExit(f"stopped after step {done}")

    distill(**kwargs, progress=progress)


if __name__ == "__main__":
    main()
