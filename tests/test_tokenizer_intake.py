"""Issue 40: a checkpoint saved without its tokenizer files is refused at intake (exit 2, the folder and the fix)
unless --tokenizer names one; the tokenizer used is recorded; a tokenizer the MMLU scorer cannot split as lm-eval
does is scored by a defined fallback or refused, never an internal error."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import CORPUS, build_config, build_model, build_tokenizer
from vcompress.core import scoring
from vcompress.core.data import Question
from vcompress.core.errors import InputError
from vcompress.core.models import Intake
from vcompress.core.stage import StageContext

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def untokenized(tmp_path_factory, tokenizer) -> Path:
    """The folder of the issue: a tiny Qwen2 (8 query / 4 KV heads) saved with save_pretrained, no tokenizer files."""
    torch.manual_seed(0)
    config = build_config("qwen2", len(tokenizer), num_attention_heads=8, num_key_value_heads=4)
    folder = tmp_path_factory.mktemp("issue40") / "checkpoint"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_models) -> Path:
    return tiny_models["qwen2"]  # a real folder with the tokenizer the tiny models were built with


def _sha256_of_tokenizer(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(n for n in TOKENIZER_FILES if (folder / n).is_file()):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def test_the_folder_of_the_issue_has_no_tokenizer_files(untokenized):
    assert sorted(p.name for p in untokenized.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_prune_refuses_a_checkpoint_without_tokenizer_files_before_any_work(cli, untokenized, tmp_path):
    code, out, err = cli("prune", "--model", untokenized, "--heads", "0.5", "--out", tmp_path / "p")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert f"{untokenized} has no tokenizer files" in err
    assert "copy the base model's tokenizer files beside the weights, or pass --tokenizer PATH" in err
    assert "calibration" not in out + err and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, _: tmp / "missing", "does not exist"),
        (lambda tmp, folder: folder / "config.json", "is a file"),
        (lambda tmp, folder: folder, "has no tokenizer files"),
    ],
)
def test_a_bad_tokenizer_argument_is_one_line_and_exit_2(cli, untokenized, tmp_path, make, message):
    code, _, err = cli(
        "prune", "--model", untokenized, "--tokenizer", make(tmp_path, untokenized), "--heads", "0.5", "--out", tmp_path / "p"
    )
    assert code == 2 and message in err and "--tokenizer" in err and len(err.strip().splitlines()) == 1


def test_an_empty_tokenizer_is_refused_at_intake(cli, untokenized, tmp_path):
    # what transformers builds from a config alone (the tokenizer of the issue), saved as a folder
    AutoTokenizer.from_pretrained(untokenized).save_pretrained(tmp_path / "empty")
    code, _, err = cli("prune", "--model", untokenized, "--tokenizer", tmp_path / "empty", "--heads", "0.5", "--out", tmp_path / "p")
    assert code == 2 and "encodes text to no tokens" in err and len(err.strip().splitlines()) == 1


def test_a_tokenizer_with_more_tokens_than_the_model_embeds_is_refused(cli, untokenized, tmp_path):
    bigger = build_tokenizer(vocab_size=600)
    bigger.save_pretrained(tmp_path / "bigger")
    rows = AutoModelForCausalLM.from_pretrained(untokenized).get_input_embeddings().num_embeddings
    assert len(bigger) > rows
    code, _, err = cli("inspect", untokenized, "--tokenizer", tmp_path / "bigger")
    assert (
        code == 2 and f"has {len(bigger)} tokens but {untokenized} embeds {rows}" in err.strip().splitlines()[-1]
    )  # after the weights load


def test_with_tokenizer_it_prunes_to_4_query_2_kv_heads_reloads_and_records_the_tokenizer(cli, untokenized, tokenizer_dir, tmp_path):
    out = tmp_path / "p"
    code, _, err = cli("prune", "--model", untokenized, "--tokenizer", tokenizer_dir, "--heads", "0.5", "--out", out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, model.config.vocab_size)
    text = "Answer: A. The heart pumps blood."
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(tokenizer_dir).encode(text)
    recorded = json.loads((out / "metrics.json").read_text())["tokenizer"]
    assert recorded == {"path": str(tokenizer_dir.resolve()), "sha256": _sha256_of_tokenizer(tokenizer_dir)}
    # the stage folder carries its tokenizer: the next command needs no --tokenizer
    code, info, err = cli("inspect", out, "--json")
    assert code == 0, err
    assert json.loads(info)["query_heads"] == 4 and json.loads(info)["tokenizer"] == str(out)


def test_a_run_records_the_tokenizer_in_run_json_and_every_stage(cli, untokenized, tokenizer_dir, tmp_path):
    from tests.test_pipeline import write_profile

    recipe = [
        {"stage": "prune", "heads": 0.5, "heldout_blocks": 1, "heldout_seq_len": 32},
        {"stage": "quantize", "method": "rtn", "group_size": 32, "heldout_blocks": 1, "heldout_seq_len": 32, "eval_per_subject": 0},
    ]
    profile = write_profile(tmp_path / "p.yaml", recipe)
    code, _, err = cli("run", "--profile", profile, "--model", untokenized, "--out", tmp_path / "refused")
    assert code == 2 and "has no tokenizer files" in err and not (tmp_path / "refused" / "02-prune").exists()

    code, out, err = cli("run", "--profile", profile, "--model", untokenized, "--tokenizer", tokenizer_dir, "--out", tmp_path / "R")
    assert code == 1 and "no validate stage" in out, err  # the stages ran; no verdict without validate
    expected = {"path": str(tokenizer_dir.resolve()), "sha256": _sha256_of_tokenizer(tokenizer_dir)}
    run = json.loads((tmp_path / "R" / "run.json").read_text())
    assert run["tokenizer"] == expected
    for stage in run["stages"]:
        assert json.loads((tmp_path / "R" / stage["folder"] / "metrics.json").read_text())["tokenizer"] == expected
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "R" / "02-prune").config.num_key_value_heads == 2


def _adapter_on(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_lora_adapter_without_tokenizer_files_takes_its_bases_and_says_so(tiny_llama, tmp_path):
    adapter = _adapter_on(tiny_llama, tmp_path / "adapter")
    assert not (adapter / "tokenizer.json").exists()
    said = []
    ctx = StageContext(source=str(adapter), out=tmp_path / "o", work=tmp_path / "w", log=said.append)
    tok = ctx.load_tokenizer()
    assert tok.encode("Answer: A") == AutoTokenizer.from_pretrained(tiny_llama).encode("Answer: A")
    assert said == [f"LoRA adapter {adapter} has no tokenizer files: using its base's, {tiny_llama}"]
    assert ctx.tokenizer_used["path"] == str(tiny_llama.resolve())


def test_a_lora_adapter_whose_base_has_no_tokenizer_either_is_refused(untokenized, tmp_path):
    adapter = _adapter_on(untokenized, tmp_path / "adapter")
    with pytest.raises(InputError, match=f"neither LoRA adapter {adapter} nor its base {untokenized} has tokenizer files"):
        Intake().resolve(adapter)


# --- scoring -------------------------------------------------------------------------------------------


def merging_tokenizer():
    """A byte-level BPE with no split at spaces, trained until "Answer: A" is one token: the whole prompt and
    answer then encode to fewer ids than the prompt alone, and lm-eval's cut leaves no continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS + [f"Answer: {letter}" for letter in "ABCD"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


