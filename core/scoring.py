"""Scores over any ids -> logits function, so every stage and backend is scored the same way.

A `LogitsFn` takes a LongTensor [batch, seq] of (right-padded) token ids and returns float logits
[batch, seq, vocab]. It may also accept `attention_mask=` (1 for real tokens) and `positions=`
(a 1-D LongTensor of sequence positions; then it may return only those, [batch, len(positions), vocab]).
Right padding never changes the logits of the real tokens of a causal model, so a function that
takes neither keyword still scores padded batches exactly.

MMLU comes in two formats, tokenized and truncated the same way (lm-eval's context/continuation pairs):
- letter: lm-eval-harness's `mmlu` task (the lettered choices in the prompt, " A".." D" scored);
- cloze: lighteval's `mmlu_cf` (the question alone, each answer's own text scored, normalised by its length
  in characters), which small models answer above chance where they answer the letter prompt with one letter.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import GROUPS, LETTERS, Question
from .errors import InputError
from .models import cache_dir
from .stage import Progress, no_progress, track

LogitsFn = Callable[..., torch.Tensor]
ContinuationFn = Callable[[list, list], "list[list[torch.Tensor]] | None"]  # Runner.continuation_logits

DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)
CLOZE_DESCRIPTION = "The following are questions about {subject}.\n"
FORMATS = {  # what eval.json says about each format: the prompt, what is scored, how the answer is picked
    "letter": {
        "as": "lm-eval-harness mmlu",
        "prompt": "The following are multiple choice questions (with answers) about <subject>.\n\n"
        "<question>\nA. <choice A>\nB. <choice B>\nC. <choice C>\nD. <choice D>\nAnswer:",
        "continuations": '" A", " B", " C", " D"',
        "score": "log-probability of the continuation's tokens",
    },
    "cloze": {
        "as": "lighteval mmlu_cf, the formulation SmolLM2's model card reports",
        "prompt": "The following are questions about <subject>.\nQuestion: <question>\nAnswer:",
        "continuations": '" <answer text>" for each of the four answers',
        "score": "log-probability of the continuation's tokens divided by the answer text's length in characters "
        "(the leading space not counted: lighteval's acc_norm_nospace)",
    },
}
DOMAINS = ("medical", "legal", "finance")  # the vertical-domain groups eval.json reports on their own
Z95 = 1.959964


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


def call_logits(
    fn: LogitsFn, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
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
def text_fidelity(
    logits_fn: LogitsFn,
    blocks: torch.Tensor,
    reference_fn: LogitsFn | None = None,
    batch_size: int = 1,
    *,
    progress: Progress = no_progress,
    label: str = "held-out text",
) -> dict:
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

    def __init__(
        self,
        reference_fn: LogitsFn,
        blocks: torch.Tensor | None = None,
        *,
        tokenizer=None,
        questions: Sequence[Question] | None = None,
        keep_logits: bool = True,
        progress: Progress = no_progress,
    ):
        self.reference_fn, self.blocks, self.tokenizer, self.progress = reference_fn, blocks, tokenizer, progress
        self.questions = list(questions or [])
        self.logits = None
        if keep_logits and blocks is not None:
            self.logits = [call_logits(reference_fn, ids) for ids in track(blocks.split(1), "reference logits", progress)]
        self.answers = (
            mmlu_logprobs(reference_fn, tokenizer, self.questions, progress=progress, label="MMLU reference") if self.questions else None
        )

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
        out = {
            "perplexity": None,
            "top1_agreement": None,
            "kl_mean": None,
            "tokens": 0,
            "answer_agreement": None,
            "answer_ci95": None,
            "answer_kl_mean": None,
            "questions": 0,
        }
        if self.blocks is not None:
            text = text_fidelity(logits_fn, self.blocks, self.reference_logits, progress=self.progress)
            reference, student = text["reference_perplexity"], text["perplexity"]
            out.update(
                perplexity={"reference": reference, "student": student, "rise_pct": 100 * (student / reference - 1)},
                top1_agreement=text["top1_agreement"],
                kl_mean=text["kl_mean"],
                tokens=text["tokens"],
            )
        if self.answers is not None:
            answers = answer_agreement(mmlu_logprobs(logits_fn, self.tokenizer, self.questions, progress=self.progress), self.answers)
            out.update(
                answer_agreement=answers["agreement"],
                answer_ci95=answers["ci95"],
                answer_kl_mean=answers["kl_mean"],
                questions=answers["n"],
            )
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


def cloze_question(q: Question) -> str:
    """lighteval's mmlu_cloze_prompt query: the question as given, no choices."""
    return f"Question: {q.question}\nAnswer:"


