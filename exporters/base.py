"""What every exporter shares: its Stage base (format, runtime, the manifest head), loading the
source, the sidecar files, the parity check against PyTorch and its gate, and the Runner base over
a numpy session (_onnx_session.py, _tflite_session.py).

An exporter module declares one Exporter subclass with `format = FORMAT` (which registers it under that
name), the `runtime` that runs the artifact (what a profile's `target.runtime` names) and
`runtime_package`, the runtime's PyPI distribution whose installed version the manifest records (where it is not
the runtime's own name).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import AfterValidator, Field

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.data import pack, texts_for
from vcompress.core.errors import InputError, Refused, Unsupported
from vcompress.core.export_manifest import PARITY_PROMPTS, session_runtime
from vcompress.core.layer_stream import (
    DequantizedStream,
    LayerStream,
    checkpoint_bytes,
    model_bytes,
    return_freed_memory,
    stream_source,
    too_big_for_memory,
    total_memory,
)
from vcompress.core.models import Intake, check_supported, source_gguf
from vcompress.core.quant_format import read_quant_grid
from vcompress.core.registry import EXPORTERS
from vcompress.core.runner import Runner
from vcompress.core.scoring import text_fidelity, torch_logits_fn
from vcompress.core.stage import Stage, StageConfig, StageContext, execute


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError(f"{value} is not a power of two (16, 32, 64, 128)")
    return value


# A quantization block along the input dimension: the runtimes' block kernels take powers of two only.
PowerOfTwo = Annotated[int, AfterValidator(_power_of_two)]


class ParityConfig(StageConfig):
    """The parity check's thresholds, shared by every exporter (written into each manifest)."""

    new_tokens: int = Field(32, ge=1, description="greedy tokens compared with PyTorch per prompt")
    # fp32 sums in another order than PyTorch (MLAS vs ATen kernels): over 30 layers that moves
    # logits of magnitude ~10 by ~1e-4; a real bug moves them by far more than the threshold.
    max_abs_diff: float = Field(5e-3, gt=0, description="fp32: largest |logit difference| allowed")
    min_top1: float = Field(0.98, ge=0, le=1, description="fp32: top-1 agreement over prompt positions")
    # A gate against broken exports (a wrong layout agrees ~0%), not a quality budget: those are the
    # profile's, checked by validate. Measured on SmolLM2 ONNX: int4 RTN 0.52, HQQ 0.83.
    min_top1_quantized: float = Field(
        0.5,
        ge=0,
        le=1,
        description="int8/int4: top-1 agreement with PyTorch fp32 the check requires",
        json_schema_extra={"option": "min-agreement"},
    )


class HeldoutConfig(ParityConfig):
    """The parity check plus the held-out text check (`heldout_fidelity`): perplexity and top-1 agreement."""

    heldout_blocks: int = Field(2, ge=0, description="held-out text blocks for perplexity and top-1 agreement (0: skip)")
    heldout_seq_len: int = Field(256, ge=8, description="tokens per held-out block")


def export_stage(settings: dict, where: str | None = None) -> Exporter:
    """The export Stage for settings that name their `format` (a registered exporter), its config validated."""
    settings = dict(settings)
    stage_cls = EXPORTERS.get(settings.pop("format"))
    return stage_cls(stage_cls.parse_config(settings, where=where))


class ExportStep(Stage):
    """A recipe's export step: the profile's target format picks the registered Exporter, whose runtime
    must be the one the target names."""

    name = "export"
    folder = "05-export"  # 05-export-<format> in a run (Exporter.run_folder)

    @classmethod
    def from_profile(cls, settings: dict, profile, where: str | None = None) -> Exporter:
        target, prefix = profile.target, f"{where}: " if where else ""
        if target.format not in EXPORTERS:
            raise InputError(f"{prefix}target.format {target.format!r} has no exporter; known: {', '.join(EXPORTERS.names())}")
        exporter = EXPORTERS.get(target.format)
        if target.runtime and target.runtime != exporter.runtime:
            raise InputError(
                f"{prefix}target.runtime {target.runtime!r}: the {target.format} exporter's artifacts run on "
                f"{exporter.runtime!r}; set runtime: {exporter.runtime} or leave it out"
            )
        if exporter.refuses_checkpoints:  # a run hands the exporter a model checkpoint
            raise Unsupported(f"{prefix}{exporter.refuses_checkpoints}")
        return export_stage({"format": target.format, "quant": target.quant, **settings}, where)


