"""TFLite (LiteRT) export and its runner, on tiny Llama (GQA) / Qwen2 checkpoints; GPT-2 is refused.
The export's LiteRT-LM bundle runs under LiteRT-LM where litert-lm-api installs."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from vcompress.core.errors import Unsupported

QUIET = dict(log=lambda _: None, threads=1)
# Small signatures keep the tiny exports quick; the llama cache (100) is not a multiple of the prefill
# length (8), so a prompt near the cache's end takes the shifted last chunk. The llama export also has a
# short prefill signature (2 tokens) for short prompts and tails; the qwen2 one has the main one only.
SHAPES = {
    "llama": dict(prefill_tokens=8, short_prefill_tokens=2, cache_length=100),
    "qwen2": dict(prefill_tokens=8, cache_length=128),
}


def _needs_litert():
    pytest.importorskip("litert_torch", reason="needs the [tflite] extra (litert-torch, tensorflow-cpu, ai-edge-litert)")
    pytest.importorskip("ai_edge_litert.interpreter", reason="needs the [tflite] extra (ai-edge-litert)")


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    _needs_litert()
    from vcompress.exporters.tflite import export

    root = tmp_path_factory.mktemp("tflite")
    cache = {}

    def get(arch: str, quant: str = "none"):
        if (arch, quant) not in cache:
            out = root / f"{arch}-{quant}"
            # Tiny random models have near-flat logits: their int8 agreement says little (see test_onnx.py).
            loose = {} if quant == "none" else {"min_top1_quantized": 0.0}
            cache[arch, quant] = (out, export(tiny_models[arch], out, quant, **QUIET, **SHAPES[arch], **loose))
        return cache[arch, quant]

    return get


def _torch(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _weight_bytes(model_file) -> dict[str, int]:
    """Bytes of constant buffers in a .tflite by tensor type (int8 / float32 ...)."""
    from ai_edge_litert import schema_py_generated as schema

    data = model_file.read_bytes()
    model = schema.Model.GetRootAsModel(data, 0)
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sizes = [model.Buffers(i).DataLength() or int(model.Buffers(i).Size()) for i in range(model.BuffersLength())]
    seen, out = set(), {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if tensor.Buffer() and tensor.Buffer() not in seen and sizes[tensor.Buffer()]:
                seen.add(tensor.Buffer())  # signatures share their weights: count each buffer once
                kind = names[tensor.Type()]
                out[kind] = out.get(kind, 0) + sizes[tensor.Buffer()]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_export_matches_pytorch(exported, arch):
    out, metrics = exported(arch)
    parity = metrics["parity"]
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    assert parity["greedy_identical"] == parity["prompts"] == 5 and parity["greedy_tokens"] == 32
    assert json.loads((out / "metrics.json").read_text())["parity"]["passed"] is True


def test_manifest_describes_the_signatures(exported):
    from ai_edge_litert.interpreter import Interpreter

    out, _ = exported("llama")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "tflite" and manifest["quant"]["scheme"] == "none" and manifest["parity"]["passed"]
    for name in ("model", "config", "tokenizer"):
        assert (out / manifest["files"][name]).is_file()
    interpreter = Interpreter(model_path=str(out / manifest["files"]["model"]))
    assert sorted(interpreter.get_signature_list()) == sorted(s["name"] for s in manifest["signatures"].values())
    assert manifest["signatures"]["prefill"]["name"] == "prefill_8" and manifest["prefill_tokens"] == 8 and manifest["cache_length"] == 100
    assert manifest["signatures"]["prefill_short"]["name"] == "prefill_2" and manifest["short_prefill_tokens"] == 2
    for signature in manifest["signatures"].values():
        runner = interpreter.get_signature_runner(signature["name"])
        inputs = runner.get_input_details()
        assert {i["name"] for i in signature["inputs"]} == set(inputs)
        for tensor in signature["inputs"]:
            assert (
                tensor["shape"] == list(inputs[tensor["name"]]["shape"])
                and tensor["dtype"] == np.dtype(inputs[tensor["name"]]["dtype"]).name
            )
        assert inputs["tokens"]["dtype"] == np.int32 and inputs["input_pos"]["dtype"] == np.int32
        kv = [i for i in signature["inputs"] if i["name"].startswith("kv_cache_")]
        assert len(kv) == 2 * manifest["layers"] and all(100 in i["shape"] for i in kv)
    assert "logits" in {o["name"] for o in manifest["signatures"]["decode"]["outputs"]}


# short prompt (short chunks); across a chunk boundary; up to the cache's end (short tail, shifted last chunk)
@pytest.mark.parametrize("prompt", [5, 9, 99])
def test_kv_cache_decode_equals_full_recompute(exported, tiny_models, prompt):
    from vcompress.exporters.tflite import TFLiteRunner

    out, _ = exported("llama")
    runner = TFLiteRunner(out, threads=1)
    model = _torch(tiny_models["llama"])
    ids = torch.randint(5, 300, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    logits, state = runner.prefill(ids)
    seq = ids[0].tolist()
    for step in range(min(10, 100 - prompt)):
        full = model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert torch.allclose(logits, full, atol=1e-4), f"step {step}"
        token = int(logits.argmax()) if step % 2 else (step * 37) % 300  # also feed tokens greedy would not pick
        logits, state = runner.decode(token, state)
        seq.append(token)
    assert state.length == len(seq)
    with pytest.raises(Exception, match="cache of 100"):
        for _ in range(101):
            logits, state = runner.decode(1, state)


def test_prefill_chunks_take_the_short_signature_while_it_costs_fewer_tokens(exported):
    from vcompress.exporters._tflite_session import LiteRTSession

    session = LiteRTSession(exported("llama")[0], threads=1)
    assert sorted(session.prefills) == [2, 8]
    assert [session.chunk(n) for n in (1, 2, 3, 6, 7, 8, 20)] == [2, 2, 2, 2, 8, 8, 8]
    assert sorted(LiteRTSession(exported("qwen2")[0], threads=1).prefills) == [8]


def test_runner_through_the_evaluation_interface(exported, tiny_models, mmlu_root):
    from vcompress.core import scoring
    from vcompress.evaluate import Evaluator
    from vcompress.exporters import open_runner
    from vcompress.exporters.tflite import TFLiteRunner

    out, _ = exported("llama")
    runner = open_runner(out, threads=1)
    assert isinstance(runner, TFLiteRunner) and runner.backend == "tflite" and runner.max_length == 100
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: positions past it are not computed
    want = _torch(tiny_models["llama"])(input_ids=ids).logits
    got = runner.forward(ids, mask)
    assert got.shape == want.shape and torch.allclose(got[0], want[0], atol=1e-4) and torch.allclose(got[1, :7], want[1, :7], atol=1e-4)
    picked = scoring.call_logits(runner.forward, ids, mask, torch.tensor([3, 6]))  # evaluation asks only for what it reads
    assert torch.allclose(picked, want[:, [3, 6]], atol=1e-4)
    # MMLU through the evaluator: the export's context (its cache, 100) truncates prompts on the left,
    # so PyTorch is scored with the same limit.
    evaluator = Evaluator(mmlu=mmlu_root, subset="medical", per_subject=1, threads=1)
    got = evaluator.mmlu_logprobs(out)
    reference = evaluator.runner(tiny_models["llama"])
    want = scoring.mmlu_logprobs(reference.forward, reference.tokenizer, evaluator.questions, max_length=100)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    report = evaluator.evaluate(out, tiny_models["llama"])
    assert report["backend"] == "tflite" and report["reference"]["backend"] == "torch"
    assert report["text"]["top1_agreement"] == 1.0 and report["text"]["seq_len"] == 100 and report["text"]["kl_mean"] < 1e-6


def test_latency_bench_runs_the_tflite_runner(exported):
    from vcompress.devices.bench import run_benchmark

    out, _ = exported("llama")
    result = run_benchmark(out, prompt_tokens=20, decode_tokens=4, runs=1, warmup=0, threads=1, backend="tflite")
    assert result["backend"] == "tflite" and result["ttft_ms"]["value"] > 0 and result["decode_tokens_per_s"]["value"] > 0
    assert result["model_size_mb"]["value"] > 0 and result["runtime"]["module"] == "ai_edge_litert.compiled_model"


def test_latency_bench_runs_litert_lm_on_the_bundle(exported):
    pytest.importorskip("litert_lm")
    from vcompress.devices.bench import run_benchmark

    out, _ = exported("llama")
    result = run_benchmark(out, prompt_tokens=20, decode_tokens=4, runs=2, warmup=1, threads=1)  # default: what an app ships
    assert result["backend"] == "tflite" and result["runtime"] == {"module": "litert_lm", "version": version("litert-lm-api")}
    assert result["ttft_ms"]["value"] > 0 and len(result["decode_tokens_per_s"]["samples"]) == 2
    assert not list(out.glob("*xnnpack_cache"))  # LiteRT-LM's weight cache went to a temporary folder, not the artifact
    with pytest.raises(Exception, match="exceeds the model's context of 100"):
        run_benchmark(out, prompt_tokens=90, decode_tokens=20, runs=1, warmup=0, threads=1)


def test_the_litert_lm_bundle_holds_the_exported_model(exported):
    out, metrics = exported("llama")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["litertlm"] == "model.litertlm"
    assert manifest["app_runtime"] == {
        "name": "litert-lm",
        "version": _installed("litert-lm-api"),
        "bundle": "model.litertlm",
        "builder": f"litert-lm-builder {version('litert-lm-builder')}",
    }
    # the .tflite inside is the very one checked against PyTorch (packaging changes no byte of it)
    assert (out / "model.tflite").read_bytes() in (out / "model.litertlm").read_bytes()
    loaded = metrics["litertlm_loaded"]
    assert loaded == f"loaded by LiteRT-LM {version('litert-lm-api')}" if _installed("litert-lm-api") else loaded.startswith("not loaded")


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def test_int8_weights_are_a_quarter_of_fp32(exported):
    fp32_dir, _ = exported("llama")
    out, metrics = exported("llama", "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quant"]["scheme"] == "int8" and manifest["quant"]["recipe"] == "dynamic_wi8_afp32"
    assert metrics["parity"]["top1_agreement"] > 0.9 and metrics["size_ratio_to_fp32"] < 0.6
    fp32, int8 = _weight_bytes(fp32_dir / "model.tflite"), _weight_bytes(out / "model.tflite")
    # Every matmul and the embedding table go to int8 (1 byte per weight + a float scale per output
    # channel): the int8 buffers are ~1/4 of the fp32 weights they replace. What stays float32 is small
    # (norm weights, rotary tables).
    assert 0.24 < int8["INT8"] / fp32["FLOAT32"] < 0.30, (int8, fp32)
    assert int8.get("FLOAT32", 0) < 0.2 * fp32["FLOAT32"], (int8, fp32)


def test_gpt2_is_refused_naming_it(tiny_models, tmp_path):
    _needs_litert()
    from vcompress.exporters.tflite import export

    with pytest.raises(Unsupported, match="'gpt2'.*num_key_value_heads.*vcompress export onnx"):
        export(tiny_models["gpt2"], tmp_path / "out", **QUIET, prefill_tokens=8, cache_length=64)
    assert not (tmp_path / "out").exists()


def test_cli_export_tflite_int4(cli, tiny_models, tmp_path):
    _needs_litert()
    out = tmp_path / "int4"
    code, stdout, stderr = cli(
        "export",
        "tflite",
        "--model",
        tiny_models["qwen2"],
        "--out",
        out,
        "--quant",
        "int4",
        "--prefill-tokens",
        "8",
        "--cache-length",
        "96",
        "--min-agreement",
        "0",
        "--threads",
        "1",
        "--json",
    )
    assert code == 0, stderr
    metrics = json.loads(stdout)  # the converter's progress output stays off stdout
    assert metrics["format"] == "tflite" and metrics["quant"] == "int4" and metrics["size_ratio_to_fp32"] < 0.6
    assert json.loads((out / "manifest.json").read_text())["quant"]["recipe"] == "dynamic_wi4_afp32"
    assert (out / "model.tflite").read_bytes() in (out / "model.litertlm").read_bytes()  # the bundle holds the int4 model
    code, _, stderr = cli(
        "export", "tflite", "--model", tiny_models["qwen2"], "--out", tmp_path / "x", "--prefill-tokens", "64", "--cache-length", "32"
    )
    assert code == 2 and "cache_length" in stderr


def test_shared_prefix_scoring_matches_full_sequences(exported):
    from tests.test_scoring import assert_shared_prefix_scores_like_full_sequences
    from vcompress.exporters.tflite import TFLiteRunner

    out, _ = exported("qwen2")  # its cache (128) holds the synthetic questions whole
    assert_shared_prefix_scores_like_full_sequences(TFLiteRunner(out, threads=1), atol=1e-4)


def test_interleaved_sequences_keep_their_own_cache(exported):
    """The cache lives in the interpreter for one sequence at a time: a second sequence's calls
    must not leak into the first, whose keys/values are rebuilt when it is fed again."""
    from vcompress.exporters._tflite_session import LiteRTSession

    out, _ = exported("llama")
    session = LiteRTSession(out, threads=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(5, 300, 12), rng.integers(5, 300, 20)
    alone = []
    logits, state = session.prefill(a)
    for token in (7, 8, 9):
        logits, state = session.decode(token, state)
        alone.append(logits)
    logits_a, state_a = session.prefill(a)
    logits_b, state_b = session.prefill(b)
    interleaved = []
    for token in (7, 8, 9):
        logits_a, state_a = session.decode(token, state_a)
        logits_b, state_b = session.decode(token, state_b)
        interleaved.append(logits_a)
    np.testing.assert_allclose(np.stack(interleaved), np.stack(alone), atol=1e-5)
    assert state_a.length == 15 and state_b.length == 23


# --- LiteRT-LM generates from the bundle alone ---------------------------------------------

LITERTLM_GREEDY = Path(__file__).with_name("litertlm_greedy.py")
TEXTS = ["The heart pumps blood", "Water boils at", "A cat sat on the mat and", "Paris is the capital of", "one two three four"]


@pytest.fixture(scope="module")
def readable(tmp_path_factory):
    """Exports of tiny models whose tokenizer holds only the corpus's characters. LiteRT-LM's Python API
    returns text, not token ids; with every token decoding to ASCII, equal text pins the tokens down
    (the byte-level tokenizer's random tokens decode to runs of U+FFFD, which would not)."""
    _needs_litert()
    from tests.tiny import build_model, build_tokenizer
    from vcompress.exporters.tflite import export

    root = tmp_path_factory.mktemp("readable")
    tokenizer = build_tokenizer(byte_alphabet=False)
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = root / f"{arch}-tflite"
            export(build_model(arch, root / arch, tokenizer), cache[arch], **QUIET, **SHAPES[arch])
        return cache[arch]

    return get


def _held_back(tokens: list[int], stops: list[list[int]]) -> list[int]:
    """The tokens whose text LiteRT-LM returns: it drops a stop sequence and, at the token limit, holds
    back a tail that could still begin one (litert-torch writes stop strings such as "?<|im_end|>\n")."""
    for n in range(min(len(tokens), max(map(len, stops))), 0, -1):
        if any(stop[:n] == tokens[-n:] for stop in stops):
            return tokens[:-n]
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_litert_lm_generates_what_our_loop_generates(readable, arch):
    """model.litertlm alone runs under LiteRT-LM, in a process without torch or vcompress, and its greedy
    continuations of 5 prompts are those of our LiteRT runner on model.tflite."""
    pytest.importorskip("litert_lm")  # its reason names the import error
    from vcompress.exporters.tflite import TFLiteRunner

    out = readable(arch)
    runner = TFLiteRunner(out, threads=1)
    prompts = [runner.tokenizer(text)["input_ids"] for text in TEXTS]
    want = [runner.generate(torch.tensor([prompt]), 24, eos_token_id=runner.tokenizer.eos_token_id) for prompt in prompts]
    request = {"bundle": str(out / "model.litertlm"), "texts": TEXTS, "new_tokens": 24}
    done = subprocess.run([sys.executable, str(LITERTLM_GREEDY)], input=json.dumps(request), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["encoded"] == prompts and not got["torch_loaded"]  # LiteRT-LM's tokenizer reads the bundle's as transformers does
    assert got["decoded"] == [len(tokens) for tokens in want]
    assert got["texts"] == [runner.tokenizer.decode(_held_back(tokens, got["stops"])) for tokens in want]
    assert len(set(got["texts"])) == len(TEXTS)  # the prompts steer the continuations: the comparison is not vacuous


def test_weight_cache_follows_a_renamed_export(tmp_path, monkeypatch):
    """An export is checked in a temp folder, then renamed: the renamed model must reuse that weight cache, not pack a second one."""
    from vcompress.exporters._tflite_session import weight_cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "tmp-export").mkdir()
    (tmp_path / "tmp-export" / "model.tflite").write_bytes(b"weights")
    before = weight_cache_file(tmp_path / "tmp-export" / "model.tflite")
    (tmp_path / "tmp-export").rename(tmp_path / "export")
    assert weight_cache_file(tmp_path / "export" / "model.tflite") == before
    (tmp_path / "other.tflite").write_bytes(b"weights")  # same bytes, another file: its own cache
    assert weight_cache_file(tmp_path / "other.tflite") != before and before.parent == tmp_path / "cache" / "vcompress" / "xnnpack"


def test_a_model_too_big_for_memory_is_refused_before_any_work(cli, tiny_models, tmp_path, monkeypatch):
    """The LiteRT converter traces the whole model: where it would not fit in this machine's memory (at the
    converter's measured peak), say so in one line and point to the streamed ONNX export, instead of swapping
    or being killed halfway. Memory other processes hold for now does not refuse a model that fits."""
    import vcompress.core.layer_stream as layer_stream
    import vcompress.exporters.base as base

    size = layer_stream.checkpoint_bytes(tiny_models["llama"])
    monkeypatch.setattr(base, "total_memory", lambda: int(size * base.CONVERTER_PEAK) - 1)  # just too small a machine
    code, _, err = cli("export", "tflite", "--model", tiny_models["llama"], "--out", tmp_path / "t")
    assert code == 2 and "whole model in memory" in err and "export onnx --stream on" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
    monkeypatch.setattr(base, "total_memory", lambda: int(size * base.CONVERTER_PEAK) + 1)
    monkeypatch.setattr(layer_stream, "available_memory", lambda: 1 << 20)  # a busy machine right now: not refused
    base.refuse_if_too_big(type("Ctx", (), {"source": tiny_models["llama"]})(), "litert-torch")
