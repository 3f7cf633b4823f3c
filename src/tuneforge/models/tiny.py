"""Tiny random models of real architectures, with a byte-level tokenizer and the family's chat template.

Used by the tests and benchmarks: the whole pipeline (folder -> load -> peft -> train -> save)
runs on them exactly as on a real checkpoint, in milliseconds and offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "phi3", "qwen2", "mistral")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Phi-3-mini-4k-instruct's template: no system-turn special casing, and an eos after the last turn.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def make_tokenizer(arch: str = "llama"):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + the family's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if arch == "phi3":
        specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
        eos, eot, template = "<|endoftext|>", "<|end|>", PHI3_TEMPLATE
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        eos, eot, template = "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>")
    tok.chat_template = template
    tok.end_of_turn_token = eot  # not saved; informational for tests
    return tok


def make_config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "phi3": Phi3Config, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**common)


def make_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny `arch` model + tokenizer to `out_dir` (safetensors) and return the folder."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    out = Path(out_dir)
    tok = make_tokenizer(arch)
    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vocab_size = config_overrides.pop("vocab_size", len(tok))  # larger than the tokenizer's: a real model's LM head
    config = make_config(arch, vocab_size, **{**ids, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
