"""MMLU scoring as lm-eval does it: prompt, tokenization, batching, both continuation paths, summaries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import build_model, build_tokenizer
from vcompress.core import scoring
from vcompress.core.data import Question
from vcompress.exporters.torch import TorchRunner

ANATOMY = Question(
    "anatomy",
    "  What is the embryological origin of the hyoid bone?\n",
    (
        "The first pharyngeal arch",
        "The first and second pharyngeal arches",
        "The second pharyngeal arch",
        "The second and third pharyngeal arches",
    ),
    3,
)
DEV = Question("anatomy", "Which organ filters the blood?", ("liver", "kidney", "lung", "heart"), 1)


def char_level_model(root: Path) -> Path:
    """A tiny Llama whose tokenizer has no merges, so " A" is two tokens (the multi-token path)."""
    tokenizer = build_tokenizer(vocab_size=261)
    return build_model("llama", root, tokenizer)


def synthetic_questions(n: int = 12) -> list[Question]:
    subjects = ("anatomy", "virology", "college_medicine")
    out = []
    for i in range(n):
        words = " ".join(["cells divide by mitosis"] * (1 + i % 5))  # different lengths, so batches pad
        out.append(Question(subjects[i % 3], f"Question {i}: {words}?", (f"liver {i}", "kidney", f"lung {i * 7}", "heart"), i % 4))
    return out


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> Path:
    return char_level_model(tmp_path_factory.mktemp("char") / "llama")


def test_one_shot_prompt_is_lm_eval_mmlu_exactly():
    prompt = scoring.mmlu_prompt(ANATOMY, [DEV])
    assert prompt == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which organ filters the blood?\nA. liver\nB. kidney\nC. lung\nD. heart\nAnswer: B\n\n"
        "What is the embryological origin of the hyoid bone?\n"
        "A. The first pharyngeal arch\nB. The first and second pharyngeal arches\n"
        "C. The second pharyngeal arch\nD. The second and third pharyngeal arches\nAnswer:"
    )
    zero = scoring.mmlu_prompt(Question("college_medicine", "Q?", ("a", "b", "c", "d"), 0))
    assert (
        zero == "The following are multiple choice questions (with answers) about college medicine.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_exemplars_are_the_first_dev_questions_of_the_subject():
    dev = [Question("virology", "v", ("a", "b", "c", "d"), 0)] + [
        Question("anatomy", f"a{i}", ("a", "b", "c", "d"), i % 4) for i in range(5)
    ]
    assert [q.question for q in scoring.exemplars_for(dev, "anatomy", 3)] == ["a0", "a1", "a2"]
    assert scoring.exemplars_for(dev, "anatomy", 0) == []


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    context, continuation = scoring.encode_pair(tokenizer, "Answer: ", "A")
    assert context == tokenizer.encode("Answer:")
    assert context + continuation == tokenizer.encode("Answer: A")


def _direct_logprobs(model, tokenizer, question: Question, exemplars=()) -> torch.Tensor:
    """Each continuation's summed log-prob, one unbatched forward per letter: the definition."""
    prompt = scoring.mmlu_prompt(question, exemplars)
    out = []
    for continuation in scoring.CONTINUATIONS:
        context = tokenizer.encode(prompt)
        whole = tokenizer.encode(prompt + continuation)
        target = whole[len(context) :]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
        out.append(sum(logp[len(whole) - 1 - len(target) + j, t].item() for j, t in enumerate(target)))
    return torch.tensor(out)


def test_single_token_path_matches_the_definition(tiny_model):
    runner = TorchRunner(tiny_model)
    assert all(len(runner.tokenizer.encode(c)) == 1 for c in scoring.CONTINUATIONS)
    questions = synthetic_questions(6)
    got = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, shots=1, dev=[DEV, *questions], batch_size=4)
    for i, q in enumerate(questions):
        exemplars = scoring.exemplars_for([DEV, *questions], q.subject, 1)
        torch.testing.assert_close(got[i], _direct_logprobs(runner.model, runner.tokenizer, q, exemplars), atol=2e-5, rtol=0)


