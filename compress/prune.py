"""Structured pruning to a standard, smaller checkpoint: whole KV groups, MLP channels, whole layers.

Every layer keeps the same counts, so the result is a plain LlamaConfig / Qwen2Config / GPT2Config
(num_attention_heads, num_key_value_heads, head_dim, intermediate_size, num_hidden_layers updated)
that reloads with AutoModelForCausalLM and no vcompress code. What goes is ranked by the analyze
stage's scores (sensitivity.json), or by the same scores computed here on a small calibration set.

- heads: sliced here by whole KV groups (`_heads.keep_kv_groups`); torch-pruning's head pruning
  hangs (Torch-Pruning#527). A model with a single KV head (Gemma 3 270M) keeps it and loses query
  heads within its group instead (`_heads.keep_query_heads`, `_arch.unit_heads`). GPT-2 is refused: its config has no head_dim (head width is
  n_embd / n_head), so fewer heads cannot be written as a standard GPT2Config.
- mlp: torch-pruning's DependencyGraph for Llama/Qwen2 (gate/up rows and down columns move
  together). Its graph cannot be built for GPT-2 (Conv1D breaks its concat index mapping), so
  GPT-2's c_fc / c_proj are sliced here.
- layers: the N with the smallest loss change when skipped are dropped and the rest renumbered.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vcompress.core.artifact import figure, read_json, write_json
from vcompress.core.errors import InputError, InternalError
from vcompress.core.models import bytes_on_disk, head_unit_name, head_units, save_model
from vcompress.core.scoring import torch_logits_fn
from vcompress.core.stage import Stage, StageConfig

from ._arch import (
    attention,
    attention_out,
    decoder_layers,
    head_rows,
    in_dim,
    is_gpt2,
    mlp_out,
    parameter_count,
    shape,
    unit_heads,
    weight_bytes,
)
from ._calib import stage_blocks
from ._heads import keep_kv_groups, keep_query_heads, slice_features
from ._judge import judge_of
from ._ranking import least_important_layers
from .prune_plan import PRUNE_PLAN, plan_pruning
from .sensitivity import SENSITIVITY, analyze, mean_loss


@dataclass
class Plan:
    keep_layers: list[int]  # original indices, in order
    keep_groups: dict[int, list[int]]  # original layer -> kept head units: KV groups, or one KV head's query heads
    drop_channels: dict[int, list[int]] = field(default_factory=dict)  # original layer -> removed MLP channels
    notes: list[str] = field(default_factory=list)


def whole_count(ratio: float, total: int, what: str, notes: list[str]) -> int:
    """How many of `total` units a ratio removes, rounded to whole units (and a note when rounded)."""
    exact = ratio * total
    count = round(exact)
    if ratio > 0 and abs(exact - count) > 1e-9:
        notes.append(f"{ratio:g} of {total} {what} is {exact:.2f}; removing {count} ({count / total:.1%}), whole {what} only")
    return count


def make_plan(scores: dict, info: dict, *, heads: float = 0.0, mlp: float = 0.0, layers: int = 0, head_score: str = "mask") -> Plan:
    notes: list[str] = []
    n_layers, kv = info["layers"], head_units(info["query_heads"], info["kv_heads"])
    what = head_unit_name(info["kv_heads"])
    if layers >= n_layers:
        raise InputError(f"--layers {layers} would drop all {n_layers} layers; drop at most {n_layers - 1}")
    dropped = sorted(least_important_layers(scores)[:layers]) if layers else []
    keep_layers = [i for i in range(n_layers) if i not in dropped]

    groups_out = whole_count(heads, kv, f"{what} per layer", notes)
    if groups_out >= kv:
        raise InputError(f"--heads {heads:g} would remove all {kv} {what} of each layer; use a ratio below {(kv - 0.5) / kv:.2f}")
    if heads > 0 and groups_out == 0:
        notes.append(f"--heads {heads:g} rounds to 0 of {kv} {what}: no heads removed (the smallest step is {1 / kv:.2f})")
    if groups_out and info["kv_heads"] == 1:
        notes.append(f"one KV head per layer: it stays, and {groups_out} of its {kv} query heads go in every layer")
    key = "mask_loss_delta_nats" if head_score == "mask" else ("taylor_query" if info["kv_heads"] == 1 else "taylor_kv_group")
    keep_groups = {}
    for i in keep_layers:
        ranking = sorted(range(kv), key=lambda g: (scores["heads"][key][i][g], g)) if groups_out else []
        keep_groups[i] = sorted(set(range(kv)) - set(ranking[:groups_out]))

    drop_channels = {}
    channels_out = whole_count(mlp, info["intermediate_size"], "MLP channels per layer", notes)
    if channels_out >= info["intermediate_size"]:
        raise InputError(f"--mlp {mlp:g} would remove every MLP channel; use a smaller ratio")
    if channels_out:
        for i in keep_layers:
            row = scores["mlp"]["taylor_channel"][i]
            drop_channels[i] = sorted(sorted(range(len(row)), key=lambda c: (row[c], c))[:channels_out])
    return Plan(keep_layers, keep_groups, drop_channels, notes)


# --- applying a plan ------------------------------------------------------------------


def prune_mlp_channels(model, drop: dict[int, list[int]]) -> str:
    """Remove the given MLP channels of each layer (same count everywhere); returns the method used."""
    layers = decoder_layers(model)
    if is_gpt2(model):
        for i, channels in drop.items():
            fc, proj = layers[i].mlp.c_fc, layers[i].mlp.c_proj
            keep = torch.tensor(sorted(set(range(fc.nf)) - set(channels)))
            slice_features(fc, out_idx=keep)
            slice_features(proj, in_idx=keep)
        return "sliced here (torch-pruning's graph cannot be built over GPT-2's Conv1D)"
    import torch_pruning as tp

    example = torch.arange(8).unsqueeze(0) % model.config.vocab_size
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=lambda out: out.logits, verbose=False)
    before = parameter_count(model)
    for i, channels in drop.items():
        graph.get_pruning_group(layers[i].mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(channels)).prune()
    removed = sum(len(c) for c in drop.values())
    expected = removed * 3 * model.config.hidden_size
    if before - parameter_count(model) != expected:  # the group must be gate/up rows and down columns, nothing else
        raise RuntimeError(f"torch-pruning removed {before - parameter_count(model)} parameters, expected {expected}")
    return "torch-pruning DependencyGraph"


@contextmanager
def plan_masked(model, plan: Plan):
    """The model computing what the plan's cut would, with what the cut removes zeroed in place and restored on
    exit: a KV group's o_proj columns, an MLP channel's down-projection input, a dropped layer's two output
    projections (tests/test_prune.py checks each against the real cut). A copy to cut instead took 2.5 GB
    more per candidate for Qwen2.5-Coder-0.5B, enough to run a 24 GB host out of memory beside another run."""
    info = shape(model)
    saved = []

    def zero(param, index) -> None:
        saved.append((param, index, param.data[index].clone()))
        param.data[index] = 0

    def zero_inputs(module, features) -> None:
        zero(module.weight, (features,) if in_dim(module) == 0 else (slice(None), features))

    for i, layer in enumerate(decoder_layers(model)):
        outputs = (attention_out(layer), mlp_out(layer))
        if i not in plan.keep_layers:
            for module in outputs:
                zero(module.weight, ...)
                if module.bias is not None:
                    zero(module.bias, ...)
            continue
        removed = sorted(set(range(head_units(info["query_heads"], info["kv_heads"]))) - set(plan.keep_groups[i]))
        if removed:
            heads = [h for g in removed for h in unit_heads(g, info["query_heads"], info["kv_heads"])]
            zero_inputs(outputs[0], head_rows(heads, info["head_dim"]))
        if plan.drop_channels.get(i):
            zero_inputs(outputs[1], torch.tensor(plan.drop_channels[i]))
    try:
        yield model
    finally:
        for param, index, value in reversed(saved):
            param.data[index] = value


def drop_layers(model, keep: list[int]) -> None:
    layers = decoder_layers(model)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is addressed by it
    if is_gpt2(model):
        model.transformer.h = kept
    else:
        model.model.layers = kept


def config_changes(model, plan: Plan) -> dict:
    """The config fields a plan changes (every layer keeps the same counts, so plain fields suffice)."""
    info = shape(model)
    config = model.config
    changes: dict = {}
    kv_after = len(plan.keep_groups[plan.keep_layers[0]])
    if info["kv_heads"] == 1 and kv_after < info["query_heads"]:  # one KV head: it stays, query heads go
        changes.update(num_attention_heads=kv_after)
    elif kv_after < info["kv_heads"]:
        changes.update(num_attention_heads=info["query_heads"] // info["kv_heads"] * kv_after, num_key_value_heads=kv_after)
    if not is_gpt2(model):
        changes["head_dim"] = info["head_dim"]  # written explicitly: the default hidden/heads is wrong once heads go
    if plan.drop_channels:
        inner = info["intermediate_size"] - len(next(iter(plan.drop_channels.values())))
        changes["n_inner" if is_gpt2(model) else "intermediate_size"] = inner
    if len(plan.keep_layers) < info["layers"]:
        changes["n_layer" if is_gpt2(model) else "num_hidden_layers"] = len(plan.keep_layers)
        if getattr(config, "layer_types", None):
            changes["layer_types"] = [config.layer_types[i] for i in plan.keep_layers]
        if is_gpt2(model) and getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise InputError(
                "this GPT-2 scales attention by 1/layer index, which renumbering layers would change; prune it without --layers"
            )
    check_config(config, changes)
    return changes


def check_config(config, changes: dict) -> None:
    """The changed config must pass its class's own validation, or the checkpoint would not reload."""
    candidate = copy.deepcopy(config)
    try:
        for key, value in changes.items():
            setattr(candidate, key, value)
        type(config).from_dict(candidate.to_dict())
    except Exception as e:  # transformers' strict configs raise their own error class, caused by a ValueError
        reason = str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1]
        raise InputError(
            f"the pruned {type(config).__name__} would not reload ({reason}); choose other ratios "
            f"(e.g. a --heads that leaves a head count dividing hidden_size {config.hidden_size})"
        ) from None


