"""A causal LM split into its decoder and its output head, for the callers that run the head themselves:
training's chunked loss (training/loss.py) and serving's last-position logits (serving/engine.py)."""
from __future__ import annotations

import torch


def output_head(model):
    """(decoder, head) when the fast path applies: a plain bias-free linear head, no virtual tokens."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(base.config, "final_logit_softcapping", None):
        return None
    return decoder, head
