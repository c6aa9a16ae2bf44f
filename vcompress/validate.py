"""Validate an artifact against a profile: MMLU accuracy and fidelity to the input model, latency on
the device (measured, or estimated by the roofline when the device is not attached), and a verdict
with one check per budget. The teacher (input) and student (artifact) are scored by the same code.
"""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

from pydantic import Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vcompress import __version__
from vcompress.core.artifact import RunLayout, write_json
from vcompress.core.errors import InputError, VcompressError
from vcompress.core.export_manifest import MANIFEST, read_manifest
from vcompress.core.models import source_hash, tokenizer_hash, weights_hash
from vcompress.core.profiles import Budgets, Profile
from vcompress.core.scoring import drop_outcome, interval_outcome
from vcompress.core.stage import Stage, StageConfig
from vcompress.core.units import UNIT


class ValidateConfig(StageConfig):
    runs: int = Field(5, gt=0, description="timed runs (the median is reported)")
    warmup: int = Field(1, ge=0, description="untimed runs before the timed ones")
    decode_tokens: int = Field(64, gt=0, description="tokens decoded per timed run")
    threads: int | None = Field(None, gt=0, description="runtime threads (default: the profile's device.threads)")
    batch_size: int = Field(8, gt=0, description="MMLU prompts scored per forward pass")
    device: str | None = Field(
        None,
        description="registered device that gives latency (default: the profile's connection, "
        "or the roofline estimate when that device is not attached)",
        json_schema_extra={"registry": "DEVICES"},
    )
    connection: dict[str, Any] = Field(default_factory=dict, description="device settings over the profile's connection (host, serial...)")


class ValidateStage(Stage):
    name = "validate"
    folder = "06-validate"
    produces = ""
    Config = ValidateConfig

    @classmethod
    def from_profile(cls, settings: dict, profile: Profile, where: str | None = None) -> ValidateStage:
        stage = cls(cls.parse_config(settings, where))
        try:  # the device and its settings are checked now, not after every compression stage has run
            stage.device(profile, probe=False)
            from vcompress.devices import target_isa_device

            emulated = target_isa_device(profile)
            if emulated is not None:
                emulated.require_tools()
        except InputError as e:
            raise InputError(f"{where}: {e}" if where else str(e)) from None
        return stage

    def device(self, profile: Profile, *, probe: bool = True):
        """The latency device: the configured one, else the profile's connection (probed for a phone or board
        when `probe`, falling back to the roofline estimate when it is not attached)."""
        from vcompress.devices import open_device

        cfg: ValidateConfig = self.config
        name = cfg.device or (None if probe else profile.device.connection.kind)
        overrides = {
            "runs": cfg.runs,
            "warmup": cfg.warmup,
            "decode_tokens": cfg.decode_tokens,
            "threads": cfg.threads or profile.device.threads,
            **cfg.connection,
        }
        return open_device(name, profile, **overrides)

    def run(self, ctx) -> dict:
        from vcompress.devices import measure_on
        from vcompress.evaluate import Evaluator

        profile: Profile = ctx.profile
        if profile is None:
            raise InputError("validate needs a profile (its budgets and device); pass --profile")
        cfg: ValidateConfig = self.config
        ev = profile.evaluation
        evaluator = Evaluator(
            subset=ev.subset,
            shots=ev.shots,
            per_subject=ev.per_subject,
            mmlu=ctx.mmlu,
            data=ctx.data,
            seed=ev.seed,
            batch_size=cfg.batch_size,
            threads=cfg.threads,  # this machine scores the answers: all its cores unless told, not the device's count
            format=ev.format,
            cache=True,
            log=ctx.log,
            progress=ctx.progress,
            open_kwargs={"intake": ctx.intake},
        )
        ctx.tokenizer_used = _artifact_tokenizer(ctx)
        try:
            report = evaluator.evaluate(model=str(ctx.source), reference=ctx.reference)
        finally:
            evaluator.close()
        ctx.log("measuring latency")
        latency = measure_on(self.device(profile), ctx.source)
        evaluation = eval_summary(report)
        isa = target_isa(ctx, profile)
        checks = budget_checks(profile.budgets, evaluation, latency, isa)
        verdict = {
            "profile": profile.name,
            "device": latency.get("device"),
            "backend": latency.get("backend"),
            "runtime": latency.get("runtime"),  # what ran the latency figures: for ONNX folders, onnxruntime_genai
            **host_beside_profile(latency.get("host"), profile),
            "format": profile.target.format,
            "artifact": Path(ctx.source).name,
            "model": {
                "label": report.get("reference", {}).get("model") or str(ctx.reference or "default"),
                "hash": source_hash(ctx.reference),
            },
            "artifact_hash": weights_hash(ctx.source),
            "export_check": {k: v for k, v in read_manifest(ctx.source).items() if k in EXPORT_CHECK},  # parity, where it ran
            "passed": all(c["passed"] for c in checks),
            "checks": checks,
            "calibrated_on": sorted({a for c in checks for a in c.get("calibrated_on") or []}),  # what the estimates rest on
            "target_isa": isa,
            "accuracy": {"teacher": evaluation["teacher"]["accuracy"], "student": evaluation["student"]["accuracy"], "unit": "fraction"},
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "vcompress": __version__,
        }
        write_json(ctx.out / RunLayout.EVAL, {**evaluation, "report": report})
        write_json(ctx.out / RunLayout.LATENCY, latency)
        write_json(ctx.out / RunLayout.VERDICT, verdict)
        metrics = {
            "passed": verdict["passed"],
            "failed": [c["budget"] for c in checks if not c["passed"]],
            "latency_source": latency.get("source"),
            "device": latency.get("device"),
        }
        if "estimate" in latency:
            metrics["roofline_check"] = latency["estimate"]
        return metrics


