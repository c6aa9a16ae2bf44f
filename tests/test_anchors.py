"""devices/anchors.yaml: the published measurements the device estimates are calibrated on, and their models' shapes."""

import importlib.resources
import json
import re

import pytest
import yaml

ROW_KEYS = {
    "id", "device", "soc", "family", "runtime", "runtime_version", "backend", "threads", "model", "weight_bits",
    "precision", "prompt_tokens", "decode_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb",
    "source", "notes",
}  # fmt: skip
FAMILIES = {"snapdragon-8", "snapdragon-7", "tensor", "jetson-orin-nano", "jetson-orin-nano-super", "raspberry-pi5", "x86"}
BACKENDS = {"cpu", "gpu", "npu", "cuda"}
SHAPE_KEYS = {
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
}  # fmt: skip
DEVICES = importlib.resources.files("vcompress.devices")


def anchors() -> list[dict]:
    return yaml.safe_load((DEVICES / "anchors.yaml").read_text())["anchors"]


def shapes(model: str) -> dict:
    return json.loads((DEVICES / "anchor_models" / f"{model}.json").read_text())


@pytest.mark.parametrize("row", anchors(), ids=lambda row: row["id"])
def test_row_follows_the_schema(row):
    assert set(row) == ROW_KEYS
    assert re.fullmatch(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", row["id"])
    assert row["family"] in FAMILIES and row["backend"] in BACKENDS
    assert row["weight_bits"] in (4, 8, 16)
    for key in ("threads", "prompt_tokens", "decode_tokens", "peak_memory_mb"):
        assert row[key] is None or (isinstance(row[key], int) and row[key] > 0), key
    rates = [row["prefill_tokens_per_s"], row["decode_tokens_per_s"]]
    assert any(rate is not None for rate in rates)
    assert all(rate is None or rate > 0 for rate in rates)
    # a URL or a repository path that a reviewer can open
    assert re.search(r"https://(github\.com|huggingface\.co)/", row["source"])


def test_ids_are_unique():
    ids = [row["id"] for row in anchors()]
    assert len(ids) == len(set(ids))


def test_prefill_is_faster_than_decode_where_both_are_published():
    # prefill runs the prompt in batched matrix products; a row where it is slower has its columns swapped
    both = [row for row in anchors() if row["prefill_tokens_per_s"] and row["decode_tokens_per_s"]]
    assert both
    assert [row["id"] for row in both if row["prefill_tokens_per_s"] <= row["decode_tokens_per_s"]] == []


def test_every_model_has_its_shapes_and_every_shape_file_a_row():
    used = {row["model"] for row in anchors()}
    files = {path.name[: -len(".json")] for path in (DEVICES / "anchor_models").iterdir() if path.name.endswith(".json")}
    assert used == files
    for model in used:
        config = shapes(model)
        assert set(config) == SHAPE_KEYS | {"_source"}, model
        assert config["_source"], model
        assert isinstance(config["tie_word_embeddings"], bool), model
        for key in SHAPE_KEYS - {"model_type", "tie_word_embeddings"}:
            assert isinstance(config[key], int) and config[key] > 0, (model, key)
        assert config["num_attention_heads"] % config["num_key_value_heads"] == 0, model


# issue 32's minimum: three rows for each phone profile's SoC family, two for Jetson Orin Nano and Raspberry Pi 5
MINIMUM_ROWS = {"snapdragon-8": 3, "snapdragon-7": 3, "tensor": 3, "jetson-orin-nano": 2, "raspberry-pi5": 2}


@pytest.mark.parametrize("family", sorted(MINIMUM_ROWS))
def test_each_family_has_the_minimum_rows(family):
    assert sum(row["family"] == family for row in anchors()) >= MINIMUM_ROWS[family]
