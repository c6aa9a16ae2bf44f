"""Greedy generation from a TFLite export's model.litertlm through LiteRT-LM alone, as a deployed app would run it.

Run by path in a fresh interpreter (no torch, no vcompress):
    python tests/litertlm_greedy.py < request.json
request: {"bundle": str, "texts": [str, ...], "new_tokens": int}
prints : {"texts": [generated text, ...], "decoded": [tokens decoded, ...], "encoded": [[ids], ...] (the texts through
          LiteRT-LM's tokenizer), "stops": [[ids], ...] (the bundle's stop sequences), "torch_loaded": bool}
LiteRT-LM's Python API takes text and gives text, not token ids: the prompt goes in as text (no chat
template), the generated tokens come back as their text and their count (its benchmark record).
"""

from __future__ import annotations

import json
import sys
import tempfile

import litert_lm


def main() -> None:
    request = json.load(sys.stdin)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:  # not beside the bundle, where LiteRT-LM would write its weight cache
        engine = litert_lm.Engine(request["bundle"], backend=litert_lm.Backend.CPU(thread_count=1), cache_dir=cache, enable_benchmark=True)
        texts, decoded = [], []
        for text in request["texts"]:
            session = engine.create_session(
                apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=request["new_tokens"]
            )
            session.run_prefill([text])
            texts.append(session.run_decode().texts[0])
            decoded.append(session.get_benchmark_info().last_decode_token_count)
            session.close()
        encoded = [engine.tokenize(text) for text in request["texts"]]
        stops = engine.eos_token_ids
        engine.close()
    print(json.dumps({"texts": texts, "decoded": decoded, "encoded": encoded, "stops": stops, "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
