"""GGUF export for llama.cpp (llama and qwen2 architectures), and its llama.cpp Runner.

`export(model, out, quant=...)` writes an artifact folder:
  model.gguf                     the weights, hyperparameters, tokenizer and chat template: llama.cpp needs
                                 nothing else (written with llama.cpp's own `gguf` package)
  config.json, generation_config.json, tokenizer files   from the source checkpoint (evaluation's tokenizer)
  manifest.json                  "format": "gguf", runtime and its version, the file, shape, block types, checks
  recipe.yaml, metrics.json      written by vcompress.core.stage.execute

From a quantize folder the codes are written as llama.cpp blocks of 32 where the grid is one of theirs, with
no rounding of ours: an asymmetric 4-bit grid (integer or float zero point) is Q4_1 (d * q + m, m = -d * zero),
a symmetric one Q4_0 (d * (q - 8)), symmetric 8-bit Q8_0 (d * (q - 128) as int8). A group of 64 or 128 is
2 or 4 blocks with the same scale. Only the minimum m is converted, to the float16 the block stores: exact
for float zero points (quantize rounds the minimum to float16 itself), up to float16's rounding of scale * zero
for integer ones (the metrics give the largest move). A float source is written fp32 (quant none); int4/int8 need codes:
`vcompress export gguf` runs our GPTQ onto the block grid first, a profile's recipe quantizes before export.
The embedding table and LM head, which quantize leaves float, go in at table_bits / head_bits through
gguf's own block quantizer (Q8_0, Q4_1; 0: F32).

The check is llama.cpp's: llama-cpp-python loads the file, its logits on the parity prompts go through the
exporters' shared gate, and on held-out text its top-1 next-token agreement with our PyTorch (dequantized)
reference and its perplexity must be within the config's bounds, or the export is refused (exit 4).
"""

from __future__ import annotations

import importlib.util
import json
import math
from functools import partial
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from pydantic import Field

from vcompress.core.artifact import MANIFEST, write_json
from vcompress.core.errors import InputError, Refused, Unsupported
from vcompress.core.layer_stream import file_tensors
from vcompress.core.models import attention_shape, bytes_on_disk
from vcompress.core.quant_format import codes, grid_bits, linear_tensors, minimums
from vcompress.core.runner import RUNNERS
from vcompress.core.stage import StageContext

from ._gguf_session import FORMAT, Session, SessionError
from .base import Exporter, HeldoutConfig, SessionRunner, gate, heldout_fidelity, load_source, save_sidecars, source_folder, stored_weights

MODEL_FILE = "model.gguf"
Q = gguf.GGMLQuantizationType
BLOCK = gguf.GGML_QUANT_SIZES[Q.Q4_0][0]  # 32 weights per block in Q4_0, Q4_1 and Q8_0 alike
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
TABLE_TYPES = {8: Q.Q8_0, 4: Q.Q4_1, 0: Q.F32}
FILE_TYPES = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


class GGUFExportConfig(HeldoutConfig):
    quant: Literal["none", "int8", "int4"] = Field(
        "int4", description="decoder linears: fp32, or a quantize folder's codes as Q8_0 / Q4_0 / Q4_1 blocks (its grid decides which)"
    )
    int4_block: Literal["q4_1", "q4_0"] = Field(
        "q4_1", description="from a float source (`vcompress export gguf` runs GPTQ first): the 4-bit block GPTQ quantizes onto"
    )
    table_bits: Literal[0, 4, 8] = Field(8, description="bits of the embedding table (Q8_0, Q4_1; 0: F32); a tied one is the LM head's")
    head_bits: Literal[0, 4, 8] | None = Field(None, description="bits of an untied LM head if not table_bits")
    heldout_seq_len: int = Field(512, ge=8, description="tokens per held-out block")
    min_heldout_top1: float = Field(0.99, ge=0, le=1, description="held-out top-1 next-token agreement with PyTorch required")
    max_perplexity_diff_pct: float = Field(0.5, ge=0, description="held-out perplexity: largest |difference| from PyTorch's, percent")
    threads: int | None = Field(None, gt=0, description="llama.cpp threads for the checks")


