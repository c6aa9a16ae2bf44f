"""Budget-driven pruning (`prune` with `auto: true`): remove just enough to meet the profile's budgets.

The exported artifact is predicted from the model's config alone with the arithmetic validate's roofline
estimate uses (core/roofline_math.py: shapes, roofline, process_ram_bytes): the weights as the profile's target exporter
says it would store them (`Exporter.predicted_weights`, asked through the EXPORTERS registry), the KV cache in
fp32, the budgets' prompt length and 64 decode tokens.
If the size, peak-RAM, TTFT and decode budgets are all met, nothing is pruned. Otherwise the plan is chosen among
the ways to meet them that trade the three kinds of cut against each other (every layer keeps equal counts):
for each number of KV groups removed per layer (each layer's least important by mask_loss_delta_nats) and each
number of whole layers dropped (smallest skip_loss_delta_nats first), the fewest MLP channels per layer (least
important by Taylor score, in steps of the quantization group so every layer still splits into whole groups)
that then meet every budget; combinations that cut more of every kind than another are left out.
Each candidate gets a predicted loss rise, the sum of its units' scores as if independent. The scores alone
rank badly across kinds (Qwen2.5-Coder-0.5B under phone-4gb, 8 x 256 calibration tokens): five adjacent layers
sum to +14% perplexity and measure +30.5%, four layers and one of two KV groups sum to +35% and measure +551%,
1120 of 4864 MLP channels (Taylor scores, an upper bound) sum to thousands of nats and measure +47%. So the prune
stage measures each candidate's real loss on calibration blocks (the model computing as the plan's cut would)
and keeps the one that loses least: there four layers and 224 MLP channels, +25.3%. Without measurements the
lowest sum is kept.
Accuracy budgets are not predicted: validate measures them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcompress.core.artifact import read_json
from vcompress.core.errors import InputError
from vcompress.core.models import head_unit_name, head_units
from vcompress.core.profiles import Profile
from vcompress.core.registry import EXPORTERS
from vcompress.core.roofline_math import DEFAULT_DECODE_TOKENS, peak_ram_bytes, process_ram_bytes, roofline, runtime_memory, shapes
from vcompress.core.units import MIB

from ._ranking import least_important_layers

PRUNE_PLAN = "prune_plan.json"
KV_ELEMENT_BYTES = 4  # what the roofline assumes when the manifest names no KV dtype
BUDGETS = {  # budget -> (predicted figure, unit, True when the figure must stay at or below the limit)
    "max_model_size_mb": ("model_size_mb", "MiB", True),
    "max_peak_ram_mb": ("peak_ram_mb", "MiB", True),
    "max_ttft_ms": ("ttft_ms", "ms", True),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "tokens/s", False),
}


@dataclass
class PrunePlan:
    kv_groups: int = 0  # KV groups removed from every layer
    mlp_channels: int = 0  # MLP channels removed from every layer
    layers: list[int] = field(default_factory=list)  # dropped, original indices
    steps: list[dict] = field(default_factory=list)  # the moves, in the order chosen
    before: dict = field(default_factory=dict)  # the predicted artifact without pruning
    after: dict = field(default_factory=dict)  # ... and with this plan
    loss_rise_nats: float = 0.0  # predicted: the units' scores summed
    perplexity_rise_pct: float = 0.0  # ... as a perplexity rise
    measured_loss_rise_nats: float | None = None  # measured on calibration blocks with the model cut as planned
    tried: list[dict] = field(default_factory=list)  # every candidate weighed, the chosen one included
    reason: str = ""

    @property
    def removes_anything(self) -> bool:
        return bool(self.kv_groups or self.mlp_channels or self.layers)

    def to_json(self) -> dict:
        return {"prunes": self.removes_anything, **asdict(self)}

    def summary(self) -> dict:
        return {
            "kv_groups": self.kv_groups,
            "mlp_channels": self.mlp_channels,
            "layers": sorted(self.layers),
            "model_size_mb": self.after["model_size_mb"],
            "summed_loss_rise_nats": round(self.loss_rise_nats, 6),
            "measured_perplexity_rise_pct": None if self.measured_loss_rise_nats is None else _pct(self.measured_loss_rise_nats),
        }

    def describe(self) -> list[str]:
        lines = [f"plan: {self.reason}", f"predicted before: {_figures(self.before)}"]
        if not self.removes_anything:
            return lines
        for t in self.tried:
            measured = t["measured_perplexity_rise_pct"]
            lines.append(
                f"  weighed: {len(t['layers'])} layers, {t['kv_groups']} KV groups, {t['mlp_channels']} MLP channels per layer: "
                f"{t['model_size_mb']:.1f} MiB, scores sum +{t['summed_loss_rise_nats']:.4g} nats"
                + (f", perplexity +{measured:.1f}% measured" if measured is not None else "")
            )
        lines += [
            f"remove {s['unit']} (scores sum +{s['loss_delta_nats']:.4g} nats, saves {s['bytes_saved'] / MIB:.2f} MiB)" for s in self.steps
        ]
        rise = (
            f"perplexity +{self.perplexity_rise_pct:.1f}% by the summed scores"
            if self.measured_loss_rise_nats is None
            else f"perplexity +{_pct(self.measured_loss_rise_nats):.1f}% measured"
        )
        lines.append(f"predicted after: {_figures(self.after)}, {rise}")
        return lines


def _figures(p: dict) -> str:
    return (
        f"{p['model_size_mb']:.1f} MiB, peak RAM {p['peak_ram_mb']:.1f} MiB, "
        f"TTFT {p['ttft_ms']:.1f} ms, decode {p['decode_tokens_per_s']:.1f} tok/s"
    )


# --- predicting the exported artifact ---------------------------------------------------------


def predicted_weights(shape: dict, profile: Profile, max_positions: int = 0) -> dict:
    """roofline.weight_bytes' dict for the artifact the profile's export would write: its target's exporter
    answers (`Exporter.predicted_weights`, through the EXPORTERS registry: compress/ does not import exporters/)."""
    return target_exporter(profile).predicted_weights(shape, quantization_settings(profile), max_positions)


def target_exporter(profile: Profile):
    """The profile's target exporter with the export step's config (the target's quant, the step's settings)."""
    exporter = EXPORTERS.get(profile.target.format)
    return exporter(exporter.parse_config({"quant": profile.target.quant, **_settings(profile, "export")}))


def quantization_settings(profile: Profile) -> dict:
    """The profile's quantization scheme with the quantize step's own settings over it (Profile.quantization_for)."""
    return profile.quantization_for().model_dump()


def _settings(profile: Profile, stage: str) -> dict:
    return profile.step(stage).settings if profile.step(stage) else {}


def predict(config: dict, profile: Profile) -> dict:
    """Size, peak RAM, TTFT and decode speed of the artifact exported from a model with this config."""
    shape = shapes(config)
    weights = predicted_weights(shape, profile, config.get("max_position_embeddings", 0))
    prompt = profile.budgets.prompt_tokens
    line = roofline(shape, weights, profile.device, prompt, DEFAULT_DECODE_TOKENS, KV_ELEMENT_BYTES)
    runtime = runtime_memory(None, profile.target.format)
    ram = (
        process_ram_bytes(shape, weights, prompt, DEFAULT_DECODE_TOKENS, KV_ELEMENT_BYTES, runtime)
        if runtime
        else peak_ram_bytes(shape, weights, prompt, DEFAULT_DECODE_TOKENS, KV_ELEMENT_BYTES)  # the runtime's own unmeasured
    )
    return {
        "model_size_mb": round(weights["stored_bytes"] / MIB, 2),
        "peak_ram_mb": round(ram / MIB, 2),
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
    """config.json after removing that many KV groups (with one KV head: query heads) and MLP channels per layer
    and that many layers."""
    shape = shapes(config)
    kv = shape["kv_heads"] - kv_groups
    queries = shape["query_heads"] // shape["kv_heads"] * kv
    if shape["kv_heads"] == 1:  # the one KV head stays, its query heads go
        kv, queries = 1, shape["query_heads"] - kv_groups
    out = dict(config)
    if config.get("model_type") == "gpt2":
        out.update(n_layer=shape["layers"] - layers, n_inner=shape["intermediate_size"] - mlp_channels)
    else:
        out.update(
            num_hidden_layers=shape["layers"] - layers,
            num_attention_heads=queries,
            num_key_value_heads=kv,
            head_dim=shape["head_dim"],
            intermediate_size=shape["intermediate_size"] - mlp_channels,
        )
    return out


# --- the plan ---------------------------------------------------------------------------------


MAX_LAYER_COUNTS = 6  # layer counts tried per KV count, evenly spaced from none to enough alone
MAX_KV_COUNTS = 3  # KV counts tried, evenly spaced


def plan_pruning(
    config: dict, profile: Profile, scores: dict | Callable[[], dict], measure: Callable[[PrunePlan], float] | None = None
) -> PrunePlan:
    """What to remove so the predicted artifact meets the profile's budgets. `scores`: the analysis, with heads,
    mlp and layers (a function returning it is called only when something must go). `measure(plan)`: the real
    loss rise in nats of a candidate plan; the candidate with the smallest wins (without it, the smallest sum)."""
    shape = shapes(config)
    n, kv, inner = shape["layers"], head_units(shape["query_heads"], shape["kv_heads"]), shape["intermediate_size"]
    what = head_unit_name(shape["kv_heads"])
    heads_prunable = config.get("model_type") != "gpt2"  # GPT2Config cannot state fewer heads
    step = channel_step(inner, profile)
    before = predict(config, profile)
    if not missed(before, profile):
        return PrunePlan(before=before, after=before, reason=f"the unpruned model meets every budget of {profile.name}; nothing pruned")

    # the most pruning can do: 1 layer, 1 KV group, one MLP step left
    most = (kv - 1 if heads_prunable else 0, (inner // step - 1) * step, n - 1)
    floor = predict(pruned_config(config, *most), profile)
    for budget in missed(floor, profile):
        key, unit, _ = BUDGETS[budget]
        limit = getattr(profile.budgets, budget)
        raise InputError(
            f"{budget} {limit:g} {unit} cannot be met by pruning: even 1 of {n} layers, {kv - most[0]} of {kv} {what} and "
            f"{inner - most[1]} of {inner} MLP channels predict {floor[key]:g} {unit} at {_scheme(profile)}; "
            f"raise {budget} in the profile or quantize to fewer bits"
        )

    found = candidate_plans(config, profile, scores() if callable(scores) else scores, before, most, step)
    if measure is not None:
        for plan in found:
            plan.measured_loss_rise_nats = round(measure(plan), 6)
    chosen = min(found, key=lambda p: p.loss_rise_nats if p.measured_loss_rise_nats is None else p.measured_loss_rise_nats)
    chosen.tried = [p.summary() for p in found]
    chosen.perplexity_rise_pct = _pct(chosen.loss_rise_nats)
    chosen.reason = (
        f"the unpruned model misses {', '.join(missed(before, profile))} of {profile.name}; removing "
        f"{chosen.kv_groups} of {kv} {what} and {chosen.mlp_channels} of {inner} MLP channels per layer and "
        f"{len(chosen.layers)} of {n} layers {sorted(chosen.layers)}"
        + (f", the least loss measured of {len(found)} ways to meet the budgets" if measure is not None else "")
    )
    rise = chosen.perplexity_rise_pct if chosen.measured_loss_rise_nats is None else _pct(chosen.measured_loss_rise_nats)
    if rise > profile.budgets.max_perplexity_rise_pct:
        kind = "predicted" if chosen.measured_loss_rise_nats is None else "measured"
        chosen.reason += (
            f" ({kind} perplexity +{rise:.1f}% is over the +{profile.budgets.max_perplexity_rise_pct:g}% budget before distillation)"
        )
    return chosen


def channel_step(inner: int, profile: Profile) -> int:
    """MLP channels go in multiples of the quantization group, so the pruned down projection still splits into
    whole groups (quantize would otherwise fall back to a smaller group than the size was predicted with)."""
    quantization = quantization_settings(profile)
    group = quantization["group_size"] if quantization["method"] not in ("none", "int8") else 32
    return group if inner % group == 0 and inner >= 4 * group else max(1, inner // 16)


def candidate_plans(config: dict, profile: Profile, scores: dict, before: dict, most: tuple, step: int) -> list[PrunePlan]:
    """The ways to meet every budget (module docstring), smallest predicted loss first."""
    n = shapes(config)["layers"]
    order = least_important_layers(scores)
    meets = lambda k, c, m: not missed(predict(pruned_config(config, k, c, m), profile), profile)  # noqa: E731
    cuts = []
    for k in _spread(range(most[0] + 1), MAX_KV_COUNTS):
        enough = next((m for m in range(n) if meets(k, most[1], m)), None)  # layers needed with the most MLP cut
        if enough is None:
            continue
        alone = next((m for m in range(enough, n) if meets(k, 0, m)), n - 1)  # layers that meet it without MLP cuts
        for m in _spread(range(enough, alone + 1), MAX_LAYER_COUNTS):
            c = next(c for c in range(0, most[1] + 1, step) if meets(k, c, m))
            cuts.append((k, c, m))
    cuts = [a for a in cuts if not any(b != a and all(x <= y for x, y in zip(b, a, strict=True)) for b in cuts)]
    plans = [_plan(config, profile, scores, before, order, k, c, m) for k, c, m in cuts]
    return sorted(plans, key=lambda p: p.loss_rise_nats)


def _spread(values: range, most: int) -> list[int]:
    """At most `most` of the values, evenly spaced, the first and the last kept."""
    values = list(values)
    if len(values) <= most:
        return values
    return sorted({values[round(i * (len(values) - 1) / (most - 1))] for i in range(most)})


def _plan(config: dict, profile: Profile, scores: dict, before: dict, order: list[int], k: int, c: int, m: int) -> PrunePlan:
    """A candidate with its steps (layers, then KV groups, then MLP channels), their summed scores and bytes saved."""
    dropped = order[:m]
    kept = [i for i in range(len(order)) if i not in dropped]
    skip = scores["layers"]["skip_loss_delta_nats"]
    moves = []
    if m:
        moves.append((f"layers {sorted(dropped)}", sum(max(0.0, skip[i]) for i in dropped), (0, 0, m)))
    if k:
        cost = sum(max(0.0, sum(sorted(scores["heads"]["mask_loss_delta_nats"][i])[:k])) for i in kept)
        moves.append((f"{k} KV group{'s' * (k > 1)} per layer", cost, (k, 0, m)))
    if c:
        cost = sum(max(0.0, sum(sorted(scores["mlp"]["taylor_channel"][i])[:c])) for i in kept)
        moves.append((f"{c} MLP channels per layer", cost, (k, c, m)))
    steps, current = [], before
    for unit, delta, cut in moves:
        after = predict(pruned_config(config, *cut), profile)
        steps.append(
            {
                "unit": unit,
                "loss_delta_nats": round(delta, 6),
                "bytes_saved": current["stored_bytes"] - after["stored_bytes"],
                "then_missed": missed(after, profile),
            }
        )
        current = after
    total = sum(s["loss_delta_nats"] for s in steps)
    return PrunePlan(kv_groups=k, mlp_channels=c, layers=dropped, steps=steps, before=before, after=current, loss_rise_nats=total)


def _pct(nats: float) -> float:
    """A loss rise as a perplexity rise in percent; the Taylor sums can reach thousands of nats, so capped at e^30."""
    return round(100 * math.expm1(min(nats, 30.0)), 2)


def analysis_unneeded(config: dict, profile: Profile | None) -> str | None:
    """Why a run's analysis would rank nothing, or None. Its readers are prune (a fixed fraction always, `auto`
    only when something must go) and quantize's keep_sensitive; a recipe with neither (x86-cpu: analyze,
    quantize, export, validate) would spend the analysis on no one. A recipe of the analysis alone (`run
    --auto`'s shared analysis, a profile that asks for the report) runs it."""
    if profile is None:
        return None
    prune, quantize = profile.step("prune"), profile.step("quantize")
    if quantize is not None and quantize.settings.get("keep_sensitive"):
        return None
    if prune is None:
        if quantize is None:
            return None
        return (
            f"nothing in {profile.name}'s recipe reads the scores (no prune step, quantize keeps no sensitive linears); "
            "`vcompress analyze` writes the sensitivity report"
        )
    if not prune.settings.get("auto"):
        return None
    before = predict(config, profile)
    if missed(before, profile):
        return None
    return f"the unpruned model meets every budget of {profile.name} ({_figures(before)}): prune auto removes nothing, so nothing is ranked"


def _scheme(profile: Profile) -> str:
    q = profile.quantization_for()
    return "fp32" if q.method == "none" else f"{q.bits}-bit weights"


def pruned_nothing(folder: Path | str | None) -> bool:
    """True when `folder` is a prune stage's output whose budget plan removed nothing."""
    path = Path(folder) / PRUNE_PLAN if folder is not None else None
    return path is not None and path.is_file() and read_json(path).get("prunes") is False