class Exporter(Stage):
    """One format's export stage (a registered exporter); a run reaches it through the recipe's ExportStep."""

    name = ExportStep.name
    format: ClassVar[str]  # its name in EXPORTERS, and the manifest's "format"
    runtime: ClassVar[str]  # what runs the artifact: a profile's target.runtime
    runtime_package: ClassVar[str | None] = None  # the runtime's PyPI distribution, where not `runtime` (its version: the manifest)
    app_runtime_package: ClassVar[str | None] = None  # a runtime an app ships on top of it (ONNX: onnxruntime-genai)
    # Why this exporter cannot take a model checkpoint as its source (None: it can), so that a
    # pipeline can refuse such a recipe before any work.
    refuses_checkpoints: ClassVar[str | None] = None
    # How the latency bench opens an artifact of this format in a process that holds only numpy and the runtime:
    # bench --backend name -> the session module (a `Session` class and its `RUNTIME`), the first what an app ships.
    # Written into every manifest.json, where devices/bench.py reads it; empty: the bench opens the Runner (torch).
    sessions: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "format" in cls.__dict__:
            cls.runtime_package = cls.runtime_package or cls.runtime
            EXPORTERS.register(cls.format)(cls)

    @property
    def run_folder(self) -> str:
        return f"05-export-{self.format}"

    @classmethod
    def export(
        cls, model_path, out, quant: str | None = None, *, force=False, seed=0, log=print, intake: Intake | None = None, **settings
    ) -> dict:
        """Run this exporter on a checkpoint (None: the embedded default) or a quantize folder into `out`; returns its
        metrics. `quant` and the settings are the config's (its defaults where left out): the library API of the command."""
        stage = cls(settings | ({"quant": quant} if quant else {}))
        return execute(stage, out, source=model_path, force=force, seed=seed, log=log, intake=intake or Intake())

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """The bytes this exporter, with its config, would store for a model of `shape` (core/roofline_math.py's
        `shapes`) quantized as `quantization` (the profile's scheme with the quantize step's settings: method,
        bits, group_size, zero_point...), with `max_positions` positions: `stored_weights`' dict, which the
        roofline reads. The prune planner asks it through EXPORTERS; a format that cannot say refuses."""
        raise Unsupported(
            f"the {self.format} exporter cannot predict the size of its artifact, which prune auto plans with; "
            "use a fixed prune fraction or a target format that predicts it"
        )

    @classmethod
    def float_reference(cls, artifact: Path, dest: Path) -> Path | None:
        """A copy of `artifact` in `dest` whose kernels take float activations: the function its stored weights define,
        which each ISA's build of the runtime is measured against (devices/emulated.py). None: the format has no such
        switch, and the builds are compared only with each other."""
        return None

    def manifest(self, files: dict[str, str], **fields) -> dict:
        """manifest.json: format, runtime and its version, files, the exporter's own fields (which may
        relabel the format), and the parity thresholds of a checked export."""
        manifest = {
            "format": self.format,
            "runtime": self.runtime,
            "runtime_version": package_version(self.runtime_package),
            "files": files,
            "sessions": dict(self.sessions),
        } | fields
        cfg = self.config
        if isinstance(cfg, ParityConfig):
            manifest["thresholds"] = {
                "max_abs_diff": cfg.max_abs_diff,
                "min_top1": cfg.min_top1,
                "min_top1_quantized": cfg.min_top1_quantized,
                "greedy_tokens": cfg.new_tokens,
            }
        return manifest


