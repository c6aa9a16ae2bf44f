"""GGUF export: a quantize folder's codes as llama.cpp blocks (read back by gguf's own dequantizer), the file
loaded and checked by llama.cpp itself (llama-cpp-python, the optional [gguf] extra that `make test` installs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from vcompress.core import quant_format
from vcompress.core.errors import InputError, Unsupported
from vcompress.core.layer_stream import file_tensors
from vcompress.exporters.gguf import GGUFExport, GGUFRunner, attention_rows, carried_blocks, export

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (pip install -e '.[gguf]')"
)
# a tiny random model's next-token logits are nearly flat: llama.cpp's int8 activations flip a tie now and then
# (Q4_1: 62 of 63 held-out tokens agreed), so 0.9 here where the default, for real models, asks 0.99
QUIET = dict(log=lambda _: None, threads=1, heldout_blocks=1, heldout_seq_len=64, min_heldout_top1=0.9)
GRIDS = {  # quantize options -> the block llama.cpp reads
    "Q4_1": ["--method", "rtn", "--group-size", "32", "--zero-point", "float"],
    "Q4_0": ["--method", "rtn", "--group-size", "32", "--sym"],
    "Q8_0": ["--method", "int8", "--group-size", "32", "--sym"],
}


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """The tiny Llama quantized onto each block grid (quantize's hand-off folders)."""
    from vcompress.cli import main

    root, folders = tmp_path_factory.mktemp("gguf-quant"), {}
    for block, options in GRIDS.items():
        folders[block] = root / block
        args = ["quantize", "--model", tiny_models["llama"], "--out", folders[block], *options, "--heldout-blocks", "0"]
        assert main([str(a) for a in [*args, "--eval-per-subject", "0"]]) == 0
    return folders


@pytest.mark.parametrize("block", GRIDS)
def test_codes_become_blocks_that_dequantize_to_the_checkpoint(quantized, block):
    """gguf's own dequantizer reads our blocks back as the quantize folder's weights: bit for bit for Q4_0 and
    Q8_0; for Q4_1 within float32 rounding, the minimum being the float16 quantize rounded it to."""
    grid = quant_format.read_quant_grid(quantized[block])
    packed = file_tensors(quantized[block] / grid["weights_file"])
    for spec in grid["linears"].values():
        data, qtype, moved = carried_blocks(packed, spec, None)
        assert qtype.name == block
        want = quant_format.dequantize(quant_format.linear_tensors(packed, spec), spec["bits"]).numpy().T
        got = gguf.quants.dequantize(data, qtype)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= (0 if block != "Q4_1" else 1e-6 * np.abs(want).max())
        assert moved <= 1e-6


def test_llama_rows_pair_adjacent_rotary_dims():
    # one head of 8: transformers rotates dims (0, 4), (1, 5)...; llama.cpp's llama pairs (0, 1), (2, 3)...
    assert attention_rows(1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert attention_rows(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_a_float_source_needs_codes_or_quant_none(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="vcompress quantize"):
        export(tiny_llama, tmp_path / "g", "int4", **QUIET)
    assert not (tmp_path / "g").exists()


def test_gpt2_is_refused_naming_the_architectures(tiny_models, tmp_path):
    with pytest.raises(Unsupported, match="llama and qwen2"):
        export(tiny_models["gpt2"], tmp_path / "g", "none", **QUIET)
    assert not (tmp_path / "g").exists()


def test_predicted_bytes_follow_the_block_sizes():
    shape = {"body_params": 32 * 1000, "head_params": 32 * 100, "tied": True}
    stage = GGUFExport({"quant": "int4", "table_bits": 8})
    q4_1 = stage.predicted_weights(shape, {"method": "gptq", "bits": 4, "group_size": 128, "sym": False}, 1024)
    q4_0 = stage.predicted_weights(shape, {"method": "gptq", "bits": 4, "group_size": 32, "sym": True}, 1024)
    assert q4_1["stored_bytes"] == 1000 * 20 + 100 * 34 and q4_0["stored_bytes"] == 1000 * 18 + 100 * 34


# --- llama.cpp itself --------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("block", GRIDS)
def test_llama_cpp_loads_the_file_and_agrees_with_pytorch(quantized, block, tmp_path):
    out = tmp_path / "gguf"
    quant = "int8" if block == "Q8_0" else "int4"
    metrics = export(quantized[block], out, quant, table_bits=0, **QUIET)
    assert metrics["types"][block] == 14 and metrics["parity"]["passed"]
    assert metrics["heldout"]["failure"] is None and metrics["heldout"]["top1_agreement"] >= 0.9
    # everything llama.cpp needs is in the one file: tokenizer, special ids, chat template
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or "id" in k}
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and len(reader.fields["tokenizer.ggml.tokens"].data) == 384
    # llama.cpp's logits against the dequantized checkpoint on fresh ids
    reference, _ = quant_format.load_dequantized(quantized[block], quant_format.read_quant_grid(quantized[block]))
    ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(7))
    runner = GGUFRunner(out, threads=1)
    try:
        got = runner.forward(ids)
    finally:
        runner.close()
    want = reference(input_ids=ids).logits
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@needs_llama
def test_qwen2_and_an_explicit_head_dim_load_in_llama_cpp(tiny_models, tmp_path):
    """qwen2 (biases, untied head, llama.cpp's NeoX rotary: no row reordering) and a Llama whose head_dim is not
    hidden / heads (what head pruning writes: llama.cpp reads it as key_length), fp32: held to fp32 parity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("llama", 384, head_dim=32))
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(pruned)
    for source in (tiny_models["qwen2"], pruned):
        metrics = export(source, tmp_path / f"{source.name}-gguf", "none", **QUIET)
        assert metrics["types"]["F32"] and metrics["parity"]["passed"] and metrics["parity"]["greedy_identical"] == 5, source.name
    reader = gguf.GGUFReader(str(tmp_path / "pruned-gguf" / "model.gguf"))
    assert reader.fields["llama.attention.key_length"].contents() == 32


@needs_llama
def test_cli_runs_gptq_onto_the_block_grid_from_a_float_model(cli, tiny_llama, calib, tmp_path):
    out = tmp_path / "gguf"
    args = ["export", "gguf", "--model", tiny_llama, "--out", out, "--quant", "int4", "--threads", "1", "--heldout-blocks", "1"]
    code, stdout, stderr = cli(*args, "--heldout-seq-len", "64", "--min-heldout-top1", "0.9", "--json")
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["types"]["Q4_1"] == 14 and metrics["parity"]["passed"]
    assert not (tmp_path / ".gguf.work").exists()  # the GPTQ folder went with the work folder
    recipe = (out / "recipe.yaml").read_text()
    assert "gptq" in recipe


@needs_llama
def test_host_bench_runs_the_gguf_through_llama_cpp_without_torch(quantized, tmp_path):
    out = tmp_path / "gguf"
    export(quantized["Q4_1"], out, "int4", **QUIET)
    bench = [sys.executable, "-m", "vcompress.devices.bench", str(out), "--prompt-tokens", "8", "--decode-tokens", "4"]
    done = subprocess.run(bench + ["--runs", "1", "--warmup", "0", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["decode_tokens_per_s"]["value"] > 0 and "llama_cpp" in result["modules_imported"]
    assert "torch" not in result["modules_imported"] and result["runtime"]["module"] == "llama_cpp"


@needs_llama
def test_a_pruned_student_quantized_and_exported_loads_in_llama_cpp(cli, tiny_llama, tmp_path):
    """The road a student takes: prune (a KV group with its query heads, half the MLP, a layer) -> quantize (Q4_1
    grid) -> export gguf; llama.cpp reads the smaller sizes from the file's metadata and agrees with PyTorch."""
    from transformers import AutoConfig

    fast = ["--heldout-blocks", "0", "--eval-per-subject", "0"]
    pruned, quantized, out = tmp_path / "pruned", tmp_path / "quant", tmp_path / "gguf"
    code, _, err = cli(
        "prune",
        "--model",
        tiny_llama,
        "--out",
        pruned,
        "--heads",
        "0.5",
        "--mlp",
        "0.5",
        "--layers",
        "1",
        "--samples",
        "2",
        "--seq-len",
        "32",
        *fast,
    )
    assert code == 0, err
    code, _, err = cli("quantize", "--model", pruned, "--out", quantized, *GRIDS["Q4_1"], *fast)
    assert code == 0, err
    config = AutoConfig.from_pretrained(pruned)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads, config.intermediate_size) == (1, 1, 2, 64)
    metrics = export(quantized, out, "int4", table_bits=0, **QUIET)
    assert metrics["parity"]["passed"] and metrics["heldout"]["failure"] is None
    fields = gguf.GGUFReader(str(out / "model.gguf")).fields
    sizes = ("block_count", "attention.head_count", "attention.head_count_kv", "feed_forward_length", "attention.key_length")
    assert [fields[f"llama.{k}"].contents() for k in sizes] == [1, 2, 1, 64, 16]
    assert metrics["parity"]["greedy_identical"] >= 4  # of 5 prompts: llama.cpp's greedy tokens are PyTorch's


