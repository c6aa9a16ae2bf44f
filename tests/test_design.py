"""The design's promise: a new exporter and a new device are each one file plus a profile.

tests/plugins/ holds a "torch-half" exporter and a "fake-board" device; importing them is the only
change, and profiles, `run`, validation and packaging take them by name. The last test fails if a
hard-coded list of exporter, device or stage names comes back into the ground or face floors.
"""

import ast
import contextlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.plugins import fake_device, half_exporter  # noqa: F401  (registers torch-half and fake-board)
from vcompress import pipeline
from vcompress.core.registry import DEVICES, EXPORTERS, STAGES

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "tests" / "data" / "plugin-profile.yaml"


def with_connection(tmp_path: Path, connection: dict) -> Path:
    data = yaml.safe_load(PROFILE.read_text())
    data["device"]["connection"] = connection
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, tiny_llama):
    from vcompress.cli import main

    run, err = tmp_path_factory.mktemp("design") / "R", io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--profile", str(PROFILE), "--model", str(tiny_llama), "--out", str(run)])
    return code, run, err.getvalue()


def test_the_plugin_profile_validates(cli):
    code, out, err = cli("profiles", "validate", PROFILE)
    assert code == 0, err
    assert "plugin-board: torch-half, 2 stages" in out


@pytest.mark.parametrize(
    "connection, named",
    [
        ({"kind": "fake-board", "board_idd": "board-0042"}, "'board_idd'"),  # a typo
        ({"kind": "fake-board"}, "board_id"),  # its required setting left out
        ({"kind": "fake-board", "board_id": "b", "tokens_per_s": 0}, "tokens_per_s"),
        ({"board_id": "board-0042"}, "kind"),  # settings that name no device
    ],
)
def test_a_bad_fake_board_connection_fails_at_plan_time_naming_the_key(cli, tmp_path, connection, named):
    profile = with_connection(tmp_path, connection)
    for args in (("profiles", "validate", profile), ("run", "--profile", profile, "--out", tmp_path / "R", "--dry-run")):
        code, _, err = cli(*args)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "R").exists()


def test_run_exports_torch_half_and_validates_on_the_fake_board(plugin_run):
    code, run, err = plugin_run
    assert code == 0, err
    assert [s["folder"] for s in json.loads((run / "run.json").read_text())["stages"]] == ["05-export-torch-half", "06-validate"]
    export = run / "05-export-torch-half"
    manifest = json.loads((export / "manifest.json").read_text())
    assert (manifest["format"], manifest["runtime"], manifest["files"]["model"]) == ("torch-half", "torch", "model.safetensors")
    assert manifest["parity"]["passed"] and manifest["thresholds"]["min_top1_quantized"] == 0.5
    assert {str(t.dtype) for t in load_file(export / "model.safetensors").values()} == {"torch.float16"}

    latency = json.loads((run / "06-validate" / "latency.json").read_text())
    assert (latency["device_kind"], latency["board_id"], latency["backend"], latency["source"]) == (
        "fake-board",
        "board-0042",
        "torch-half",
        "estimated",
    )
    assert latency["decode_tokens_per_s"] == {"value": 40, "unit": "tokens/s", "source": "estimated", "device": "plugin test board"}
    assert latency["ttft_ms"]["value"] == 800  # 32 prompt tokens at 40 tokens/s
    verdict = json.loads((run / "06-validate" / "verdict.json").read_text())
    assert (verdict["format"], verdict["backend"], verdict["device"], verdict["passed"]) == (
        "torch-half",
        "torch-half",
        "plugin test board",
        True,
    )
    sources = {c["budget"]: c["source"] for c in verdict["checks"]}
    assert sources["max_ttft_ms"] == sources["min_decode_tokens_per_s"] == sources["max_peak_ram_mb"] == "estimated"
    assert sources["max_model_size_mb"] == "measured"


def test_package_takes_the_plugin_format(plugin_run, cli, tmp_path):
    run = plugin_run[1]
    bundle = tmp_path / "bundle.zip"
    code, _, err = cli("package", run, "--format", "torch-half", "--out", bundle)
    assert code == 0, err
    assert cli("verify", bundle)[0] == 0
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert "model/model.safetensors" in zf.namelist()
    assert manifest["format"] == "torch-half" and manifest["validated_with"]["device"] == "plugin test board"


def test_cli_choices_come_from_the_registries(cli, tmp_path):
    code, _, err = cli("package", tmp_path, "--format", "coreml", "--out", tmp_path / "b.zip")
    assert code == 2 and "'coreml'" in err and "torch-half" in err
    code, _, err = cli("run", "--profile", PROFILE, "--out", tmp_path / "R", "--device", "toaster", "--dry-run")
    assert code == 2 and "'toaster'" in err and "fake-board" in err
    assert cli("run", "--profile", PROFILE, "--out", tmp_path / "R", "--device", "fake-board", "--dry-run")[0] == 0


