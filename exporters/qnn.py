"""QNN export: the decoder compiled for a Snapdragon's Hexagon NPU (QNN HTP), offline, on this machine.

`export(model, out, quant=...)` writes an artifact folder:
  prefill.ctx.onnx + prefill.ctx_qnn.bin   the prefill step (`chunk` tokens) as an EPContext model and its HTP
  decode.ctx.onnx + decode.ctx_qnn.bin     context binary compiled for `htp_arch`; the decode step (one token)
  qdq/prefill.onnx, qdq/decode.onnx        the QDQ models they were compiled from (to recompile for another SoC,
                                           and the CPU fallback of the accuracy check)
  qnn_config.json                          what an app needs to drive the two graphs (_qnn_config in manifest)
  config.json, tokenizer files, manifest.json (placement: nodes on the HTP per graph), recipe.yaml, metrics.json
The step graphs are built by _qnn_graph.py (static shapes, plain ONNX ops), checked against the HTP's op list,
quantized QDQ on calibration text and compiled by ONNX Runtime's QNN execution provider (onnxruntime-qnn,
the [qnn] extra: it ships QNN's HTP backend and its x86 emulation) (_qnn_compile.py). The export then checks
itself against PyTorch through the HTP backend, as a phone would run it (base.parity).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from pydantic import Field, model_validator

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.data import pack, texts_for
from vcompress.core.export_manifest import PARITY_PROMPTS
from vcompress.core.models import bytes_on_disk
from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext

from . import _onnx_graph, _qnn_compile, _qnn_graph
from ._qnn_session import SOC_MODELS, QnnSession, SessionError, Steps, open_step
from .base import Exporter, ParityConfig, SessionRunner, gate, load_source, package_version, save_sidecars, stored_weights

FORMAT = "qnn"
GRAPHS = ("prefill", "decode")
APP_CONFIG = "qnn_config.json"


class QnnExportConfig(ParityConfig):
    quant: Literal["int8", "int4"] = Field("int8", description="weights: symmetric INT8 or INT4 per output channel (activations uint16)")
    htp_arch: Literal[73, 75] = Field(73, description="Hexagon HTP version compiled for: 73 (SM8550, 8 Gen 2) or 75 (SM8650, 8 Gen 3)")
    chunk: int = Field(128, ge=2, description="tokens of the prefill graph (a prompt runs in chunks of this size)")
    cache: int = Field(512, ge=2, description="KV cache slots: the longest sequence the export holds")
    calibration_blocks: int = Field(4, ge=1, description="calibration text blocks (each: one prefill chunk, then decode steps)")
    calibration_decode_tokens: int = Field(8, ge=1, description="decode steps recorded per calibration block")
    new_tokens: int = Field(8, ge=1, description="greedy tokens compared with PyTorch per prompt")
    # QNN's HTP emulation on an x86 host is slow: SmolLM2-135M took 58 s per decode step and 229 s per 128-token
    # chunk on this 2-core host under load (docs/targets.md, "Snapdragon NPU (qnn)")
    evaluate_on: Literal["cpu", "htp"] = Field(
        "cpu",
        description="what the parity check and validate run: the QDQ graphs on the CPU EP (labelled so), or the context "
        "binaries on QNN's HTP emulation; the HTP check (one prompt and one decode step, HTP against the CPU EP) runs either way",
    )
    # SmolLM2-135M's down projections peak at 25,900 (layer 11), 15,500 and 7,900 (28, 29), then 670 to 310 (2, 9, 27,
    # 10, 1): in fp16 the first three took held-out perplexity from +9% to +5.5%, all eight to +4.3% (QDQ, CPU EP)
    fp16_mlp_above: float = Field(
        256.0,
        gt=0,
        description="an MLP whose output reaches this magnitude on the calibration text runs its product and down projection "
        "in fp16 on the HTP, not on a uint16 grid, whose step over it would exceed 1/128 (the residual stream always does)",
    )
    text_chunks: int = Field(
        3,
        ge=0,
        description="prefill chunks of held-out text that validate scores on the HTP emulation (perplexity, top-1 agreement), "
        "the QDQ graphs on the CPU EP over the same positions beside it; 0: the text is scored where the answers are (evaluate_on)",
    )
    threads: int | None = Field(None, gt=0, description="ONNX Runtime threads for calibration and the parity check")

    @model_validator(mode="after")
    def _cache_holds_a_chunk(self):
        if self.cache < self.chunk:
            raise ValueError(f"cache {self.cache} is shorter than chunk {self.chunk}; raise it or lower chunk")
        return self


class QnnExport(Exporter):
    format = FORMAT
    runtime = "onnxruntime-qnn"
    sessions = {"onnxruntime_qnn": f"{__package__}._qnn_session"}
    Config = QnnExportConfig

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """What one context binary holds (`Exporter.predicted_weights`): the linears at `quant` bits per channel, the
        LM head as its own copy of a tied table at the same bits, the embedding table as a uint16 activation."""
        bits = {"int8": 8, "int4": 4}[self.config.quant]
        return stored_weights({**shape, "tied": False}, bits, 16, bits)

    def run(self, ctx: StageContext) -> dict:
        cfg: QnnExportConfig = self.config
        model, tokenizer, _ = load_source(ctx)  # a quantize folder: its dequantized weights, re-quantized per channel
        scratch = ctx.work / "qnn"
        scratch.mkdir(parents=True, exist_ok=True)
        fp32 = {}
        for graph, seq in zip(GRAPHS, (cfg.chunk, 1)):
            proto, dims = _qnn_graph.build_step(model, _onnx_graph.Weights(model.state_dict()), seq, cfg.cache)
            _qnn_compile.check_ops(proto, graph)
            fp32[graph] = scratch / f"{graph}.fp32.onnx"
            onnx.save_model(proto, fp32[graph], save_as_external_data=True, location=f"{graph}.fp32.onnx.data")
        ctx.log(f"step graphs: prefill {cfg.chunk} tokens, decode 1, over a {cfg.cache}-slot cache ({len(proto.graph.node)} nodes each)")
        texts = texts_for(ctx.data, tokenizer, part="calib", exclude=ctx.subset, mmlu=ctx.mmlu, log=ctx.log)
        blocks = pack(texts, tokenizer, cfg.chunk + cfg.calibration_decode_tokens, max_blocks=cfg.calibration_blocks)
        feeds = self._calibration_feeds(ctx, blocks, dims, fp32)
        wide = _wide_mlps(model, blocks, cfg.fp16_mlp_above)
        ctx.log(f"fp16 on the HTP: the residual stream, and the MLPs of layers {sorted(wide) or 'none'} (peak |output| {wide or '-'})")
        (ctx.out / "qdq").mkdir()
        files, placement = {"htp": {}, "qdq": {}, "binaries": {}}, {}
        for graph in GRAPHS:
            qdq = ctx.out / "qdq" / f"{graph}.onnx"
            ctx.log(f"quantizing the {graph} graph (uint16 activations, {cfg.quant} weights per channel) on {len(feeds[graph])} feeds")
            float_nodes = _qnn_graph.float_nodes(onnx.load(fp32[graph], load_external_data=False), wide)
            _qnn_compile.quantize(fp32[graph], qdq, feeds[graph], 8 if cfg.quant == "int8" else 4, float_nodes)
            context = ctx.out / f"{graph}.ctx.onnx"
            ctx.log(f"compiling the {graph} graph for HTP v{cfg.htp_arch} (soc_model {SOC_MODELS[cfg.htp_arch]})")
            placement[graph] = _qnn_compile.compile_htp(qdq, context, cfg.htp_arch)
            binary = next(ctx.out.glob(f"{graph}.ctx*.bin"))
            files["htp"][graph], files["qdq"][graph], files["binaries"][graph] = context.name, f"qdq/{qdq.name}", binary.name
            ctx.log(f"{graph}: {placement[graph]['on_htp']}/{placement[graph]['nodes']} nodes on the HTP, {binary.name}")
        shutil.rmtree(scratch)
        save_sidecars(model, tokenizer, ctx.out)
        shape = {"htp_arch": cfg.htp_arch, "soc_model": SOC_MODELS[cfg.htp_arch], "chunk": cfg.chunk, "cache": cfg.cache}
        write_json(ctx.out / APP_CONFIG, _app_config(dims, files, shape))
        manifest = self.manifest(
            # model / weights: what decode reads per token (the roofline's bytes); the prefill binary holds a second copy
            files
            | {"model": files["htp"]["decode"], "weights": files["binaries"]["decode"]}
            | {"prefill_model": files["htp"]["prefill"], "prefill_weights": files["binaries"]["prefill"]}  # counted in the size
            | {"config": "config.json", "tokenizer": "tokenizer.json", "app_config": APP_CONFIG},
            **dims.manifest_fields(),
            **shape,
            quant={
                "weights": cfg.quant,
                "granularity": "per output channel, symmetric",
                "activations": "uint16",
                "fp16": {"residual_stream": True, "mlp_layers": sorted(wide), "mlp_peaks": {str(k): v for k, v in wide.items()}},
            },
            placement=placement,
            io={"inputs": list(_qnn_graph.step_io(dims, cfg.chunk, cfg.cache)[0]), "masked_bias": _qnn_graph.MASKED},
        )
        manifest["evaluate_on"], manifest["text_chunks"] = cfg.evaluate_on, cfg.text_chunks
        write_json(ctx.out / MANIFEST, manifest)
        manifest["fidelity"] = _htp_check(ctx, tokenizer)
        write_json(ctx.out / MANIFEST, manifest)
        label = "QNN HTP emulation" if cfg.evaluate_on == "htp" else "QNN QDQ graphs on the CPU EP"
        result = gate(ctx, QnnRunner, model, tokenizer, cfg, manifest, label, dequantized=True)
        fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
        size = sum(bytes_on_disk(ctx.out / f) for f in [*files["htp"].values(), *files["binaries"].values()])
        return {
            "format": FORMAT,
            "quant": cfg.quant,
            "htp_arch": cfg.htp_arch,
            "model_bytes": size,  # both graphs' context binaries: each holds its own copy of the weights
            "fp32_weight_bytes": fp32_bytes,
            "size_ratio_to_fp32": round(size / fp32_bytes, 4),
            "placement": placement,
            "parity": result,
        }

    def _calibration_feeds(self, ctx: StageContext, blocks: torch.Tensor, dims, fp32: dict[str, Path]) -> dict[str, list[dict]]:
        """Every feed of the fp32 step graphs while they read calibration text: per block, one prefill chunk, then
        `calibration_decode_tokens` decode steps teacher-forced on the block's next tokens (caches really filled)."""
        cfg: QnnExportConfig = self.config
        recorded: list[dict] = []
        sessions = [open_step(fp32[g], "cpu", threads=cfg.threads) for g in GRAPHS]
        steps = Steps(*sessions, layers=dims.layers, kv_heads=dims.kv_heads, head_dim=dims.head_dim, chunk=cfg.chunk, cache=cfg.cache)
        steps.record = recorded
        for block in blocks.tolist():
            state = steps.new_state()
            steps.run(block[: cfg.chunk], state)
            for token in block[cfg.chunk :]:
                steps.run([token], state)
        ctx.log(f"calibration: {len(blocks)} blocks of {blocks.shape[1]} tokens (MMLU outside {ctx.subset!r} unless --data)")
        return {
            "prefill": [f for f in recorded if f["input_ids"].shape[1] == cfg.chunk],
            "decode": [f for f in recorded if f["input_ids"].shape[1] == 1],
        }


