"""Distillation on tiny models: the loss falls, a killed run resumes to the same weights, data files parse."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.processes import kill_when_saved
from tests.tiny import CORPUS, build_model, build_tokenizer
from vcompress.compress.distill import CHECKPOINT, DistillConfig, build_blocks, distill, distill_loss, student_layer_map
from vcompress.core.artifact import write_metrics
from vcompress.core.errors import InputError
from vcompress.core.models import load_model

# Small enough to train in a second or two; eval_per_subject 0 keeps MMLU out unless a test asks.
FAST = dict(seq_len=32, batch_size=2, max_steps=12, save_every=4, warmup=2, lr=3e-3, eval_per_subject=0, eval_blocks=2, patience=100)


def sliced_student(teacher: Path, out: Path, keep: list[int]) -> Path:
    """A depth-pruned copy of a tiny Llama teacher that keeps the given layers, and records which."""
    model, tokenizer = load_model(teacher)
    n = model.config.num_hidden_layers
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # what the prune stage records about the layers it dropped
    write_metrics(out, {"stage": "prune", "layers": {"count": [n, len(keep)], "dropped": [i for i in range(n) if i not in keep]}})
    return out


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory, tokenizer):
    """(teacher, student): a 3-layer tiny Llama and its copy that keeps layers 0 and 2."""
    root = tmp_path_factory.mktemp("distill")
    teacher = build_model("llama", root / "teacher", tokenizer, layers=3)
    return teacher, sliced_student(teacher, root / "student", [0, 2])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    rows = [
        {"instruction": q, "input": "" if i % 2 else "context", "output": CORPUS[(i + 3) % len(CORPUS)]} for i, q in enumerate(CORPUS * 2)
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", rows)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def fixed_batch_losses(teacher_path, student_path, ids, cfg, steps=25) -> list[dict]:
    teacher, _ = load_model(teacher_path)
    student, _ = load_model(student_path)
    layer_map = student_layer_map(student_path, teacher, student)
    assert layer_map == [0, 2]  # read from the student's metrics.json, not spread evenly
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    student.train()
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
    history = []
    for _ in range(steps):
        s_out = student(input_ids=ids, output_hidden_states=True, use_cache=False)
        loss, parts = distill_loss(s_out, t_out, ids, cfg, layer_map)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), **parts})
    return history


def test_loss_goes_down_on_a_fixed_batch(pair, tokenizer):
    ids = torch.tensor(tokenizer(" ".join(CORPUS[:4]))["input_ids"][:48]).unsqueeze(0)
    kl_only = fixed_batch_losses(*pair, ids, DistillConfig())
    assert set(kl_only[0]) == {"loss", "kl"}
    assert kl_only[-1]["kl"] < 0.5 * kl_only[0]["kl"]
    combined = fixed_batch_losses(*pair, ids, DistillConfig(ce_weight=0.5, hidden_weight=1.0))
    assert set(combined[0]) == {"loss", "kl", "ce", "hidden_mse"}
    assert combined[-1]["loss"] < 0.5 * combined[0]["loss"]
    assert combined[-1]["hidden_mse"] < combined[0]["hidden_mse"] and combined[-1]["ce"] < combined[0]["ce"]


def test_kl_term_is_zero_for_the_teacher_itself_and_scaled_by_t_squared(tiny_llama, tokenizer):
    model, _ = load_model(tiny_llama)
    ids = torch.tensor(tokenizer(CORPUS[0])["input_ids"]).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
        shifted = type(out)(logits=out.logits + torch.randn_like(out.logits))
        assert distill_loss(out, out, ids, DistillConfig())[1]["kl"] == pytest.approx(0.0, abs=1e-6)
        kl1 = distill_loss(shifted, out, ids, DistillConfig(temperature=1.0))[1]["kl"]
    assert kl1 > 0.1


def test_layer_map_spreads_evenly_without_a_record(tiny_models, tokenizer, tmp_path):
    teacher, _ = load_model(build_model("llama", tmp_path / "t4", tokenizer, layers=4))
    student, _ = load_model(tiny_models["llama"])  # 2 layers, no prune record
    assert student_layer_map(tiny_models["llama"], teacher, student) == [1, 3]
    # the prune stage's per-layer record of kept heads names each layer's source layer
    write_metrics(tmp_path, {"heads": {"kept_per_layer": [{"layer": 0, "source_layer": 0}, {"layer": 1, "source_layer": 2}]}})
    assert student_layer_map(tmp_path, teacher, student) == [0, 2]
    write_metrics(tmp_path, {"layer_map": [0, 7]})
    with pytest.raises(InputError, match="does not fit 2 student and 4 teacher layers"):
        student_layer_map(tmp_path, teacher, student)


def test_run_writes_checkpoint_and_metrics_and_lowers_validation_kl(pair, alpaca, tmp_path):
    teacher, student = pair
    out = tmp_path / "03-distill"
    metrics = distill(
        student,
        out,
        teacher=teacher,
        data=alpaca,
        config={**FAST, "eval_per_subject": 1, "hidden_weight": 0.5},
        subset="anatomy",
        log=lambda _: None,
    )
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 12 and saved["stopped_by"] == "steps_done"
    val, before = saved["validation"], saved["before"]
    assert val["kl_mean"] < before["validation"]["kl_mean"] and val["tokens"] == before["validation"]["tokens"] > 0
    assert before["validation"]["perplexity"]["reference"] == val["perplexity"]["reference"]  # the teacher, scored once
    assert saved["tokens"] == 2 * 31 and saved["kl_mean"] < before["kl_mean"]  # held-out text (eval_blocks 2)
    assert saved["questions"] == before["questions"] == 1 and saved["answer_agreement"] in (0.0, 1.0)
    assert saved["tokens_per_s"] > 0 and saved["train_tokens"] == 12 * 2 * 32
    assert [h["step"] for h in saved["validation_history"]] == [4, 8, 12]
    assert metrics["validation"] == saved["validation"]
    assert not (tmp_path / ".03-distill.work").exists()  # scratch goes once the stage is complete
    model, _ = load_model(out)
    assert model.config.num_hidden_layers == 2


class Killed(Exception):
    pass


def kill_at(step: int):
    """A progress callback that stops the run after the given training step (and its checkpoint)."""

    def hook(label: str, done: int, total: int) -> None:
        if label == "distill" and done == step:
            raise Killed(step)

    return hook


@pytest.mark.parametrize("arch,kill_step", [("llama", 6), ("gpt2", 8)])
def test_killed_run_resumes_to_the_same_weights(arch, kill_step, tiny_models, tokenizer, alpaca, tmp_path):
    # gpt2 trains with dropout, so its RNG state must be restored too; llama adds the hidden-state term.
    teacher = tiny_models[arch]
    student = build_model(arch, tmp_path / "student", tokenizer, layers=1, seed=1)
    config = {**FAST, "hidden_weight": 0.5 if arch == "llama" else 0.0}
    straight = tmp_path / "straight"
    distill(student, straight, teacher=teacher, data=alpaca, config=config, seed=7, log=lambda _: None)

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        distill(student, out, teacher=teacher, data=alpaca, config=config, seed=7, log=lambda _: None, progress=kill_at(kill_step))
    assert not out.exists() and (tmp_path / ".resumed.work" / CHECKPOINT).is_file()
    logs = []
    metrics = distill(student, out, teacher=teacher, data=alpaca, config=config, seed=7, resume=True, log=logs.append)
    last_checkpoint = 8 if kill_step == 8 else 4  # the hook runs after the step's checkpoint
    assert any(line.startswith("resumed from") and line.endswith(f"at step {last_checkpoint}") for line in logs)
    assert_same_weights(straight, out)
    assert metrics["validation"] == json.loads((straight / "metrics.json").read_text())["validation"]
    # A finished folder is trusted by --resume rather than refused.
    assert distill(student, out, teacher=teacher, data=alpaca, config=config, seed=7, resume=True, log=logs.append)["steps"] == 12


def test_resume_with_other_settings_is_refused(tiny_llama, tokenizer, alpaca, tmp_path):
    student = build_model("llama", tmp_path / "student", tokenizer, layers=1, seed=1)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        distill(student, out, teacher=tiny_llama, data=alpaca, config=FAST, log=lambda _: None, progress=kill_at(5))
    with pytest.raises(InputError, match="other settings or data"):
        distill(student, out, teacher=tiny_llama, data=alpaca, config={**FAST, "lr": 1e-3}, resume=True, log=lambda _: None)


def test_kill_9_then_resume_from_the_cli(pair, alpaca, tmp_path, cli):
    teacher, student = pair
    args = [
        "distill",
        "--teacher",
        teacher,
        "--student",
        student,
        "--data",
        alpaca,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--lr",
        3e-3,
        "--warmup",
        2,
        "--max-steps",
        400,
        "--save-every",
        20,
        "--patience",
        100,
        "--eval-per-subject",
        0,
        "--seed",
        3,
    ]
    code, _, err = cli(*args, "--out", tmp_path / "straight")
    assert code == 0, err
    out = tmp_path / "killed"
    checkpoint = tmp_path / ".killed.work" / CHECKPOINT
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = kill_when_saved([sys.executable, "-m", "vcompress", *map(str, args), "--out", str(out)], checkpoint, env, seconds=120)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists() and checkpoint.is_file()
    code, _, err = cli(*args, "--out", out, "--resume")
    assert code == 0, err
    assert "resumed from" in err
    assert_same_weights(tmp_path / "straight", out)


# --- data ----------------------------------------------------------------------------------


FORMATS = {
    "alpaca.jsonl": lambda: "".join(json.dumps({"instruction": t, "input": "", "output": "ok " + t}) + "\n" for t in CORPUS),
    "pairs.jsonl": lambda: "".join(json.dumps({"prompt": t, "completion": "ok " + t}) + "\n" for t in CORPUS),
    "text.jsonl": lambda: "".join(json.dumps({"text": t}) + "\n" for t in CORPUS),
    "pairs.csv": lambda: "prompt,completion\n" + "".join(f'"{t}","ok {t}"\n' for t in CORPUS),
    "text.csv": lambda: "text\n" + "".join(f'"{t}"\n' for t in CORPUS),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_data_format_parses_into_train_and_validation(name, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_text(FORMATS[name]())
    cfg = DistillConfig(seq_len=16, val_fraction=0.2)
    train, val = build_blocks(path, tokenizer, cfg, seed=0, subset="medical", mmlu=None, log=print)
    assert train.shape[1] == val.shape[1] == 16 and train.shape[0] > val.shape[0] >= 1
    text = tokenizer.decode(train.flatten())
    if "text" in name:
        assert "<|im_start|>" not in text and "The heart pumps blood" in text
    else:  # prompt/completion records go through the chat template
        assert "<|im_start|>user" in text and "<|im_start|>assistant\nok " in text
    again, _ = build_blocks(path, tokenizer, cfg, seed=0, subset="medical", mmlu=None, log=print)
    other, _ = build_blocks(path, tokenizer, cfg, seed=1, subset="medical", mmlu=None, log=print)
    assert torch.equal(train, again) and not torch.equal(train, other)  # a seeded split


@pytest.mark.parametrize(
    "name,body,line",
    [
        ("bad.jsonl", '{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n', 3),
        ("keys.jsonl", '{"text": "fine"}\n{"question": "no known keys"}\n', 2),
        ("bad.csv", 'prompt,completion\n"a","b"\n"c","d"\n"e"\n', 4),
    ],
)
def test_malformed_line_names_file_and_line(name, body, line, tiny_llama, tmp_path, cli):
    path = tmp_path / name
    path.write_text(body)
    code, _, err = cli("distill", "--teacher", tiny_llama, "--student", tiny_llama, "--data", path, "--out", tmp_path / "o")
    assert code == 2 and f"{path}:{line}:" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_default_data_is_mmlu_outside_the_subset_and_says_so(tokenizer, mmlu_root):
    logs = []
    train, val = build_blocks(
        None, tokenizer, DistillConfig(seq_len=64, max_blocks=8, val_blocks=2), seed=0, subset="medical", mmlu=mmlu_root, log=logs.append
    )
    assert train.shape == (8, 64) and val.shape == (2, 64)
    assert any("no --data given" in line and "medical" in line for line in logs)


def test_teacher_with_another_vocabulary_is_refused(tiny_llama, alpaca, tmp_path, cli):
    other = build_model("llama", tmp_path / "other", build_tokenizer(vocab_size=320), layers=1)
    code, _, err = cli("distill", "--teacher", tiny_llama, "--student", other, "--data", alpaca, "--out", tmp_path / "o")
    assert code == 2 and "do not share a tokenizer vocabulary" in err


def test_unknown_setting_is_rejected(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="unknown distill setting 'epochs'"):
        distill(tiny_llama, tmp_path / "o", teacher=tiny_llama, config={"epochs": 3})
