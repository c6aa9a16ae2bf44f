"""The decoder layers streamed from the checkpoint on disk, one at a time, as quantize's source of layers.

Quantize.run is the one flow (GPTQ or RTN, layer by layer); this source loads each layer before it is
quantized and writes it after, so the streamed folder holds the in-memory one's tensors bit for bit
(tests/test_stream.py). Memory is the largest layer,
its Hessians and the calibration activations, plus the embedding while the first layer's inputs
are computed. What needs the whole model (held-out perplexity and answer agreement of the result)
is left to `vcompress validate`, and the metrics say so.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from vcompress.core.artifact import write_json
from vcompress.core.errors import InputError
from vcompress.core.layer_stream import LayerStream, TensorFileWriter, return_freed_memory
from vcompress.core.quant_format import QUANT_GRID_FILE

from ._arch import is_gpt2, layer_prefix
from ._calib import first_layer_inputs
from ._gptq_core import Grid, Quantized
from ._gptq_pack import to_tensors
from ._quant_checkpoint import SIDECAR, gptq_config, gptq_reloadable, quant_grid

NOT_MEASURED = "not measured: the model was streamed layer by layer and never whole in memory; `vcompress validate` measures the artifact"


class QuantizedFiles:
    """The quantize folder's weight files written as layers finish: model.safetensors and, for layouts
    transformers cannot reload, the codes in the sidecar (see save_quantized for the two layouts)."""

    def __init__(self, out: Path, reloadable: bool, sidecar: str):
        self.reloadable = reloadable
        self.model = TensorFileWriter(out / "model.safetensors")
        self.codes = self.model if reloadable else TensorFileWriter(out / sidecar)
        self.quant_bytes = 0

    def write(self, name: str, tensor: torch.Tensor, quantized: Quantized | None = None) -> None:
        if quantized is None:
            self.model.add(name, tensor)
            return
        packed = to_tensors(quantized)
        module = name.removesuffix(".weight")
        for key, t in packed.items():
            self.codes.add(f"{module}.{key}", t)
        self.quant_bytes += sum(t.numel() * t.element_size() for t in packed.values())
        if not self.reloadable:  # the float weights beside the codes, exactly W
            self.model.add(name, tensor)

    def close(self) -> None:
        self.model.close({"format": "pt"})
        if self.codes is not self.model:
            self.codes.close({"format": "pt"})

    def abort(self) -> None:
        self.model.abort()
        if self.codes is not self.model:
            self.codes.abort()


class StreamedLayers:
    """The quantize flow's source of decoder layers read one at a time from the checkpoint on disk: `enter`
    loads a layer before it is quantized, `leave` writes its tensors (the codes as they are made) and drops it,
    `save` writes what lies outside the layers and the folder's other files."""

    streamed = True
    held_out = NOT_MEASURED  # what needs the whole model (held-out scoring) is left to validate

    def __init__(self, folder: Path, ctx, cfg):
        if cfg.compare_rtn:
            raise InputError("compare_rtn needs the model in memory; drop it or pass --stream off")
        self.folder, self.device = folder, "cuda" if torch.cuda.is_available() else "cpu"  # layers, Hessians, GPTQ
        self.stream = LayerStream(folder, device=self.device)
        self.model, self.tokenizer = self.stream.model, ctx.load_tokenizer()
        self.load_tokenizer = ctx.load_tokenizer  # the intake's (--tokenizer, or the checkpoint's own)
        self.prefix = layer_prefix(self.model)
        self.bytes_before = self.stream.source_bytes()
        self.files: QuantizedFiles | None = None
        self.results: dict[str, Quantized] = {}
        ctx.log(f"streaming {folder} layer by layer (the model is never whole in memory)")

    def judge(self, cfg, ctx) -> None:
        return None  # held-out scoring needs the whole model: `held_out` says so

    def start(self, grid: Grid, results: dict[str, Quantized], out: Path) -> None:
        """Open the weight files; `results` fills as layers are quantized."""
        self.results = results
        self.files = QuantizedFiles(out, gptq_reloadable(self.model, grid), SIDECAR)

    def first_layer_inputs(self, blocks: torch.Tensor, batch_size: int) -> list:
        """The calibration blocks' hidden states entering layer 0, from the embedding's rows alone."""
        self.tokenizer = None  # ~140 MB for a 150k vocabulary; read again for saving once the layers are done
        return_freed_memory()
        positions = _position_embeddings(self.model)
        for module in positions:
            self.stream.load(module)
        embeddings = f"{self.stream.name_of(self.model.get_input_embeddings())}.weight"
        inputs = first_layer_inputs(self.model, blocks, batch_size, embed=lambda ids: self.stream.rows(embeddings, ids).to(self.device))
        for module in positions:
            self.stream.release(module)
        return inputs

    def enter(self, i: int, layer) -> None:
        self.stream.load(layer)

    def leave(self, i: int, layer) -> None:
        """Write layer i's tensors (a quantized linear's codes, and its float weight where the layout keeps it)."""
        for key, tensor in layer.state_dict().items():
            name = f"{self.prefix}.{i}.{key}"
            module = name.removesuffix(".weight")
            quantized = self.results.get(module) if name.endswith(".weight") else None
            self.files.write(name, tensor, quantized)
            if quantized is not None:
                self.results[module] = _shape_only(quantized)
        self.stream.release(layer)

    def save(self, results: dict, kept: list[str], grid: Grid, cfg, out: Path) -> tuple[dict[str, int], int]:
        """What lies outside the layers, then config, tokenizer and quant_manifest.json; (bytes per file, codes' bytes)."""

        model, files = self.model, self.files
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        for name, tensor in model.state_dict().items():  # copied in chunks where the source holds them
            if not name.startswith(f"{self.prefix}.") and name not in tied:
                if name in self.stream.files:
                    self.stream.copy_into(files.model, name)
                else:
                    files.write(name, tensor)
        files.close()
        config = copy.deepcopy(model.config)
        if files.reloadable:
            config.quantization_config = gptq_config(grid, cfg, sorted(results), kept)
        config.save_pretrained(out)
        if (self.folder / "generation_config.json").is_file():
            shutil.copy(self.folder / "generation_config.json", out / "generation_config.json")
        self.load_tokenizer().save_pretrained(out)
        write_json(out / QUANT_GRID_FILE, quant_grid(model, results, kept, grid, cfg))
        return self.written(results), files.quant_bytes

    def written(self, results: dict) -> dict[str, int]:
        files = self.files
        if files.reloadable:
            return {"quantized model": files.model.nbytes}
        other = files.model.nbytes - sum(_float_bytes(q) for q in results.values())
        return {"model.safetensors (float weights, for reload)": files.model.nbytes, "quantized model": other + files.quant_bytes}

    def abort(self) -> None:
        if self.files is not None:
            self.files.abort()


def _position_embeddings(model) -> list[torch.nn.Module]:
    """Learned position embeddings, which the first layer's inputs add to the token embeddings."""
    return [model.transformer.wpe] if is_gpt2(model) else []


def _shape_only(q: Quantized) -> Quantized:
    """The layer's record without its codes (written already): shapes for the manifest and metrics."""
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
    return Quantized(meta(q.codes), meta(q.scales), meta(q.zeros), q.g_idx, q.grid)


def _float_bytes(q: Quantized) -> int:
    return q.codes.numel() * 4
