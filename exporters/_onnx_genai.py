"""genai_config.json: what ONNX Runtime GenAI needs to generate from an export folder with no vcompress code.

`onnxruntime_genai.Model(folder)` reads this file, opens model.onnx, and drives the graph the way our
own loop does: input_ids, attention_mask (position_ids where the graph takes them), and one KV buffer
per layer and side bound as both past_key_values.* and present.* (past_present_share_buffer, what
GroupQueryAttention appends into). Its tokenizer reads tokenizer.json and tokenizer_config.json,
which save_sidecars writes beside the graph. The fields are those onnxruntime-genai 0.18's model
builder writes for a GroupQueryAttention decoder; the values come from the model's config and its
generation config (sampling defaults, as `transformers` generate would use them).

GPT-2: genai's "gpt2" model type expects one combined past_{i} tensor per layer, which this graph
does not have; its generic "decoder" type takes separate keys and values and feeds position_ids
(computed from the attention mask) when the graph has that input, so GPT-2 is written as "decoder".
"""

from __future__ import annotations

from vcompress.core.errors import InputError

from ._onnx_graph import Dims

FILE = "genai_config.json"


def genai_config(model, dims: Dims, model_file: str, prefill_file: str | None = None) -> dict:
    config, generation = model.config, model.generation_config
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if dims.arch == "gpt2":
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": model_file,
        "head_size": dims.head_dim,
        "hidden_size": dims.hidden,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "num_hidden_layers": dims.layers,
        "inputs": inputs,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    model_type = "decoder" if dims.arch == "gpt2" else dims.arch
    if prefill_file:
        decoder["pipeline"] = _pipeline(dims, {"prompt": prefill_file, "token_gen": model_file}, inputs, decoder["outputs"])
        model_type = "decoder-pipeline"
    return {
        "model": {
            "type": model_type,
            "context_length": dims.max_positions,
            "vocab_size": dims.vocab,
            **_token_ids(config, generation),
            "decoder": decoder,
        },
        "search": _search(generation, dims.max_positions),
    }


def _pipeline(dims: Dims, files: dict[str, str], inputs: dict, outputs: dict) -> list[dict]:
    """Two whole decoders as one pipeline (the int8 prompt graph, the 4-bit one for generated tokens): ORT GenAI
    runs the first on the prompt and the second on each new token, binding the same managed inputs and outputs
    (ids, mask, the one KV cache) to whichever runs."""
    names = lambda spec, keys: [spec[k] % i for i in range(dims.layers) for k in keys]  # noqa: E731
    ins = [v for k, v in inputs.items() if not k.startswith("past_")] + names(inputs, ("past_key_names", "past_value_names"))
    outs = [outputs["logits"]] + names(outputs, ("present_key_names", "present_value_names"))
    return [
        {
            stage: {
                "filename": file,
                "inputs": ins,
                "outputs": outs,
                "run_on_prompt": stage == "prompt",
                "run_on_token_gen": stage == "token_gen",
            }
        }
        for stage, file in files.items()
    ]


def _token_ids(config, generation) -> dict:
    def first_set(name):
        for source in (generation, config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    bos, eos, pad = first_set("bos_token_id"), first_set("eos_token_id"), first_set("pad_token_id")
    if eos is None:
        raise InputError(
            "the model names no eos_token_id, which ORT GenAI needs to stop; add the tokenizer's end-of-sequence id to its config.json or generation_config.json"
        )
    # genai finds a prompt's last real token by skipping trailing pad ids; with no pad id set, the
    # first end-of-sequence id is what transformers pads with too.
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    ids = {"eos_token_id": eos, "pad_token_id": pad}
    if bos is not None:
        ids["bos_token_id"] = bos
    return ids


def _search(generation, context_length: int) -> dict:
    def setting(name, default):
        value = getattr(generation, name, None) if generation is not None else None
        return default if value is None else value

    return {
        "do_sample": bool(setting("do_sample", False)),
        "temperature": float(setting("temperature", 1.0)),
        "top_k": int(setting("top_k", 50)),
        "top_p": float(setting("top_p", 1.0)),
        "repetition_penalty": float(setting("repetition_penalty", 1.0)),
        "num_beams": 1,
        "num_return_sequences": 1,
        "min_length": 0,
        "max_length": context_length,
        "past_present_share_buffer": True,
    }