class GGUFExport(Exporter):
    format = FORMAT
    runtime = "llama.cpp"
    runtime_package = "llama-cpp-python"
    sessions = {"llama_cpp": f"{__package__}._gguf_session"}
    Config = GGUFExportConfig

    def predicted_weights(self, shape: dict, quantization: dict, max_positions: int) -> dict:
        """What this export stores (`Exporter.predicted_weights`): the body in blocks of 32 (Q4_1: 20 bytes, Q4_0:
        18, Q8_0: 34, whatever the quantize group size: a group is whole blocks), the tables at table_bits /
        head_bits in the same blocks; quant none: fp32. Norms and the tokenizer's metadata are left out."""
        cfg = self.config
        if cfg.quant == "none" or quantization["method"] == "none":
            return stored_weights(shape, 32, 32, 32)
        if quantization["method"] == "int8" or quantization["bits"] == 8:
            body = Q.Q8_0
        else:
            body = Q.Q4_0 if quantization.get("sym") else Q.Q4_1
        return stored_weights(shape, _bits(body), _bits(TABLE_TYPES[cfg.table_bits]), _bits(TABLE_TYPES[_head_bits(cfg)]))

    def run(self, ctx: StageContext) -> dict:
        cfg: GGUFExportConfig = self.config
        model, tokenizer, grid = load_source(ctx)
        arch = _arch(model.config)
        _check_grid(cfg, grid)
        if importlib.util.find_spec("llama_cpp") is None:
            raise Unsupported("the gguf exporter checks its file in llama.cpp: install llama-cpp-python with `pip install -e '.[gguf]'`")
        folder = source_folder(ctx.source)
        packed = file_tensors(folder / grid["weights_file"]) if grid and cfg.quant != "none" else None
        ctx.log(f"writing {MODEL_FILE} ({model.config.model_type}, {cfg.quant}{', the checkpoint codes as blocks' if packed else ''})")
        written = write_gguf(ctx.out / MODEL_FILE, model, tokenizer, arch, grid if packed else None, packed, cfg, ctx.work / "tokenizer")
        save_sidecars(model, tokenizer, ctx.out)
        shape = attention_shape(model.config)
        manifest = self.manifest(
            {"model": MODEL_FILE, "config": "config.json", "tokenizer": "tokenizer.json"},
            architecture=model.config.model_type,
            layers=shape["layers"],
            heads=shape["query_heads"],
            kv_heads=shape["kv_heads"],
            head_dim=shape["head_dim"],
            vocab_size=model.config.vocab_size,
            max_positions=model.config.max_position_embeddings,
            tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
            kv_dtype="float16",  # llama.cpp's default KV cache
            quant={"scheme": cfg.quant, "types": written["types"], "table_bits": cfg.table_bits, "head_bits": _head_bits(cfg)},
            notes={"tokenizer": "in the GGUF (tokenizer.ggml.*, chat template): llama.cpp needs no other file"},
        )
        write_json(ctx.out / MANIFEST, manifest)
        # fp32 weights are held to fp32 parity, so the check's cache is float32 too (an app's is llama.cpp's float16)
        runner = partial(GGUFRunner, kv_float32=cfg.quant == "none")
        result = gate(ctx, runner, model, tokenizer, cfg, manifest, "GGUF", dequantized=bool(grid))
        manifest["heldout"] = heldout = heldout_check(ctx, runner, model, tokenizer, cfg)
        write_json(ctx.out / MANIFEST, manifest)
        if heldout.get("failure"):
            raise Refused(f"GGUF held-out check failed: {heldout['failure']}; the export was not written")
        size = bytes_on_disk(ctx.out / MODEL_FILE)
        fp32 = sum(p.numel() * 4 for p in model.parameters())
        return {
            "format": FORMAT,
            "quant": cfg.quant,
            "types": written["types"],
            "q4_1_min_float16_move": written["mins_rounded"],
            "model_bytes": size,
            "fp32_weight_bytes": fp32,
            "size_ratio_to_fp32": round(size / fp32, 4),
            "parity": result,
            "heldout": heldout,
        }


