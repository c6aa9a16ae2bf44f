"""Greedy generation from an export folder through ONNX Runtime GenAI alone, as a deployed app would run it.

Run by path in a fresh interpreter (no torch, no vcompress):
    python tests/genai_greedy.py < request.json
request: {"folder": str, "prompts": [[token ids], ...], "new_tokens": int, "texts": [str, ...]}
prints : {"tokens": [[ids], ...], "encoded": [[ids], ...] (the texts through genai's tokenizer), "torch_loaded": bool}
"""

from __future__ import annotations

import json
import sys

import onnxruntime_genai as og


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def main() -> None:
    request = json.load(sys.stdin)
    model = og.Model(request["folder"])
    tokens = [greedy(model, prompt, request["new_tokens"]) for prompt in request["prompts"]]
    tokenizer = og.Tokenizer(model) if request.get("texts") else None
    encoded = [[int(t) for t in tokenizer.encode(text)] for text in request.get("texts", [])]
    print(json.dumps({"tokens": tokens, "encoded": encoded, "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