def target_isa(ctx, profile: Profile) -> dict | None:
    """The artifact on the device's own build of its runtime (emulated), where the profile budgets it and the device's
    architecture is not this machine's; a check that cannot run here says why (its `error`)."""
    from vcompress.devices import target_isa_device

    device = target_isa_device(profile)
    if device is None:
        return None
    ctx.log(f"checking the artifact on the {profile.device.arch} build of its runtime (emulated)")
    try:
        return device.check(ctx.source, log=ctx.log)
    except VcompressError as e:
        return {"arch": profile.device.arch, "loads": None, "error": str(e)}


def isa_check(limit: float, isa: dict) -> dict:
    """min_target_isa_agreement: top-1 agreement of the target's build with the artifact's float-activation reference
    (where its format has one; else with this machine's build), the rest said beside it. Not the two builds with each
    other: each rounds activations its own way, so their disagreements add up and a target build exactly as faithful
    as this machine's would fail (docs/emulated.md, "What the budget compares")."""
    value = ((isa.get("reference") or {}).get("target") or isa.get("logits") or {}).get("top1_agreement")
    check = {"budget": "min_target_isa_agreement", "limit": limit, "value": value, "unit": "fraction", "source": "emulated"}
    check["device"] = isa.get("device")
    check["passed"] = bool(isa.get("loads") and value is not None and value >= limit)
    check["why"] = isa_summary(isa)
    return check


def isa_summary(isa: dict) -> str:
    """One line: "aarch64 build of onnxruntime_genai 0.18.0: loads, greedy tokens 5/5 identical, top-1 agreement ..."."""
    runtime = isa.get("runtime") or {}
    name = f"{runtime.get('module')} {runtime.get('version')}" if "module" in runtime else ", ".join(f"{k} {v}" for k, v in runtime.items())
    head = f"{isa.get('arch')} build of {name or 'the runtime'}"
    if not isa.get("loads"):
        return f"{head}: {'does not load: ' if isa.get('loads') is False else 'not checked: '}{isa.get('error')}"
    g, lg = isa["greedy"], isa["logits"]
    differ = [f"{i + 1} at token {p}" for i, p in enumerate(g["first_difference"]) if p is not None]
    host = platform.machine()
    parts = [f"greedy tokens {g['identical']}/{g['prompts']} identical to {host}" + (f" (prompt {', '.join(differ)})" if differ else "")]
    if ref := isa.get("reference"):
        t, h = ref["target"], ref["host"]
        parts.append(
            f"top-1 agreement with the float reference {t['top1_agreement']:.3f} over {lg['positions']} positions "
            f"(max |logit diff| {t['max_abs_diff']:.2g}; {host} build {h['top1_agreement']:.3f}, {h['max_abs_diff']:.2g}), "
            f"with the {host} build {lg['top1_agreement']:.3f}"
        )
    else:
        parts.append(
            f"top-1 agreement {lg['top1_agreement']:.3f} with {host} over {lg['positions']} positions (max |logit diff| {lg['max_abs_diff']:.2g})"
        )
    if isa.get("mmlu"):
        m = isa["mmlu"]
        parts.append(
            f"MMLU answers {m['agree']}/{m['n']} agree with {host} ({m['agreement']:.3f}, 95% CI {m['ci95'][0]:.2f} to {m['ci95'][1]:.2f})"
        )
    seconds, steps = isa.get("seconds") or {}, isa.get("emulated_seconds") or {}
    split = ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
    parts.append(
        f"{seconds.get('emulated', 0):.0f} s emulated{f' ({split})' if split else ''} on {isa.get('cpu')} "
        f"({' '.join(f for f in isa.get('cpu_features', []) if f in ISA_SHOWN)})"
    )
    return f"{head}: loads, " + ", ".join(parts)