def stored_weights(shape: dict, body_bits: float, table_bits: float, head_bits: float, gather_only: float = 0) -> dict:
    """roofline.weight_bytes' dict from bits per weight: the decoder body, the embedding table (only gathered, a row
    per token; a tied one is the head's), the LM head, and `gather_only` other bytes read a row at a time (rotary
    tables). Norms and biases are left out."""
    head = shape["head_params"] * head_bits / 8
    gathered = (0 if shape["tied"] else shape["head_params"] * table_bits / 8) + gather_only
    stored = shape["body_params"] * body_bits / 8 + head + gathered
    return {"stored_bytes": round(stored), "gather_only_bytes": round(gathered), "per_token_bytes": round(stored - gathered)}


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --- the source -----------------------------------------------------------------------


def source_folder(source) -> Path | None:
    """The path of a stage's source (a ModelSource's too); None for the embedded default."""
    path = getattr(source, "path", source)
    return Path(str(path)) if path is not None else None


def load_source(ctx: StageContext) -> tuple[Any, Any, dict | None]:
    """Model, tokenizer and quantize-stage manifest (None if the source is not a quantize folder) to export.

    A quantize folder loads as its exact dequantized weights, what the exported graph must compute;
    any other source through the intake, with the command's flags (--base, --allow-pickle, ...)."""
    return (*ctx.load(), read_quant_grid(source_folder(ctx.source)))


def uncarried_source(ctx: StageContext, quant: str, why: str) -> str | None:
    """For an exporter that cannot carry a GGUF source's blocks (`why`): says so, and returns the manifest's note
    (None: no quantization asked, or not a GGUF source)."""
    path = source_gguf(ctx.read_source()) if quant != "none" else None
    if path is None:
        return None
    note = f"{path.name}'s GGUF blocks are not carried but re-rounded: {why}"
    ctx.log(note)
    return note


def stream_folder(setting: str, ctx: StageContext, grid: dict | None) -> Path | None:
    """The safetensors folder to export layer by layer from ("on", or "auto" when the fp32 model would not
    fit in memory), or None to load the model whole. A quantize folder streams as its dequantized model;
    a GGUF as its safetensors conversion (core.layer_stream.stream_source)."""
    if grid is None:
        return stream_source(setting, ctx)
    folder = source_folder(ctx.source)
    if setting == "off" or (setting == "auto" and not too_big_for_memory(model_bytes(folder))):
        return None
    return folder


# litert-torch's conversion peaked at 9x the fp32 model (SmolLM2-135M to int8: 4.5 GiB RSS for 0.5 GiB)
CONVERTER_PEAK = 9


def refuse_if_too_big(ctx: StageContext, converter: str, peak: float = CONVERTER_PEAK) -> None:
    """For an exporter that needs the whole model in memory: a one-line refusal, before any work, when a
    source folder's fp32 model times the converter's measured peak is more than this machine's memory.
    Memory other processes hold now does not count: it comes back, and refusing for it would send a
    model that fits to the streamed ONNX export."""
    folder = source_folder(ctx.source)
    if folder is None or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return  # the default, a GGUF or a LoRA folder: loaded whole by the intake anyway
    size = model_bytes(folder) if read_quant_grid(folder) is not None else checkpoint_bytes(folder)
    if size * peak > total_memory():
        raise Unsupported(
            f"{converter} needs the whole model in memory, about {peak:g}x its fp32 size ({size * peak / 2**30:.1f} GiB for "
            f"{size / 2**30:.1f} GiB) on a machine of {total_memory() / 2**30:.1f} GiB; export ONNX layer by layer with "
            f"`vcompress export onnx --stream on`, or convert on a bigger machine"
        )