def cloze_prompt(q: Question, exemplars: Sequence[Question] = ()) -> str:
    """The description once, k exemplars each with its answer's text and a blank line, then the question."""
    shots = "".join(f"{cloze_question(e)} {e.choices[e.answer]}\n\n" for e in exemplars)
    return CLOZE_DESCRIPTION.format(subject=q.subject.replace("_", " ")) + shots + cloze_question(q)


def prompt_and_continuations(q: Question, exemplars: Sequence[Question] = (), format: str = "letter") -> tuple[str, tuple[str, ...]]:
    """The prompt and the four continuations scored after it, in the given format."""
    if format == "letter":
        return mmlu_prompt(q, exemplars), CONTINUATIONS
    if format == "cloze":
        return cloze_prompt(q, exemplars), tuple(f" {choice}" for choice in q.choices)
    raise ValueError(f"unknown MMLU format {format!r}; choose one of: {', '.join(FORMATS)}")


def exemplars_for(dev: Sequence[Question] | None, subject: str, shots: int) -> list[Question]:
    """The first k dev questions of the subject (lm-eval's `first_n` sampler)."""
    if shots <= 0:
        return []
    if shots > 5:
        raise ValueError(f"shots must be 0..5, got {shots}")
    pool = [q for q in dev or () if q.subject == subject]
    if len(pool) < shots:
        raise InputError(
            f"{shots}-shot needs {shots} dev questions for {subject}, found {len(pool)}; use fewer --shots or an MMLU copy with dev/"
        )
    return pool[:shots]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the way lm-eval's HFLM makes them: encode the whole, cut at the context length.

    Like lm-eval, the tokenizer adds its own special tokens (a BOS where it is configured to). Where the whole
    is no longer than the context alone (the answer merges into the prompt's last token), the cut leaves no
    continuation, which lm-eval cannot score (its HFLM asserts one): the continuation is then encoded alone,
    without special tokens, and scored after the context's ids.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :] or tokenizer.encode(continuation, add_special_tokens=False)


@dataclass
class _Request:
    row: int  # question index
    column: int | None  # answer index; None = all four answers (one token each) from one position
    ids: list[int]  # model input
    targets: list[int]  # continuation ids (column set) or the four answers' ids (column None)
    prefix: int | None = None  # column set and not truncated: ids[:prefix] is the context, shared by the row's answers


def _requests(tokenizer, items: list[tuple[str, Sequence[str]]], max_length: int | None) -> list[_Request]:
    requests = []
    for row, (prompt, continuations) in enumerate(items):
        pairs = [encode_pair(tokenizer, prompt, c) for c in continuations]
        if not all(ctx and cont for ctx, cont in pairs):
            raise InputError(
                f"the tokenizer encodes MMLU question {row} or one of its answers to no tokens, so it cannot be scored; "
                "use the model's own tokenizer (--tokenizer PATH)"
            )
        if all(len(cont) == 1 for _, cont in pairs) and all(ctx == pairs[0][0] for ctx, _ in pairs):
            whole = pairs[0][0] + pairs[0][1]
            ids = whole[-(max_length + 1) :][:-1] if max_length else whole[:-1]
            requests.append(_Request(row, None, ids, [cont[0] for _, cont in pairs]))
            continue
        for column, (ctx, cont) in enumerate(pairs):
            whole = ctx + cont
            ids = whole[-(max_length + 1) :][:-1] if max_length else whole[:-1]
            requests.append(_Request(row, column, ids, cont, len(ctx) if len(ids) == len(whole) - 1 else None))
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
def mmlu_logprobs(
    logits_fn: LogitsFn,
    tokenizer,
    questions: Sequence[Question],
    *,
    shots: int = 0,
    dev: Sequence[Question] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    format: str = "letter",
    progress: Progress = no_progress,
    label: str = "MMLU",
    continuation_fn: ContinuationFn | None = None,
) -> torch.Tensor:
    """[N, 4] answer scores, the prediction being their argmax: for `letter`, the log-probabilities of
    " A".." D" after each question's lm-eval mmlu prompt; for `cloze`, each answer text's log-probability
    after the lighteval mmlu_cf prompt divided by its length in characters.

    When the tokenizer makes each continuation one token, one forward per question reads all
    four from the last position; otherwise each continuation is scored in full (sum of its
    token log-probs). Requests run longest first in batches of similar length, right-padded,
    at most `batch_size` prompts and `max_batch_tokens` padded tokens each (a backend that returns
    full logits holds batch x length x vocab floats).
    `max_length` truncates on the left as lm-eval does (the model's context size).
    With a `continuation_fn` (a Runner's `continuation_logits`), the answers of one question that share
    an untruncated context are scored after one run of it instead (the same figures, ~3x fewer tokens).
    """
    items = [prompt_and_continuations(q, exemplars_for(dev, q.subject, shots), format) for q in questions]
    requests = _requests(tokenizer, items, max_length)
    out = torch.full((len(questions), 4), float("nan"))
    pad = _pad_id(tokenizer)
    done, total = 0, len(requests)  # the total stays the first count: the prefix-shared rows leave `requests` below
    progress(label, done, total)
    if continuation_fn is not None:
        rows: dict[int, list[_Request]] = {}
        for request in requests:
            rows.setdefault(request.row, []).append(request)
        scored = set()
        shared = sorted((r for r, group in rows.items() if _shares_prefix(group)), key=lambda r: -_packed_length(rows[r]))
        for start in range(0, len(shared), batch_size):
            batch = [rows[row] for row in shared[start : start + batch_size]]
            scores = _score_after_prefix(continuation_fn, batch)
            if scores is None:  # not on this backend: scored in full below
                break
            for group, row_scores in zip(batch, scores):
                for request, score in zip(group, row_scores):
                    out[request.row, request.column] = score
                scored.add(group[0].row)
                done += len(group)
            progress(label, done, total)
        requests = [r for r in requests if r.row not in scored]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
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
                out[request.row, request.column] = sum(logp[b, where[first + j], token].item() for j, token in enumerate(request.targets))
        done += len(batch)
        progress(label, done, total)
    if format == "cloze":
        out /= torch.tensor([[max(1, len(choice)) for choice in q.choices] for q in questions], dtype=out.dtype)
    return out


def _shares_prefix(group: list[_Request]) -> bool:
    first = group[0]
    return (
        len(group) > 1
        and all(r.prefix is not None and r.prefix == first.prefix for r in group)
        and all(r.ids[: r.prefix] == first.ids[: first.prefix] for r in group)
    )


def _packed_length(group: list[_Request]) -> int:
    """A question's context and its answers' tokens: what a shared-prefix run feeds (batches of similar ones pad least)."""
    return group[0].prefix + sum(len(r.targets) - 1 for r in group)


def _score_after_prefix(continuation_fn: ContinuationFn, groups: list[list[_Request]]) -> list[list[float]] | None:
    """Each answer's summed log-probability, each question's context run once and shared (None: not supported)."""
    prefixes = [torch.tensor(group[0].ids[: group[0].prefix]) for group in groups]
    logits = continuation_fn(prefixes, [[torch.tensor(r.targets) for r in group] for group in groups])
    if logits is None:
        return None
    scores = []
    for group, answers in zip(groups, logits):
        row = []
        for request, answer in zip(group, answers):
            logp = F.log_softmax(answer.float(), dim=-1)
            row.append(logp[torch.arange(len(request.targets)), torch.tensor(request.targets)].sum().item())
        scores.append(row)
    return scores


# --- the answer cache: one model's answers to one question set, kept across stages and runs ----


def answers_cache_dir() -> Path:
    return cache_dir() / "answers"


# The code that turns a model into answers: the prompts, the question sets and the scoring. A change to either
# file may change the answers, so their bytes are part of the cache key (a release's version would miss edits).
SCORING_SOURCES = (Path(__file__), Path(__file__).with_name("data.py"))


def scoring_code_hash() -> str:
    digest = hashlib.sha256()
    for source in SCORING_SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def cached_mmlu_logprobs(model: dict | None, logits_fn: LogitsFn, tokenizer, questions: Sequence[Question], **options) -> torch.Tensor:
    """`mmlu_logprobs`, kept under the cache dir when `model` (what identifies the scored model) is given.

    `model` names everything outside this call that changes the answers: the weights' sha256, config.json's, the
    tokenizer files', the backend and its runtime with versions, the vcompress version. The key adds the scoring
    code's hash, the tokenizer's size, every prompt and continuation scored (so the question set, the format, the
    shots and their exemplars) and the truncation.
    """
    if not model:
        return mmlu_logprobs(logits_fn, tokenizer, questions, **options)
    fmt, shots = options.get("format", "letter"), options.get("shots", 0)
    items = [prompt_and_continuations(q, exemplars_for(options.get("dev"), q.subject, shots), fmt) for q in questions]
    key = [model, scoring_code_hash(), len(tokenizer), options.get("max_length"), items]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    path = answers_cache_dir() / f"{fmt}-{shots}shot-{len(questions)}q-{digest.hexdigest()[:24]}.json"
    try:
        saved = torch.tensor(json.loads(path.read_text())["logprobs"], dtype=torch.float32)
        if saved.shape == (len(questions), 4):
            return saved
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: score again
    logprobs = mmlu_logprobs(logits_fn, tokenizer, questions, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**model, "format": fmt, "shots": shots, "questions": len(questions), "logprobs": logprobs.tolist()}))
    tmp.replace(path)
    return logprobs


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


