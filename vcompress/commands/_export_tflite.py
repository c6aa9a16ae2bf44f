"""vcompress export tflite: a .tflite with prefill/decode signatures and a KV cache, checked against PyTorch."""

from __future__ import annotations

from vcompress.commands._options import echo_export, execute_stage, stage_command, stage_options


@stage_command("tflite", config="vcompress.exporters.tflite:TFLiteExportConfig")
@stage_options
def tflite_command(settings, out, **options):
    """TFLite (LiteRT) for Android: fp32 must match PyTorch, INT8/INT4 must agree with it."""
    from vcompress.exporters.tflite import TFLiteExport

    execute_stage(TFLiteExport(settings), out, lambda out, metrics: echo_export(out, metrics, "the fp32 .tflite"), **options)
