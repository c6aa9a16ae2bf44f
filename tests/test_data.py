"""MMLU loading: the packaged copy, Hendrycks CSV folders, JSONL, subjects and groups, seeded sampling;
users' domain files."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from vcompress.core.data import (
    ALL_SUBJECTS,
    GROUPS,
    PACKAGED_MMLU,
    Question,
    default_texts,
    find_mmlu,
    load_mmlu,
    read_domain_file,
    resolve_subjects,
    sample_questions,
)
from vcompress.core.errors import InputError

# The copy the tests read before MMLU was packaged, where it sits beside the checkout.
SHARED_MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"


def write_csv(folder, subject, split, rows: list[str]):
    (folder / split).mkdir(parents=True, exist_ok=True)
    path = folder / split / f"{subject}_{split}.csv"
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_folder_loads_questions_and_answers(tmp_path):
    write_csv(tmp_path, "anatomy", "test", ['"Which, bone?",a,b,c,d,B', "Q2,e,f,g,h,d"])
    write_csv(tmp_path, "virology", "test", ["Q3,i,j,k,l,A"])
    questions = load_mmlu(tmp_path, "test")
    assert questions[0] == Question("anatomy", "Which, bone?", ("a", "b", "c", "d"), 1)
    assert [q.answer for q in questions] == [1, 3, 0]
    assert [q.subject for q in load_mmlu(tmp_path, "test", ["virology"])] == ["virology"]


def test_malformed_csv_row_names_file_and_line(tmp_path):
    # The first row spans two lines (a quoted newline), so the bad row starts on line 3.
    path = write_csv(tmp_path, "anatomy", "test", ['"Two\nlines",a,b,c,d,A', "only,four,columns,here"])
    with pytest.raises(InputError, match=rf"{path}:3: expected 6 columns"):
        load_mmlu(tmp_path, "test")
    write_csv(tmp_path, "anatomy", "test", ["Q,a,b,c,d,A", "Q,a,b,c,d,E"])
    with pytest.raises(InputError, match=r"anatomy_test.csv:2: answer 'E' is not one of A, B, C, D"):
        load_mmlu(tmp_path, "test")


def test_missing_split_folder_says_what_a_folder_holds(tmp_path):
    write_csv(tmp_path, "anatomy", "test", ["Q,a,b,c,d,A"])
    with pytest.raises(InputError, match="no dev/ folder"):
        load_mmlu(tmp_path, "dev")


def test_unknown_subject_lists_valid_groups_and_subjects():
    with pytest.raises(InputError) as info:
        resolve_subjects("medical,anatomyy")
    message = str(info.value)
    assert "'anatomyy'" in message and "medical" in message and "professional_medicine" in message and "virology" in message


def test_groups_resolve_to_subjects():
    medical = resolve_subjects("medical")
    assert medical == sorted(GROUPS["medical"]) and len(medical) == 8 and {"anatomy", "professional_medicine", "virology"} <= set(medical)
    assert len(resolve_subjects("all")) == len(ALL_SUBJECTS) == 57
    assert sum(len(GROUPS[g]) for g in ("stem", "humanities", "social_sciences", "other")) == 57
    assert resolve_subjects(["virology", "anatomy", "virology"]) == ["anatomy", "virology"]


def test_jsonl_loads_letters_and_indices_and_splits(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    lines = [
        {"question": "Q1", "choices": ["a", "b", "c", "d"], "answer": "C", "subject": "anatomy"},
        {"question": "Q2", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "virology"},
        {"question": "D1", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "anatomy", "split": "dev"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    test = load_mmlu(path, "test")
    assert [(q.question, q.subject, q.answer) for q in test] == [("Q1", "anatomy", 2), ("Q2", "virology", 3)]
    assert [q.question for q in load_mmlu(path, "dev")] == ["D1"]  # lines without a split are test questions
    assert [q.question for q in load_mmlu(path, "test", ["virology"])] == ["Q2"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q", "choices": ["a","b","c","d"], "answer": 1}\n{"question": "Q", "choices": ["a"], "answer": 1}\n')
    with pytest.raises(InputError, match=rf"{path}:2: needs question"):
        load_mmlu(path)
    path.write_text("{not json\n")
    with pytest.raises(InputError, match=rf"{path}:1: not valid JSON"):
        load_mmlu(path)


def test_sampling_is_seeded_and_per_subject():
    questions = [Question(s, f"{s}{i}", ("a", "b", "c", "d"), i % 4) for s in ("anatomy", "virology") for i in range(30)]
    first = sample_questions(questions, 5, seed=0)
    assert [q.question for q in first] == [q.question for q in sample_questions(questions, 5, seed=0)]
    assert [q.question for q in first] != [q.question for q in sample_questions(questions, 5, seed=1)]
    assert [q.subject for q in first] == ["anatomy"] * 5 + ["virology"] * 5
    assert len(sample_questions(questions, None)) == 60 and len(sample_questions(questions, 100)) == 60


def test_packaged_copy_has_the_released_test_set(mmlu_root):
    test = load_mmlu(mmlu_root, "test")
    assert len(test) == 14042 and {q.subject for q in test} == set(ALL_SUBJECTS)
    dev = load_mmlu(mmlu_root, "dev", ["anatomy"])
    assert len(dev) == 5


def test_heldout_text_avoids_the_evaluated_subset(mmlu_root):
    medical = {q.question for q in load_mmlu(mmlu_root, "test", resolve_subjects("medical"))}
    heldout = default_texts("heldout", "medical", mmlu_root)
    calib = set(default_texts("calib", "medical", mmlu_root))
    assert heldout and not calib.intersection(heldout)
    assert not any(text.split("\nA. ")[0] in medical for text in heldout[:500])


def test_packaged_copy_is_byte_for_byte_the_copy_the_tests_always_used():
    listed = {name: digest for digest, name in (line.split("  ", 1) for line in (PACKAGED_MMLU / "SHA256SUMS").read_text().splitlines())}
    with zipfile.ZipFile(PACKAGED_MMLU / "mmlu.zip") as archive:
        packaged = {name: hashlib.sha256(archive.read(name)).hexdigest() for name in archive.namelist()}
    assert len(packaged) == 2 * 57 and packaged == listed
    if SHARED_MMLU.is_dir():
        shared = {p.relative_to(SHARED_MMLU).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in SHARED_MMLU.glob("*/*.csv")}
        assert shared == packaged


def test_mmlu_is_found_in_the_package_not_beside_the_working_folder(tmp_path, monkeypatch):
    write_csv(tmp_path / "shared" / "data" / "mmlu", "anatomy", "test", ["Q,a,b,c,d,A"])
    monkeypatch.chdir(tmp_path)
    assert len(load_mmlu(None, "test", ["anatomy"])) == 135  # the packaged anatomy test, not the one-row copy here
    mine = tmp_path / "mine"
    write_csv(mine, "anatomy", "test", ["Q,a,b,c,d,A", "Q2,a,b,c,d,B"])
    monkeypatch.setenv("VCOMPRESS_MMLU", str(mine))
    assert find_mmlu() == mine and len(load_mmlu(None, "test")) == 2
    assert find_mmlu(tmp_path / "shared" / "data" / "mmlu") == tmp_path / "shared" / "data" / "mmlu"  # --mmlu wins


def test_empty_subset_is_refused_with_the_valid_names(cli, tiny_llama):
    with pytest.raises(InputError, match="subset is empty"):
        resolve_subjects(" , ")
    code, _, err = cli("eval", "--model", tiny_llama, "--subset", "")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: the MMLU subset is empty") and "medical" in err and "virology" in err


def test_mmlu_csv_that_is_not_utf8_names_file_and_line(cli, tiny_llama, tmp_path):
    path = write_csv(tmp_path, "anatomy", "test", ["Q,a,b,c,d,A"])
    path.write_bytes(b'Q,a,b,c,d,A\n"Caf\xe9?",a,b,c,d,B\n')  # Latin-1, as a spreadsheet may save it
    code, _, err = cli("eval", "--model", tiny_llama, "--mmlu", tmp_path, "--subset", "anatomy", "--per-subject", "1")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"error: {path}:2: byte 0xe9 is not UTF-8; save the file as UTF-8"


def test_mmlu_jsonl_line_that_is_not_an_object_names_the_line(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    for line in ("[1, 2]", '"x"'):
        path.write_text(json.dumps({"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 1}) + "\n" + line + "\n")
        with pytest.raises(InputError, match=rf"{path}:2: each line must be a JSON object"):
            load_mmlu(path)


@pytest.mark.parametrize(
    "name, data", [("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), ("d.csv", b"prompt,completion\nhi,caf\xe9\n")]
)
def test_data_file_that_is_not_utf8_names_file_and_line(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=rf"^{path}:2: byte 0xe9 is not UTF-8; save the file as UTF-8$"):
        read_domain_file(path)


def test_data_files_read_with_a_bom_and_windows_newlines(tmp_path):
    csv_path, txt_path = tmp_path / "d.csv", tmp_path / "d.txt"
    csv_path.write_bytes('\ufeffprompt,completion\r\nhi,"two\r\nlines"\r\n'.encode())
    txt_path.write_bytes(b"first\r\n\r\nsecond\r\n")
    assert read_domain_file(csv_path) == [{"prompt": "hi", "completion": "two\r\nlines"}]
    assert read_domain_file(txt_path) == [{"text": "first"}, {"text": "second\n"}]