def hits(logprobs: torch.Tensor, questions: Sequence[Question]) -> list[bool]:
    """Per question: is the argmax the right answer."""
    return [p == q.answer for p, q in zip(predictions(logprobs), questions)]


def domains_of(questions: Sequence[Question]) -> dict[str, list[int]]:
    """The indices of the questions in each vertical domain (medical, legal, finance) that has any."""
    out = {d: [i for i, q in enumerate(questions) if q.subject in GROUPS[d]] for d in DOMAINS}
    return {d: rows for d, rows in out.items() if rows}


def mmlu_summary(logprobs: torch.Tensor, questions: Sequence[Question]) -> dict:
    """Accuracy overall, per subject and per domain, each with a 95% Wilson interval and its n."""
    predicted = predictions(logprobs)
    right = hits(logprobs, questions)
    by_subject: dict[str, list[bool]] = {}
    for q, hit in zip(questions, right):
        by_subject.setdefault(q.subject, []).append(hit)
    letters = {letter: predicted.count(i) for i, letter in enumerate(LETTERS)}
    return {
        **_accuracy(sum(right), len(questions)),
        "predicted_letters": letters,
        "subjects": {s: _accuracy(sum(h), len(h)) for s, h in sorted(by_subject.items())},
        "domains": {d: _accuracy(sum(right[i] for i in rows), len(rows)) for d, rows in domains_of(questions).items()},
    }