export = GGUFExport.export  # the library API: export(model_path, out, quant=None, **settings) -> metrics


def _bits(qtype) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def _head_bits(cfg: GGUFExportConfig) -> int:
    return cfg.table_bits if cfg.head_bits is None else cfg.head_bits


def _arch(config):
    check_architecture(config.model_type)
    return ARCHES[config.model_type]


def check_architecture(model_type: str) -> None:
    """Refuse an architecture this exporter does not write, by name (the command asks before any GPTQ runs)."""
    if model_type not in ARCHES:
        raise Unsupported(
            f"{model_type}: GGUF export is not supported yet (it writes llama.cpp's {' and '.join(ARCHES)} architectures); "
            "export ONNX or TFLite instead"
        )


def _check_grid(cfg: GGUFExportConfig, grid: dict | None) -> None:
    """int4/int8 write a quantize folder's codes; a float source has none (the command quantizes it first)."""
    if cfg.quant == "none":
        return
    if grid is None:
        raise InputError(
            f"--quant {cfg.quant} writes a quantize folder's codes as GGUF blocks and this source is float: run `vcompress quantize "
            "--group-size 32` first (a profile: a quantize step before export), use `vcompress export gguf` on it, or --quant none"
        )
    bits = grid_bits(grid)
    if {4: "int4", 8: "int8"}.get(bits) != cfg.quant:
        raise InputError(
            f"the checkpoint is quantized to {bits} bits; export it with --quant {'int4' if bits == 4 else 'int8'} or --quant none"
        )


# --- packing: codes -> llama.cpp blocks (blocks run along the input dimension, 32 weights each) ---------


def _halves(codes: np.ndarray) -> np.ndarray:
    """[..., 32] 4-bit codes -> [..., 16] bytes: weight j in the low nibble of byte j, weight j+16 in its high nibble."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)[..., None].view(np.uint8)


def pack_q4_1(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Codes [rows, blocks, 32] in 0..15 with W = scale * q + min per block -> Q4_1 bytes [rows, blocks * 20]."""
    return np.concatenate([_f16(scales), _f16(mins), _halves(codes)], axis=-1).reshape(codes.shape[0], -1)


def pack_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Codes [rows, blocks, 32] in 0..15 with W = scale * (q - 8) -> Q4_0 bytes [rows, blocks * 18]."""
    return np.concatenate([_f16(scales), _halves(codes)], axis=-1).reshape(codes.shape[0], -1)


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Codes [rows, blocks, 32] in 0..255 with W = scale * (q - 128) -> Q8_0 bytes [rows, blocks * 34]."""
    signed = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16(scales), signed], axis=-1).reshape(codes.shape[0], -1)


