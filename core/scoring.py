"""Scores over any ids -> logits function, so every stage and backend is scored the same way.

A `LogitsFn` takes a LongTensor [batch, seq] of (right-padded) token ids and returns float logits
[batch, seq, vocab]. It may also accept `attention_mask=` (1 for real tokens) and `positions=`
(a 1-D LongTensor of sequence positions; then it may return only those, [batch, len(positions), vocab]).
Right padding never changes the logits of the real tokens of a causal model, so a function that
takes neither keyword still scores padded batches exactly.

MMLU is scored as lm-eval-harness's `mmlu` task does: same prompt, same tokenization of the
context/continuation pair, same left truncation, prediction = argmax of the continuation log-probs.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .data import LETTERS, Question
from .stage import Progress, no_progress, track

LogitsFn = Callable[..., torch.Tensor]

DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)


def torch_logits_fn(model) -> LogitsFn:
    """An ids -> logits function for a transformers causal LM (no cache, no grad)."""

    @torch.no_grad()
    def run(ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        kwargs = {"attention_mask": attention_mask.to(device)} if attention_mask is not None else {}
        if positions is not None:  # the LM head only where asked: saves its matmul and the memory of full logits
            kwargs["logits_to_keep"] = positions.to(device)
        return model(input_ids=ids.to(device), use_cache=False, **kwargs).logits.float().cpu()

    return run


def _keywords(fn: LogitsFn) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {"attention_mask", "positions"}
    return {p.name for p in params}


def call_logits(fn: LogitsFn, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, len(positions) or seq, vocab], passing only the keywords `fn` takes."""
    accepted = _keywords(fn)
    kwargs = {}
    if attention_mask is not None and "attention_mask" in accepted:
        kwargs["attention_mask"] = attention_mask
    if positions is not None and "positions" in accepted:
        kwargs["positions"] = positions
    logits = fn(ids, **kwargs)
    if positions is not None and "positions" not in kwargs:
        logits = logits[:, positions]
    return logits.float()


# --- text: perplexity, top-1 agreement, KL ---------------------------------------------


@torch.no_grad()
def text_fidelity(logits_fn: LogitsFn, blocks: torch.Tensor, reference_fn: LogitsFn | None = None, batch_size: int = 1,
                  *, progress: Progress = no_progress, label: str = "held-out text") -> dict:
    """Perplexity on [N, T] blocks; with a reference, also top-1 next-token agreement and mean KL(ref || model).

    Every position but the last of each block predicts the next token.
    """
    nll_sum, count, agree, kl_sum = 0.0, 0, 0, 0.0
    ref_nll_sum = 0.0
    with_reference = reference_fn is not None
    for ids in track(blocks.split(batch_size), label, progress):
        logits = call_logits(logits_fn, ids)[:, :-1]
        targets = ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if with_reference:
            ref_logp = F.log_softmax(call_logits(reference_fn, ids)[:, :-1], dim=-1)
            ref_nll_sum += -ref_logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0).sum().item()  # >= 0 but for rounding
    out = {"perplexity": math.exp(nll_sum / count), "tokens": count}
    if with_reference:
        out.update(
            reference_perplexity=math.exp(ref_nll_sum / count),
            top1_agreement=agree / count,
            kl_mean=kl_sum / count,
        )
    return out


def perplexity(logits_fn: LogitsFn, blocks: torch.Tensor, batch_size: int = 1) -> float:
    return text_fidelity(logits_fn, blocks, batch_size=batch_size)["perplexity"]