def test_an_exporter_that_cannot_predict_its_size_refuses_prune_auto_plainly():
    """The prune planner asks the target's exporter what it would store; one that does not say refuses."""
    from vcompress.compress.prune_plan import predicted_weights
    from vcompress.core.errors import Unsupported
    from vcompress.core.profiles import load_profile

    profile = load_profile(PROFILE)
    with pytest.raises(Unsupported, match="torch-half exporter cannot predict the size of its artifact"):
        predicted_weights({"body_params": 1, "head_params": 1, "tied": True, "head_dim": 1, "model_type": "llama"}, profile)


# --- no hard-coded names --------------------------------------------------------------

# Every folder asks the registries; a name may be written only in its plugin's own files.
FOLDERS = ("core", "compress", "exporters", "devices", "vcompress")
CHECKED = sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py"))


def registered_names() -> set[str]:
    pipeline.load_stages()
    import vcompress.devices  # noqa: F401  (registers the devices)

    return {*EXPORTERS.names(), *DEVICES.names(), *STAGES.names()}


def owned_files() -> dict[Path, set[str]]:
    """File -> the registered names that are its own: the module registering the name, and for an exporter the
    session modules it names for the latency bench (its runtime half)."""
    import importlib.util
    import inspect

    registered_names()
    owned: dict[Path, set[str]] = {}
    for registry in (EXPORTERS, DEVICES, STAGES):
        for name in registry.names():
            entry = registry.get(name)
            files = [inspect.getsourcefile(entry)]
            files += [importlib.util.find_spec(module).origin for module in getattr(entry, "sessions", {}).values()]
            for file in files:
                owned.setdefault(Path(file).resolve(), set()).add(name)
    return owned


def hard_coded(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each registered name written where a registry should be asked: compared against, in a
    Literal[...] or click.Choice, as a default, or listed beside another name in a tuple, list, set or dict."""

    def named(node) -> list[ast.Constant]:
        return [node] if isinstance(node, ast.Constant) and node.value in names else []

    def elements(node) -> list[ast.Constant]:
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [node])
        return [c for item in items if item is not None for c in named(item)]

    found: list[ast.Constant] = []

    def visit(node) -> None:
        if isinstance(node, ast.Compare):
            found.extend(c for side in (node.left, *node.comparators) for c in elements(side))
        elif isinstance(node, ast.Subscript) and getattr(node.value, "id", getattr(node.value, "attr", None)) == "Literal":
            found.extend(elements(node.slice))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Choice":
            found.extend(c for arg in node.args for c in elements(arg))
        elif isinstance(node, ast.Call):
            found.extend(c for kw in node.keywords if kw.arg == "default" for c in named(kw.value))
        elif isinstance(node, (ast.AnnAssign, ast.Assign)) and node.value is not None:
            found.extend(named(node.value))
        elif isinstance(node, ast.arguments):
            found.extend(c for d in (*node.defaults, *node.kw_defaults) if d is not None for c in named(d))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and len(elements(node)) >= 2:
            found.extend(elements(node))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return sorted({(c.lineno, c.value) for c in found})


def test_hard_coded_check_catches_the_patterns_it_is_for():
    names = {"onnx", "tflite", "ssh", "roofline"}
    source = """
format: Literal["onnx", "tflite"]
kind: str = "roofline"
if device == "ssh": pass
choice = click.Choice(["onnx"])
FORMATS = ("onnx", "tflite")
command("onnx")  # a command's own name: fine
"""
    assert hard_coded(ast.parse(source), names) == [
        (2, "onnx"),
        (2, "tflite"),
        (3, "roofline"),
        (4, "ssh"),
        (5, "onnx"),
        (6, "onnx"),
        (6, "tflite"),
    ]


def test_each_name_is_owned_by_the_file_that_registers_it():
    owned = {path.relative_to(ROOT).as_posix(): names for path, names in owned_files().items() if path.is_relative_to(ROOT)}
    assert owned["exporters/onnx.py"] == {"onnx"} and owned["exporters/_onnx_session.py"] == {"onnx"}
    assert owned["devices/host.py"] == {"host"} and owned["exporters/base.py"] == {"export"}
    assert "core/registry.py" not in owned and "devices/bench.py" not in owned


def test_no_hard_coded_exporter_device_or_stage_names():
    names = registered_names()
    assert {"onnx", "tflite", "tensorrt", "host", "ssh", "adb", "roofline", "torch-half", "fake-board"} <= names
    assert {path.parent.name for path in CHECKED} >= {"core", "compress", "exporters", "devices", "vcompress", "commands"}
    owned = owned_files()
    offenders = []
    for path in CHECKED:
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        offenders += [f"{rel}:{line}: {name!r}" for line, name in hard_coded(tree, names - owned.get(path.resolve(), set()))]
    assert not offenders, "ask the registry instead of naming these:\n" + "\n".join(offenders)