def open_stream(folder: Path, grid: dict | None) -> LayerStream:
    """A folder's stream: the model's skeleton, whose weights are read when asked (a quantize folder's linears
    dequantized from their codes), with the generation config loading it whole would give."""
    from transformers import GenerationConfig

    stream = DequantizedStream(folder, grid) if grid is not None else LayerStream(folder)
    check_supported(stream.model.config)
    if grid is None and (folder / "generation_config.json").is_file():  # from_pretrained reads it; load_dequantized does not
        stream.model.generation_config = GenerationConfig.from_pretrained(folder)
    return stream


def streamed_reference(stream: LayerStream):
    """The stream's model as the parity reference: embeddings, final norm and LM head held, each decoder
    layer read before its forward and dropped after it (memory: one layer plus the tables)."""
    model = stream.model
    layers = model.transformer.h if model.config.model_type == "gpt2" else model.model.layers
    stream.load_outside(layers)
    stream.on_demand(layers)
    return model


def save_sidecars(model, tokenizer, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files beside an exported model."""
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- parity ---------------------------------------------------------------------------


def gate(
    ctx: StageContext,
    runner_class,
    model,
    tokenizer,
    cfg,
    manifest: dict,
    label: str,
    dequantized: bool,
    stream: LayerStream | None = None,
    next_step: str | None = None,
) -> dict:
    """Check the written artifact against PyTorch, record the result in its manifest, refuse a failed one.

    The runtime answers every prompt first and its session is closed before PyTorch runs. With a `stream`
    (`model` is its skeleton) the reference then reads one decoder layer per forward (`streamed_reference`):
    the artifact's session and the reference are never in memory together. `next_step`: what would pass, named by a refusal."""
    ctx.log("checking the export against PyTorch" + (" (the dequantized checkpoint)" if dequantized else ""))
    prompts = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in PARITY_PROMPTS]
    runner = runner_class(ctx.out, threads=cfg.threads)
    try:
        runtime = [(runner.forward(ids), runner.generate(ids, cfg.new_tokens)) for ids in prompts]
    finally:
        runner.close()
    if stream is not None:
        return_freed_memory()
        model = streamed_reference(stream)
    result = parity(model, prompts, runtime, cfg, streamed=stream is not None)
    manifest["parity"] = result
    write_json(ctx.out / MANIFEST, manifest)
    if not result["passed"]:
        fix = next_step or "loosen the thresholds only if the figures are acceptable"
        raise Refused(f"{label} parity check failed: {result['failure']}; the export was not written ({fix})")
    return result


def heldout_fidelity(ctx: StageContext, open_runner, model, tokenizer, blocks: int, seq_len: int) -> dict | None:
    """Perplexity and top-1 next-token agreement of an artifact (`open_runner()`: its Runner) against the PyTorch
    model on `blocks` held-out blocks of `seq_len` tokens (MMLU text outside the evaluated subset); None when
    skipped (0 blocks) or without that text."""
    if not blocks:
        return None
    try:
        texts = texts_for(None, tokenizer, part="heldout", exclude=ctx.subset, mmlu=ctx.mmlu, log=lambda _: None)
        ids = pack(texts, tokenizer, seq_len, blocks)
    except InputError as e:
        ctx.log(f"no held-out perplexity: {e}")
        return None
    runner = open_runner()
    try:
        figures = text_fidelity(runner.forward, ids, reference_fn=torch_logits_fn(model))
    finally:
        runner.close()
    rise = 100 * (figures["perplexity"] / figures["reference_perplexity"] - 1)
    return {**{k: round(v, 4) for k, v in figures.items()}, "perplexity_rise_pct": round(rise, 3)}


