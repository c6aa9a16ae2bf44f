"""vcompress eval: MMLU-subset accuracy with its interval, and fidelity to a reference model (with the accuracy
drop judged on the paired answers)."""

from __future__ import annotations

import click
from rich.table import Table

from vcompress.commands._options import json_option, make_console, mmlu_option, model_options, print_json, seed_option, subset_option


@click.command("eval")
@model_options
@click.option(
    "--reference",
    type=str,
    default=None,
    help="The uncompressed checkpoint to compare with (agreement, KL, perplexity); `default` = the embedded default.",
)
@subset_option("MMLU group (medical, legal, finance, stem, humanities, social_sciences, other, all), subject, or comma list.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["letter", "cloze"]),
    default="letter",
    show_default=True,
    help='letter: lm-eval\'s mmlu prompt, " A".." D" scored; cloze: lighteval\'s mmlu_cf, each answer\'s text scored per character '
    "(for models that answer the letter prompt near chance).",
)
@click.option(
    "--shots", type=click.IntRange(0, 5), default=0, show_default=True, help="Dev exemplars before each question (lm-eval mmlu prompt)."
)
@click.option(
    "--per-subject", type=click.IntRange(0), default=10, show_default=True, help="Questions per subject, drawn with --seed (0 = all)."
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Held-out text for perplexity (JSONL/CSV/TXT); default: MMLU text outside --subset.",
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for the backend (default: the library's choice).")
@mmlu_option
@seed_option
@json_option
def eval_command(model, intake, reference, subset, fmt, shots, per_subject, data, batch_size, threads, mmlu, seed, as_json):
    """Score a model (HF folder, GGUF, exported artifact) on an MMLU subset as lm-eval's mmlu task (letter) or
    lighteval's mmlu_cf (cloze) does."""
    from vcompress.evaluate import evaluate
    from vcompress.progress import progress_bars

    console = make_console(stderr=True)
    with progress_bars(quiet=as_json, console=console) as progress:
        report = evaluate(
            model,
            reference,
            subset=subset,
            format=fmt,
            shots=shots,
            per_subject=per_subject,
            mmlu=mmlu,
            data=data,
            seed=seed,
            batch_size=batch_size,
            threads=threads,
            progress=progress,
            log=None if as_json else (lambda message: console.print(f"[dim]{message}[/dim]")),
            open_kwargs={"intake": intake},
        )
    if as_json:
        print_json(report)
    else:
        show(report)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _interval(item: dict) -> str:
    low, high = item["ci95"]
    return f"{_pct(low)} - {_pct(high)}"


def show(report: dict) -> None:
    console = make_console()
    mmlu = report["mmlu"]
    n_subjects = len(mmlu["subjects"])
    per = f"{report['per_subject']} per subject, " if report["per_subject"] else "all questions, "
    console.print(
        f"[bold]{report['model']}[/bold] ({report['backend']}) on MMLU {report['subset']}, {report['format']['name']} format, "
        f"{report['shots']}-shot: {mmlu['n']} questions ({per}{n_subjects} subjects, seed {report['seed']})",
        soft_wrap=True,
    )
    console.print(
        f"accuracy [bold]{_pct(mmlu['accuracy'])}[/bold]  (95% CI {_interval(mmlu)}, {mmlu['correct']}/{mmlu['n']})"
        f"   answers given: " + " ".join(f"{k} {v}" for k, v in mmlu["predicted_letters"].items()),
        soft_wrap=True,
    )
    letter, most = max(mmlu["predicted_letters"].items(), key=lambda item: item[1])
    if report["format"]["name"] == "letter" and mmlu["n"] >= 20 and most > 0.6 * mmlu["n"]:
        console.print(
            f"[yellow]{most} of {mmlu['n']} answers are {letter}: this model answers the letter prompt near chance; "
            "--format cloze scores what it knows[/yellow]",
            soft_wrap=True,
        )
    ref = report.get("reference")
    table = Table(title="per subject")
    for column in ("subject", "n", "correct", "accuracy", "95% CI"):
        table.add_column(column, justify="left" if column == "subject" else "right")
    if ref:
        table.add_column("reference", justify="right")
    rows = [*mmlu["subjects"].items(), *((f"{d} (domain)", row) for d, row in mmlu["domains"].items())]
    for subject, row in rows:
        cells = [subject, str(row["n"]), str(row["correct"]), _pct(row["accuracy"]), _interval(row)]
        if ref:
            group = "domains" if subject.endswith(" (domain)") else "subjects"
            cells.append(_pct(ref["mmlu"][group][subject.removesuffix(" (domain)")]["accuracy"]))
        table.add_row(*cells)
    console.print(table)
    if ref:
        agreement, drop, text = report["agreement"], report["drop"], report.get("text", {})
        fidelity = Table(title=f"fidelity to {ref['model']} ({ref['backend']})", show_header=False)
        fidelity.add_row("reference accuracy", f"{_pct(ref['mmlu']['accuracy'])}  (95% CI {_interval(ref['mmlu'])})")
        fidelity.add_row("accuracy drop", _drop(drop))
        for domain, row in drop["domains"].items():
            fidelity.add_row(f"accuracy drop, {domain}", _drop(row))
        fidelity.add_row(
            "answer agreement", f"{_pct(agreement['agreement'])}  (95% CI {_interval(agreement)}, {agreement['agree']}/{agreement['n']})"
        )
        fidelity.add_row("answer KL, mean (max)", f"{agreement['kl_mean']:.4g} ({agreement['kl_max']:.4g}) nats")
        if text:
            fidelity.add_row("held-out perplexity", f"{text['perplexity']:.3f}  (reference {text['reference_perplexity']:.3f})")
            fidelity.add_row("top-1 next-token agreement", _pct(text["top1_agreement"]))
            fidelity.add_row("next-token KL, mean", f"{text['kl_mean']:.4g} nats")
            fidelity.add_row("held-out text", f"{text['source']}: {text['blocks']} x {text['seq_len']} tokens")
        console.print(fidelity)
    elif "text" in report:
        text = report["text"]
        console.print(f"held-out perplexity {text['perplexity']:.3f} on {text['source']} ({text['tokens']} tokens)", soft_wrap=True)


def _drop(drop: dict) -> str:
    low, high = drop["ci95"]
    return (
        f"{drop['points']:+.2f} points  (paired 95% CI {low:+.2f} to {high:+.2f}; reference alone right on {drop['lost']}, "
        f"this model alone on {drop['gained']}, of {drop['n']})"
    )