def test_multi_token_continuations_are_scored_in_full(char_model):
    runner = TorchRunner(char_model)
    assert len(runner.tokenizer.encode(" A")) == 2
    questions = synthetic_questions(5)
    got = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=3)
    for i, q in enumerate(questions):
        torch.testing.assert_close(got[i], _direct_logprobs(runner.model, runner.tokenizer, q), atol=2e-5, rtol=0)
    # The space is the same token for all four, so the letters differ only in the last term.
    assert got.isfinite().all() and (got.std(-1) > 0).all()


@pytest.mark.parametrize("path", ["single", "multi"])
def test_batch_size_does_not_change_the_scores(path, tiny_llama, char_model):
    runner = TorchRunner(tiny_llama if path == "single" else char_model)
    questions = synthetic_questions(12)
    one = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=1)
    eight = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=8)
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=0)
    assert one.argmax(-1).tolist() == eight.argmax(-1).tolist()
    budget = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=8, max_batch_tokens=60)
    torch.testing.assert_close(one, budget, atol=1e-5, rtol=0)


def test_batches_respect_the_prompt_and_token_limits():
    requests = [scoring._Request(i, None, [0] * length, [1, 2, 3, 4]) for i, length in enumerate([50, 40, 30, 20, 10, 10, 10])]
    sizes = [[len(r.ids) for r in batch] for batch in scoring._batches(requests, batch_size=3, max_tokens=100)]
    assert sizes == [[50, 40], [30, 20, 10], [10, 10]]


def test_a_plain_ids_to_logits_function_scores_the_same(tiny_model):
    """Backends that take neither attention_mask nor positions (full logits) give the same numbers."""
    runner = TorchRunner(tiny_model)
    questions = synthetic_questions(9)
    plain = lambda ids: runner.model(input_ids=ids).logits  # noqa: E731
    torch.testing.assert_close(
        scoring.mmlu_logprobs(plain, runner.tokenizer, questions, batch_size=5),
        scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=5),
        atol=1e-5,
        rtol=0,
    )


def test_long_prompts_are_truncated_on_the_left_like_lm_eval(tiny_llama):
    runner = TorchRunner(tiny_llama)
    q = synthetic_questions(5)[4]
    ids = runner.tokenizer.encode(scoring.mmlu_prompt(q))
    keep = 20
    assert len(ids) > keep
    got = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, [q], max_length=keep)[0]
    with torch.no_grad():
        logits = runner.model(input_ids=torch.tensor([ids[-keep:]])).logits[0, -1]
    letters = [runner.tokenizer.encode(c)[0] for c in scoring.CONTINUATIONS]
    torch.testing.assert_close(got, F.log_softmax(logits, -1)[letters], atol=1e-5, rtol=0)


def test_cloze_prompt_is_lighteval_mmlu_cf_exactly():
    prompt, continuations = scoring.prompt_and_continuations(ANATOMY, format="cloze")
    assert prompt == (
        "The following are questions about anatomy.\nQuestion:   What is the embryological origin of the hyoid bone?\n\nAnswer:"
    )  # the question as given
    assert continuations == (
        " The first pharyngeal arch",
        " The first and second pharyngeal arches",
        " The second pharyngeal arch",
        " The second and third pharyngeal arches",
    )
    one_shot = scoring.cloze_prompt(Question("college_medicine", "Q?", ("a", "bb", "c", "d"), 1), [DEV])
    assert one_shot == (
        "The following are questions about college medicine.\n"
        "Question: Which organ filters the blood?\nAnswer: kidney\n\nQuestion: Q?\nAnswer:"
    )
    with pytest.raises(ValueError, match="unknown MMLU format"):
        scoring.prompt_and_continuations(ANATOMY, format="essay")