ISA_SHOWN = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "svei8mm")  # the features int8/fp kernels pick by


def host_beside_profile(host: dict | None, profile: Profile) -> dict:
    """The machine that measured (bench.py's fingerprint; none for an estimate or a phone) and how it differs from
    the profile's device: ISA features that pick other kernels, fewer cores than the profile's threads."""
    if not host:
        return {}
    from vcompress.devices.fingerprint import differences

    device = profile.device
    return {"host": host, "host_differs": differences(host, device.isa, device.threads)}


def print_host(verdict: dict, console: Console) -> None:
    """The fingerprint line of a measured verdict, and the profile's device beside it when they differ."""
    host = verdict.get("host")
    if not host:
        return
    from vcompress.devices.fingerprint import describe

    console.print(f"measured on: {describe(host)} [fingerprint {host.get('id')}]", soft_wrap=True, highlight=False, markup=False)
    if verdict.get("host_differs"):
        console.print(
            f"[yellow]the profile's device {escape(str(verdict.get('device')))} differs[/yellow]: {escape('; '.join(verdict['host_differs']))}; "
            "these figures are this host's, not the profile's device's",
            soft_wrap=True,
            highlight=False,
        )


def _artifact_tokenizer(ctx) -> dict | None:
    """The tokenizer the artifact is scored with: the files an export ships beside its model, else the intake's."""
    folder = Path(ctx.source)
    if (folder / MANIFEST).is_file():
        return {"path": str(folder), "sha256": tokenizer_hash(folder)}
    ctx.read_source()
    return ctx.tokenizer_used


EXPORT_CHECK = ("parity", "fidelity", "checked_on", "tensorrt_ready", "engine_note", "placement")  # what an export says of itself


def eval_summary(report: dict) -> dict:
    """The figures the budgets need, from an Evaluator report with a reference: accuracies with their intervals
    per subject and per vertical domain, and the drop judged on the paired outcomes (teacher and student answer
    the same questions), in the format the profile chose (its prompt and normalisation written out)."""
    student, teacher = report["mmlu"], report["reference"]["mmlu"]
    text = report.get("text", {})
    ppl, ref_ppl = text.get("perplexity"), text.get("reference_perplexity")
    return {
        "subset": report["subset"],
        "shots": report["shots"],
        "per_subject": report["per_subject"],
        "n": report["questions"],
        "format": report["format"],
        "teacher": {k: teacher[k] for k in ("accuracy", "ci95", "n", "subjects", "domains")},
        "student": {k: student[k] for k in ("accuracy", "ci95", "n", "subjects", "domains")},
        "drop": report["drop"],
        "answer_agreement": report["agreement"]["agreement"],
        "answer_kl_mean": report["agreement"]["kl_mean"],
        "perplexity": {"teacher": ref_ppl, "student": ppl, "rise_pct": (ppl / ref_ppl - 1) * 100 if ppl and ref_ppl else None},
        "top1_agreement": text.get("top1_agreement"),
        "kl_mean": text.get("kl_mean"),
        # where a backend scores the text apart from the answers (an NPU's arithmetic in emulation): what and on how much
        **({"text": {k: text.get(k) for k in ("scored_on", "tokens", "against_cpu_ep", "fallback")}} if text.get("scored_on") else {}),
        "answers_on": (report.get("runtime") or {}).get("backend"),
    }


LATENCY_BUDGETS = {  # budget -> (latency.json figure, unit, True when the figure must stay at or below the limit)
    "max_model_size_mb": ("model_size_mb", UNIT, True),
    "max_peak_ram_mb": ("peak_rss_mb", UNIT, True),
    "max_ttft_ms": ("ttft_ms", "ms", True),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "tokens/s", False),
}


