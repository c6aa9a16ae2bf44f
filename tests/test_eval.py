"""`vcompress eval` and the Evaluator: accuracy with intervals, fidelity to a reference, any Runner,
and a cross-check of per-item predictions against lm-eval-harness itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_scoring import char_level_model
from vcompress.core import scoring
from vcompress.core.runner import Runner
from vcompress.evaluate import Evaluator
from vcompress.exporters.torch import TorchRunner

SUBJECTS = ("anatomy", "virology", "sociology")  # two medical subjects; sociology gives the held-out text


@pytest.fixture(scope="module")
def mini_mmlu(tmp_path_factory) -> Path:
    """A small Hendrycks-layout folder, so these tests need no MMLU copy."""
    root = tmp_path_factory.mktemp("mmlu")
    for split, n in (("dev", 5), ("test", 40)):
        (root / split).mkdir()
        for s, subject in enumerate(SUBJECTS):
            rows = [
                f'"Question {i} about {subject.replace("_", " ")}: which organ filters the blood, {"and why " * (i % 6)}?",'
                f'liver {i},kidney,lung,"heart, {s}",{"ABCD"[(i + s) % 4]}'
                for i in range(n)
            ]
            (root / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_eval_with_itself_as_reference(cli, tiny_llama, mini_mmlu):
    code, out, err = cli("eval", "--model", tiny_llama, "--reference", tiny_llama, "--mmlu", mini_mmlu, "--per-subject", "6", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["questions"] == 12 and report["mmlu"]["n"] == 12
    assert set(report["mmlu"]["subjects"]) == {"anatomy", "virology"}
    low, high = report["mmlu"]["ci95"]
    assert low <= report["mmlu"]["accuracy"] <= high
    assert report["agreement"]["agreement"] == 1.0 and report["agreement"]["kl_mean"] == 0.0
    assert report["text"]["top1_agreement"] == 1.0 and report["text"]["kl_mean"] == 0.0
    assert report["text"]["perplexity"] == report["text"]["reference_perplexity"] > 1


@pytest.fixture
def eval_qwen2(cli, tiny_llama, tiny_models, mini_mmlu):
    """`vcompress eval` of the tiny Qwen2 against the tiny Llama, 4 questions a subject, with more options."""
    return lambda *options: cli(
        "eval", "--model", tiny_models["qwen2"], "--reference", tiny_llama, "--mmlu", mini_mmlu, "--per-subject", "4", *options
    )


def test_eval_prints_accuracy_interval_and_subject_rows(eval_qwen2):
    code, out, err = eval_qwen2("--shots", "2", "--subset", "anatomy,virology")
    assert code == 0, err
    assert "8 questions (4 per subject, 2 subjects" in out and "2-shot" in out
    assert "accuracy" in out and "95% CI" in out
    assert "│ anatomy" in out and "│ virology" in out and "sociology" not in out.split("fidelity")[0]
    assert "answer agreement" in out and "held-out perplexity" in out and "top-1 next-token agreement" in out


def test_eval_cloze_reports_the_format_the_domains_and_the_paired_drop(eval_qwen2):
    code, out, err = eval_qwen2("--format", "cloze", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"]["name"] == "cloze" and report["format"]["prompt"].startswith("The following are questions about <subject>.")
    assert "length in characters" in report["format"]["score"]
    student, teacher = report["mmlu"], report["reference"]["mmlu"]
    assert student["domains"]["medical"]["n"] == 8 and set(student["domains"]) == {"medical"}  # anatomy + virology
    drop = report["drop"]
    assert drop["n"] == 8 and drop["points"] == pytest.approx(100 * (teacher["accuracy"] - student["accuracy"]))
    assert drop["lost"] - drop["gained"] == teacher["correct"] - student["correct"]
    assert drop["ci95"][0] <= drop["points"] <= drop["ci95"][1] and drop["domains"]["medical"]["n"] == 8
    code, out, err = eval_qwen2("--format", "cloze")
    assert code == 0, err
    assert "cloze format" in out and "medical (domain)" in out and "accuracy drop" in out and "paired 95% CI" in out


def test_eval_says_when_the_letter_prompt_is_answered_near_chance(capsys):
    from vcompress.commands.eval import show

    row = {"accuracy": 0.3125, "ci95": [0.22, 0.42], "correct": 25, "n": 80}
    report = {
        "model": "m",
        "backend": "torch",
        "subset": "medical",
        "format": {"name": "letter"},
        "shots": 0,
        "per_subject": 10,
        "seed": 0,
        "mmlu": {**row, "predicted_letters": {"A": 79, "B": 0, "C": 0, "D": 1}, "subjects": {"anatomy": row}, "domains": {"medical": row}},
    }
    show(report)
    assert "79 of 80 answers are A" in capsys.readouterr().out
    report["mmlu"]["predicted_letters"] = {"A": 21, "B": 20, "C": 19, "D": 20}
    show(report)
    assert "near chance" not in capsys.readouterr().out


def test_two_loads_of_one_model_agree_fully(tiny_model, mini_mmlu):
    """Determinism: separately opened runners of one checkpoint give identical scores."""
    evaluator = Evaluator(subset="medical", per_subject=5, mmlu=mini_mmlu, batch_size=3)
    report = evaluator.evaluate(TorchRunner(tiny_model), TorchRunner(tiny_model))
    assert report["agreement"]["agreement"] == 1.0 and report["agreement"]["kl_mean"] == 0.0
    assert report["text"]["top1_agreement"] == 1.0 and report["text"]["kl_mean"] == 0.0


def test_reference_logprobs_are_computed_once(tiny_llama, tiny_models, mini_mmlu, monkeypatch):
    calls = []
    real = scoring.mmlu_logprobs
    monkeypatch.setattr(scoring, "mmlu_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    reported = []
    evaluator = Evaluator(subset="anatomy", per_subject=3, mmlu=mini_mmlu, progress=lambda *call: reported.append(call))
    evaluator.evaluate(tiny_models["qwen2"], tiny_llama)
    evaluator.evaluate(tiny_models["gpt2"], tiny_llama)
    assert len(calls) == 3  # two models + one reference
    ends = {label: (done, total) for label, done, total in reported}  # each label's last report
    assert set(ends) == {"MMLU qwen2", "MMLU gpt2", "MMLU llama", "held-out text"}  # labels name the runner
    assert all(done == total > 0 for done, total in ends.values())


class FullLogitsRunner(Runner):
    """A backend like an ONNX session: only forward(ids, attention_mask) -> full logits."""

    backend = "fake"

    def __init__(self, path):
        super().__init__(path)
        self._torch = TorchRunner(path)
        self.tokenizer = self._torch.tokenizer

    def forward(self, input_ids, attention_mask=None):
        with torch.no_grad():
            return self._torch.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def prefill(self, input_ids):
        raise NotImplementedError

    def decode(self, token_id, state):
        raise NotImplementedError


def test_any_runner_gives_the_same_predictions(tiny_llama, mini_mmlu):
    evaluator = Evaluator(subset="medical", per_subject=8, mmlu=mini_mmlu, shots=1)
    report = evaluator.evaluate(FullLogitsRunner(tiny_llama), tiny_llama)
    assert report["backend"] == "fake" and report["reference"]["backend"] == "torch"
    assert report["agreement"]["agreement"] == 1.0 and report["agreement"]["kl_mean"] < 1e-9


def test_bad_inputs_exit_2(cli, tiny_llama, tmp_path, mini_mmlu):
    other = char_level_model(tmp_path / "char")
    code, _, err = cli("eval", "--model", other, "--reference", tiny_llama, "--mmlu", mini_mmlu, "--per-subject", "2")
    assert code == 2 and "different tokenizers" in err
    code, _, err = cli("eval", "--model", tiny_llama, "--mmlu", mini_mmlu, "--subset", "medicine")
    assert code == 2 and "unknown MMLU subject or group 'medicine'" in err and "medical" in err
    code, _, err = cli("eval", "--model", tiny_llama, "--mmlu", mini_mmlu, "--subset", "nutrition")
    assert code == 2 and "no test questions" in err
    code, _, err = cli("eval", "--model", tiny_llama, "--mmlu", mini_mmlu, "--shots", "6")
    assert code == 2


# --- the peer: lm-eval-harness on the same items ----------------------------------------


def _lm_eval_task_files(lm_eval, questions, dev, subjects, folder: Path) -> Path:
    """Local JSONL data and task YAMLs that include lm-eval's own mmlu_<subject>.yaml (prompt,
    description, few-shot sampler), swapping only the dataset for local files: no hub."""
    mmlu_tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    for subject in subjects:
        for split, items in (("test", questions), ("dev", dev)):
            with open(folder / f"{subject}_{split}.jsonl", "w") as f:
                for q in (q for q in items if q.subject == subject):
                    f.write(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer, "subject": subject}) + "\n")
        (tasks / f"vc_{subject}.yaml").write_text(
            f"include: {mmlu_tasks / f'mmlu_{subject}.yaml'}\ntask: vc_{subject}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / f'{subject}_test.jsonl'}\n    dev: {folder / f'{subject}_dev.jsonl'}\n"
        )
    return tasks


@pytest.mark.parametrize("kind", ["single-token gpt2", "multi-token llama"])
def test_per_item_predictions_agree_with_lm_eval(kind, tiny_models, mmlu_root, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from vcompress.core.data import load_mmlu, sample_questions

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_models["gpt2"] if kind.startswith("single") else char_level_model(tmp_path / "char")
    # professional_law prompts exceed the tiny models' 256 positions: both truncate on the left.
    subjects = ["anatomy", "professional_law", "virology"]  # the order sample_questions returns
    questions = sample_questions(load_mmlu(mmlu_root, "test", subjects), 40, seed=0)
    dev = load_mmlu(mmlu_root, "dev", subjects)
    tasks = _lm_eval_task_files(lm_eval, questions, dev, subjects, tmp_path / "lm_eval")

    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(model), batch_size=8, device="cpu"),
        tasks=[f"vc_{s}" for s in subjects],
        num_fewshot=1,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    theirs = []
    for subject in subjects:
        for sample in sorted(results["samples"][f"vc_{subject}"], key=lambda s: s["doc_id"]):
            theirs.append([float(resp[0]) for resp in sample["filtered_resps"]])
    theirs = torch.tensor(theirs)

    runner = TorchRunner(model)
    ours = scoring.mmlu_logprobs(runner.forward, runner.tokenizer, questions, shots=1, dev=dev, max_length=runner.max_length)
    assert ours.shape == theirs.shape == (120, 4)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_default_model_self_reference(cli):
    """The embedded default, a few items: accuracy with interval, and agreement with itself 100%, KL 0."""
    code, out, err = cli("eval", "--subset", "anatomy", "--per-subject", "4", "--reference", "default", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["mmlu"]["n"] == 4 and report["agreement"]["agreement"] == 1.0 and report["agreement"]["kl_mean"] == 0.0
