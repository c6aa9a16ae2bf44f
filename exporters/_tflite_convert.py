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

from vcompress.core.errors import InternalError, Unsupported
from vcompress.core.packages import import_failure

# ai-edge-quantizer recipes: weights per channel, activations stay float32 (quantized on the fly).
# "none" must be spelled out: litert-torch quantizes to int8 when no recipe is given.
RECIPES = {"none": "none", "int8": "dynamic_wi8_afp32", "int4": "dynamic_wi4_afp32"}
TOOLS = ("litert-torch", "tensorflow-cpu", "ai-edge-litert")  # what the exporter imports
INSTALL = "`pip install -e '.[tflite]'`"
CHECKED = ("llama", "qwen2", "gemma3_text")  # architectures whose export was checked against PyTorch


def missing() -> str | None:
    """Why the converter cannot be imported (one line), or None when it can."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as e:
        return import_failure(e, TOOLS, INSTALL)
    return None


def convert(
    hf_folder: Path, work: Path, *, model_type: str, quant: str, prefill_lengths: list[int], cache_length: int, log=print
) -> tuple[Path, Path]:
    """The .tflite written under `work` (quantized when asked) and the LiteRT-LM bundle holding it.
    Raises Unsupported when the converter cannot take the architecture, InternalError when it fails on one it takes."""
    transcript = io.StringIO()
    work.mkdir(parents=True, exist_ok=True)  # convert.log goes there even when the converter fails before making it
    try:
        # importing it imports transformers model classes whose docstring checks print on stdout
        with contextlib.redirect_stdout(transcript):
            from litert_torch.generative.export_hf import export as litert_export
    except ImportError as e:
        raise Unsupported(f"the tflite exporter needs litert-torch and tensorflow-cpu: {import_failure(e, TOOLS, INSTALL)}") from None
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
        raise _conversion_error(e, model_type, work, packaged=(work / _model_name(quant)).is_file()) from e
    (work / "convert.log").write_text(transcript.getvalue())
    model, bundle = work / _model_name(quant), work / "model.litertlm"
    for path in (model, bundle):
        if not path.is_file():
            raise InternalError(f"litert-torch reported success but wrote no {path.name} under {work}; its log: {work / 'convert.log'}")
    log(
        f"converted with litert-torch: {model.stat().st_size / 1e6:.1f} MB ({quant}), LiteRT-LM bundle {bundle.stat().st_size / 1e6:.1f} MB"
    )
    return model, bundle


def _conversion_error(e: Exception, model_type: str, work: Path, packaged: bool) -> Exception:
    """What a converter exception means: on an architecture outside CHECKED, that litert-torch cannot take it
    (Unsupported, exit 2: export ONNX instead); on a checked one, a crash of the converter or of ours on an
    input it converts (InternalError, exit 3), not something the user's input could fix."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    step = "package the LiteRT-LM bundle of" if packaged else "convert"  # packaging runs last: the model converted, the bundle did not
    log = work / "convert.log"
    if model_type in CHECKED:
        return InternalError(
            f"litert-torch failed to {step} {model_type!r}, an architecture it converts ({type(e).__name__}: {message}); its log: {log}"
        )
    return Unsupported(
        f"litert-torch cannot {step} architecture {model_type!r} ({type(e).__name__}: {message}); checked architectures: "
        f"{', '.join(CHECKED)}. Export it with `vcompress export onnx` instead (converter log: {log})"
    )


def _model_name(quant: str) -> str:
    return "model.tflite" if quant == "none" else "model_quantized.tflite"
