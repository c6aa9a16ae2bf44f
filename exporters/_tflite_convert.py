"""A Hugging Face folder to a .tflite with prefill/decode signatures, through litert-torch's generative exporter.

litert-torch 0.10 (`litert_torch.generative.export_hf.export`) loads the folder itself, swaps in its
own attention and static KV cache, converts one prefill signature (`prefill_<P>`) and one `decode`
signature into a single .tflite that shares the weights, then quantizes it with ai-edge-quantizer
recipes. We ask for the plain .tflite (no .litertlm bundle) and no prefill logits (see _tflite_session.py).
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


def convert(hf_folder: Path, work: Path, *, model_type: str, quant: str, prefill_tokens: int, cache_length: int, log=print) -> Path:
    """The .tflite written under `work` (quantized when asked). Raises Unsupported when the converter cannot."""
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
                bundle_litert_lm=False,
                keep_temporary_files=True,
                quantization_recipe=RECIPES[quant],
                prefill_lengths=[prefill_tokens],
                cache_length=cache_length,
                prefill_logits=False,
            )
    except Exception as e:  # the converter's failures are of every kind (AttributeError, RuntimeError, ...)
        (work / "convert.log").write_text(transcript.getvalue())
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unsupported(
            f"litert-torch cannot convert architecture {model_type!r} to TFLite ({type(e).__name__}: {message}); "
            f"checked architectures: {', '.join(CHECKED)}. Export it with `vcompress export onnx` instead"
        ) from None
    (work / "convert.log").write_text(transcript.getvalue())
    name = "model.tflite" if quant == "none" else "model_quantized.tflite"
    model = work / name
    if not model.is_file():
        raise Unsupported(f"litert-torch wrote no {name} under {work} (see convert.log there)")
    log(f"converted with litert-torch: {model.stat().st_size / 1e6:.1f} MB ({quant})")
    return model