class Judge:
    """A student measured against its reference, with the same figures under the same names in every stage.

    The reference's side is taken once, when the judge is made: its MMLU answer log-probs and (with
    `keep_logits`, for a reference that changes afterwards, as quantize's does in place) its logits
    on the held-out blocks. Either part is left out when there are no blocks or no questions.
    """

    def __init__(self, reference_fn: LogitsFn, blocks: torch.Tensor | None = None, *, tokenizer=None,
                 questions: Sequence[Question] | None = None, keep_logits: bool = True, progress: Progress = no_progress):
        self.reference_fn, self.blocks, self.tokenizer, self.progress = reference_fn, blocks, tokenizer, progress
        self.questions = list(questions or [])
        self.logits = None
        if keep_logits and blocks is not None:
            self.logits = [call_logits(reference_fn, ids) for ids in track(blocks.split(1), "reference logits", progress)]
        self.answers = mmlu_logprobs(reference_fn, tokenizer, self.questions, progress=progress, label="MMLU reference") if self.questions else None

    def reference_logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            return call_logits(self.reference_fn, ids)
        for block, logits in zip(self.blocks.split(1), self.logits):
            if torch.equal(block, ids):
                return logits
        raise KeyError("not one of this judge's held-out blocks")

    @torch.no_grad()
    def score(self, logits_fn: LogitsFn) -> dict:
        """perplexity {reference, student, rise_pct}, top-1 next-token agreement, mean KL(reference || student)
        and tokens on the held-out blocks; answer agreement, its 95% interval, answer KL and questions on MMLU."""
        out = {"perplexity": None, "top1_agreement": None, "kl_mean": None, "tokens": 0,
               "answer_agreement": None, "answer_ci95": None, "answer_kl_mean": None, "questions": 0}
        if self.blocks is not None:
            text = text_fidelity(logits_fn, self.blocks, self.reference_logits, progress=self.progress)
            reference, student = text["reference_perplexity"], text["perplexity"]
            out.update(perplexity={"reference": reference, "student": student, "rise_pct": 100 * (student / reference - 1)},
                       top1_agreement=text["top1_agreement"], kl_mean=text["kl_mean"], tokens=text["tokens"])
        if self.answers is not None:
            answers = answer_agreement(mmlu_logprobs(logits_fn, self.tokenizer, self.questions, progress=self.progress), self.answers)
            out.update(answer_agreement=answers["agreement"], answer_ci95=answers["ci95"], answer_kl_mean=answers["kl_mean"],
                       questions=answers["n"])
        return out


# --- MMLU prompts -----------------------------------------------------------------------


def format_question(q: Question) -> str:
    """lm-eval's doc_to_text for mmlu: the question, four lettered choices, then "Answer:"."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def mmlu_prompt(q: Question, exemplars: Sequence[Question] = ()) -> str:
    """Description, k answered exemplars (each followed by a blank line), then the question."""
    shots = "".join(f"{format_question(e)} {e.letter}\n\n" for e in exemplars)
    return DESCRIPTION.format(subject=q.subject.replace("_", " ")) + shots + format_question(q)


def exemplars_for(dev: Sequence[Question] | None, subject: str, shots: int) -> list[Question]:
    """The first k dev questions of the subject (lm-eval's `first_n` sampler)."""
    if shots <= 0:
        return []
    if shots > 5:
        raise ValueError(f"shots must be 0..5, got {shots}")
    pool = [q for q in dev or () if q.subject == subject]
    if len(pool) < shots:
        from .errors import InputError

        raise InputError(f"{shots}-shot needs {shots} dev questions for {subject}, found {len(pool)}; use fewer --shots or an MMLU copy with dev/")
    return pool[:shots]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the way lm-eval's HFLM makes them: encode the whole, cut at the context length.

    Like lm-eval, the tokenizer adds its own special tokens (a BOS where it is configured to).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class _Request:
    row: int  # question index
    column: int | None  # letter index; None = all four letters from one position
    ids: list[int]  # model input
    targets: list[int]  # continuation ids (column set) or the four letter ids (column None)


def _requests(tokenizer, prompts: list[str], max_length: int | None) -> list[_Request]:
    requests = []
    for row, prompt in enumerate(prompts):
        pairs = [encode_pair(tokenizer, prompt, c) for c in CONTINUATIONS]
        if not all(cont for _, cont in pairs):
            raise ValueError(f"the tokenizer merges an answer letter into the prompt of question {row}; it cannot be scored as lm-eval does")
        if all(len(cont) == 1 for _, cont in pairs) and all(ctx == pairs[0][0] for ctx, _ in pairs):
            whole = pairs[0][0] + pairs[0][1]
            ids = whole[-(max_length + 1):][:-1] if max_length else whole[:-1]
            requests.append(_Request(row, None, ids, [cont[0] for _, cont in pairs]))
            continue
        for column, (ctx, cont) in enumerate(pairs):
            whole = ctx + cont
            ids = whole[-(max_length + 1):][:-1] if max_length else whole[:-1]
            requests.append(_Request(row, column, ids, cont))
    return requests


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _batches(requests: list[_Request], batch_size: int, max_tokens: int):
    """Consecutive runs of longest-first requests; the first of each sets the padded width."""
    batch: list[_Request] = []
    for request in requests:
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * len(batch[0].ids) > max_tokens):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