@needs_llama
def test_a_gguf_sources_kept_q4_1_blocks_are_written_back_byte_for_byte(tmp_path, tokenizer, monkeypatch):
    """The default's road (x86-cpu-gguf): quantize keeps a GGUF source's Q4_1 blocks (scales and float minimums,
    no zero point) and the export writes them back unchanged, llama's q/k rows permuted back as llama.cpp holds them."""

    from tests.gguf_tiny import write_gguf
    from tests.tiny import build_config, random_model
    from vcompress.cli import main

    monkeypatch.setenv("VCOMPRESS_CACHE", str(tmp_path / "cache"))
    model = random_model(build_config("llama", len(tokenizer) + 1, 2))
    tokenizer.save_pretrained(tmp_path / "tok")
    source = tmp_path / "src.gguf"
    write_gguf(model, tmp_path / "tok", source, {})
    folder, out = tmp_path / "q", tmp_path / "gguf"
    args = ["quantize", "--model", source, "--out", folder, "--method", "rtn", "--group-size", "32", "--zero-point", "float"]
    assert main([str(a) for a in [*args, "--heldout-blocks", "0", "--eval-per-subject", "0"]]) == 0
    assert all("mins" in s["tensors"] for s in quant_format.read_quant_grid(folder)["linears"].values())
    metrics = export(folder, out, "int4", table_bits=0, **QUIET)
    assert metrics["types"]["Q4_1"] == 14 and metrics["q4_1_min_float16_move"] == 0
    theirs = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    ours = [t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(ours) == 14 and all(np.array_equal(t.data, theirs[t.name].data) for t in ours)
