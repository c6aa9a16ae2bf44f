"""A test-only exporter, "torch-half": the model's weights as fp16 safetensors, run by PyTorch in fp32.

The whole of a new format: a Stage registered in EXPORTERS (config, manifest, the shared parity
gate of exporters/base.py) and a Runner registered in RUNNERS under the same name, which is the
manifest's `format`, so evaluation and latency find it through `open_runner`.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext
from vcompress.exporters.base import Exporter, ParityConfig, gate, load_source, save_sidecars
from vcompress.exporters.torch import TorchRunner

FORMAT = "torch-half"
WEIGHTS = "model.safetensors"  # the name from_pretrained reads


class HalfExportConfig(ParityConfig):
    quant: Literal["fp16"] = "fp16"  # not "none", so parity judges it by top-1 agreement like int8/int4
    threads: int | None = Field(None, gt=0, description="PyTorch threads for the parity check")


class HalfExport(Exporter):
    format = FORMAT
    runtime = "torch"
    Config = HalfExportConfig

    def run(self, ctx: StageContext) -> dict:
        cfg: HalfExportConfig = self.config
        model, tokenizer, grid = load_source(ctx)
        ctx.log("writing the weights as fp16 safetensors")
        copy.deepcopy(model).half().save_pretrained(ctx.out)  # the source model stays fp32 for the parity check
        save_sidecars(model, tokenizer, ctx.out)
        vocab = model.config.vocab_size
        manifest = self.manifest(
            {"model": WEIGHTS, "config": "config.json", "tokenizer": "tokenizer.json"},
            weights_dtype="float16",
            inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
            outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", vocab]}],
        )
        result = gate(ctx, HalfRunner, model, tokenizer, cfg, manifest, "torch-half", dequantized=bool(grid))
        return {"format": FORMAT, "quant": cfg.quant, "model_bytes": (ctx.out / WEIGHTS).stat().st_size, "parity": result}


@RUNNERS.register(FORMAT)
class HalfRunner(TorchRunner):
    """The fp16 folder loaded as fp32 (TorchRunner's dtype), so the CPU computes in fp32 on fp16-rounded weights."""

    backend = FORMAT
