"""The `vcompress` command: a thin Click layer over the library.

Each module in vcompress/commands/ exposes a Click command (or group) named after it, `<module>_command`
(`quantize.py`: `quantize_command`), and is added here, so a new stage adds its own file instead of editing this one. Errors become one line and
an exit code: 0 ok, 1 a check or budget failed, 2 bad input, 3 an internal error (a bug of ours or of a
library: its traceback goes to a log file that the line names, so it is never mistaken for a failed budget),
4 an export refused its own artifact (core.errors.Refused: no artifact, so no verdict either).
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib
import os
import pkgutil
import sys
import traceback
from pathlib import Path

import click

from vcompress import __version__
from vcompress.core.errors import VcompressError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vcompress")
@click.option("--verbose", is_flag=True, help="Let the libraries we use print their own logs and banners too.")
def cli(verbose: bool) -> None:
    """Compress a fine-tuned causal LLM for an edge device, export it, and prove the result."""


def _add_commands() -> None:
    import vcompress.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vcompress.commands.{info.name}")
        cli.add_command(getattr(module, f"{info.name}_command"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    # Offline first: nothing reaches the hub unless the user names a hub id (hf:org/name).
    if not any("hf:" in a for a in args):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "--verbose" in args[: args.index("--") if "--" in args else len(args)]:
        args.remove("--verbose")
    else:
        _quiet_libraries()
    _add_commands()
    try:
        result = cli.main(args=args, prog_name="vcompress", standalone_mode=False)
    except VcompressError as e:
        click.echo(f"error: {e}", err=True)
        code = e.exit_code
    except click.exceptions.UsageError as e:
        hint = f"`{e.ctx.command_path} --help`" if e.ctx else "`vcompress --help`"
        click.echo(f"error: {e.format_message()}; see {hint}", err=True)
        code = 2
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        click.echo("error: interrupted; finished stage folders are kept (use --resume)", err=True)
        code = 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            code = _internal_error(e)
        else:
            where = e.filename or "the output folder"
            what = {errno.EACCES: "permission denied on", errno.EROFS: "read-only file system at"}.get(e.errno)
            problem = (
                f"{what} {where}; choose a writable --out" if what else f"no space left on {where}; free space or choose another --out"
            )
            click.echo(f"error: {problem}", err=True)
            code = 2
    except Exception as e:  # noqa: BLE001  (anything not ours is an internal error, exit 3)
        code = _internal_error(e)
    else:
        code = result if isinstance(result, int) else 0
    if argv is None:
        sys.exit(code)
    return code


# Loggers of libraries we use that speak on import or on every model load: torchao's optional CUDA kernels
# that fail to load on CPU, torch's pytree deprecation notes for torchao's enums, datasets announcing
# TensorFlow/JAX, matplotlib building its font cache, gptqmodel's banner. Noise to a user; `--verbose` shows it.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "datasets", "matplotlib", "gptqmodel", "absl", "tensorflow", "jax")


def _quiet_libraries() -> None:
    import logging

    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("DATASETS_VERBOSITY", "error"),
        ("TF_CPP_MIN_LOG_LEVEL", "3"),
        ("GPTQMODEL_LOGLEVEL", "ERROR"),
        # tqdm reads TQDM_* once, on import: set before transformers (its GGUF conversion bar is a bare tqdm),
        # huggingface_hub or datasets import it, and inherited by the processes we start.
        ("TQDM_DISABLE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(name, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # also when tqdm was imported before us (a library calling main())


def _internal_error(e: BaseException) -> int:
    """One line naming the error and the log that holds its traceback; exit code 3."""
    root = Path(os.environ.get("VCOMPRESS_CACHE") or Path.home() / ".cache" / "vcompress") / "logs"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = root / f"error-{stamp}-{os.getpid()}.log"
    try:
        root.mkdir(parents=True, exist_ok=True)
        log.write_text(f"vcompress {__version__}: {' '.join(sys.argv)}\n\n{traceback.format_exc()}", encoding="utf-8")
    except OSError:
        log = Path("(unwritable log; run with VCOMPRESS_CACHE set to a writable folder)")
    message = str(e).splitlines()[0] if str(e) else ""
    click.echo(f"internal error: {type(e).__name__}: {message}; details in {log}", err=True)
    return 3


if __name__ == "__main__":
    main()
