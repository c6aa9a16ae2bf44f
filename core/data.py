"""Corpora: MMLU questions, users' domain files, and the calibration / held-out text built from them.

MMLU comes from a Hendrycks-layout folder (dev/ and test/, `<subject>_<split>.csv`, no header),
a JSONL file, or the hub (`hf:cais/mmlu`); by default from the copy shipped inside vcompress
(core/mmlu/mmlu.zip: that layout in one archive, read in place; see core/mmlu/SOURCE.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError
from .packages import import_failure

LETTERS = ("A", "B", "C", "D")
PACKAGED_MMLU = resources.files(__package__) / "mmlu"  # mmlu.zip (dev/, test/), SHA256SUMS, SOURCE.md, LICENSE

# The four MMLU categories as lm-eval-harness groups the 57 subjects.
GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
GROUPS["medical"] = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "nutrition",
    "professional_medicine",
    "virology",
)
GROUPS["legal"] = ("international_law", "jurisprudence", "professional_law")
GROUPS["finance"] = ("econometrics", "high_school_macroeconomics", "high_school_microeconomics", "professional_accounting")
ALL_SUBJECTS: tuple[str, ...] = tuple(sorted(s for g in ("stem", "humanities", "social_sciences", "other") for s in GROUPS[g]))
GROUPS["all"] = ALL_SUBJECTS


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


# --- where MMLU lives -----------------------------------------------------------------


def packaged_mmlu() -> zipfile.Path:
    """The MMLU dev and test splits shipped inside vcompress, as a Hendrycks folder inside its archive."""
    return zipfile.Path(PACKAGED_MMLU / "mmlu.zip")


def find_mmlu(path: str | Path | zipfile.Path | None = None) -> Path | str | zipfile.Path:
    """--mmlu, else $VCOMPRESS_MMLU, else the packaged copy."""
    if path:
        if isinstance(path, zipfile.Path):  # the packaged copy, passed on
            return path
        if str(path).startswith("hf:"):
            return str(path)
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"MMLU path {p} does not exist; pass a folder with dev/ and test/ CSVs, a JSONL file, or hf:cais/mmlu")
        return p
    env = os.environ.get("VCOMPRESS_MMLU")
    if env:
        return find_mmlu(env)
    return packaged_mmlu()


def resolve_subjects(subset: str | list[str] | tuple[str, ...]) -> list[str]:
    """A group name, a subject, or a comma list / list of either, to sorted unique subjects."""
    names = [n.strip() for n in (subset.split(",") if isinstance(subset, str) else subset) if n.strip()]
    valid = f"groups: {', '.join(sorted(GROUPS))}; subjects: {', '.join(ALL_SUBJECTS)}"
    if not names:
        raise InputError(f"the MMLU subset is empty; name a group or subjects ({valid})")
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out.extend(GROUPS[name])
        elif name in ALL_SUBJECTS:
            out.append(name)
        else:
            raise InputError(f"unknown MMLU subject or group {name!r}; {valid}")
    return sorted(set(out))


def load_mmlu(source: str | Path | None, split: str = "test", subjects: list[str] | None = None) -> list[Question]:
    """All questions of a split for the given subjects (all subjects when None)."""
    root = find_mmlu(source)
    wanted = set(subjects) if subjects else None
    if isinstance(root, str):
        questions = _load_hub(root[3:], split)
    elif root.is_file():
        questions = _load_jsonl(root, split)
    else:
        questions = _load_csv_folder(root, split, wanted)
    if wanted is not None:
        questions = [q for q in questions if q.subject in wanted]
    return questions


def sample_questions(questions: list[Question], per_subject: int | None, seed: int = 0) -> list[Question]:
    """N questions per subject, drawn with a fixed seed; order: subject, then file order."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    out: list[Question] = []
    for subject in sorted(by_subject):
        items = by_subject[subject]
        if per_subject is not None and per_subject < len(items):
            rng = random.Random(f"{seed}:{subject}")
            keep = sorted(rng.sample(range(len(items)), per_subject))
            items = [items[i] for i in keep]
        out.extend(items)
    return out