def carried_blocks(packed, spec: dict, rows: np.ndarray | None) -> tuple[np.ndarray, object, float]:
    """One linear's codes as llama.cpp blocks: (bytes [out, ...], block type, largest move of a Q4_1 minimum by
    float16), rows
    reordered by `rows` (llama's query/key permutation; None: as they are)."""
    bits, group = spec["bits"], spec["group_size"]
    tensors = linear_tensors(packed, spec)
    if "g_idx" in tensors and not np.array_equal(tensors["g_idx"].numpy(), np.arange(spec["in_features"]) // group):
        raise InputError(
            "g_idx is not arange(K) // group_size: a permuted (act-order) grid cannot be carried; re-quantize with `vcompress quantize`"
        )
    if group % BLOCK:
        raise InputError(f"group size {group} is not a whole number of GGUF blocks of {BLOCK}; re-quantize with --group-size 32, 64 or 128")
    # W = scale * q + min: a zero point becomes min = -scale * zero; a GGUF source's kept Q4_1 blocks carry their mins
    q, scales, mins = (t.numpy().T for t in minimums(tensors, bits))  # [out, in], [out, groups], [out, groups]
    middle = 2 ** (bits - 1)
    symmetric = "qzeros" in tensors and bool(np.all(codes(tensors, bits)[2].numpy() == middle))
    if rows is not None:
        q, scales, mins = q[rows], scales[rows], mins[rows]
    out, k = q.shape
    repeat = group // BLOCK
    blocks = q.reshape(out, k // BLOCK, BLOCK).astype(np.uint8)
    scales, mins = np.repeat(scales, repeat, axis=1), np.repeat(mins, repeat, axis=1)
    if bits == 8:
        if not symmetric:
            raise InputError("Q8_0 is symmetric and this 8-bit grid has zero points: re-quantize with --sym, or export with --quant none")
        return pack_q8_0(blocks, scales), Q.Q8_0, 0.0
    if bits != 4:
        raise InputError(f"{bits}-bit codes have no GGUF block of 32 (Q4_0, Q4_1, Q8_0): re-quantize to 4 or 8 bits")
    if symmetric:
        return pack_q4_0(blocks, scales), Q.Q4_0, 0.0
    return pack_q4_1(blocks, scales, mins), Q.Q4_1, float(np.abs(mins.astype(np.float16).astype(np.float32) - mins).max())


def attention_rows(heads: int, head_dim: int) -> np.ndarray:
    """The row order llama.cpp's llama architecture wants for q_proj / k_proj: its rotary embedding pairs
    adjacent dims, transformers' Llama the two halves of each head."""
    return np.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


# --- the file -----------------------------------------------------------------------------


def write_gguf(path: Path, model, tokenizer, arch, grid: dict | None, packed, cfg: GGUFExportConfig, work: Path) -> dict:
    """Write model.gguf; returns {"types": tensor count per block type, "mins_rounded": the largest move of a Q4_1 minimum by float16}."""
    config = model.config
    shape = attention_shape(config)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.TensorNameMap(arch, shape["layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _hparams(writer, config, shape)
    tokenizer.save_pretrained(work)
    bos = tokenizer.bos_token_id
    add_tokenizer(writer, work, config.vocab_size, bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    linears = grid["linears"] if grid else {}
    permuted = {"q_proj": shape["query_heads"], "k_proj": shape["kv_heads"]} if arch == gguf.MODEL_ARCH.LLAMA else {}
    types: dict[str, int] = {}
    moved = 0.0
    body = None
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"{name} has no GGUF tensor name for {config.model_type}; this checkpoint's layout is not llama.cpp's")
        module, _, leaf = name.rpartition(".")
        heads = permuted.get(module.rpartition(".")[2])
        rows = attention_rows(heads, shape["head_dim"]) if heads else None
        if module in linears and leaf == "weight":
            data, qtype, m = carried_blocks(packed, linears[module], rows)
            moved = max(moved, m)
            body = body or qtype
        else:
            values = tensor.detach().float().numpy()
            values = values[rows] if rows is not None else values
            qtype = _table_type(name, cfg, tied) if values.ndim == 2 else Q.F32
            data = gguf.quants.quantize(values, qtype) if qtype != Q.F32 else np.ascontiguousarray(values)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.add_file_type(FILE_TYPES.get(body, gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"types": types, "mins_rounded": moved}


def _table_type(name: str, cfg: GGUFExportConfig, tied: bool):
    """The embedding table at table_bits (tied: the head's bits), the LM head at head_bits; other 2-D weights
    (a float source's linears, or those quantize kept float) and everything under quant none fp32."""
    if cfg.quant == "none":
        return Q.F32
    if name.endswith("embed_tokens.weight"):
        return TABLE_TYPES[_head_bits(cfg) if tied else cfg.table_bits]
    if name == "lm_head.weight":
        return TABLE_TYPES[_head_bits(cfg)]
    return Q.F32


def _hparams(writer, config, shape: dict) -> None:
    """llama.cpp's hyperparameters for the llama / qwen2 loaders. Every layer has the same counts (our pruning
    keeps them uniform); head_dim is written where it is not hidden / heads, as a pruned model's is not."""
    writer.add_name(Path(getattr(config, "_name_or_path", "") or config.model_type).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(shape["query_heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    if shape["head_dim"] != config.hidden_size // shape["query_heads"]:
        writer.add_key_length(shape["head_dim"])
        writer.add_value_length(shape["head_dim"])
    writer.add_rope_dimension_count(shape["head_dim"])
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise Unsupported(f"rope scaling {rope['rope_type']!r} is not written to GGUF yet; export ONNX instead")
    return rope.get("rope_theta") or config.rope_theta


# --- the tokenizer ------------------------------------------------------------------------


def add_tokenizer(writer, folder: Path, vocab_size: int, add_bos: bool = False) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's gpt2-style vocabulary: tokens by id (added special ones as
    control tokens, ids past the tokenizer up to the model's vocabulary as unused padding), merges, special ids,
    the chat template (gguf's SpecialVocab) and whether a BOS goes first (`add_bos`: what the tokenizer does, unless its
    config says)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise Unsupported(
            f"the tokenizer is {tok['model']['type']}, and GGUF export writes byte-level BPE tokenizers only; export ONNX instead"
        )
    n = max(vocab_size, 1 + max([*tok["model"]["vocab"].values(), *(added["id"] for added in tok["added_tokens"])]))
    tokens, types = [f"[PAD{i}]" for i in range(n)], [gguf.TokenType.UNUSED] * n
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    special.add_special_token.setdefault("bos", add_bos)
    special.add_to_gguf(writer)


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the split before BPE: GPT-2's regex (a bare ByteLevel, as transformers rebuilds a GGUF's
    tokenizer and our tests train one), SmolLM's (digits one by one, then GPT-2's), else llama.cpp's default."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [(s["type"], s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    return "default"


# --- llama.cpp's own check on held-out text ---------------------------------------------------------


def heldout_check(ctx: StageContext, runner, model, tokenizer, cfg: GGUFExportConfig) -> dict:
    """llama.cpp's top-1 next-token agreement and perplexity against our PyTorch model on held-out text
    (base.heldout_fidelity), with the config's bounds and the failure, if any ({} when skipped)."""
    ctx.log(f"checking llama.cpp against PyTorch on {cfg.heldout_blocks} held-out blocks of {cfg.heldout_seq_len} tokens")
    figures = heldout_fidelity(ctx, lambda: runner(ctx.out, threads=cfg.threads), model, tokenizer, cfg.heldout_blocks, cfg.heldout_seq_len)
    if figures is None:
        return {}
    diff = figures["perplexity_rise_pct"]
    failures = []
    if figures["top1_agreement"] < cfg.min_heldout_top1:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {cfg.min_heldout_top1}")
    if not math.isfinite(diff) or abs(diff) > cfg.max_perplexity_diff_pct:
        failures.append(
            f"perplexity {figures['perplexity']:.3f} vs PyTorch {figures['reference_perplexity']:.3f} ({diff:+.2f}% > {cfg.max_perplexity_diff_pct}%)"
        )
    return {
        **figures,
        "min_top1": cfg.min_heldout_top1,
        "max_perplexity_diff_pct": cfg.max_perplexity_diff_pct,
        "failure": "; ".join(failures) or None,
    }


# --- the runner -----------------------------------------------------------------------


@RUNNERS.register(FORMAT)
class GGUFRunner(SessionRunner):
    """llama.cpp on CPU through llama-cpp-python: every position's logits for evaluation, prefill + decode
    for generation. A torch-facing adapter over `_gguf_session.Session`, which the latency bench runs too."""

    backend = FORMAT
    session_error = SessionError

    def __init__(self, path: str | Path, *, threads: int | None = None, context: int | None = None, kv_float32: bool = False, **_):
        self.context, self.kv_float32 = context, kv_float32
        super().__init__(path, threads=threads)
        self.max_length = self.session.max_length

    def open_session(self) -> Session:
        return Session(self.path, threads=self.threads, context=self.context, all_logits=True, kv_float32=self.kv_float32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        lengths = None if attention_mask is None else attention_mask.sum(-1).tolist()
        ids = input_ids.cpu().numpy()
        if lengths is None or all(n == ids.shape[1] for n in lengths):
            return torch.from_numpy(self._call(self.session.logits, ids))
        out = torch.zeros(*ids.shape, self.session.vocab)  # right padding: each row at its own length
        for i, n in enumerate(lengths):
            out[i, :n] = torch.from_numpy(self._call(self.session.logits, ids[i : i + 1, :n]))[0]
        return out

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        super().close()