@torch.no_grad()
def mmlu_logprobs(logits_fn: LogitsFn, tokenizer, questions: Sequence[Question], *, shots: int = 0,
                  dev: Sequence[Question] | None = None, batch_size: int = 8, max_length: int | None = None,
                  max_batch_tokens: int = 2048, progress: Progress = no_progress, label: str = "MMLU") -> torch.Tensor:
    """[N, 4] log-probabilities of " A".." D" after each question's lm-eval mmlu prompt.

    When the tokenizer makes each continuation one token, one forward per question reads all
    four from the last position; otherwise each continuation is scored in full (sum of its
    token log-probs). Requests run longest first in batches of similar length, right-padded,
    at most `batch_size` prompts and `max_batch_tokens` padded tokens each (a backend that returns
    full logits holds batch x length x vocab floats).
    `max_length` truncates on the left as lm-eval does (the model's context size).
    """
    prompts = [mmlu_prompt(q, exemplars_for(dev, q.subject, shots)) for q in questions]
    requests = _requests(tokenizer, prompts, max_length)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    out = torch.full((len(questions), 4), float("nan"))
    pad = _pad_id(tokenizer)
    done = 0
    progress(label, done, len(requests))
    for batch in _batches([requests[i] for i in order], batch_size, max_batch_tokens):
        width = len(batch[0].ids)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, request in enumerate(batch):
            ids[b, : len(request.ids)] = torch.tensor(request.ids)
            mask[b, : len(request.ids)] = 1
        # Only the positions that predict a continuation token are read.
        wanted = sorted({len(r.ids) - k for r in batch for k in range(1, (len(r.targets) if r.column is not None else 1) + 1)})
        positions = torch.tensor(wanted, dtype=torch.long)
        where = {p: i for i, p in enumerate(wanted)}
        logp = F.log_softmax(call_logits(logits_fn, ids, mask, positions), dim=-1)
        for b, request in enumerate(batch):
            n = len(request.ids)
            if request.column is None:
                out[request.row] = logp[b, where[n - 1], request.targets]
            else:
                first = n - len(request.targets)
                out[request.row, request.column] = sum(
                    logp[b, where[first + j], token].item() for j, token in enumerate(request.targets))
        done += len(batch)
        progress(label, done, len(requests))
    return out


# --- MMLU summaries -------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (stays inside [0, 1], sane at 0 and n)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends, not 1 - 1e-16
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def _accuracy(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else None, "ci95": [low, high], "correct": correct, "n": n}


def predictions(logprobs: torch.Tensor) -> list[int]:
    return logprobs.argmax(-1).tolist()


def mmlu_summary(logprobs: torch.Tensor, questions: Sequence[Question]) -> dict:
    """Accuracy overall and per subject, each with a 95% Wilson interval and its n."""
    predicted = predictions(logprobs)
    hits: dict[str, list[int]] = {}
    for q, p in zip(questions, predicted):
        hits.setdefault(q.subject, []).append(int(p == q.answer))
    total = sum(sum(h) for h in hits.values())
    letters = {letter: predicted.count(i) for i, letter in enumerate(LETTERS)}
    return {
        **_accuracy(total, len(questions)),
        "predicted_letters": letters,
        "subjects": {s: _accuracy(sum(h), len(h)) for s, h in sorted(hits.items())},
    }


def answer_agreement(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> dict:
    """How often the model picks the reference's answer, and the mean KL(reference || model)
    of the 4-way answer distributions (softmax over the four log-probs)."""
    if logprobs.shape != reference_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(logprobs.shape)} vs {tuple(reference_logprobs.shape)}")
    n = logprobs.shape[0]
    model = F.log_softmax(logprobs.double(), dim=-1)
    ref = F.log_softmax(reference_logprobs.double(), dim=-1)
    agree = int((model.argmax(-1) == ref.argmax(-1)).sum())
    kl = (ref.exp() * (ref - model)).sum(-1).clamp_min(0.0)
    low, high = wilson_interval(agree, n)
    return {"agreement": agree / n if n else None, "ci95": [low, high], "agree": agree, "n": n,
            "kl_mean": float(kl.mean()) if n else None, "kl_max": float(kl.max()) if n else None}
