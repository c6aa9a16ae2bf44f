import hashlib
import importlib.resources
import json
import os
import stat
import struct
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.runs import MODEL_HASH, SIGNATURE_INPUTS, VERSIONS, make_run
from vcompress.package import FILE_MODE

STARTED = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(
        tmp_path / "run", started=STARTED, ttft_samples=[86.0, 87.1, 88.2, 87.0, 90.1], decode_samples=[140.2, 139.0, 141.5, 138.8, 140.9]
    )


@pytest.fixture
def bundle(run, tmp_path, cli) -> Path:
    out = tmp_path / "bundle.zip"
    code, msg, err = cli("package", run, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert msg.startswith(f"wrote {out}")
    return out


def rewrite(src: Path, dst: Path, *, drop=(), change=None, add=()) -> Path:
    """Copy a bundle entry by entry (valid zip structure) with some entries dropped, changed or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info)
            if change and info.filename == change[0]:
                data = change[1](data)
            zout.writestr(info, data)
        for info, data in add:
            zout.writestr(info, data)
    return dst


def entry(name: str, mode: int = FILE_MODE) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def test_bundle_contents_and_manifest(bundle, run, cli):
    code, out, _ = cli("verify", bundle)
    assert code == 0 and out.startswith("ok: ") and out.count("\n") == 1
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        assert names == sorted(names)
        for info in zf.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0) and info.external_attr >> 16 == FILE_MODE
        for f in manifest["files"]:  # each hash and size is that of the run's own file
            data = zf.read(f["path"])
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    assert {
        "model/model.onnx",
        "model/model.onnx.data",
        "model/genai_config.json",  # the folder ONNX Runtime GenAI opens: the bundle is what the app loads
        "model/manifest.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "model/generation_config.json",
        "model/chat_template.jinja",
        "profile.yaml",
        "verdict.json",
        "recipes/01-analyze.yaml",
        "recipes/04-quantize.yaml",
        "recipes/05-export-onnx.yaml",
        "recipes/06-validate.yaml",
        "manifest.json",
    } == set(names)
    assert zipfile.ZipFile(bundle).read("model/model.onnx") == (run / "05-export-onnx" / "model.onnx").read_bytes()
    assert manifest["bundle"] == "vcompress-bundle/1" and manifest["format"] == "onnx"
    assert manifest["model"]["hash"] == MODEL_HASH and manifest["signature"]["inputs"] == SIGNATURE_INPUTS
    assert manifest["validated_with"]["versions"] == VERSIONS and manifest["validated_with"]["device"] == "x86-64 host"
    assert manifest["verdict"] == {"passed": True, "allow_failed": False, "failed_checks": [], "file": "verdict.json"}
    assert manifest["chat_template"] == "model/chat_template.jinja" and manifest["generation_config"] == "model/generation_config.json"
    assert manifest["vcompress"] and manifest["run"]["run_id"].startswith("20261120T020000Z-x86-cpu-")


def test_tflite_bundle_carries_the_litert_lm_bundle(tmp_path, cli):
    run = make_run(tmp_path / "run", started=STARTED, ttft_samples=[86.0, 87.1, 88.2], decode_samples=[140.2, 139.0, 141.5], fmt="tflite")
    out = tmp_path / "tflite.zip"
    code, _, err = cli("package", run, "--format", "tflite", "--out", out)
    assert code == 0, err
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {"model/model.tflite", "model/model.litertlm", "model/tokenizer.json", "model/manifest.json"} <= names
        assert zf.read("model/model.litertlm") == (run / "05-export-tflite" / "model.litertlm").read_bytes()
        # the export's manifest, bundled as is, names the runtime the app ships and its version
        app_runtime = json.loads(zf.read("model/manifest.json"))["app_runtime"]
        assert (app_runtime["name"], app_runtime["version"], app_runtime["bundle"]) == ("litert-lm", "0.18.1", "model.litertlm")
        assert json.loads(zf.read("manifest.json"))["format"] == "tflite"
    code, msg, _ = cli("verify", out)
    assert code == 0 and msg.startswith("ok: ")
    bad = rewrite(out, tmp_path / "bad.zip", change=("model/model.litertlm", lambda d: d[:-1] + bytes([d[-1] ^ 1])))
    code, _, err = cli("verify", bad)
    assert code == 1 and "model/model.litertlm" in err and "sha256 differs" in err


def test_same_run_packaged_twice_is_byte_identical(bundle, run, tmp_path, cli):
    for path in run.rglob("*"):  # a later checkout: other mtimes, same content
        os.utime(path, (1_900_000_000, 1_900_000_000))
    again = tmp_path / "again.zip"
    assert cli("package", run, "--format", "onnx", "--out", again)[0] == 0
    assert again.read_bytes() == bundle.read_bytes()
    code, _, err = cli("package", run, "--format", "onnx", "--out", again)
    assert code == 2 and "--force" in err
    assert cli("package", run, "--format", "onnx", "--out", again, "--force")[0] == 0


def _data_offset(zip_path: Path, name: str) -> int:
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(name)
    raw = zip_path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize(
    "case",
    [
        "changed byte in content",
        "flipped byte in the zip",
        "extra file",
        "dot-dot entry",
        "absolute entry",
        "symlink entry",
        "missing file",
        "broken manifest",
    ],
)
def test_tampered_bundles_are_refused_naming_the_file(bundle, tmp_path, cli, case):
    bad = tmp_path / "bad.zip"
    if case == "changed byte in content":
        rewrite(bundle, bad, change=("model/model.onnx", lambda d: bytes([d[0] ^ 1]) + d[1:]))
        named, why = "model/model.onnx", "sha256 differs"
    elif case == "flipped byte in the zip":
        raw = bytearray(bundle.read_bytes())
        raw[_data_offset(bundle, "model/model.onnx.data") + 100] ^= 0xFF
        bad.write_bytes(bytes(raw))
        named, why = "model/model.onnx.data", "corrupt"
    elif case == "extra file":
        rewrite(bundle, bad, add=[(entry("model/extra.so"), b"payload")])
        named, why = "model/extra.so", "not listed"
    elif case == "dot-dot entry":
        rewrite(bundle, bad, add=[(entry("model/../../evil.sh"), b"#!/bin/sh\n")])
        named, why = "model/../../evil.sh", "outside the bundle root"
    elif case == "absolute entry":
        rewrite(bundle, bad, add=[(entry("/etc/cron.d/evil"), b"* * * * * root true\n")])
        named, why = "/etc/cron.d/evil", "absolute path"
    elif case == "symlink entry":
        rewrite(bundle, bad, add=[(entry("model/link", stat.S_IFLNK | 0o777), b"/etc/passwd")])
        named, why = "model/link", "symbolic link"
    elif case == "missing file":
        rewrite(bundle, bad, drop=("model/tokenizer.json",))
        named, why = "model/tokenizer.json", "missing"
    else:
        rewrite(bundle, bad, change=("manifest.json", lambda d: d.replace(b'"sha256"', b'"sha1"', 1)))
        named, why = "manifest.json", "schema"
    code, out, err = cli("verify", bad)
    assert code == 1 and out == ""
    assert named in err and why in err and err.count("\n") == 1


def test_failed_verdict_needs_allow_failed(tmp_path, cli):
    failed = make_run(tmp_path / "failed", started=STARTED, ttft_samples=[586.0, 587.1, 588.2], decode_samples=[140.2, 139.0, 141.5])
    out = tmp_path / "failed.zip"
    code, _, err = cli("package", failed, "--format", "onnx", "--out", out)
    assert code == 1 and "max_ttft_ms" in err and "--allow-failed" in err and not out.exists()
    code, msg, _ = cli("package", failed, "--format", "onnx", "--out", out, "--allow-failed")
    assert code == 0 and "FAILED" in msg
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert manifest["verdict"] == {"passed": False, "allow_failed": True, "failed_checks": ["max_ttft_ms"], "file": "verdict.json"}
    code, msg, _ = cli("verify", out)
    assert code == 0 and "allow-failed" in msg
    # a failed bundle whose manifest claims nothing is wrong is refused
    relabelled = rewrite(
        out, tmp_path / "relabelled.zip", change=("manifest.json", lambda d: d.replace(b'"allow_failed": true', b'"allow_failed": false'))
    )
    code, _, err = cli("verify", relabelled)
    assert code == 1 and "manifest.json" in err


def test_wrong_format_and_tokenizer_from_an_earlier_stage(run, tmp_path, cli):
    code, _, err = cli("package", run, "--format", "tflite", "--out", tmp_path / "x.zip")
    assert code == 2 and "no tflite export" in err and "--format onnx" in err
    (run / "05-export-onnx" / "tokenizer.json").rename(run / "04-quantize" / "tokenizer.json")
    out = tmp_path / "b.zip"
    assert cli("package", run, "--format", "onnx", "--out", out)[0] == 0
    assert zipfile.ZipFile(out).read("model/tokenizer.json") == (run / "04-quantize" / "tokenizer.json").read_bytes()
    (run / "04-quantize" / "tokenizer.json").unlink()
    code, _, err = cli("package", run, "--format", "onnx", "--out", tmp_path / "c.zip")
    assert code == 2 and "tokenizer" in err


def test_profile_is_the_one_the_run_used(run, tmp_path, cli):
    from vcompress.core.profiles import load_profile

    builtin = (importlib.resources.files("vcompress.profiles") / "x86-cpu.yaml").read_text()
    state = json.loads((run / "run.json").read_text())
    data = load_profile("x86-cpu").model_dump(mode="json")
    # `vcompress run` hashes the parsed profile as sorted JSON: the built-in YAML (with its comments) matches
    state["profile"]["sha256"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    (run / "run.json").write_text(json.dumps(state))
    assert cli("package", run, "--format", "onnx", "--out", tmp_path / "a.zip")[0] == 0
    assert zipfile.ZipFile(tmp_path / "a.zip").read("profile.yaml").decode() == builtin
    # a profile edited after the run is not bundled as if it were the one validated
    state["profile"]["sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(state))
    code, _, err = cli("package", run, "--format", "onnx", "--out", tmp_path / "b.zip")
    assert code == 2 and "profile" in err and "sha256" in err
    # ...unless run.json kept the profile's data: then that is bundled
    state["profile"]["data"] = {**data, "description": "as run"}
    (run / "run.json").write_text(json.dumps(state))
    assert cli("package", run, "--format", "onnx", "--out", tmp_path / "c.zip")[0] == 0
    assert "as run" in zipfile.ZipFile(tmp_path / "c.zip").read("profile.yaml").decode()


def test_an_encrypted_entry_is_bad_input_not_a_crash(bundle, tmp_path, cli):
    raw = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("model/model.onnx")
    name = info.filename.encode()
    raw[info.header_offset + 6] |= 0x1  # the local header's "encrypted" flag ...
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(name)] != name:  # ... and the central directory's
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 8] |= 0x1
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    assert zipfile.ZipFile(bad).getinfo("model/model.onnx").flag_bits & 0x1
    code, _, err = cli("verify", bad)
    assert code == 2 and "model/model.onnx" in err and "encrypted" in err and err.count("\n") == 1


def test_a_verdict_that_is_not_an_object_is_bad_input(bundle, tmp_path, cli):
    body = b"[true]\n"
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    for f in manifest["files"]:
        if f["path"] == "verdict.json":
            f.update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    bad = rewrite(bundle, tmp_path / "bad.zip", change=("verdict.json", lambda _: body))
    rewrite(bad, tmp_path / "bad2.zip", change=("manifest.json", lambda _: json.dumps(manifest).encode()))
    code, _, err = cli("verify", tmp_path / "bad2.zip")
    assert code == 2 and "verdict.json" in err and "JSON object" in err and err.count("\n") == 1