def _wide_mlps(model, blocks: torch.Tensor, limit: float) -> dict[int, float]:
    """The layers whose MLP output (down_proj) reaches `limit` in magnitude on the calibration blocks: their peaks."""
    peaks: dict[int, float] = {}

    def hook(layer: int):
        return lambda module, args, out: peaks.__setitem__(layer, max(peaks.get(layer, 0.0), float(out.abs().max())))

    handles = [layer.mlp.down_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for block in blocks:
                model(block[None])
    finally:
        for handle in handles:
            handle.remove()
    return {i: round(peak, 1) for i, peak in peaks.items() if peak >= limit}


def _htp_check(ctx: StageContext, tokenizer) -> dict:
    """The compiled binaries on QNN's HTP emulation against the same QDQ graphs on the CPU EP: one parity prompt
    (a prefill chunk) and one decode step, sized for the emulator's speed."""
    ids = tokenizer(PARITY_PROMPTS[0], add_special_tokens=False)["input_ids"]
    logits, seconds = {}, {}
    for backend in ("htp", "cpu"):
        session = QnnSession(ctx.out, backend=backend)
        started = time.perf_counter()
        state = session.steps.new_state()
        prompt = session.steps.run(ids[:-1], state)
        logits[backend] = np.concatenate([prompt, session.steps.run(ids[-1:], state)])
        seconds[backend] = round(time.perf_counter() - started, 1)
    htp, cpu = logits["htp"], logits["cpu"]
    check = {
        "checked_on": "QNN HTP backend (x86 emulation) against the QDQ graphs on the CPU EP",
        "positions": len(ids),
        "max_abs_diff": float(np.abs(htp - cpu).max()),
        "top1_agreement": round(float((htp.argmax(-1) == cpu.argmax(-1)).mean()), 4),
        "seconds": seconds,
    }
    ctx.log(
        f"HTP check: {check['positions']} positions, max |logit diff| {check['max_abs_diff']:.3g} against the CPU EP, "
        f"top-1 agreement {check['top1_agreement']:.3f} ({seconds['htp']} s on the HTP emulation, {seconds['cpu']} s on the CPU EP)"
    )
    return {"htp": check}


def _app_config(dims, files: dict, shape: dict) -> dict:
    """What an app reads to drive the two context binaries (the loop _qnn_session.Steps runs)."""
    return {
        "runtime": {"name": QnnExport.runtime_package, "version": package_version(QnnExport.runtime_package), "backend": "htp", **shape},
        "graphs": {g: {"model": files["htp"][g], "context_binary": files["binaries"][g]} for g in GRAPHS},
        "tokenizer": "tokenizer.json",
        "model": dims.manifest_fields(),
        "loop": {
            "inputs": "input_ids int32 [1, seq]; position_ids int32 [1, seq]; attention_bias float32 [1, 1, seq, cache + seq]; "
            "past_key.{i} / past_value.{i} float32 [1, kv_heads, cache, head_dim]",
            "outputs": "logits float32 [1, seq, vocab]; new_key.{i} / new_value.{i} float32 [1, kv_heads, seq, head_dim]",
            "cache": "the app owns it: write new_key/new_value at the step's positions",
            "attention_bias": f"0 for a filled cache slot and for the step's own earlier tokens, {_qnn_graph.MASKED} elsewhere",
            "prompt": "prefill in chunks (the last one padded), then decode one token at a time",
        },
    }


export = QnnExport.export  # the library API: export(model_path, out, quant=None, **settings) -> metrics


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class QnnRunner(SessionRunner):
    """The compiled context binaries through the QNN HTP backend (HTP emulation on an x86 host).

    Where the HTP backend cannot open or run the graphs, the runner says why and falls back to the QDQ
    graphs on the CPU execution provider (`fallback` holds the reason; `runtime` labels it)."""

    backend = FORMAT
    session_error = SessionError
    labels = {"htp": "QNN HTP backend (x86 emulation of the NPU's arithmetic)", "cpu": "QDQ on the CPU EP"}

    def __init__(self, path: str | Path, *, threads: int | None = None, backend: str | None = None, **_):
        manifest = Path(path) / MANIFEST
        settings = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.requested, self.fallback = backend or settings.get("evaluate_on") or "htp", None
        super().__init__(path, threads=threads)
        self.max_length = self.session.max_length
        # the held-out text on the HTP emulation, a sample sized for its speed, the CPU EP beside it on the same positions
        chunks = settings.get("text_chunks") or 0
        self.text_positions = chunks * self.manifest["chunk"] or None
        self._text = {"positions": 0, "agree": 0, "max_abs_diff": 0.0, "seconds": {"htp": 0.0, "cpu": 0.0}}
        self._sessions: dict[str, QnnSession | None] = {}

    def open_session(self) -> QnnSession:
        return (self._open("htp") if self.requested == "htp" else None) or QnnSession(self.path, threads=self.threads, backend="cpu")

    def _open(self, backend: str) -> QnnSession | None:
        """A session on `backend`; None where the HTP backend refused the graphs (`fallback` says why)."""
        try:
            return QnnSession(self.path, threads=self.threads, backend=backend)
        except SessionError:
            raise
        except Exception as e:  # onnxruntime's own error: the HTP backend refused a graph
            self.fallback = f"the QNN HTP backend could not open the context binaries ({str(e).splitlines()[0][:300]})"
            return None

    @property
    def runtime(self) -> dict:
        label = self.labels[self.session.backend]
        return {**super().runtime, "backend": label, **({"fallback": self.fallback} if self.fallback else {})}

    def text_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.text_positions:
            return self.forward(input_ids)
        ids = input_ids.cpu().numpy()
        logits = {}
        for backend in ("htp", "cpu"):
            session = self._text_session(backend)
            started = time.perf_counter()
            logits[backend] = self._call(session.logits, ids) if session else None
            self._text["seconds"][backend] += time.perf_counter() - started
        if logits["htp"] is None:  # the HTP backend refused the graphs (self.fallback says why): the CPU EP's own
            return torch.from_numpy(logits["cpu"])
        t = self._text
        t["positions"] += ids.size
        t["agree"] += int((logits["htp"].argmax(-1) == logits["cpu"].argmax(-1)).sum())
        t["max_abs_diff"] = max(t["max_abs_diff"], float(np.abs(logits["htp"] - logits["cpu"]).max()))
        return torch.from_numpy(logits["htp"])

    def _text_session(self, backend: str) -> QnnSession | None:
        """The session of one backend for the text: the answers' own, or one opened for it (None: the HTP refused it)."""
        if self.session.backend == backend:
            return self.session
        if backend not in self._sessions:
            self._sessions[backend] = self._open(backend)
        return self._sessions[backend]

    def text_report(self) -> dict:
        t = self._text
        if not t["positions"]:
            return (
                {"scored_on": self.labels["cpu"], **({"fallback": self.fallback} if self.fallback else {})} if self.text_positions else {}
            )
        return {
            "scored_on": self.labels["htp"],
            "against_cpu_ep": {  # the same positions through the QDQ graphs on the CPU EP: do they compute the same numbers
                "positions": t["positions"],
                "top1_agreement": round(t["agree"] / t["positions"], 4),
                "max_abs_diff": round(t["max_abs_diff"], 4),
            },
            "seconds": {k: round(v, 1) for k, v in t["seconds"].items()},
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # causal: a right-padded row's real tokens never see its padding
        return torch.from_numpy(self._call(self.session.logits, input_ids.cpu().numpy()))
