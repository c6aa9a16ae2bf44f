"""vcompress export qnn: the decoder compiled for a Snapdragon's Hexagon NPU (HTP context binaries), checked on its arithmetic."""

from __future__ import annotations

import click

from vcompress.commands._options import echo_export, execute_stage, stage_command, stage_options


@stage_command("qnn", config="vcompress.exporters.qnn:QnnExportConfig")
@stage_options
def qnn_command(settings, out, **options):
    """Hexagon NPU (QNN HTP) context binaries, compiled here; checked against PyTorch through HTP emulation."""
    from vcompress.exporters.qnn import QnnExport

    def report(out, metrics):
        echo_export(out, metrics, "the fp32 weights")
        for graph, p in metrics["placement"].items():
            click.echo(
                f"{graph}: {p['on_htp']}/{p['nodes']} nodes on the HTP (v{metrics['htp_arch']}), compiled in {p['compile_seconds']} s"
            )

    execute_stage(QnnExport(settings), out, report, **options)
