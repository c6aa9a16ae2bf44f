"""Teacher-student distillation: win back, on the teacher's own outputs, what pruning cost.

Loss = kl_weight * T^2 * KL(teacher_T || student_T) on next-token distributions at temperature T
     + ce_weight * cross-entropy on the next token
     + hidden_weight * MSE between student layer outputs and the teacher layers they came from.

The loop is resumable bit for bit: a checkpoint (every `save_every` steps, in the stage's work
folder) holds the student, optimizer, schedule, RNG states and the step; batches are a pure
function of (seed, step), so a resumed run sees the same data in the same order.

Under `torchrun` or `accelerate launch` (compress/_distributed.py) every rank trains on its slice of the
same global batch (batch_size stays the global micro-batch); reported losses are global means, rank 0
alone writes checkpoints, scores and writes the stage folder, and any world size resumes a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from vcompress.core.artifact import METRICS, read_json, read_metrics, write_json
from vcompress.core.data import pack, texts_for
from vcompress.core.errors import InputError
from vcompress.core.models import Intake, attention_shape, save_model
from vcompress.core.scoring import Judge, torch_logits_fn
from vcompress.core.seeding import seeded
from vcompress.core.stage import Progress, Stage, StageConfig, StageContext, execute, no_progress

from . import _distributed
from ._distributed import Ranks
from ._judge import judge_of
from .prune_plan import pruned_nothing

CHECKPOINT = "checkpoint.pt"
BEFORE = "before.json"


class DistillConfig(StageConfig):
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the KL term (the KL is scaled by T^2)")
    kl_weight: float = Field(1.0, ge=0, description="weight of the KL divergence to the teacher's next-token distribution")
    ce_weight: float = Field(0.0, ge=0, description="weight of cross-entropy on the next token")
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of hidden-state MSE between student layers and the teacher layers they came from"
    )
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup: int = Field(10, ge=0, description="linear warm-up steps before the cosine decay")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip: float = Field(1.0, ge=0, description="max gradient norm; 0 turns clipping off")
    seq_len: int = Field(256, ge=8, description="tokens per packed block")
    batch_size: int = Field(4, ge=1, description="blocks per micro-batch; the global batch under torchrun or accelerate launch")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default one pass over the data (or what fits max_minutes)")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget for training; makes runs non-reproducible")
    save_every: int = Field(50, ge=1, description="checkpoint (and validate) every N steps, for --resume")
    eval_every: int | None = Field(None, ge=1, description="validation KL every N steps; default save_every")
    patience: int = Field(3, ge=1, description="stop after this many validations without a lower KL")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the packed blocks held out for validation KL")
    val_blocks: int = Field(4, ge=1, description="fewest validation blocks")
    max_blocks: int = Field(4096, ge=1, description="training blocks kept after packing")
    eval_blocks: int = Field(8, ge=1, description="held-out blocks for the before/after perplexity")
    eval_per_subject: int = Field(5, ge=0, description="MMLU questions per subject for answer agreement; 0 skips it")
    distributed: Literal["auto", "ddp", "fsdp", "none"] = Field(
        "auto",
        description="under torchrun or accelerate launch: DDP or FSDP over the processes (auto: DDP, FSDP when accelerate's config asks)",
    )


class Distill(Stage):
    """Student = the stage's source (the pruned model); teacher = the reference (the uncompressed model)."""

    name = "distill"
    folder = "03-distill"
    Config = DistillConfig
    needs = ("prune", "distillation needs a pruned student")

    def run(self, ctx: StageContext) -> dict:
        cfg: DistillConfig = self.config
        ranks = _distributed.setup(cfg.distributed)
        if cfg.batch_size % ranks.world:
            raise InputError(f"batch size {cfg.batch_size} does not split over {ranks.world} processes; use a multiple of {ranks.world}")
        if pruned_nothing(ctx.source):  # the student is the teacher: nothing to win back
            ctx.log("skipped: the prune step removed nothing (its prune_plan.json), so the student is the teacher unchanged")
            student, tokenizer = ctx.load()
            if ranks.main:
                save_model(student, tokenizer, ctx.out)
            return {"skipped": "the prune step removed nothing", "student": str(ctx.source), "teacher": str(ctx.reference or "default")}
        device = ranks.device
        teacher, tokenizer = ctx.load(ctx.reference)
        student, student_tokenizer = ctx.load()
        check_same_vocab(teacher, tokenizer, student, student_tokenizer)
        layer_map = student_layer_map(ctx.source, teacher, student) if cfg.hidden_weight else None
        if layer_map is not None:
            ctx.log(f"hidden-state loss maps student layers to teacher layers {layer_map}")
        train, val = build_blocks(ctx.data, tokenizer, cfg, seed=ctx.seed, subset=ctx.subset, mmlu=ctx.mmlu, log=ctx.log)
        teacher.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        student.to(device)
        where = device.type if ranks.world == 1 else f"{ranks.world} {device.type} processes ({ranks.mode.upper()})"
        ctx.log(f"distilling on {where}: {train.shape[0]} training and {val.shape[0]} validation blocks of {cfg.seq_len} tokens")

        # The teacher stays loaded: the held-out judge reruns it rather than hold its logits; the
        # validation judge keeps them, since every validation during training reads them.
        # Rank 0 alone scores the student before and after; every rank validates during training.
        judge = None
        if ranks.main:
            judge = judge_of(
                teacher, tokenizer, ctx, blocks=cfg.eval_blocks, seq_len=cfg.seq_len, per_subject=cfg.eval_per_subject, keep_logits=False
            )
        validation = Judge(torch_logits_fn(teacher), val, progress=ctx.progress)
        before = _stored_before(ctx.work, ctx.resume)
        if before is None and ranks.main:
            before = evaluate(student, judge, validation)
            write_json(ctx.work / BEFORE, before)
        trainer = Trainer(
            student,
            teacher,
            train,
            val,
            cfg,
            device=device,
            seed=ctx.seed,
            work=ctx.work,
            teacher_val_logits=validation.logits,
            layer_map=layer_map,
            log=ctx.log,
            progress=ctx.progress,
            ranks=ranks,
        )
        summary = trainer.fit(resume=ctx.resume)
        if ranks.mode == "fsdp":  # the trained weights are sharded: gather them into a fresh copy on rank 0
            state = _distributed.model_state(student, ranks)
            if ranks.main:
                student, _ = ctx.load()
                student.to(device)
                student.load_state_dict(state)
        if not ranks.main:
            return summary
        after = evaluate(student, judge, validation)
        student.to("cpu", dtype=torch.float32)
        save_model(student, student_tokenizer, ctx.out)
        return {
            "teacher": str(ctx.reference) if ctx.reference else "default",
            "student": str(ctx.source) if ctx.source else "default",
            "device": device.type,
            "processes": ranks.world,
            "distributed": ranks.mode,
            **summary,
            **after,  # the distilled student against the teacher
            "before": before,  # the student as it came in
        }


