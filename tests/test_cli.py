import os
import subprocess
import sys


def test_help_lists_command_groups(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in (
        "inspect",
        "profiles",
        "run",
        "analyze",
        "prune",
        "distill",
        "quantize",
        "export",
        "eval",
        "validate",
        "record",
        "report",
        "package",
        "verify",
    ):
        assert name in out


def test_profiles_list_and_show(cli):
    code, out, _ = cli("profiles", "list", "--json")
    assert code == 0
    assert {"snapdragon8g2", "x86-cpu", "pixel8"} <= set(
        __import__("json").loads(out) and [p["name"] for p in __import__("json").loads(out)]
    )
    code, out, _ = cli("profiles", "show", "snapdragon8g2")
    assert code == 0 and "67.2" in out and "LPDDR5X" in out


def test_profiles_validate(cli, tmp_path):
    code, out, _ = cli("profiles", "validate", "x86-cpu")
    assert code == 0 and out.startswith("ok:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(open("profiles/x86-cpu.yaml").read().replace("max_ttft_ms: 500", "max_ttft_ms: -1"))
    code, _, err = cli("profiles", "validate", bad)
    assert code == 2 and "budgets.max_ttft_ms" in err and str(bad) in err and err.count("\n") == 1


def test_inspect_tiny_json(cli, tiny_llama):
    code, out, _ = cli("inspect", "--model", tiny_llama, "--json")
    info = __import__("json").loads(out)
    assert code == 0 and info["kv_heads"] == 2 and info["head_dim"] == 16


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "vcompress", "inspect", "--model", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert "does not exist" in run.stderr
    run = subprocess.run([sys.executable, "-m", "vcompress", "profiles", "show", "nope"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown profile 'nope'" in run.stderr


# A command that draws a bare tqdm bar, as transformers' GGUF conversion does, run through `main` in a fresh
# process: tqdm reads its environment once, on import, so only a new process shows what a user's run sees.
BARE_TQDM_COMMAND = """
import sys
from vcompress import cli

@cli.cli.command("draw-bar")
def draw_bar():
    from tqdm.auto import tqdm
    for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass

sys.exit(cli.main(sys.argv[1:]))
"""


def test_third_party_bars_are_quiet_unless_verbose():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_DISABLE", "HF_DATASETS_DISABLE"))}
    quiet = subprocess.run([sys.executable, "-c", BARE_TQDM_COMMAND, "draw-bar"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout == ""
    verbose = subprocess.run([sys.executable, "-c", BARE_TQDM_COMMAND, "--verbose", "draw-bar"], capture_output=True, text=True, env=env)
    assert "Converting and de-quantizing GGUF tensors" in verbose.stderr and "3/3" in verbose.stderr
