"""Budget-driven pruning (`prune` with `auto: true`): remove just enough to meet the profile's budgets.

The exported artifact is predicted from the model's config alone with the arithmetic validate's roofline
estimate uses (core/roofline.py: shapes, roofline, peak_ram_bytes): weights at the profile's quantization
as its exporter stores them (ONNX gptq/rtn: MatMulNBits codes, an fp32 scale and a packed zero point per group,
an fp32 correction per group for float zero points, the embedding / LM head in blocks at the export step's
table_bits, the rotary tables; other formats: a 4-byte scale and 1-byte zero per group and the table at 8 bits
or more; int8: 8 bits with per-channel scales; norms and biases left out), the KV cache in fp32, the budgets'
prompt length and 64 decode tokens.
If the size, peak-RAM, TTFT and decode budgets are all met, nothing is pruned. Otherwise, one step at a
time, the move with the smallest measured loss increase per byte saved goes (every layer keeps equal counts, so a
step is the same cut in every layer); where one move alone would meet every budget for less total loss than going
on, the plan ends with it:
- one KV group per layer: each layer's next least important group, cost the sum of their mask_loss_delta_nats;
- 1/16 of the MLP channels per layer: cost the sum of their Taylor scores (sum |w dL/dw|, a first-order
  estimate of the loss change in the same nats per token; an upper bound on its size);
- one whole layer, the one with the smallest skip_loss_delta_nats: cost that delta.
The predicted perplexity rise is exp(sum of the costs) - 1, as if the removals were independent (like
`run --auto`'s). Accuracy budgets are not predicted: validate measures them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcompress.core.artifact import read_json
from vcompress.core.errors import InputError
from vcompress.core.profiles import Profile
from vcompress.core.roofline import DEFAULT_DECODE_TOKENS, peak_ram_bytes, roofline, shapes
from vcompress.core.units import MIB

from .sensitivity import least_important_layers

PRUNE_PLAN = "prune_plan.json"
MLP_STEPS = 16  # an MLP move removes 1/16 of each layer's channels
KV_ELEMENT_BYTES = 4  # what the roofline assumes when the manifest names no KV dtype
BUDGETS = {  # budget -> (predicted figure, unit, True when the figure must stay at or below the limit)
    "max_model_size_mb": ("model_size_mb", "MiB", True),
    "max_peak_ram_mb": ("peak_ram_mb", "MiB", True),
    "max_ttft_ms": ("ttft_ms", "ms", True),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "tokens/s", False),
}


@dataclass
class BudgetPlan:
    kv_groups: int = 0  # KV groups removed from every layer
    mlp_channels: int = 0  # MLP channels removed from every layer
    layers: list[int] = field(default_factory=list)  # dropped, original indices
    steps: list[dict] = field(default_factory=list)  # the moves, in the order chosen
    before: dict = field(default_factory=dict)  # the predicted artifact without pruning
    after: dict = field(default_factory=dict)  # ... and with this plan
    loss_rise_nats: float = 0.0
    perplexity_rise_pct: float = 0.0
    reason: str = ""

    @property
    def removes_anything(self) -> bool:
        return bool(self.kv_groups or self.mlp_channels or self.layers)

    def to_json(self) -> dict:
        return {"prunes": self.removes_anything, **asdict(self)}

    def describe(self) -> list[str]:
        lines = [f"plan: {self.reason}", f"predicted before: {_figures(self.before)}"]
        if self.removes_anything:
            lines += [
                f"remove {s['unit']} (loss +{s['loss_delta_nats']:.4g} nats, saves {s['bytes_saved'] / MIB:.2f} MiB)" for s in self.steps
            ]
            lines.append(f"predicted after: {_figures(self.after)}, perplexity +{self.perplexity_rise_pct:.1f}%")
        return lines


def _figures(p: dict) -> str:
    return (
        f"{p['model_size_mb']:.1f} MiB, peak RAM {p['peak_ram_mb']:.1f} MiB, "
        f"TTFT {p['ttft_ms']:.1f} ms, decode {p['decode_tokens_per_s']:.1f} tok/s"
    )


# --- predicting the exported artifact ---------------------------------------------------------


def predicted_weights(shape: dict, profile: Profile, max_positions: int = 0) -> dict:
    """roofline.weight_bytes' dict for the artifact the profile's quantization and export would write."""
    q = profile.quantization
    if q.method in ("none", "int8"):  # fp32 as exported; int8 with one scale per output channel
        bits = table_bits = head_bits = 32 if q.method == "none" else 8
    elif profile.target.format == "onnx":
        bits, table_bits, head_bits = _matmulnbits_bits(profile)
    else:
        bits = q.bits + (40 / q.group_size if q.bits < 16 else 0)
        table_bits = head_bits = max(bits, 8)  # vocab x hidden, never below 8 bits
    table = shape["head_params"] * head_bits / 8
    # an untied input embedding is only gathered from; a tied one is the head's table
    gathered = 0 if shape["tied"] else shape["head_params"] * table_bits / 8
    # ONNX stores the rotary cos/sin tables for every position (fp32, half the head dim each)
    rotary = max_positions * shape["head_dim"] * 4 if profile.target.format == "onnx" and shape["model_type"] != "gpt2" else 0
    stored = shape["body_params"] * bits / 8 + table + gathered + rotary
    return {
        "stored_bytes": round(stored),
        "gather_only_bytes": round(gathered + rotary),
        "per_token_bytes": round(stored - gathered - rotary),
    }


def _matmulnbits_bits(profile: Profile) -> tuple[float, float, float]:
    """Bits per weight of the body, the embedding table and the LM head in an ONNX export: MatMulNBits stores an
    fp32 scale and a packed integer zero point per group, and a float zero point (quantize's zero_point: float)
    adds an fp32 correction per group; the tables are blocks of 32 at the export's table_bits / head_bits (0: fp32).
    The x86-cpu export of Qwen2.5-Coder-0.5B (untied, table bits 8) was 570.0 MiB where the earlier rule said 483.6."""
    q = profile.quantization
    settings = lambda stage: profile.step(stage).settings if profile.step(stage) else {}  # noqa: E731
    float_zero = settings("quantize").get("zero_point", "int") == "float"
    body = q.bits + (32 + q.bits + (32 if float_zero else 0)) / q.group_size
    table_bits = settings("export").get("table_bits", 4 if q.bits == 4 else 8)
    head_bits = settings("export").get("head_bits", table_bits)
    block = settings("export").get("block_size", 32)
    stored = lambda b: b + (32 + b) / block if b else 32  # noqa: E731
    return body, stored(table_bits), stored(head_bits)


def predict(config: dict, profile: Profile) -> dict:
    """Size, peak RAM, TTFT and decode speed of the artifact exported from a model with this config."""
    shape = shapes(config)
    weights = predicted_weights(shape, profile, config.get("max_position_embeddings", 0))
    prompt = profile.budgets.prompt_tokens
    line = roofline(shape, weights, profile.device, prompt, DEFAULT_DECODE_TOKENS, KV_ELEMENT_BYTES)
    return {
        "model_size_mb": round(weights["stored_bytes"] / MIB, 2),
        "peak_ram_mb": round(peak_ram_bytes(shape, weights, prompt, DEFAULT_DECODE_TOKENS, KV_ELEMENT_BYTES) / MIB, 2),
        "ttft_ms": round(line["ttft_ms"], 2),
        "decode_tokens_per_s": round(line["decode_tokens_per_s"], 2),
        "stored_bytes": weights["stored_bytes"],
    }


def missed(prediction: dict, profile: Profile) -> list[str]:
    """The budgets the prediction does not meet."""
    out = []
    for budget, (key, _, at_most) in BUDGETS.items():
        limit = getattr(profile.budgets, budget)
        if (prediction[key] > limit) if at_most else (prediction[key] < limit):
            out.append(budget)
    return out


def pruned_config(config: dict, kv_groups: int = 0, mlp_channels: int = 0, layers: int = 0) -> dict:
    """config.json after removing that many KV groups and MLP channels per layer and that many layers."""
    shape = shapes(config)
    kv = shape["kv_heads"] - kv_groups
    out = dict(config)
    if config.get("model_type") == "gpt2":
        out.update(n_layer=shape["layers"] - layers, n_inner=shape["intermediate_size"] - mlp_channels)
    else:
        out.update(
            num_hidden_layers=shape["layers"] - layers,
            num_attention_heads=shape["query_heads"] // shape["kv_heads"] * kv,
            num_key_value_heads=kv,
            head_dim=shape["head_dim"],
            intermediate_size=shape["intermediate_size"] - mlp_channels,
        )
    return out


# --- the plan ---------------------------------------------------------------------------------


def budget_plan(config: dict, profile: Profile, scores: dict | Callable[[], dict]) -> BudgetPlan:
    """What to remove so the predicted artifact meets the profile's budgets. `scores` (the analysis, with
    heads, mlp and layers; a function returning it is called only when something must go)."""
    shape = shapes(config)
    n, kv, inner = shape["layers"], shape["kv_heads"], shape["intermediate_size"]
    heads_prunable = config.get("model_type") != "gpt2"  # GPT2Config cannot state fewer heads
    step = max(1, inner // MLP_STEPS)
    before = predict(config, profile)
    if not missed(before, profile):
        return BudgetPlan(before=before, after=before, reason=f"the unpruned model meets every budget of {profile.name}; nothing pruned")

    # the most pruning can do: 1 layer, 1 KV group, one MLP step left
    most = (kv - 1 if heads_prunable else 0, (inner // step - 1) * step, n - 1)
    floor = predict(pruned_config(config, *most), profile)
    for budget in missed(floor, profile):
        key, unit, _ = BUDGETS[budget]
        limit = getattr(profile.budgets, budget)
        raise InputError(
            f"{budget} {limit:g} {unit} cannot be met by pruning: even 1 of {n} layers, {kv - most[0]} of {kv} KV groups and "
            f"{inner - most[1]} of {inner} MLP channels predict {floor[key]:g} {unit} at {_scheme(profile)}; "
            f"raise {budget} in the profile or quantize to fewer bits"
        )

    scores = scores() if callable(scores) else scores
    kv_costs = [sorted(row) for row in scores["heads"]["mask_loss_delta_nats"]] if heads_prunable else []
    channel_costs = [sorted(row) for row in scores["mlp"]["taylor_channel"]]
    skip = scores["layers"]["skip_loss_delta_nats"]
    order = least_important_layers(scores)

    plan, current = BudgetPlan(before=before), before
    best = None  # the cheapest plan found that meets every budget
    while missed(current, profile):
        kept = [i for i in range(n) if i not in plan.layers]
        moves = []  # (loss delta, unit, change)
        if heads_prunable and plan.kv_groups < most[0]:
            g = plan.kv_groups
            moves.append((sum(kv_costs[i][g] for i in kept), "1 KV group per layer", {"kv_groups": g + 1}))
        if plan.mlp_channels < most[1]:
            c = plan.mlp_channels
            moves.append(
                (sum(sum(channel_costs[i][c : c + step]) for i in kept), f"{step} MLP channels per layer", {"mlp_channels": c + step})
            )
        if len(kept) > 1:
            layer = next(i for i in order if i not in plan.layers)
            moves.append((skip[layer], f"layer {layer}", {"layers": [*plan.layers, layer]}))
        options = []
        for delta, unit, change in moves:
            delta = max(delta, 0.0)  # noise can make a measured delta negative: free
            state = {"kv_groups": plan.kv_groups, "mlp_channels": plan.mlp_channels, "layers": plan.layers, **change}
            after = predict(pruned_config(config, state["kv_groups"], state["mlp_channels"], len(state["layers"])), profile)
            saved = current["stored_bytes"] - after["stored_bytes"]
            step_record = {"unit": unit, "loss_delta_nats": round(delta, 6), "bytes_saved": saved, "then_missed": missed(after, profile)}
            options.append((delta / max(saved, 1), -saved, delta, state, after, step_record))
            if not step_record["then_missed"] and (best is None or plan.loss_rise_nats + delta < best.loss_rise_nats):
                best = BudgetPlan(
                    **state, steps=[*plan.steps, step_record], before=before, after=after, loss_rise_nats=plan.loss_rise_nats + delta
                )
        _, _, delta, state, current, step_record = min(options, key=lambda option: option[:2])  # the cheapest per byte saved
        plan = BudgetPlan(
            **state, steps=[*plan.steps, step_record], before=before, after=current, loss_rise_nats=plan.loss_rise_nats + delta
        )
    plan = best  # greedy per byte, or where a single move would finish sooner for less loss, that move
    plan.perplexity_rise_pct = round(100 * (math.exp(plan.loss_rise_nats) - 1), 2)
    plan.loss_rise_nats = round(plan.loss_rise_nats, 6)
    plan.reason = (
        f"the unpruned model misses {', '.join(missed(before, profile))} of {profile.name}; removing "
        f"{plan.kv_groups} of {kv} KV groups and {plan.mlp_channels} of {inner} MLP channels per layer and "
        f"{len(plan.layers)} of {n} layers {sorted(plan.layers)}"
    )
    if plan.perplexity_rise_pct > profile.budgets.max_perplexity_rise_pct:
        plan.reason += f" (predicted perplexity +{plan.perplexity_rise_pct:.1f}% is over the +{profile.budgets.max_perplexity_rise_pct:g}% budget before distillation)"
    return plan


def analysis_unneeded(config: dict, profile: Profile | None) -> str | None:
    """Why a run's analysis would rank nothing, or None: in a recipe whose pruning is `auto` (and whose
    quantize keeps no sensitive linears), the scores are read only when something must go."""
    if profile is None or not (prune := profile.step("prune")) or not prune.settings.get("auto"):
        return None
    if (quantize := profile.step("quantize")) and quantize.settings.get("keep_sensitive"):
        return None
    before = predict(config, profile)
    if missed(before, profile):
        return None
    return f"the unpruned model meets every budget of {profile.name} ({_figures(before)}): prune auto removes nothing, so nothing is ranked"


def _scheme(profile: Profile) -> str:
    q = profile.quantization
    return "fp32" if q.method == "none" else f"{q.bits}-bit weights"


def pruned_nothing(folder: Path | str | None) -> bool:
    """True when `folder` is a prune stage's output whose budget plan removed nothing."""
    path = Path(folder) / PRUNE_PLAN if folder is not None else None
    return path is not None and path.is_file() and read_json(path).get("prunes") is False