QUESTION = Question("anatomy", "Which organ filters the blood?", ("liver", "kidney", "lung", "heart"), 1)


def test_an_answer_merged_into_the_prompt_is_encoded_alone_after_it():
    tok = merging_tokenizer()
    prompt, continuations = scoring.prompt_and_continuations(QUESTION, [], "letter")
    for continuation in continuations:
        assert len(tok.encode(prompt + continuation)) <= len(tok.encode(prompt))  # the case: the cut is empty
        context, answer = scoring.encode_pair(tok, prompt, continuation)
        assert context == tok.encode(prompt)
        assert answer == tok.encode(continuation, add_special_tokens=False) and answer


def test_a_tokenizer_that_merges_answers_into_the_prompt_is_scored_by_the_cli(cli, tmp_path):
    folder = build_model("llama", tmp_path / "merging", merging_tokenizer())
    code, out, err = cli("eval", "--model", folder, "--subset", "anatomy", "--per-subject", "3", "--json")
    assert code == 0, err
    mmlu = json.loads(out)["mmlu"]
    assert mmlu["n"] == 3 and 0 <= mmlu["accuracy"] <= 1


def test_a_tokenizer_that_encodes_an_answer_to_nothing_is_an_input_error():
    class Silent:  # encodes the prompt, and nothing of an answer alone or after it
        def encode(self, text, add_special_tokens=True):
            return [7] * len(text.split("Answer:")[0]) if "Answer:" in text else []

    with pytest.raises(InputError, match="encodes MMLU question 0 or one of its answers to no tokens"):
        scoring._requests(Silent(), [scoring.prompt_and_continuations(QUESTION, [], "letter")], None)
