"""Tiny random models (Llama with GQA, Qwen2, GPT-2, Gemma 3) and a tokenizer trained here: no hub, seconds to build."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The following are multiple choice questions (with answers) about anatomy.",
    "Answer: A. B. C. D. The heart pumps blood through the body.",
    "What is the capital of France? Paris is the capital of France.",
    "A patient presents with fever and cough. The doctor orders a chest x-ray.",
    "The contract is void if either party fails to deliver the goods on time.",
    "Interest rates rose by two percent, and the bond prices fell.",
    "Cells divide by mitosis; the nucleus holds the chromosomes.",
    "Question: which organ filters the blood? A. liver B. kidney C. lung D. heart",
] * 4


def build_tokenizer(vocab_size: int = 384, byte_alphabet: bool = True):
    """A byte-level BPE tokenizer trained on CORPUS. byte_alphabet=False keeps only the corpus's own
    characters: every token then decodes to ASCII text, never to part of a UTF-8 sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else [],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}  # llama, qwen2


def build_config(arch: str, vocab_size: int, layers: int = 2, **sizes):
    """A tiny config of `arch`; `sizes` overrides SIZES and the rest (llama and qwen2)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2)
    decoder = {"vocab_size": vocab_size, "num_hidden_layers": layers, "max_position_embeddings": 1024, **SIZES, **SPECIAL_IDS}
    if arch == "llama":  # GQA like SmolLM2: 4 query heads share 2 KV heads, tied embeddings
        return LlamaConfig(**{**decoder, "head_dim": 16, "rope_theta": 100000.0, "tie_word_embeddings": True, **sizes})
    if arch == "qwen2":
        return Qwen2Config(**{**decoder, "tie_word_embeddings": False, **sizes})
    if arch == "gemma3":  # like Gemma 3 270M: one KV head, QK-norm, sliding layers (window 16) around a global one
        from transformers import Gemma3TextConfig

        rope = {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
        gemma = {"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16, "rope_parameters": rope}
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"][:layers]
        return Gemma3TextConfig(**{**decoder, **gemma, "layer_types": layer_types, "tie_word_embeddings": True, **sizes})
    raise ValueError(arch)


def random_model(config, seed: int = 0):
    """A model of `config` with larger weights than the init default, so heads differ measurably."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def build_model(arch: str, out: Path, tokenizer, layers: int = 2, seed: int = 0) -> Path:
    model = random_model(build_config(arch, len(tokenizer), layers), seed).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
