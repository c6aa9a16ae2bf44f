"""`vcompress run --auto`: search the prune ratio and bit width for the smallest artifact that
still passes the profile.

The profile's analyze step runs once. Its scores rank the candidates before any of them is built:
each candidate (a fraction of KV groups pruned in every layer, 4- or 8-bit weights) gets an
estimated artifact size and a predicted perplexity rise (the loss changes of the KV groups the
pruner would remove plus, at 4 bits, of every linear rounded, summed as if independent). A
candidate predicted far over the size or perplexity budget is skipped with the reason; the rest
run the profile's recipe with their settings, smallest first, and the first whose verdict passes
is the answer: nothing smaller passed or was worth trying. Estimates only order and prune the
search; every verdict is measured as in a plain run.

RUN/01-analyze        the shared analysis
RUN/candidates/NAME/  one run folder per candidate tried (resumable like any run)
RUN/auto.json         every candidate with its estimates, status and failed budgets, and the winner
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vcompress.core.artifact import RunLayout, write_json
from vcompress.core.errors import InputError, VcompressError
from vcompress.core.models import head_units
from vcompress.core.profiles import Profile
from vcompress.core.units import MIB

# How far over budget a prediction may be and still be tried: distillation wins some of the
# pruning loss back, and summed single-unit deltas are only a first-order guess.
PREDICTION_SLACK = 2.0
MAX_PRUNE_FRACTION = 0.5


@dataclass
class Candidate:
    heads: float
    bits: int
    estimated_mb: float = 0.0
    predicted_ppl_rise_pct: float | None = None
    status: str = "pending"  # pending, skipped, passed, failed, error, not needed
    reason: str = ""
    exit_code: int | None = None  # status error: the exit code of the error that stopped it (2 bad input, 4 refused)
    size_mb: float | None = None
    failed: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"heads{self.heads:.2f}-int{self.bits}"


def candidates(scores: dict, profile: Profile) -> list[Candidate]:
    """Every (prune fraction, bits) pair, with estimates, smallest estimated artifact first. The size is what
    prune auto predicts (compress/prune_plan.py) for the pruned config exported as the candidate's profile says."""
    from vcompress.compress.prune_plan import predict, pruned_config

    kv = head_units(scores["shape"]["query_heads"], scores["shape"]["kv_heads"])
    if "config" not in scores:
        raise InputError("the analysis predates `run --auto`'s size predictions (no config in sensitivity.json); run it again")
    fractions = [round(g / kv, 4) for g in range(kv) if g / kv <= MAX_PRUNE_FRACTION]
    found = []
    for heads in fractions:
        for bits in (4, 8):
            c = Candidate(heads, bits)
            config = pruned_config(scores["config"], kv_groups=round(heads * kv))
            c.estimated_mb = round(predict(config, candidate_profile(profile, c))["stored_bytes"] / MIB, 4)
            c.predicted_ppl_rise_pct = predicted_rise_pct(scores, heads, bits)
            found.append(c)
    return sorted(found, key=lambda c: (c.estimated_mb, -c.bits))


def predicted_rise_pct(scores: dict, heads: float, bits: int) -> float | None:
    """First-order perplexity rise from the analysis: None when the scores needed are missing."""
    delta = 0.0
    if heads:
        if "heads" not in scores:
            return None
        removed = round(heads * head_units(scores["shape"]["query_heads"], scores["shape"]["kv_heads"]))
        delta += sum(sum(sorted(row)[:removed]) for row in scores["heads"]["mask_loss_delta_nats"])
    if bits == 4:
        if "quant" not in scores:
            return None
        delta += sum(max(0.0, d) for row in scores["quant"]["loss_delta_nats"] for d in row)
    return round(100 * (math.exp(delta) - 1), 2)


def candidate_profile(profile: Profile, c: Candidate) -> Profile:
    """The profile's recipe with this candidate's prune fraction and bit width."""
    data = profile.model_dump(mode="json")
    steps = {s["stage"]: s for s in data["recipe"]}
    if c.heads:
        prune = {k: v for k, v in steps.get("prune", {"stage": "prune"}).items() if k != "auto"}  # the candidate fixes the fraction
        steps["prune"] = {**prune, "heads": c.heads}
    else:
        steps.pop("prune", None)
        steps.pop("distill", None)
    steps.setdefault("quantize", {"stage": "quantize"})
    if c.bits == 8:
        data["quantization"].update(method="int8", bits=8)
        steps["quantize"] = {"stage": "quantize"}  # 4-bit grid settings (zero_point...) do not apply
    else:
        data["quantization"].update(
            method=profile.quantization.method if profile.quantization.method in ("gptq", "rtn") else "gptq", bits=4
        )
    data["target"]["quant"] = f"int{c.bits}"
    from vcompress.core.registry import STAGES
    from vcompress.pipeline import load_stages

    load_stages()  # the registered stages' folders give the road's order
    data["recipe"] = sorted(steps.values(), key=lambda step: STAGES.get(step["stage"]).folder)
    return Profile.model_validate(data)


