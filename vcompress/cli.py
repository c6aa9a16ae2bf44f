"""The `vcompress` command: a thin Click layer over the library.

Each module in vcompress/commands/ exposes `command` (a Click command or group) and is added
here, so a new stage adds its own file instead of editing this one. Errors become one line and
an exit code: 0 ok, 1 a check or budget failed, 2 bad input.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import click

from vcompress import __version__
from vcompress.core.errors import VcompressError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vcompress")
def cli() -> None:
    """Compress a fine-tuned causal LLM for an edge device, export it, and prove the result."""


def _add_commands() -> None:
    import vcompress.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vcompress.commands.{info.name}")
        cli.add_command(module.command)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    # Offline first: nothing reaches the hub unless the user names a hub id (hf:org/name).
    if not any("hf:" in a for a in args):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging

    # gptqmodel pulls in torchao, whose optional CUDA kernels fail to load on CPU and say so on
    # every model load, and whose enum registrations make torch's pytree warn about a deprecation:
    # noise here, not a problem.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display, not a bar per weight file
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
    else:
        code = result if isinstance(result, int) else 0
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
