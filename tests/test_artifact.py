import pytest

from vcompress.core.artifact import read_metrics, read_recipe, stage_folder
from vcompress.core.errors import InputError
from vcompress.core.stage import Stage, StageConfig, execute


class Echo(Stage):
    name = "echo"

    class Config(StageConfig):
        text: str = "hi"
        fail: bool = False

    def run(self, ctx):
        (ctx.out / "out.txt").write_text(self.config.text)
        if self.config.fail:
            raise RuntimeError("boom")
        return {"chars": len(self.config.text)}


def test_execute_writes_artifact_recipe_and_metrics(tmp_path):
    out = tmp_path / "01-echo"
    metrics = execute(Echo({"text": "hello"}), out, seed=3)
    assert (out / "out.txt").read_text() == "hello"
    assert read_recipe(out)["config"] == {"text": "hello", "fail": False}
    assert read_recipe(out)["seed"] == 3
    assert read_metrics(out)["chars"] == 5 == metrics["chars"]


def test_finished_folder_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "s"
    execute(Echo({"text": "one"}), out)
    with pytest.raises(InputError, match="already exists; pass --force"):
        execute(Echo({"text": "two"}), out)
    assert (out / "out.txt").read_text() == "one"
    execute(Echo({"text": "two"}), out, force=True)
    assert (out / "out.txt").read_text() == "two"


def test_failed_stage_leaves_previous_artifact_whole(tmp_path):
    out = tmp_path / "s"
    execute(Echo({"text": "one"}), out)
    with pytest.raises(RuntimeError):
        execute(Echo({"text": "two", "fail": True}), out, force=True)
    assert (out / "out.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".work")) == ["s"]


def test_unknown_setting_is_rejected_before_work():
    with pytest.raises(InputError, match="unknown echo setting 'txt'; known: text, fail"):
        Echo({"txt": "x"})


def test_stage_folder_never_appears_half_written(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        with stage_folder(out) as tmp:
            (tmp / "partial").write_text("1")
            raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_prompt_graph_beside_the_decode_graph_counts_in_the_size_not_in_the_bytes_per_token(tmp_path):
    import json

    from vcompress.core.export_manifest import model_files, model_size_bytes

    (tmp_path / "model.onnx").write_bytes(b"m" * 100)
    (tmp_path / "model_prefill.onnx").write_bytes(b"p" * 40)
    files = {"model": "model.onnx", "prefill_model": "model_prefill.onnx", "config": "config.json"}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "onnx", "files": files}))
    assert model_files(tmp_path) == [tmp_path / "model.onnx"]
    assert model_size_bytes(tmp_path) == 140