def test_cloze_scores_each_answer_per_character(char_model):
    """The definition, one unbatched forward per answer: its tokens' log-probs summed, divided by its length."""
    runner = TorchRunner(char_model)
    questions = synthetic_questions(5)  # answers of 5 to 9 characters, several tokens each
    got = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=3, format="cloze")
    for i, q in enumerate(questions):
        prompt = scoring.cloze_prompt(q)
        context = runner.tokenizer.encode(prompt)
        for column, choice in enumerate(q.choices):
            whole = runner.tokenizer.encode(prompt + " " + choice)
            target = whole[len(context) :]
            with torch.no_grad():
                logp = F.log_softmax(runner.model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
            total = sum(logp[len(whole) - 1 - len(target) + j, t].item() for j, t in enumerate(target))
            assert got[i, column].item() == pytest.approx(total / len(choice), abs=2e-5)
    # the letter format of the same questions is another set of numbers: the formats do not share a path by mistake
    letter = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=3)
    assert not torch.allclose(letter, got)


def test_wilson_interval_known_values():
    low, high = scoring.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert scoring.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert scoring.wilson_interval(10, 10)[1] == 1.0


def test_mmlu_summary_counts_per_subject():
    questions = synthetic_questions(6)  # answers 0,1,2,3,0,1; subjects a,v,c,a,v,c
    logprobs = torch.full((6, 4), -5.0)
    logprobs[:, 0] = -1.0  # always "A"
    summary = scoring.mmlu_summary(logprobs, questions)
    assert (summary["correct"], summary["n"]) == (2, 6)
    assert summary["predicted_letters"] == {"A": 6, "B": 0, "C": 0, "D": 0}
    assert summary["subjects"]["anatomy"]["correct"] == 1 and summary["subjects"]["anatomy"]["n"] == 2
    assert summary["subjects"]["college_medicine"]["correct"] == 0
    low, high = summary["ci95"]
    assert low < 2 / 6 < high


def test_answer_agreement_of_a_model_with_itself_is_total():
    logprobs = torch.log_softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), -1)
    same = scoring.answer_agreement(logprobs, logprobs.clone())
    assert same["agreement"] == 1.0 and same["kl_mean"] == 0.0
    flipped = scoring.answer_agreement(logprobs.flip(-1), logprobs)
    assert flipped["agreement"] < 1.0 and flipped["kl_mean"] > 0.0
    # KL(ref || model) of one item, by hand
    p, q = torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    kl = scoring.answer_agreement(q.log(), p.log())["kl_mean"]
    assert kl == pytest.approx(sum(pi * math.log(pi / 0.25) for pi in (0.7, 0.1, 0.1, 0.1)), rel=1e-6)


def test_text_fidelity_against_itself_and_another(tiny_models, tokenizer):
    blocks = torch.randint(5, len(tokenizer), (3, 32), generator=torch.Generator().manual_seed(1))
    llama = TorchRunner(tiny_models["llama"])
    qwen = TorchRunner(tiny_models["qwen2"])
    same = scoring.text_fidelity(llama.forward, blocks, llama.forward, batch_size=2)
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"])
    other = scoring.text_fidelity(qwen.forward, blocks, llama.forward)
    assert other["kl_mean"] > 0.01 and other["top1_agreement"] < 1.0
    assert scoring.perplexity(llama.forward, blocks) == pytest.approx(same["perplexity"], rel=1e-5)


