"""Parameter, byte and FLOP arithmetic for a run, from the model's config alone (meta device, no weights).

What the engine really stores (training/recipe.py, hardware.py, methods/peft_builders.py):
- trainable parameters are fp32, with fp32 gradients and AdamW's two fp32 moments (8-bit AdamW: two
  bytes per parameter plus one fp32 scale per 256-element block and moment);
- the frozen base is bf16 when the run computes in bf16 with an adapter method (`base_dtype: auto`),
  else fp32; full fine-tuning keeps fp32 master weights;
- QLoRA stores every linear layer but the output head as NF4 with double-quantised absmax (bitsandbytes):
  half a byte per weight, one byte per 64-weight block, one fp32 per 256 blocks; the rest stays in the base
  dtype (fp32 when the base is fp32: peft's `prepare_model_for_kbit_training` upcasts it).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import torch

from tuneforge.errors import ModelError, SpecError

METHODS = ("full", "lora", "dora", "qlora", "ia3", "prompt_tuning")
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4-bit + 8-bit absmax per 64 + fp32 per 256 blocks


def load_config(model_ref: str, trust_remote_code: bool = False):
    """The transformers config of a model alias, folder (config.json is enough) or hub id."""
    from transformers import AutoConfig

    from tuneforge.models import resolve_model

    path = resolve_model(model_ref)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"could not read the model config in {path}: {str(e)[:300]}") from None


def config_fingerprint(config) -> str:
    return json.dumps(config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict(),
                      sort_keys=True, default=str)


def with_layers(config, layers: int):
    """A copy of `config` with `layers` decoder layers (per-layer lists such as layer_types cut to match)."""
    c = copy.deepcopy(config)
    c.num_hidden_layers = layers
    for name in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(c, name, None)
        if isinstance(value, list):
            setattr(c, name, value[:layers])
    return c


def meta_model(config, dtype: torch.dtype = torch.bfloat16):
    """The model on the meta device: shapes and module structure, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot build a causal LM from this config ({config.model_type}): {str(e)[:300]}") from None


@dataclass
class ParamCounts:
    total: int  # logical parameters of the trained model (base + adapter)
    trainable: int
    quantizable: int  # base weights QLoRA stores in 4 bits (every linear layer but the output head)
    frozen_other: int  # frozen base parameters outside those linears (embeddings, head, norms)
    matmul_params: int  # base linear weights a token passes through (decoder linears + output head)
    head_params: int  # the output head's weights (vocab x hidden)
    layers: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(config, method: str, adapter) -> ParamCounts:
    """Exact parameter counts of `method` applied to the model of `config` (peft on the meta device)."""
    from peft import get_peft_model

    from tuneforge.methods.peft_builders import build_peft_config

    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model = meta_model(config)
    head = model.get_output_embeddings()  # kept in full precision by QLoRA, as every other method
    head = head if isinstance(head, torch.nn.Linear) else None
    head_ids = {id(head.weight)} if head is not None else set()
    seen: set[int] = set()
    quantizable = base_total = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            quantizable += module.weight.numel()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            base_total += p.numel()
    head_params = head.weight.numel() if head is not None else 0
    matmul = quantizable + head_params
    if method == "full":
        return ParamCounts(base_total, base_total, quantizable, base_total - quantizable, matmul, head_params,
                           config.num_hidden_layers)
    peft_config = build_peft_config(
        "lora" if method == "qlora" else method, config.model_type, r=adapter.r, alpha=adapter.alpha,
        dropout=adapter.dropout, target_modules=adapter.target_modules, num_virtual_tokens=adapter.num_virtual_tokens)
    try:
        with torch.device("meta"):
            wrapped = get_peft_model(model, peft_config)
    except ValueError as e:
        raise SpecError(f"adapter: {e}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    del head_ids
    return ParamCounts(base_total + trainable, trainable, quantizable, base_total - quantizable, matmul, head_params,
                       config.num_hidden_layers)


@dataclass
class StaticBytes:
    """Bytes that live for the whole run: weights, gradients (between backward and the optimizer step),
    optimizer state."""

    base_weights: int  # frozen base (or, for full fine-tuning, the fp32 trained weights)
    trainable_weights: int  # fp32 adapter (0 for full: counted in base_weights)
    gradients: int
    optimizer: int

    @property
    def weights(self) -> int:
        return self.base_weights + self.trainable_weights

    def as_dict(self) -> dict:
        return {**asdict(self), "weights": self.weights}


def static_bytes(counts: ParamCounts, method: str, base_dtype: torch.dtype, optimizer: str = "adamw",
                 tied_embeddings: bool = False) -> StaticBytes:
    """Weights, gradient and optimizer bytes as the engine stores them."""
    base_size = 2 if base_dtype == torch.bfloat16 else 4
    trainable = counts.trainable
    if method == "full":
        base = counts.total * 4
        adapter = 0
    else:
        frozen = counts.total - trainable
        if method == "qlora":
            base = int(counts.quantizable * NF4_BYTES_PER_WEIGHT) + (frozen - counts.quantizable) * base_size
        else:
            base = frozen * base_size
        adapter = trainable * 4
    opt = trainable * 8 if optimizer == "adamw" else trainable * 2 + 2 * 4 * -(-trainable // 256)
    return StaticBytes(base, adapter, trainable * 4, opt)


def step_flops(counts: ParamCounts, config, method: str, tokens: int, seq_len: int, targets: int | None = None,
               gradient_checkpointing: bool = False, chunked_loss: bool = True, reference_pass: bool = False) -> float:
    """Matmul FLOPs of one micro-batch of `tokens` tokens (rows of `seq_len`): forward 2 FLOPs per weight per
    token plus causal attention; backward the input gradients (1x forward) and, for full fine-tuning, the
    weight gradients (another 1x); gradient checkpointing recomputes the decoder forward. The chunked loss
    projects only the `targets` positions through the head. Adapters add ~r/hidden: ignored (< 3 %).
    `reference_pass`: DPO's no-grad forward of the same rows with the adapter off (one more forward)."""
    targets = tokens if targets is None else targets
    head_tokens = targets if chunked_loss else tokens
    decoder = 2 * (counts.matmul_params - counts.head_params) * tokens
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * 2 * heads * head_dim * tokens * seq_len / 2 * counts.layers  # QK^T and PV, causal half
    head = 2 * counts.head_params * head_tokens
    forward = decoder + attention + head
    backward_passes = 2 if method == "full" else 1
    total = forward * (1 + backward_passes)
    if gradient_checkpointing:
        total += decoder + attention
    if reference_pass:
        total += forward
    return float(total)