def apply_plan(model, plan: Plan) -> dict:
    """Prune in place and rewrite the config; returns the shape after."""
    info = shape(model)
    changes = config_changes(model, plan)  # validated before anything is cut
    if "num_attention_heads" in changes and info["kv_heads"] == 1:
        for i in plan.keep_layers:
            keep_query_heads(attention(decoder_layers(model)[i]), plan.keep_groups[i], info["head_dim"])
    elif "num_key_value_heads" in changes:
        for i in plan.keep_layers:
            keep_kv_groups(
                attention(decoder_layers(model)[i]),
                plan.keep_groups[i],
                query_heads=info["query_heads"],
                kv_heads=info["kv_heads"],
                head_dim=info["head_dim"],
            )
    method = prune_mlp_channels(model, plan.drop_channels) if plan.drop_channels else None
    if len(plan.keep_layers) < info["layers"]:
        drop_layers(model, plan.keep_layers)
    for key, value in changes.items():
        setattr(model.config, key, value)
    return {**shape(model), "mlp_method": method}


# --- scores ---------------------------------------------------------------------------


def read_scores(path: str | Path, info: dict) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / SENSITIVITY
    scores = read_json(path)
    theirs = scores.get("shape", {})
    for key in ("layers", "query_heads", "kv_heads", "intermediate_size"):
        if theirs.get(key) != info[key]:
            raise InputError(
                f"{path} was computed for a model with {key}={theirs.get(key)}, this one has {info[key]}; run `vcompress analyze` on this model or drop --scores"
            )
    return scores


