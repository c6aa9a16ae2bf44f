from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("VCOMPRESS_MMLU", None)  # every test reads the MMLU copy shipped in the package, whatever the shell sets

from tests.tiny import CORPUS, build_model, build_tokenizer  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One saved tiny random checkpoint per architecture (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_model(arch, root / arch, tokenizer) for arch in ARCHS}


@pytest.fixture(scope="session")
def calib(tmp_path_factory) -> Path:
    """A calibration text file (the tiny corpus) for quantize runs."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(CORPUS))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Gemma 3 (one KV head, QK-norm, sliding window 16; layers sliding, global, sliding)."""
    return build_model("gemma3", tmp_path_factory.mktemp("tiny") / "gemma3", tokenizer, layers=3)


@pytest.fixture(params=ARCHS)
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def mmlu_root():
    """The MMLU copy shipped in the package (a Hendrycks folder inside its archive): what --mmlu defaults to."""
    from vcompress.core.data import packaged_mmlu

    return packaged_mmlu()


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process as a user would; returns (exit code, stdout, stderr)."""
    from vcompress.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def load_bench(name: str):
    """bench/<name>.py as a module (the bench folder is scripts, not a package)."""
    from vcompress.core.by_path import load_by_path

    return load_by_path(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