def budget_checks(budgets: Budgets, evaluation: dict, latency: dict, isa: dict | None = None) -> list[dict]:
    """One check per budget: the limit, the figure, its unit and where it came from."""

    def check(budget, limit, value, unit, source, ok, **extra):
        return {
            "budget": budget,
            "limit": limit,
            "value": _round(value),
            "unit": unit,
            "source": source,
            "passed": bool(value is not None and ok),
            **extra,
        }

    drop = evaluation["drop"]
    drop_result, drop_why = drop_outcome(drop, budgets.max_mmlu_drop_points)
    rise = evaluation["perplexity"]["rise_pct"]
    agreement = evaluation["answer_agreement"]
    return [
        *(latency_check(budget, getattr(budgets, budget), latency, budgets.prompt_tokens) for budget in LATENCY_BUDGETS),
        check(
            "max_mmlu_drop_points",
            budgets.max_mmlu_drop_points,
            drop["points"],
            "points",
            "measured",
            drop_result == "pass",
            n=evaluation["n"],
            ci95=[_round(x) for x in drop["ci95"]],
            result=drop_result,
            why=drop_why + (f"; answers scored on {evaluation['answers_on']}" if evaluation.get("text") else ""),
            format=evaluation["format"]["name"],
        ),
        check(
            "max_perplexity_rise_pct",
            budgets.max_perplexity_rise_pct,
            rise,
            "%",
            "measured",
            rise is not None and rise <= budgets.max_perplexity_rise_pct,
            **({"why": text_why(evaluation)} if evaluation.get("text") else {}),
        ),
        check(
            "min_answer_agreement",
            budgets.min_answer_agreement,
            agreement,
            "fraction",
            "measured",
            agreement is not None and agreement >= budgets.min_answer_agreement,
            n=evaluation["n"],
        ),
        *([isa_check(budgets.min_target_isa_agreement, isa)] if isa is not None and budgets.min_target_isa_agreement is not None else []),
    ]


def text_why(evaluation: dict) -> str:
    """The text measures and what scored them: perplexity, top-1 agreement with the source, positions, backend."""
    text, ppl = evaluation["text"], evaluation["perplexity"]
    line = (
        f"perplexity {_end(_round(ppl['student']))} vs {_end(_round(ppl['teacher']))}, top-1 agreement "
        f"{_end(_round(evaluation['top1_agreement']))} with the source over {text['tokens']} positions, on {text['scored_on']}"
    )
    if check := text.get("against_cpu_ep"):
        line += (
            f" (against the CPU EP on the same {check['positions']} positions: top-1 agreement {check['top1_agreement']:.3f}, "
            f"max |logit diff| {check['max_abs_diff']:.3g})"
        )
    return line + (f"; {text['fallback']}" if text.get("fallback") else "")


def latency_check(budget: str, limit: float, latency: dict, prompt_tokens: int) -> dict:
    """A size, RAM or speed budget on its latency.json figure. A measured figure passes or fails on its value; an
    estimated one on its band (`interval_outcome`): it passes only when the pessimistic end meets the limit and
    fails when even the optimistic end misses it, otherwise it is undecided until measured on the device."""
    key, unit, at_most = LATENCY_BUDGETS[budget]
    fig = latency.get(key) or {}
    value, source = fig.get("value"), fig.get("source", latency.get("source"))
    low, high = fig.get("low", value), fig.get("high", value)
    optimistic, pessimistic = (low, high) if at_most else (high, low)

    def meets(x):
        return x is not None and (x <= limit if at_most else x >= limit)

    result = interval_outcome(meets(optimistic), meets(pessimistic)) if value is not None else "fail"
    out = {"budget": budget, "limit": limit, "value": _round(value), "unit": unit, "source": source, "passed": result == "pass"}
    out.update({k: fig[k] for k in ("device", "samples", "band_pct", "low", "high", "calibrated_on") if k in fig})
    if budget == "max_ttft_ms":
        out["prompt_tokens"] = prompt_tokens
    if result == "undecided":
        out["result"] = result
        out["why"] = (
            f"undecided: measure on the device (estimated {value:g} {unit}, {_end(low)} to {_end(high)} within its band; "
            f"a measurement {'at or below' if at_most else 'at or above'} {limit:g} {unit} passes)"
        )
    return out


def _end(x) -> str:
    return "unknown" if x is None else f"{x:g}"


