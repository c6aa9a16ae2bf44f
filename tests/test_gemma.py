"""Gemma 3 (gemma3_text): intake, and errors that name what is not supported instead of blaming the installation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import build_config
from vcompress.core import models, packages
from vcompress.core.errors import InputError
from vcompress.core.models import check_supported, load_model, rope_theta


def test_rope_theta_of_a_config_with_one_base_per_layer_type():
    config = build_config("gemma3", 384, 3)
    assert rope_theta(config) == 1e6  # the global layers' base, the one a GGUF's rope.freq_base names


def _meta(theta):
    return {"general.architecture": "gemma3", "gemma3.rope.freq_base": theta}


def test_rope_check_passes_gemma3_and_blames_the_installation_only_off_its_pin(monkeypatch):
    config = build_config("gemma3", 384, 3)
    models._check_rope_theta(config, _meta(1e6), Path("g.gguf"))  # what transformers 5.23 reads for Gemma 3
    # with the pinned transformers, a disagreement is ours to handle: named, no "install"
    with pytest.raises(InputError, match=r"^gemma3: this rope layout is not supported yet") as caught:
        models._check_rope_theta(config, _meta(5e5), Path("g.gguf"))
    assert "install" not in str(caught.value)
    monkeypatch.setattr(packages.metadata, "version", lambda dist: "5.0.0" if dist == "transformers" else "1")
    with pytest.raises(InputError, match=r"transformers 5\.0\.0 is installed but vcompress pins transformers==5\.23\.\*: install"):
        models._check_rope_theta(config, _meta(5e5), Path("g.gguf"))


def test_import_failure_blames_the_installation_only_when_a_package_is_absent_or_off_pin(monkeypatch):
    error = ImportError("libfoo.so: cannot open shared object file")
    pinned = packages.pin("transformers")
    assert pinned is not None and str(pinned.specifier) == "==5.23.*"
    said = packages.import_failure(error, ("transformers",), "`pip install -e .`")
    assert (
        said.startswith("importing it failed although transformers 5.23")
        and "libfoo.so" in said
        and "install" not in said.replace("installed", "")
    )
    monkeypatch.setattr(packages, "installed", lambda dist: None)
    assert packages.import_failure(error, ("transformers",), "`pip install -e .`") == (
        "transformers is not installed; install the pinned versions with `pip install -e .`"
    )


def test_unsupported_gemma_pieces_are_named(tiny_gemma):
    config = build_config("gemma3", 384, 3)
    check_supported(config)
    config.final_logit_softcapping = 30.0
    with pytest.raises(InputError, match=r"^gemma3_text: logit soft-capping \(30.0\) is not supported yet"):
        check_supported(config)
    config.final_logit_softcapping = None
    config.model_type = "gemma3"
    with pytest.raises(InputError, match=r"^gemma3: the multimodal checkpoint \(vision tower\) is not supported yet"):
        check_supported(config)


def test_loads_a_tiny_gemma3(tiny_gemma):
    model, tok = load_model(tiny_gemma)
    assert model.config.model_type == "gemma3_text" and model.config.layer_types[1] == "full_attention"
    ids = torch.tensor([tok.encode("The heart pumps blood through the body.")])
    assert torch.isfinite(model(ids).logits).all()