# --- the accuracy drop, judged on paired outcomes ----------------------------------------


def paired_interval(lost: int, gained: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for (lost - gained) / n, the difference of two accuracies on the same n questions,
    where `lost` questions only the first model and `gained` only the second answered right.

    Tango's score interval: it depends only on the discordant pairs, keeps a width when they are
    few or none (z^2 / (n + z^2) each side at none), and excludes 0 exactly when McNemar's test rejects.
    """
    if n == 0:
        return (-1.0, 1.0)

    def statistic(delta: float) -> float:  # falls as delta rises
        a, b = 2 * n, -lost - gained + (2 * n - lost + gained) * delta
        c = -gained * delta * (1 - delta)
        gained_share = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)  # its ML estimate given delta
        spread = n * (2 * gained_share + delta * (1 - delta))
        return (lost - gained - n * delta) / math.sqrt(spread) if spread > 0 else 0.0

    def solve(low: float, high: float, target: float) -> float:
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (middle, high) if statistic(middle) > target else (low, middle)
        return (low + high) / 2

    estimate, edge = (lost - gained) / n, 1e-12
    return (-1.0 if estimate == -1 else solve(-1 + edge, estimate, z), 1.0 if estimate == 1 else solve(estimate, 1 - edge, -z))


def _fewest(enough: Callable[[int], bool], most: int = 10**8) -> int | None:
    """The smallest n >= 1 for which `enough(n)` holds (it must stay true for larger n); None past `most`."""
    low, high = 1, 1
    while not enough(high):
        if high > most:
            return None
        low, high = high, 2 * high
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return high


def questions_for(half_width_points: float, lost_share: float, gained_share: float, z: float = Z95) -> int:
    """The fewest questions whose paired interval is at most +-half_width_points when those shares of the
    questions are lost and gained (the interval narrows as questions are added at the same shares)."""

    def precise(n: int) -> bool:
        low, high = paired_interval(lost_share * n, gained_share * n, n, z)
        return 100 * (high - low) / 2 <= half_width_points

    return _fewest(precise)


def paired_drop(reference_hits: Sequence[bool], model_hits: Sequence[bool]) -> dict:
    """The accuracy drop from reference to model on the same questions, in points, with its paired 95% interval."""
    if len(reference_hits) != len(model_hits):
        raise ValueError(f"paired outcomes need the same questions: {len(reference_hits)} vs {len(model_hits)}")
    n = len(model_hits)
    lost = sum(r and not m for r, m in zip(reference_hits, model_hits))
    gained = sum(m and not r for r, m in zip(reference_hits, model_hits))
    low, high = paired_interval(lost, gained, n)
    return {
        "points": 100 * (lost - gained) / n if n else None,
        "ci95": [100 * low, 100 * high],
        "unit": "points",
        "lost": lost,
        "gained": gained,
        "n": n,
        "method": "Tango score interval on the paired outcomes",
    }


def drop_outcome(drop: dict, limit: float) -> tuple[str, str]:
    """("pass" | "fail" | "undecided", why) for a budget of `limit` points on a `paired_drop`.

    Pass only when the interval's high end is within the limit, fail when its low end is above it
    (`interval_outcome`); otherwise undecided, with about how many questions at the same rates would decide it.
    """
    low, high = drop["ci95"]
    figures = f"drop {drop['points']:.2f} points, 95% CI {low:.2f} to {high:.2f}, n={drop['n']}"
    outcome = _decide(low, high, limit)
    if outcome == "fail":
        return outcome, f"{figures}: significantly above the {limit:g}-point budget"
    if outcome == "pass":
        return outcome, f"{figures}: within the {limit:g}-point budget at the interval's high end"
    n, lost, gained = drop["n"], drop["lost"], drop["gained"]

    def decided(size: int) -> bool:
        interval = paired_interval(lost * size / n, gained * size / n, size)
        return _decide(100 * interval[0], 100 * interval[1], limit) != "undecided"

    needed = _fewest(decided) if n else None
    more = f"; about {needed} at the same rates would decide it" if needed else ""
    return outcome, f"undecided: evaluate more questions ({figures}, straddles the {limit:g}-point budget{more})"


def interval_outcome(optimistic_ok: bool, pessimistic_ok: bool) -> str:
    """A budget judged on an interval: "pass" only when its pessimistic end meets the budget, "fail" when even
    its optimistic end does not, otherwise "undecided". The MMLU drop and every estimated latency use it."""
    if pessimistic_ok:
        return "pass"
    return "undecided" if optimistic_ok else "fail"


def _decide(low: float, high: float, limit: float) -> str:
    return interval_outcome(optimistic_ok=low <= limit, pessimistic_ok=high <= limit)


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
    return {
        "agreement": agree / n if n else None,
        "ci95": [low, high],
        "agree": agree,
        "n": n,
        "kl_mean": float(kl.mean()) if n else None,
        "kl_max": float(kl.max()) if n else None,
    }