def needed_parts(heads: float, mlp: float, layers: int) -> list[str]:
    return [part for part, wanted in (("heads", heads), ("mlp", mlp), ("layers", layers)) if wanted]


# --- the stage ------------------------------------------------------------------------


class Prune(Stage):
    name = "prune"
    folder = "02-prune"

    class Config(StageConfig):
        auto: bool = Field(False, description="remove just enough to meet the profile's budgets, by loss increase per byte saved")
        heads: float = Field(
            0.0,
            ge=0,
            lt=1,
            description="fraction of KV groups (a KV head and the query heads sharing it) to remove in every layer; with one KV head, of its query heads",
        )
        mlp: float = Field(0.0, ge=0, lt=1, description="fraction of MLP channels to remove in every layer")
        layers: int = Field(0, ge=0, description="how many of the least important layers to drop")
        scores: str | None = Field(None, description="sensitivity.json or the analyze folder; default: computed here")
        head_score: Literal["mask", "taylor"] = Field("mask", description="rank KV groups by the loss when masked, or by Taylor scores")
        samples: int = Field(8, gt=0, description="calibration blocks when scores are computed here")
        seq_len: int = Field(128, ge=8, description="tokens per calibration block")
        heldout_blocks: int = Field(16, ge=0, description="held-out blocks for perplexity before/after (0: skip)")
        heldout_seq_len: int = Field(256, ge=8, description="tokens per held-out block")
        eval_per_subject: int = Field(
            10, ge=0, description="MMLU questions per subject of the evaluated subset for answer agreement (0: skip)"
        )
        plan_blocks: int = Field(
            8, ge=0, description="auto: calibration blocks each way to meet the budgets is measured on (0: trust the summed scores)"
        )
        plan_seq_len: int = Field(256, ge=8, description="auto: tokens per block of those measurements")

        @model_validator(mode="after")
        def _auto_alone(self):
            if self.auto and (self.heads or self.mlp or self.layers):
                raise ValueError("auto chooses what to remove; set either auto or heads/mlp/layers, not both")
            return self

    def run(self, ctx) -> dict:
        cfg = self.config
        if cfg.auto:
            return self.run_auto(ctx)
        if not (cfg.heads or cfg.mlp or cfg.layers):
            raise InputError("nothing to prune; pass --heads, --mlp and/or --layers")
        model, tokenizer = ctx.load()
        info = shape(model)
        if cfg.heads and is_gpt2(model):
            raise InputError(
                "GPT-2 cannot lose attention heads and stay a standard checkpoint (GPT2Config has no head_dim: "
                "head width is n_embd / n_head); prune GPT-2 with --mlp and --layers only"
            )
        scores = self.scores(ctx, model, tokenizer, info, needed_parts(cfg.heads, cfg.mlp, cfg.layers))
        return self.prune(ctx, model, tokenizer, info, scores, cfg.heads, cfg.mlp, cfg.layers)

    def run_auto(self, ctx) -> dict:
        """Predict the exported artifact; prune nothing if it meets the budgets, else just enough (compress/prune_plan.py)."""
        if ctx.profile is None:
            raise InputError(
                "prune auto needs a profile's budgets; run it through `vcompress run --profile`, or pass --heads/--mlp/--layers"
            )
        cfg = self.config
        model, tokenizer = ctx.load()
        info = shape(model)
        parts = ["mlp", "layers"] if is_gpt2(model) else ["heads", "mlp", "layers"]
        held: dict = {}  # the scores, read or computed only when something must go

        def scores() -> dict:
            held.update(self.scores(ctx, model, tokenizer, info, parts))
            return held

        measure = self.plan_loss(ctx, model, tokenizer, info, held) if cfg.plan_blocks else None
        plan = plan_pruning(model.config.to_dict(), ctx.profile, scores, measure)
        for line in plan.describe():
            ctx.log(line)
        if not plan.removes_anything:
            save_model(model, tokenizer, ctx.out)
            write_json(ctx.out / PRUNE_PLAN, plan.to_json())
            return {"auto": True, "pruned": False, "plan": plan.to_json()}
        metrics = self.prune(
            ctx,
            model,
            tokenizer,
            info,
            held,
            plan.kv_groups / head_units(info["query_heads"], info["kv_heads"]),
            plan.mlp_channels / info["intermediate_size"],
            len(plan.layers),
        )
        write_json(ctx.out / PRUNE_PLAN, plan.to_json())
        return {"auto": True, "pruned": True, "plan": plan.to_json(), **metrics}

    def plan_loss(self, ctx, model, tokenizer, info, scores: dict):
        """measure(plan) for plan_pruning: the loss rise, in nats per token on calibration blocks, of a copy of the
        model cut as the plan says (the scores are read when it is first called, after they are computed)."""
        cfg = self.config
        blocks, base = None, None

        @torch.no_grad()
        def measure(plan) -> float:
            nonlocal blocks, base
            if blocks is None:
                blocks = stage_blocks(tokenizer, ctx, samples=cfg.plan_blocks, seq_len=cfg.plan_seq_len)
                ctx.log(f"measuring each way to meet the budgets on {blocks.shape[0]} x {blocks.shape[1]} calibration tokens")
                base = mean_loss(model, blocks)
            ratios = (
                plan.kv_groups / head_units(info["query_heads"], info["kv_heads"]),
                plan.mlp_channels / info["intermediate_size"],
                len(plan.layers),
            )
            with plan_masked(model, make_plan(scores, info, heads=ratios[0], mlp=ratios[1], layers=ratios[2], head_score=cfg.head_score)):
                return mean_loss(model, blocks) - base

        return measure

    def scores(self, ctx, model, tokenizer, info, parts: list[str]) -> dict:
        """The analysis's scores (--scores), with the missing parts computed here."""
        cfg = self.config
        scores = read_scores(cfg.scores, info) if cfg.scores else {}
        missing = [p for p in parts if p not in scores]
        if missing:
            ctx.log(f"computing {', '.join(missing)} scores on {cfg.samples} calibration blocks (pass --scores to reuse an analysis)")
            blocks = stage_blocks(tokenizer, ctx, samples=cfg.samples, seq_len=cfg.seq_len)
            scores = {**scores, **analyze(model, blocks, parts=missing, log=ctx.log)}
        return scores

    def prune(self, ctx, model, tokenizer, info, scores, heads: float, mlp: float, layers: int) -> dict:
        cfg = self.config
        plan = make_plan(scores, info, heads=heads, mlp=mlp, layers=layers, head_score=cfg.head_score)
        for note in plan.notes:
            ctx.log(f"note: {note}")

        reference = copy.deepcopy(model)
        judge = judge_of(
            reference,
            tokenizer,
            ctx,
            blocks=cfg.heldout_blocks,
            seq_len=cfg.heldout_seq_len,
            per_subject=cfg.eval_per_subject,
            keep_logits=False,
        )  # the reference stays: no need to hold its logits
        after = apply_plan(model, plan)
        save_model(model, tokenizer, ctx.out)
        reload_diff = check_reload(model, ctx.out, torch.arange(32).unsqueeze(0) % model.config.vocab_size)
        fidelity = judge.score(torch_logits_fn(model))
        return self.metrics(reference, model, info, after, plan, fidelity, reload_diff, ctx, (heads, mlp, layers))

    def metrics(self, reference, model, info, after, plan, fidelity, reload_diff, ctx, requested) -> dict:
        cfg = self.config
        params = (parameter_count(reference), parameter_count(model))
        size = (weight_bytes(reference), weight_bytes(model))
        kept = [
            {
                "layer": new,
                "source_layer": old,
                "kv_groups": plan.keep_groups[old],
                "query_heads": [h for g in plan.keep_groups[old] for h in unit_heads(g, info["query_heads"], info["kv_heads"])],
            }
            for new, old in enumerate(plan.keep_layers)
        ]
        return {
            "parameters_before": params[0],
            "parameters_after": params[1],
            "weights_bytes_before": size[0],
            "weights_bytes_after": size[1],
            "size_reduction": figure(round(100 * (1 - size[1] / size[0]), 2), "%"),
            "folder_bytes_after": bytes_on_disk(ctx.out),
            **fidelity,  # the pruned model against the model before pruning
            "reload_max_abs_logit_diff": reload_diff,
            "heads": {
                "requested_ratio": requested[0],
                "query_heads": [info["query_heads"], after["query_heads"]],
                "kv_heads": [info["kv_heads"], after["kv_heads"]],
                "removed_ratio": round(
                    1 - head_units(after["query_heads"], after["kv_heads"]) / head_units(info["query_heads"], info["kv_heads"]), 4
                ),
                "unit": head_unit_name(info["kv_heads"]),
                "ranked_by": cfg.head_score,
                "kept_per_layer": kept,
            },
            "mlp": {
                "requested_ratio": requested[1],
                "intermediate_size": [info["intermediate_size"], after["intermediate_size"]],
                "removed_ratio": round(1 - after["intermediate_size"] / info["intermediate_size"], 4),
                "method": after["mlp_method"],
            },
            "layers": {
                "requested": requested[2],
                "count": [info["layers"], after["layers"]],
                "dropped": [i for i in range(info["layers"]) if i not in plan.keep_layers],
                "ranked_by": "skip_loss_delta_nats",
            },
            "scores": cfg.scores or "computed here",
            "notes": plan.notes,  # ratios rounded to whole groups / channels
        }


@torch.no_grad()
def check_reload(model, folder: Path, ids: torch.Tensor) -> float:
    """Reload the saved folder with plain transformers; its logits must match the pruned model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = model(input_ids=ids, use_cache=False).logits
    got = reloaded(input_ids=ids, use_cache=False).logits
    diff = (want - got).abs().max().item()
    if diff > 1e-3 * max(1.0, want.abs().max().item()):
        raise InternalError(f"the saved pruned model reloads with different logits (max diff {diff:.3g}); this is a bug, please report it")
    return diff