def distill(
    student,
    out,
    *,
    teacher=None,
    data=None,
    config: DistillConfig | dict | None = None,
    seed: int = 0,
    force: bool = False,
    resume: bool = False,
    mmlu=None,
    subset="medical",
    log=print,
    progress: Progress = no_progress,
    intake: Intake | None = None,
) -> dict:
    """Distill `teacher` (None: the embedded default) into `student`; write an HF folder to `out`.

    `progress("distill", step, total)` is called after every optimizer step (and its checkpoint, if any).
    """
    out = Path(out)
    stage = Distill(config)
    ranks = _distributed.setup(stage.config.distributed)
    if not ranks.main:  # rank 0 speaks for the job
        log, progress = (lambda _: None), no_progress
    if resume and (out / METRICS).is_file() and not force:
        log(f"{out} is already complete; nothing to resume")
        return read_metrics(out)
    context = dict(
        reference=teacher,
        data=data,
        seed=seed,
        resume=resume,
        mmlu=mmlu,
        subset=subset,
        log=log,
        progress=progress,
        intake=intake or Intake(),
    )
    if ranks.main:
        metrics = execute(stage, out, source=student, force=force, **context)
    else:  # the same run, writing nothing: rank 0 owns the stage folder and the checkpoints
        if out.exists() and not force:
            raise InputError(f"{out} already exists; pass --force to replace it (or --resume in a run)")
        with seeded(seed):
            metrics = stage.run(StageContext(source=student, out=out, work=out.parent / f".{out.name}.work", **context))
    ranks.barrier()  # the others wait until rank 0 has put the stage folder in place
    return metrics


# --- checks --------------------------------------------------------------------------------


def check_same_vocab(teacher, teacher_tokenizer, student, student_tokenizer) -> None:
    t_size, s_size = teacher.config.vocab_size, student.config.vocab_size
    if t_size != s_size or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise InputError(
            f"teacher and student do not share a tokenizer vocabulary (vocab sizes {t_size} and {s_size}); "
            "distill into a student pruned from the teacher, or pass the teacher it came from"
        )


