"""`make demo`'s exit status from `vcompress run`'s: 0 passes, and 1 passes only when it is a verdict.

    python scripts/demo_exit.py CODE RUN_DIR STARTED

Exit 1 is a verdict (a budget failed; the table says which) only when this invocation, started at STARTED (UTC,
ISO 8601, as run.json writes it), finished the run and its validate stage wrote verdict.json: then make succeeds.
An exit 1 without that, and every other non-zero code (2 bad input, 3 internal error, 4 an export refused its
artifact), fails make with the code it was given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vcompress.core.artifact import RunLayout
from vcompress.core.errors import InputError


def verdict_written(run_dir: Path, started: str) -> bool:
    """Whether the run that began at `started` (or later) finished and its verdict is on disk. run.json is written
    afresh by each invocation with `finished` null, and `finished` is set only after the last stage."""
    layout = RunLayout(run_dir)
    try:
        run = layout.read_run()
        verdict = layout.validation(RunLayout.VERDICT, required=False)
    except InputError:
        return False
    return bool(run.get("finished")) and str(run.get("started", "")) >= started and "passed" in verdict


def main(argv: list[str]) -> int:
    code, run_dir, started = int(argv[0]), Path(argv[1]), argv[2]
    if code != 1:
        return code
    if verdict_written(run_dir, started):
        print(f"make demo: exit 1 is the verdict in {run_dir} (a budget failed; the table above says which)")
        return 0
    print(f"make demo: vcompress exited 1 but this run wrote no verdict in {run_dir}; read the error above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