def print_verdict(verdict: dict, console: Console | None = None) -> None:
    console = console or Console()
    if not verdict:
        console.print("no verdict: the recipe has no validate stage")
        return
    runtime = verdict.get("runtime") or {}
    through = f" through {runtime['module']} {runtime.get('version') or ''}".rstrip() if runtime.get("module") else ""
    table = Table(title=f"verdict: {verdict['profile']} on {verdict.get('device')} ({verdict.get('backend')}{through})")
    for col in ("budget", "limit", "figure", "unit", "source", "result"):
        table.add_column(col)
    for c in verdict["checks"]:
        result = (
            "[green]pass[/green]" if c["passed"] else "[yellow]undecided[/yellow]" if c.get("result") == "undecided" else "[red]FAIL[/red]"
        )
        figure = "n/a" if c["value"] is None else f"{c['value']:g}"
        if c.get("ci95") and c["value"] is not None:  # the accuracy drop, judged on its paired interval
            figure += f" (95% CI {c['ci95'][0]:.2f} to {c['ci95'][1]:.2f})"
        elif c.get("source") == "estimated" and "low" in c and c["value"] is not None:  # an estimate, judged on its band
            figure += f" ({_end(c['low'])} to {_end(c['high'])})"
        table.add_row(c["budget"], f"{c['limit']:g}", figure, c["unit"], check_source(c), result)
    console.print(table)
    for c in verdict["checks"]:
        if c.get("why"):
            what = f" ({c.get('format', 'letter')} MMLU)" if c["budget"] == "max_mmlu_drop_points" else ""
            console.print(f"{c['budget']}{what}: {c['why']}", soft_wrap=True)
    if placement := (verdict.get("export_check") or {}).get("placement"):  # an NPU export: where its nodes were compiled for
        console.print(
            "compiled for the NPU: "
            + ", ".join(
                f"{graph} {p['on_htp']}/{p['nodes']} nodes"
                + (
                    f" (+{p['io_quantization_on_cpu']} quantizing its float inputs and outputs, on the CPU)"
                    if p.get("io_quantization_on_cpu")
                    else ""
                )
                for graph, p in placement.items()
            ),
            soft_wrap=True,
        )
    acc = verdict.get("accuracy", {})
    if acc.get("teacher") is not None:
        console.print(f"MMLU accuracy: teacher {acc['teacher']:.3f}, student {acc['student']:.3f}")
    anchors = sorted({a for c in verdict["checks"] for a in c.get("calibrated_on") or []})
    if anchors:
        console.print("estimates calibrated on: " + ", ".join(anchors), soft_wrap=True)
    console.print(headline(verdict["checks"]), soft_wrap=True)
    print_host(verdict, console)


def check_source(check: dict) -> str:
    """`measured on <device>`, `estimated ±N%` (the band), or what the check says of itself."""
    source = check.get("source") or "?"
    if source != "estimated" and check.get("device"):  # measured, or emulated: on the machine named
        return f"{source} on {check['device']}"
    if source == "estimated" and check.get("band_pct") is not None:
        return f"estimated ±{check['band_pct']:g}%"
    if source == "estimated" and "high" in check and check["high"] is None:
        return "estimated, lower bound only"
    return source


def headline(checks: list[dict]) -> str:
    """PASS (estimated) / PASS (measured) / FAIL: budgets / UNDECIDED (estimated): measure on the device."""
    failed = [c["budget"] for c in checks if not c["passed"] and c.get("result") != "undecided"]
    undecided = [c for c in checks if c.get("result") == "undecided"]
    estimated = any(c.get("source") == "estimated" for c in checks)
    if failed:
        return "[bold red]FAIL[/bold red]: " + ", ".join(failed + [c["budget"] for c in undecided])
    if undecided:
        latency = [c["budget"] for c in undecided if c.get("source") == "estimated"]
        accuracy = [c["budget"] for c in undecided if c.get("source") != "estimated"]
        reasons = ([f"measure on the device ({', '.join(latency)})"] if latency else []) + (
            [f"evaluate more questions ({', '.join(accuracy)})"] if accuracy else []
        )
        return f"[bold yellow]UNDECIDED{' (estimated)' if latency else ''}[/bold yellow]: " + "; ".join(reasons)
    return f"[bold green]PASS ({'estimated' if estimated else 'measured'})[/bold green]"


def _round(value):
    return round(value, 4) if isinstance(value, float) else value