def test_judge_gives_the_scoring_figures_under_one_set_of_names(tiny_models, tokenizer):
    blocks = torch.randint(5, len(tokenizer), (3, 32), generator=torch.Generator().manual_seed(2))
    questions = synthetic_questions(6)
    llama = TorchRunner(tiny_models["llama"])
    qwen = TorchRunner(tiny_models["qwen2"])
    reported = []
    judge = scoring.Judge(
        llama.forward, blocks, tokenizer=llama.tokenizer, questions=questions, progress=lambda *call: reported.append(call)
    )
    got = judge.score(qwen.forward)
    text = scoring.text_fidelity(qwen.forward, blocks, llama.forward)
    answers = scoring.answer_agreement(
        scoring.mmlu_logprobs(qwen.forward, llama.tokenizer, questions), scoring.mmlu_logprobs(llama.forward, llama.tokenizer, questions)
    )
    assert got == {
        "perplexity": {
            "reference": text["reference_perplexity"],
            "student": text["perplexity"],
            "rise_pct": 100 * (text["perplexity"] / text["reference_perplexity"] - 1),
        },
        "top1_agreement": text["top1_agreement"],
        "kl_mean": text["kl_mean"],
        "tokens": 3 * 31,
        "answer_agreement": answers["agreement"],
        "answer_ci95": answers["ci95"],
        "answer_kl_mean": answers["kl_mean"],
        "questions": 6,
    }
    # the reference's logits are taken once (quantize changes its reference in place), unless told not to keep them
    scale = [1.0]

    def changing(ids):
        return llama.forward(ids) * scale[0]

    kept, rerun = scoring.Judge(changing, blocks), scoring.Judge(changing, blocks, keep_logits=False)
    scale[0] = 3.0
    assert kept.score(qwen.forward)["kl_mean"] == got["kl_mean"]
    assert rerun.score(qwen.forward)["kl_mean"] != pytest.approx(got["kl_mean"])
    with pytest.raises(KeyError):
        kept.reference_logits(blocks[:1] + 1)
    # progress: each label starts at 0 and ends at its total
    for label in ("reference logits", "MMLU reference", "held-out text", "MMLU"):
        calls = [(done, total) for name, done, total in reported if name == label]
        assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0, label
    assert scoring.Judge(llama.forward).score(qwen.forward)["perplexity"] is None


def _counted(fn):
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    run.calls = calls
    return run


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cloze_after_one_shared_prefix_equals_the_full_sequences(tiny_models, arch):
    """The four answers scored after one run of their question (KV cache shared) give the full sequences' figures."""
    runner = TorchRunner(tiny_models[arch])
    questions = synthetic_questions(6)
    full = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, batch_size=3, format="cloze")
    forward, shared_fn = _counted(runner.forward), _counted(runner.continuation_logits)
    # batches of 4 questions whose prompts differ in length: the rows run padded, in one batch
    shared = scoring.mmlu_logprobs(forward, runner.tokenizer, questions, batch_size=4, format="cloze", continuation_fn=shared_fn)
    assert len(shared_fn.calls) == 2 and not forward.calls  # the shared path really ran, alone
    torch.testing.assert_close(shared, full, atol=2e-5, rtol=1e-5)
    # a context truncated on the left has no prefix to share: those questions go the full way
    longest = max(
        len(r.ids)
        for r in scoring._requests(runner.tokenizer, [scoring.prompt_and_continuations(q, format="cloze") for q in questions], None)
    )
    reported = []
    cut = scoring.mmlu_logprobs(
        forward,
        runner.tokenizer,
        questions,
        format="cloze",
        continuation_fn=shared_fn,
        max_length=longest - 2,
        progress=lambda *call: reported.append(call),
    )
    assert forward.calls and torch.isfinite(cut).all()
    # progress counts both paths against one total: the shared rows do not shrink it (it read "3185/5" once)
    totals = {total for _, _, total in reported}
    assert len(totals) == 1 and reported[-1][1] == reported[0][2] >= 4 * len(questions) - 4


def test_backends_without_a_shared_prefix_path_are_scored_in_full(char_model):
    runner = TorchRunner(char_model)
    questions = synthetic_questions(4)
    full = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, format="cloze")
    none = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, format="cloze", continuation_fn=lambda prefix, conts: None)
    torch.testing.assert_close(none, full, atol=0, rtol=0)


def assert_shared_prefix_scores_like_full_sequences(runner, questions: int = 6, atol: float = 5e-5) -> None:
    """A Runner's continuation_logits gives the cloze figures of full sequences, and alone scores every question."""
    items = synthetic_questions(questions)
    full = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, items, format="cloze")
    shared = scoring.mmlu_logprobs(
        lambda *a, **k: pytest.fail("the shared path should score every question"),
        runner.tokenizer,
        items,
        format="cloze",
        continuation_fn=runner.continuation_logits,
    )
    torch.testing.assert_close(shared, full, atol=atol, rtol=1e-5)