def search(profile: Profile, options, *, where: str = "profile", log: Callable[[str], None] = print, on_stage=None) -> dict:
    """Run the search into options.out; returns auto.json's content (winner's verdict included)."""
    from vcompress import pipeline

    if profile.step("analyze") is None or profile.step("validate") is None:
        raise InputError(
            f"{where}: --auto needs analyze and validate in the profile's recipe (the scores rank the candidates, the verdict decides)"
        )
    from vcompress.compress.sensitivity import Analyze

    out = Path(options.out)
    # run alone, the analyze step would not see the recipe's quantize step, whose grid it ranks the linears on
    analyze = Analyze.from_profile(profile.step("analyze").settings, profile, f"{where}: recipe.analyze").config
    analysis_profile = Profile.model_validate(
        {**profile.model_dump(mode="json"), "recipe": [{"stage": "analyze", **analyze.model_dump(mode="json")}]}
    )
    pipeline.run(analysis_profile, _with(options, out=out), where=where, log=log, on_stage=on_stage)
    analysis = RunLayout(out).folder("analyze")
    scores = json.loads((analysis / "sensitivity.json").read_text())
    found = candidates(scores, profile)
    budget = profile.budgets
    winner = None
    for c in found:
        if winner is not None:
            c.status = "not needed"
            continue
        if c.estimated_mb > PREDICTION_SLACK * budget.max_model_size_mb:
            c.status, c.reason = "skipped", f"estimated {c.estimated_mb:.0f} MiB, budget {budget.max_model_size_mb:g} MiB"
        elif c.predicted_ppl_rise_pct is not None and c.predicted_ppl_rise_pct > PREDICTION_SLACK * budget.max_perplexity_rise_pct:
            c.status, c.reason = (
                "skipped",
                f"predicted perplexity +{c.predicted_ppl_rise_pct:.1f}%, budget +{budget.max_perplexity_rise_pct:g}%",
            )
        else:
            winner = _try(c, profile, analysis, out, options, where, log, on_stage)
        log(f"auto: {c.name}: {c.status}{' (' + c.reason + ')' if c.reason else ''}")
        write_json(RunLayout(out).auto_json, _summary(found, winner))
    summary = _summary(found, winner)
    write_json(RunLayout(out).auto_json, summary)
    return summary


def _try(c: Candidate, profile: Profile, analysis: Path, out: Path, options, where, log, on_stage) -> Candidate | None:
    from vcompress import pipeline

    folder = RunLayout(out).candidates / c.name
    if not (folder / analysis.name).is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(analysis, folder / analysis.name)
    log(
        f"auto: trying {c.name} (estimated {c.estimated_mb:.0f} MiB, predicted perplexity "
        f"{f'+{c.predicted_ppl_rise_pct:.1f}%' if c.predicted_ppl_rise_pct is not None else 'n/a'})"
    )
    try:
        verdict = pipeline.run(
            candidate_profile(profile, c),
            _with(options, out=folder, resume=True, from_stage=None, force=False, record=False),
            where=f"{where} [{c.name}]",
            log=log,
            on_stage=on_stage,
        )
    except VcompressError as e:  # one candidate the toolchain cannot build does not end the search
        c.status, c.reason, c.exit_code = "error", str(e), e.exit_code
        return None
    size = next((ch for ch in verdict.get("checks", []) if ch["budget"] == "max_model_size_mb"), None)
    c.size_mb = size["value"] if size else None
    c.failed = [ch["budget"] for ch in verdict.get("checks", []) if not ch["passed"]]
    c.status = "passed" if verdict.get("passed") else "failed"
    c.reason = "" if c.status == "passed" else "failed: " + ", ".join(c.failed)
    return c if c.status == "passed" else None


def no_winner_error(summary: dict) -> VcompressError | None:
    """Why a search without a winner is not a verdict: when a candidate stopped on an error (bad input, a refused
    export), "no candidate passed" was never established, so the run exits with that error's code (the highest
    of them), not with 1. None when every candidate tried reached a verdict or was ruled out by the estimates."""
    stopped = [c for c in summary["candidates"] if c["status"] == "error"]
    if summary["winner"] or not stopped:
        return None
    worst = max(stopped, key=lambda c: c["exit_code"] or 0)
    error = VcompressError(
        f"no candidate passed, and {len(stopped)} stopped on an error before a verdict, e.g. {worst['name']}: {worst['reason']}"
    )
    error.exit_code = worst["exit_code"] or 2
    return error


def _summary(found: list[Candidate], winner: Candidate | None) -> dict:
    return {
        "winner": winner.name if winner else None,
        "winner_folder": f"candidates/{winner.name}" if winner else None,
        "candidates": [{"name": c.name, **asdict(c)} for c in found],
    }


def _with(options, **changes):
    from dataclasses import replace

    return replace(options, **changes)
