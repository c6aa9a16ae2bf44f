"""vcompress distill: train a pruned student on its teacher's next-token distributions."""

from __future__ import annotations

import click
from rich.console import Console

from vcompress.commands._options import (
    force_option,
    intake_options,
    json_option,
    mmlu_option,
    out_option,
    print_json,
    seed_option,
    stage_command,
    subset_option,
)


@stage_command("distill", config="vcompress.compress.distill:DistillConfig")
@click.option(
    "--teacher",
    type=str,
    default=None,
    help="The uncompressed model (HF folder, .gguf, LoRA adapter, hf:org/name); default: the embedded SmolLM2-135M-Instruct.",
)
@click.option("--student", type=str, required=True, help="The pruned model to train; it must share the teacher's tokenizer.")
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Domain file: JSONL instruction/input/output, prompt/completion or text; CSV prompt,completion or text. Default: MMLU text outside --subset.",
)
@out_option()
@subset_option("The evaluated MMLU subset: answer agreement uses it, default training text avoids it.")
@mmlu_option
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the last checkpoint of an interrupted run with the same settings; ends with the weights one run would give.",
)
@seed_option
@force_option
@intake_options
@json_option
def distill_command(settings, student, out, as_json, **options):
    """Distill TEACHER into STUDENT: KL on next-token distributions (+ optional CE and hidden-state MSE).

    Writes an HF checkpoint folder to --out with metrics.json: validation KL and perplexity before and
    after, tokens/s, steps, and MMLU answer agreement with the teacher.
    """
    from vcompress.compress._distributed import launched_rank
    from vcompress.compress.distill import distill
    from vcompress.progress import progress_bars

    console = Console(stderr=True)
    main_rank = launched_rank() == 0  # under torchrun/accelerate launch, rank 0 alone prints
    with progress_bars(quiet=as_json or not main_rank, console=console) as progress:
        log = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
        metrics = distill(student, out, config=settings, log=log, progress=progress, **options)
    if not main_rank:
        return
    if as_json:
        print_json(metrics)
    elif metrics.get("skipped"):
        click.echo(f"wrote {out}: distillation skipped ({metrics['skipped']})")
    else:
        echo_distilled(out, metrics)


def echo_distilled(out, metrics: dict) -> None:
    before, after = metrics["before"], metrics
    val, val_before = after["validation"], before["validation"]
    lines = [
        f"wrote {out}: {metrics['steps']} steps, {metrics['tokens_per_s']:,.0f} tokens/s on {metrics['device']} ({metrics['stopped_by']})",
        f"validation KL {val_before['kl_mean']:.4f} -> {val['kl_mean']:.4f} nats/token; perplexity "
        f"{val_before['perplexity']['student']:.2f} -> {val['perplexity']['student']:.2f} (teacher {val['perplexity']['reference']:.2f})",
    ]
    if after["perplexity"]:
        lines.append(
            f"held-out KL {before['kl_mean']:.4f} -> {after['kl_mean']:.4f}; perplexity {before['perplexity']['student']:.2f} "
            f"-> {after['perplexity']['student']:.2f} (teacher {after['perplexity']['reference']:.2f})"
        )
    if after["answer_agreement"] is not None:
        lines.append(
            f"MMLU answer agreement with the teacher {before['answer_agreement']:.3f} -> {after['answer_agreement']:.3f} (n={after['questions']})"
        )
    click.echo("\n".join(lines))