def _load_csv_folder(root: Path | zipfile.Path, split: str, wanted: set[str] | None) -> list[Question]:
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"{root} has no {split}/ folder; an MMLU folder holds dev/ and test/ with <subject>_{split}.csv files")
    questions: list[Question] = []
    for file in sorted((f for f in folder.iterdir() if f.name.endswith(f"_{split}.csv")), key=lambda f: f.name):
        subject = file.name[: -len(f"_{split}.csv")]
        if wanted is not None and subject not in wanted:
            continue
        reader = csv.reader(_read_text(file, newline=""))
        first_line = 1  # a quoted field may span lines: name the line the row starts on
        try:
            for row in reader:
                questions.append(_row(row, subject, f"{file}:{first_line}"))
                first_line = reader.line_num + 1
        except csv.Error as e:
            raise InputError(f"{file}:{reader.line_num}: not valid CSV ({e}); fix that row") from None
    if not questions and wanted is None:
        raise InputError(f"{folder} holds no <subject>_{split}.csv files; point --mmlu at the folder that holds dev/ and test/")
    return questions


def _row(row: list[str], subject: str, where: str) -> Question:
    if len(row) != 6:
        raise InputError(f"{where}: expected 6 columns (question,A,B,C,D,answer), found {len(row)}; fix or remove that row")
    answer = row[5].strip().upper()
    if answer not in LETTERS:
        raise InputError(f"{where}: answer {row[5]!r} is not one of A, B, C, D; fix that row")
    return Question(subject, row[0], tuple(row[1:5]), LETTERS.index(answer))


def _load_jsonl(path: Path, split: str) -> list[Question]:
    questions = []
    for lineno, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: each line must be a JSON object with question, choices and answer; fix that line")
        if item.get("split", "test") != split:  # lines without a split are test questions
            continue
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item.get("question"), str) or not isinstance(choices, list) or len(choices) != 4:
            raise InputError(f"{where}: needs question (text) and choices (4 items); fix that line")
        if isinstance(answer, str) and answer.strip().upper() in LETTERS:
            answer = LETTERS.index(answer.strip().upper())
        if answer not in (0, 1, 2, 3):
            raise InputError(f"{where}: answer {answer!r} is not 0-3 or A-D; fix that line")
        questions.append(Question(item.get("subject", "unknown"), item["question"], tuple(map(str, choices)), int(answer)))
    return questions


def _load_hub(name: str, split: str) -> list[Question]:
    try:
        import datasets
    except ImportError as e:
        why = import_failure(e, ("datasets",), "`pip install datasets`")
        raise InputError(f"reading MMLU from the hub needs the `datasets` package: {why}; or pass --mmlu PATH") from None
    try:
        data = datasets.load_dataset(name, "all", split=split)
    except Exception as e:  # network, auth or a missing dataset all end here
        raise InputError(
            f"cannot load {name} from the hub ({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass --mmlu PATH to a local copy"
        ) from None
    return [Question(r["subject"], r["question"], tuple(r["choices"]), int(r["answer"])) for r in data]


def _read_text(file: Path | zipfile.Path, newline: str | None = None) -> io.StringIO:
    """A file's UTF-8 text (a leading BOM dropped) as a stream; `newline` as open() takes it."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{file}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8") from None
    return io.StringIO(text.removeprefix("\ufeff"), newline=newline)


# --- users' domain data ---------------------------------------------------------------


def read_domain_file(path: str | Path) -> list[dict]:
    """Records from a domain file: {"prompt", "completion"} or {"text"}.

    JSONL with instruction/input/output (Alpaca), prompt/completion, or text; CSV with a header
    that has prompt,completion or text. A malformed line names the file and line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; pass a JSONL or CSV file")
    if path.suffix == ".csv":
        return _read_domain_csv(path)
    if path.suffix not in (".jsonl", ".json", ".txt"):
        raise InputError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl (instruction/input/output, prompt/completion or text) or .csv (prompt,completion or text)"
        )
    if path.suffix == ".txt":
        return [{"text": t} for t in _read_text(path).read().split("\n\n") if t.strip()]
    records = []
    for lineno, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix that line") from None
        records.append(_domain_record(item, f"{path}:{lineno}"))
    if not records:
        raise InputError(f"{path} holds no records; add JSON lines")
    return records