def student_layer_map(student_source, teacher, student) -> list[int]:
    """Teacher layer index for each student layer: the prune stage's record, else spread evenly."""
    t_shape, s_shape = attention_shape(teacher.config), attention_shape(student.config)
    if t_shape["hidden_size"] != s_shape["hidden_size"]:
        raise InputError(
            f"hidden-state loss needs equal hidden sizes (teacher {t_shape['hidden_size']}, student {s_shape['hidden_size']}); "
            "set --hidden-weight 0"
        )
    t_layers, s_layers = t_shape["layers"], s_shape["layers"]
    recorded = _recorded_layer_map(student_source)
    if recorded is not None:
        if len(recorded) != s_layers or not all(isinstance(i, int) and 0 <= i < t_layers for i in recorded):
            raise InputError(
                f"the layer map recorded with the student ({recorded}) does not fit {s_layers} student and "
                f"{t_layers} teacher layers; re-run the prune stage, or set --hidden-weight 0"
            )
        return list(recorded)
    return [round((i + 1) * t_layers / s_layers) - 1 for i in range(s_layers)]


def _recorded_layer_map(source) -> list[int] | None:
    """The source layer of each kept layer, from the prune stage's metrics.json beside the student."""
    path = Path(source) / METRICS if source is not None else None
    if path is None or not path.is_file():
        return None
    record = read_json(path)
    if isinstance(record.get("layer_map"), list):
        return record["layer_map"]
    kept = (record.get("heads") or {}).get("kept_per_layer")
    if isinstance(kept, list) and kept and all(isinstance(k, dict) and "source_layer" in k for k in kept):
        return [k["source_layer"] for k in kept]
    layers = record.get("layers") or {}
    if isinstance(layers.get("dropped"), list) and isinstance(layers.get("count"), list) and layers["count"]:
        return [i for i in range(layers["count"][0]) if i not in layers["dropped"]]
    return None


# --- data ----------------------------------------------------------------------------------


