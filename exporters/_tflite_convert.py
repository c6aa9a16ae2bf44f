"""A Hugging Face folder to a .tflite with prefill/decode signatures, through litert-torch's generative exporter.

litert-torch 0.10 (`litert_torch.generative.export_hf.export`) loads the folder itself, swaps in its
own attention and static KV cache, converts a prefill signature per length (`prefill_<P>`) and one `decode`
signature into a single .tflite that shares the weights, then quantizes it with ai-edge-quantizer
recipes. We ask for no prefill logits (see _tflite_session.py) and for the LiteRT-LM bundle, model.litertlm:
litert-torch packs that .tflite (the same bytes: packaging runs after conversion and changes no
signature) with the HF tokenizer.json and LLM metadata (stop tokens from generation_config.json, the
chat template, the cache length as max tokens) through litert-lm-builder. That is LiteRT-LM's own
format; the older MediaPipe `.task` bundle takes SentencePiece tokenizers only, not tokenizer.json.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from vcompress.core.errors import Unsupported

# ai-edge-quantizer recipes: weights per channel, activations stay float32 (quantized on the fly).
# "none" must be spelled out: litert-torch quantizes to int8 when no recipe is given.
RECIPES = {"none": "none", "int8": "dynamic_wi8_afp32", "int4": "dynamic_wi4_afp32"}
CHECKED = ("llama", "qwen2")  # architectures whose export was checked against PyTorch


def available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError:
        return False
    return True


def convert(
    hf_folder: Path, work: Path, *, model_type: str, quant: str, prefill_lengths: list[int], cache_length: int, log=print
) -> tuple[Path, Path]:
    """The .tflite written under `work` (quantized when asked) and the LiteRT-LM bundle holding it.
    Raises Unsupported when the converter or the packaging cannot."""
    transcript = io.StringIO()
    try:
        # importing it imports transformers model classes whose docstring checks print on stdout
        with contextlib.redirect_stdout(transcript):
            from litert_torch.generative.export_hf import export as litert_export
    except ImportError as e:
        raise Unsupported(
            f"the tflite exporter needs litert-torch and tensorflow-cpu ({e}); install them with `pip install -e '.[tflite]'`"
        ) from None
    try:
        # The exporter prints a progress tree on stdout, which carries --json output here.
        with contextlib.redirect_stdout(transcript):
            litert_export.export(
                model=str(hf_folder),
                output_dir=str(work),
                bundle_litert_lm=True,
                keep_temporary_files=True,
                quantization_recipe=RECIPES[quant],
                prefill_lengths=prefill_lengths,
                cache_length=cache_length,
                prefill_logits=False,
            )
    except Exception as e:  # the converter's failures are of every kind (AttributeError, RuntimeError, ...)
        (work / "convert.log").write_text(transcript.getvalue())
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if (work / _model_name(quant)).is_file():  # packaging runs last: the model converted, the bundle did not
            raise Unsupported(
                f"litert-torch converted {model_type!r} but could not package the LiteRT-LM bundle ({type(e).__name__}: {message}); "
                f"see {work / 'convert.log'}"
            ) from None
        raise Unsupported(
            f"litert-torch cannot convert architecture {model_type!r} to TFLite ({type(e).__name__}: {message}); "
            f"checked architectures: {', '.join(CHECKED)}. Export it with `vcompress export onnx` instead"
        ) from None
    (work / "convert.log").write_text(transcript.getvalue())
    model, bundle = work / _model_name(quant), work / "model.litertlm"
    for path in (model, bundle):
        if not path.is_file():
            raise Unsupported(f"litert-torch wrote no {path.name} under {work} (see convert.log there)")
    log(
        f"converted with litert-torch: {model.stat().st_size / 1e6:.1f} MB ({quant}), LiteRT-LM bundle {bundle.stat().st_size / 1e6:.1f} MB"
    )
    return model, bundle


def _model_name(quant: str) -> str:
    return "model.tflite" if quant == "none" else "model_quantized.tflite"