def _domain_record(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise InputError(f"{where}: each line must be a JSON object; fix that line")
    if "instruction" in item and "output" in item:
        prompt = item["instruction"] if not item.get("input") else f"{item['instruction']}\n\n{item['input']}"
        return {"prompt": str(prompt), "completion": str(item["output"])}
    if "prompt" in item and "completion" in item:
        return {"prompt": str(item["prompt"]), "completion": str(item["completion"])}
    if isinstance(item.get("text"), str):
        return {"text": item["text"]}
    raise InputError(f"{where}: expected instruction/output, prompt/completion or text keys, found {sorted(item)}; fix that line")


def _read_domain_csv(path: Path) -> list[dict]:
    reader = csv.DictReader(_read_text(path, newline=""))
    fields = set(reader.fieldnames or [])
    if not ({"prompt", "completion"} <= fields or "text" in fields):
        raise InputError(f"{path}:1: the header needs prompt,completion or text columns, found {sorted(fields)}; fix the header")
    records = []
    for lineno, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{path}:{lineno}: wrong number of columns; fix that row")
        records.append(_domain_record(row, f"{path}:{lineno}"))
    return records


def render(record: dict, tokenizer=None) -> str:
    """One record as training text, through the model's chat template when it has one."""
    if "text" in record:
        return record["text"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{record['prompt']}\n{record['completion']}"


# --- text for calibration, distillation and held-out perplexity ------------------------


def question_text(q: Question) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return f"{q.question}\n{options}\nAnswer: {q.letter}. {q.choices[q.answer]}\n"


def default_texts(part: str, exclude: str | list[str] = "medical", mmlu: str | Path | None = None) -> list[str]:
    """MMLU question+answer text from subjects outside the evaluated subset.

    `part` is "calib" (calibration, distillation) or "heldout" (perplexity): each question goes
    to one part by a hash of its text, so the two never share a question.
    """
    if part not in ("calib", "heldout"):
        raise ValueError(part)
    excluded = set(resolve_subjects(exclude)) if exclude else set()
    subjects = [s for s in ALL_SUBJECTS if s not in excluded]
    texts = []
    for q in load_mmlu(mmlu, "test", subjects):
        bucket = int(hashlib.sha256(q.question.encode()).hexdigest(), 16) % 2
        if bucket == (0 if part == "calib" else 1):
            texts.append(question_text(q))
    random.Random(f"default_texts:{part}").shuffle(texts)
    return texts


def texts_for(data: str | Path | None, tokenizer=None, *, part: str = "calib", exclude="medical", mmlu=None, log=print) -> list[str]:
    """The user's domain file rendered, else the MMLU default (and the log says so)."""
    if data:
        return [render(r, tokenizer) for r in read_domain_file(data)]
    log(f"no --data given: using MMLU text from subjects outside {exclude!r} ({part} half)")
    return default_texts(part, exclude, mmlu)


def pack(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None):
    """Tokenize, join with EOS and cut into [N, seq_len] blocks (the last partial block dropped)."""
    import torch

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_blocks is not None and len(ids) >= max_blocks * seq_len:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise InputError(f"the text gives {len(ids)} tokens, fewer than one block of {seq_len}; give more data or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def agreement_questions(mmlu, subset, per_subject: int, seed: int = 0, log=print) -> list[Question] | None:
    """The evaluated subset's test questions a stage scores answer agreement on: `per_subject` per
    subject with `seed`; None (and a log line saying why) when there are none to score."""
    if not per_subject:
        return None
    try:
        questions = load_mmlu(mmlu, "test", resolve_subjects(subset))
    except InputError as e:
        log(f"no answer agreement: {e}")
        return None
    return sample_questions(questions, per_subject, seed=seed) or None