@torch.no_grad()
def parity(model, prompts: list[torch.Tensor], runtime: list[tuple[torch.Tensor, list[int]]], cfg, streamed: bool = False) -> dict:
    """The export's logits and greedy continuations (`runtime`: per prompt) against the PyTorch model's.

    fp32 must match: max |diff| of logits, top-1 agreement over prompt positions, and identical
    greedy tokens. int8/int4 are judged by top-1 agreement only; their greedy match is reported.
    `streamed`: PyTorch's tokens come from one forward along the runtime's continuation (`_torch_along`).
    """
    max_diff, agree, positions, identical, matched = 0.0, 0, 0, 0, []
    for ids, (got, have) in zip(prompts, runtime):
        if streamed:
            ref, want = _torch_along(model, ids, have)
        else:
            ref, want = model(input_ids=ids, use_cache=False).logits.float(), _torch_greedy(model, ids, cfg.new_tokens)
        max_diff = max(max_diff, float((ref - got).abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ids.shape[1]
        same = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), len(want))
        matched.append(same)
        identical += int(want == have)
    top1 = agree / positions
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "max_abs_diff": max_diff,
        "top1_agreement": round(top1, 4),
        "greedy_identical": identical,
        "greedy_tokens": cfg.new_tokens,
        "greedy_prefix_matched": matched,
    }
    if cfg.quant == "none":
        failures = []
        if max_diff > cfg.max_abs_diff:
            failures.append(f"max |logit diff| {max_diff:.2e} > {cfg.max_abs_diff:.0e}")
        if top1 < cfg.min_top1:
            failures.append(f"top-1 agreement {top1:.3f} < {cfg.min_top1}")
        if identical < len(prompts):
            failures.append(f"greedy continuations identical on {identical}/{len(prompts)} prompts")
    else:
        failures = [f"top-1 agreement {top1:.3f} < {cfg.min_top1_quantized}"] if top1 < cfg.min_top1_quantized else []
    result["passed"] = not failures
    result["failure"] = "; ".join(failures) or None
    return result


def _torch_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model(input_ids=ids, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _torch_along(model, ids: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The prompt's logits, and the token PyTorch picks after the prompt and each prefix of `tokens` (the
    runtime's greedy continuation), from one forward: up to their first difference these are PyTorch's own
    greedy tokens, and parity compares no further. A streamed model then reads each layer once per prompt,
    not once per generated token."""
    logits = model(input_ids=torch.cat([ids, torch.tensor([tokens[:-1]], dtype=ids.dtype)], dim=1), use_cache=False).logits.float()
    n = ids.shape[1]
    return logits[:, :n], logits[0, n - 1 :].argmax(-1).tolist()


# --- the runner -----------------------------------------------------------------------


class SessionRunner(Runner):
    """A torch-facing Runner over a numpy session (the decode loop the latency bench also runs):
    prefill and decode pass through, and the session's errors become one-line input errors."""

    session_error: ClassVar[type[Exception]]  # what the session raises for a bad folder or a sequence too long

    def __init__(self, path: str | Path, *, threads: int | None = None, **_):
        from transformers import AutoTokenizer

        super().__init__(path, threads=threads)
        self.session = self._call(self.open_session)
        self.manifest = self.session.manifest
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))

    def open_session(self):
        """The numpy session over the artifact folder `self.path`."""
        raise NotImplementedError

    @property
    def runtime(self) -> dict:
        return session_runtime(sys.modules[type(self.session).__module__])

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        logits, state = self._call(self.session.prefill, input_ids.cpu().numpy())
        return torch.from_numpy(np.array(logits)), state

    def decode(self, token_id: int, state: Any) -> tuple[torch.Tensor, Any]:
        logits, state = self._call(self.session.decode, token_id, state)
        return torch.from_numpy(np.array(logits)), state

    def continuation_logits(self, prefixes: list[torch.Tensor], continuations: list[list[torch.Tensor]]) -> list[list[torch.Tensor]] | None:
        run = getattr(self.session, "continuation_logits", None)
        if run is None:
            return None
        return [
            [torch.from_numpy(x) for x in self._call(run, prefix.cpu().numpy(), [c.cpu().numpy() for c in rows])]
            for prefix, rows in zip(prefixes, continuations)
        ]

    def close(self) -> None:
        self.session = None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self.session_error as e:
            raise InputError(str(e)) from None
