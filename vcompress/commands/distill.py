"""vcompress distill: train a pruned student on its teacher's next-token distributions."""

from __future__ import annotations

import click
from rich.console import Console

from vcompress.commands._options import force_option, intake_options, json_option, mmlu_option, out_option, print_json, seed_option


@click.command("distill")
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
@click.option(
    "--temperature", type=float, default=2.0, show_default=True, help="Softmax temperature of the KL term (the KL is scaled by T^2)."
)
@click.option("--kl-weight", type=float, default=1.0, show_default=True)
@click.option("--ce-weight", type=float, default=0.0, show_default=True, help="Weight of cross-entropy on the next token.")
@click.option(
    "--hidden-weight",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of hidden-state MSE between student layers and the teacher layers they came from.",
)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Linear warm-up steps before the cosine decay.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Max gradient norm (0: no clipping).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per packed block.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Blocks per micro-batch.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: one pass over the data, or what fits --max-minutes).")
@click.option(
    "--max-minutes",
    type=float,
    default=None,
    help="Training time budget. Runs cut by time are NOT reproducible (the step count depends on speed).",
)
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint (and validate) every N steps, for --resume.")
@click.option("--eval-every", type=int, default=None, help="Validation KL every N steps (default: --save-every).")
@click.option("--patience", type=int, default=3, show_default=True, help="Stop after this many validations without a lower KL.")
@click.option(
    "--eval-per-subject",
    type=int,
    default=5,
    show_default=True,
    help="MMLU questions per subject of --subset for answer agreement with the teacher (0: skip).",
)
@click.option(
    "--subset",
    type=str,
    default="medical",
    show_default=True,
    help="The evaluated MMLU subset: answer agreement uses it, default training text avoids it.",
)
@mmlu_option
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the last checkpoint of an interrupted run with the same settings; ends with the weights one run would give.",
)
@click.option(
    "--distributed",
    type=click.Choice(["auto", "ddp", "fsdp", "none"]),
    default="auto",
    show_default=True,
    help="Under torchrun or accelerate launch: DDP or FSDP over the processes (auto: DDP, FSDP when accelerate's config asks). "
    "--batch-size stays the global batch.",
)
@seed_option
@force_option
@intake_options
@json_option
def command(
    teacher,
    student,
    data,
    out,
    temperature,
    kl_weight,
    ce_weight,
    hidden_weight,
    lr,
    warmup,
    grad_accum,
    clip,
    seq_len,
    batch_size,
    max_steps,
    max_minutes,
    save_every,
    eval_every,
    patience,
    eval_per_subject,
    subset,
    mmlu,
    resume,
    distributed,
    seed,
    force,
    intake,
    as_json,
):
    """Distill TEACHER into STUDENT: KL on next-token distributions (+ optional CE and hidden-state MSE).

    Writes an HF checkpoint folder to --out with metrics.json: validation KL and perplexity before and
    after, tokens/s, steps, and MMLU answer agreement with the teacher.
    """
    from vcompress.compress._distributed import launched_rank
    from vcompress.compress.distill import distill
    from vcompress.progress import progress_bars

    config = dict(
        temperature=temperature,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        hidden_weight=hidden_weight,
        lr=lr,
        warmup=warmup,
        grad_accum=grad_accum,
        clip=clip,
        seq_len=seq_len,
        batch_size=batch_size,
        max_steps=max_steps,
        max_minutes=max_minutes,
        save_every=save_every,
        eval_every=eval_every,
        patience=patience,
        eval_per_subject=eval_per_subject,
        distributed=distributed,
    )
    console = Console(stderr=True)
    main_rank = launched_rank() == 0  # under torchrun/accelerate launch, rank 0 alone prints
    with progress_bars(quiet=as_json or not main_rank, console=console) as progress:
        metrics = distill(
            student,
            out,
            teacher=teacher,
            data=data,
            config=config,
            seed=seed,
            force=force,
            resume=resume,
            mmlu=mmlu,
            subset=subset,
            log=lambda m: console.print(m, highlight=False, markup=False),
            progress=progress,
            intake=intake,
        )
    if not main_rank:
        return
    if as_json:
        print_json(metrics)
        return
    if metrics.get("skipped"):
        click.echo(f"wrote {out}: distillation skipped ({metrics['skipped']})")
        return
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