def build_blocks(data, tokenizer, cfg: DistillConfig, *, seed: int, subset, mmlu, log) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation blocks [N, seq_len]; records go to one side by a seeded shuffle."""
    texts = texts_for(data, tokenizer, part="calib", exclude=subset, mmlu=mmlu, log=log)
    if len(texts) < 2:
        raise InputError(f"{data}: distillation needs at least 2 records (one for validation); add records")
    order = list(range(len(texts)))
    random.Random(f"distill-split:{seed}").shuffle(order)
    n_val = max(1, round(len(texts) * cfg.val_fraction))
    val_texts, train_texts = [texts[i] for i in order[:n_val]], [texts[i] for i in order[n_val:]]
    try:
        val = pack(val_texts, tokenizer, cfg.seq_len, cfg.val_blocks)
        train = pack(train_texts, tokenizer, cfg.seq_len, cfg.max_blocks)
    except InputError as e:
        raise InputError(f"{e} (validation split: {n_val} of {len(texts)} records)") from None
    return train, val


def batch_indices(micro_step: int, batch_size: int, n_blocks: int, seed: int) -> list[int]:
    """Block indices of one micro-batch: a pure function of the position, so a resume sees the same order.

    Every epoch is a fresh seeded permutation of the training blocks.
    """
    out = []
    for item in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(item, n_blocks)
        out.append(int(_permutation(seed, epoch, n_blocks)[offset]))
    return out


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    key = (seed, epoch, n)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 8:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return _PERMUTATIONS[key]


# --- loss ----------------------------------------------------------------------------------


def distill_loss(
    student_out, teacher_out, ids: torch.Tensor, cfg: DistillConfig, layer_map: list[int] | None = None
) -> tuple[torch.Tensor, dict]:
    """The weighted loss and its parts (floats) for one batch of student and teacher outputs."""
    t = cfg.temperature
    s_logits, t_logits = student_out.logits.float(), teacher_out.logits.float()
    vocab = s_logits.shape[-1]
    s_logp = F.log_softmax(s_logits.view(-1, vocab) / t, dim=-1)
    t_logp = F.log_softmax(t_logits.view(-1, vocab) / t, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t
    loss = cfg.kl_weight * kl
    parts = {"kl": kl.item()}
    if cfg.ce_weight:
        ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss = loss + cfg.ce_weight * ce
        parts["ce"] = ce.item()
    if cfg.hidden_weight and layer_map is not None:
        s_hidden, t_hidden = student_out.hidden_states, teacher_out.hidden_states
        mse = sum(F.mse_loss(s_hidden[i + 1].float(), t_hidden[j + 1].float()) for i, j in enumerate(layer_map)) / len(layer_map)
        loss = loss + cfg.hidden_weight * mse
        parts["hidden_mse"] = mse.item()
    return loss, parts


class Schedule:
    """Linear warm-up, then cosine to zero at `total` steps (`total` may be set after the first steps)."""

    def __init__(self, warmup: int, total: int | None):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if not self.total:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- the loop ------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        student,
        teacher,
        train: torch.Tensor,
        val: torch.Tensor,
        cfg: DistillConfig,
        *,
        device,
        seed: int,
        work: Path,
        teacher_val_logits: list[torch.Tensor],
        layer_map=None,
        log=print,
        progress: Progress = no_progress,
        ranks: Ranks | None = None,
    ):
        self.student, self.teacher, self.train, self.val, self.cfg = student, teacher, train, val, cfg
        self.device, self.seed, self.work, self.layer_map, self.log, self.progress = device, seed, Path(work), layer_map, log, progress
        self.ranks = ranks or Ranks(device=torch.device(device))
        self.model = _distributed.wrap(student, self.ranks)  # what trains: the student, or DDP/FSDP around it
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        epoch_steps = math.ceil(train.shape[0] / (cfg.batch_size * cfg.grad_accum))
        # With only a time budget, the cosine's length is fixed from the speed of the first steps.
        total = cfg.max_steps or (None if cfg.max_minutes else epoch_steps)
        self.schedule = Schedule(cfg.warmup, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.eval_every = cfg.eval_every or cfg.save_every
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.best_kl, self.best_step, self.bad_evals, self.best_state = math.inf, 0, 0, None
        self.history: list[dict] = []
        self.losses: list[float] = []  # training loss per optimizer step, the mean over every rank's slice
        self.data_hash = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()[:16]
        self.teacher_val_logits = teacher_val_logits  # one [1, seq, vocab] per validation block

    def fit(self, resume: bool = False) -> dict:
        checkpoint = self.work / CHECKPOINT
        if resume and checkpoint.is_file():
            self._load(checkpoint)
            self.log(f"resumed from {checkpoint} at step {self.step}")
        else:
            if resume:
                self.log(f"no checkpoint in {self.work}: starting from step 0")
            if checkpoint.is_file() and self.ranks.main:
                self.log(f"starting over: ignoring the checkpoint in {self.work} (pass --resume to continue it)")
                checkpoint.unlink()
            torch.manual_seed(self.seed)
            random.seed(self.seed)
            np.random.seed(self.seed % 2**32)
        stopped = self._loop()
        if self.best_state is not None and self.best_step != self.step:
            _distributed.load_model_state(self.student, self.best_state, self.ranks)
        return {
            "steps": self.step,
            "stopped_by": stopped,
            "best_step": self.best_step,
            "train_tokens": self.tokens,
            "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.tokens / max(self.train_seconds, 1e-9), 1),
            "learning_rate_peak": self.cfg.lr,
            "validation_history": self.history,
            "train_loss": self.losses,
        }

    def _loop(self) -> str:
        cfg = self.cfg
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.student.train()
        stopped = "steps_done"
        while self.schedule.total is None or self.step < self.schedule.total:
            started = time.perf_counter()
            self.losses.append(self._optimizer_step())
            # rank 0's clock decides for every rank, so they stop at the same step
            self.train_seconds = self.ranks.broadcast(self.train_seconds + time.perf_counter() - started)
            if self.schedule.total is None and self.step >= 2:
                per_step = self.train_seconds / self.step
                self.schedule.total = max(self.step, int(0.9 * budget_s / per_step))
            if self.step % self.eval_every == 0 and self._validate():
                stopped = "early_stop"
            if self.step % cfg.save_every == 0 or stopped == "early_stop":
                self._save(self.work / CHECKPOINT)
            if self.schedule.total is not None:  # a time budget sets it after the first steps
                self.progress("distill", self.step, self.schedule.total)
            if stopped == "early_stop":
                break
            if self.train_seconds >= budget_s:
                stopped = "max_minutes"
                break
        self.progress("distill", self.step, self.step)  # stopped early or not, training is over
        if not self.history or self.history[-1]["step"] != self.step:
            self._validate()
        self.student.eval()
        return stopped

    def _optimizer_step(self) -> float:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        share = cfg.batch_size // self.ranks.world  # this rank's slice of the global micro-batch
        for micro in range(cfg.grad_accum):
            index = batch_indices(self.step * cfg.grad_accum + micro, cfg.batch_size, self.train.shape[0], self.seed)
            ids = self.train[index[self.ranks.rank * share : (self.ranks.rank + 1) * share]].to(self.device)
            hidden = bool(cfg.hidden_weight and self.layer_map)
            # DDP averages gradients over the ranks (the gradient of the global mean loss), on the last micro-batch only
            sync = self.model.no_sync() if self.ranks.mode == "ddp" and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    with torch.no_grad():
                        t_out = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                    s_out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                    loss, _ = distill_loss(s_out, t_out, ids, cfg, self.layer_map)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            self.tokens += ids.numel() * self.ranks.world
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return self.ranks.mean(total)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _validate(self) -> bool:
        """Validation KL(teacher || student) at temperature 1; True when patience has run out."""
        self.student.eval()
        kl_sum, count = 0.0, 0
        for ids, t_logits in zip(self.val.split(1), self.teacher_val_logits):
            with self._autocast():
                logits = self.student(input_ids=ids.to(self.device), use_cache=False).logits
            s_logp = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            t_logp = F.log_softmax(t_logits[:, :-1].float(), dim=-1)
            kl_sum += (t_logp.exp() * (t_logp - s_logp)).sum().item()
            count += t_logp.shape[1]
        self.student.train()
        kl = self.ranks.broadcast(kl_sum / count)  # every rank scores the same weights; rank 0's figure decides
        self.history.append({"step": self.step, "kl_mean": round(kl, 5)})
        self.log(f"step {self.step}: validation KL {kl:.4f} nats/token")
        if kl < self.best_kl:
            self.best_kl, self.best_step, self.bad_evals = kl, self.step, 0
            self.best_state = _distributed.model_state(self.student, self.ranks)
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.cfg.patience

    # --- checkpoints: everything that decides the next step, so a resume ends where one run would

    def _save(self, path: Path) -> None:
        """Rank 0 writes the full state (under FSDP every rank takes part in gathering it)."""
        student = self.student.state_dict() if self.ranks.mode != "fsdp" else _distributed.model_state(self.student, self.ranks)
        optimizer = _distributed.optimizer_state(self.student, self.optimizer, self.ranks)
        if not self.ranks.main:
            return
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "student": student,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "best": {
                "kl": self.best_kl,
                "step": self.best_step,
                "bad_evals": self.bad_evals,
                "state": self.best_state if self.best_step != self.step else None,
            },
            "history": self.history,
            "losses": self.losses,
            "rng": _rng_state(),
            "identity": self._identity(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it and start over without --resume") from None
        if state["identity"] != self._identity():
            raise InputError(
                f"checkpoint {path} was made with other settings or data; rerun with the same ones, or drop --resume to start over"
            )
        _distributed.load_model_state(self.student, state["student"], self.ranks)
        _distributed.load_optimizer_state(self.student, self.optimizer, state["optimizer"], self.ranks)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        best = state["best"]
        self.best_kl, self.best_step, self.bad_evals = best["kl"], best["step"], best["bad_evals"]
        self.best_state = best["state"]
        if self.best_step == self.step:  # saved without a copy: the best weights are the current ones
            self.best_state = _distributed.model_state(self.student, self.ranks)
        self.history, self.losses = state["history"], state.get("losses", [])
        _set_rng_state(state["rng"])

    def _identity(self) -> dict:
        settings = self.cfg.model_dump(exclude={"max_steps", "max_minutes", "save_every", "eval_per_subject", "eval_blocks", "distributed"})
        return {"seed": self.seed, "data": self.data_hash, **{k: str(v) for k, v in settings.items()}}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


# --- before / after ------------------------------------------------------------------------


def _stored_before(work: Path, resume: bool) -> dict | None:
    path = Path(work) / BEFORE
    if resume and path.is_file() and (Path(work) / CHECKPOINT).is_file():
        return read_json(path)
    return None


@torch.no_grad()
def evaluate(student, judge: Judge, validation: Judge) -> dict:
    """The student against the teacher: held-out text and MMLU answers, and the validation blocks under "validation"."""
    was_training = student.training
    student.eval()
    fn = torch_logits_fn(student)
    out = {**judge.score(fn), "validation": validation.score(fn)}
    student.train(was_training)
    return out
