"""vcompress export gguf: one GGUF file for llama.cpp, checked in llama.cpp against PyTorch.

From a float checkpoint under --quant int4/int8 our GPTQ (the quantize stage) runs first, onto the block grid
llama.cpp reads (group 32: Q4_1 with a float minimum, Q4_0 symmetric, Q8_0), into the export's work folder,
and its codes are written as they are; a `vcompress quantize` folder is written from its own codes.
"""

from __future__ import annotations

from pathlib import Path

import click

from vcompress.commands._options import echo_export, execute_stage, stage_command, stage_options

# the quantize settings that put a float model's weights on each block grid (group 32 = one GGUF block)
BLOCK_GRIDS = {
    "q4_1": {"method": "gptq", "bits": 4, "group_size": 32, "zero_point": "float"},
    "q4_0": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True},
    "int8": {"method": "int8", "group_size": 32, "sym": True},
}


@stage_command("gguf", config="vcompress.exporters.gguf:GGUFExportConfig")
@stage_options
def gguf_command(settings, out, **options):
    """GGUF for llama.cpp: a quantize folder's codes as Q4_1 / Q4_0 / Q8_0 blocks (a float model: GPTQ onto them first),
    tokenizer and chat template inside; checked by llama.cpp on the parity prompts and on held-out text."""
    from vcompress.core.models import declared_model_type
    from vcompress.core.quant_format import read_quant_grid
    from vcompress.exporters.gguf import GGUFExport, check_architecture

    stage = GGUFExport(settings)
    cfg = stage.config
    model = options.pop("model")
    if model_type := declared_model_type(model, allow_pickle=options.get("allow_pickle", False), base=options.get("base")):
        check_architecture(model_type)  # before a float model's GPTQ, not after it
    if cfg.quant != "none" and read_quant_grid(model) is None:
        model = _gptq_first(model, Path(out), BLOCK_GRIDS["int8" if cfg.quant == "int8" else cfg.int4_block], options)
    execute_stage(stage, out, echo_gguf, model=model, **options)


def _gptq_first(model, out: Path, grid: dict, options: dict) -> str:
    """Quantize a float model onto the block grid into the export's work folder (kept if the export fails, removed
    with it when it succeeds); an earlier complete one there is reused."""
    from vcompress.compress.quantize import Quantize

    folder = out.parent / f".{out.name}.work" / "gptq"
    if not folder.is_dir():
        click.echo(f"GPTQ onto the GGUF block grid ({grid}) first, into {folder}", err=True)
        settings = {k: v for k, v in options.items() if k not in ("force", "as_json")}
        done = lambda folder, metrics: click.echo(f"quantized: {metrics['quantized_linears']} linears in {folder}", err=True)  # noqa: E731
        execute_stage(Quantize(grid), folder, done, model=model, as_json=False, **settings)
    return str(folder)


def echo_gguf(out, metrics: dict) -> None:
    echo_export(out, metrics, "the fp32 weights")
    click.echo(f"blocks: {', '.join(f'{n} {t}' for t, n in sorted(metrics['types'].items()))} tensors")
    held = metrics.get("heldout") or {}
    if held:
        click.echo(
            f"llama.cpp on {held['tokens']} held-out tokens: top-1 agreement {held['top1_agreement']:.4f} with PyTorch, "
            f"perplexity {held['perplexity']:.3f} vs {held['reference_perplexity']:.3f} ({held['perplexity_rise_pct']:+.2f}%)"
        )
