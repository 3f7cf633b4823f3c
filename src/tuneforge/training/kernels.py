"""Which implementation computes each hot part of a training step: tuneforge's own or the library's.

`training.kernels` in the spec picks them, and the resolved choice is recorded in `summary.json`, so
what runs in forward and backward is never a hidden function of the device:

| part | `auto` (default) | `library` |
|---|---|---|
| loss | target-only chunked linear cross-entropy (training/loss.py): no (B, T, V) logits | the model's logits + cross-entropy |
| rmsnorm | one autograd node keeping input + 1/rms (models/rmsnorm.py), Llama-family norms | transformers' RMSNorm |
| dropout | CPU: byte-mask dropout (methods/dropout.py), 8x fewer random draws; p rounded to k/256 | torch's nn.Dropout |
| lora | CPU: one autograd node per LoRA layer + recomputed SwiGLU product (methods/fused_lora.py) | peft's forward |
| attention | CPU: SDPA's math kernel for rows up to 160 tokens, its flash kernel above (models/attention.py) | transformers' SDPA |

Each `auto` path is tested against the library path it replaces (same loss and gradients; for
dropout the same distribution). GPUs get the loss and rmsnorm paths; the dropout, LoRA and attention
paths are CPU-only (on GPU mask generation is cheap, peft's ops already run as fused kernels, and SDPA picks
its GPU kernels itself).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

PARTS = ("loss", "rmsnorm", "dropout", "lora", "attention")


@dataclass(frozen=True)
class Kernels:
    loss: str  # "chunked" | "library"
    rmsnorm: str  # "fused" | "library"
    dropout: str  # "byte" | "library" | "none" (no adapter dropout)
    lora: str  # "fused" | "library" | "none" (no LoRA layers)
    attention: str = "library"  # "math-short" | "library"

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_kernels(setting: str | dict, device: torch.device, method: str = "lora", dropout: float = 0.0) -> Kernels:
    """`setting` is "auto", "library", or a mapping part -> "auto"|"library" (missing parts: auto).

    Parts that do not apply are recorded as "none": adapter dropout and the LoRA layer exist only for
    lora/dora/qlora (dropout only when p > 0). The fused LoRA layer covers plain LoRA over nn.Linear
    (not DoRA's magnitude, not QLoRA's 4-bit base), and draws byte masks, so with dropout on it needs
    the byte-mask dropout too."""
    choice = {part: setting for part in PARTS} if isinstance(setting, str) else {p: setting.get(p, "auto") for p in PARTS}
    cpu = device.type == "cpu"
    has_dropout = method in ("lora", "dora", "qlora") and dropout > 0
    byte_dropout = has_dropout and choice["dropout"] == "auto" and cpu
    lora = "none"
    if method in ("lora", "dora", "qlora"):
        fusable = method == "lora" and cpu and (byte_dropout or not has_dropout)
        lora = "fused" if choice["lora"] == "auto" and fusable else "library"
    return Kernels(
        loss="chunked" if choice["loss"] == "auto" else "library",
        rmsnorm="fused" if choice["rmsnorm"] == "auto" else "library",
        dropout="byte" if byte_dropout else "library" if has_dropout else "none",
        lora=lora,
        attention="math-short" if choice["attention"] == "auto" and cpu else "library",
    )


def install_kernels(model: torch.nn.Module, kernels: Kernels, *, before_peft: bool) -> dict[str, int]:
    """Swap the chosen implementations into `model` in place; return how many modules each part changed.
    Norms are swapped before peft wraps the model, dropout and LoRA layers after."""
    from tuneforge.methods.dropout import use_byte_dropout
    from tuneforge.methods.fused_lora import use_fused_lora
    from tuneforge.models.rmsnorm import use_fused_rmsnorm

    counts: dict[str, int] = {}
    if before_peft:
        if kernels.rmsnorm == "fused":
            counts["rmsnorm"] = use_fused_rmsnorm(model)
        return counts
    if kernels.dropout == "byte":
        counts["dropout"] = use_byte_dropout(model)
    if kernels.lora == "fused":
        counts["lora"] = use_fused_lora(model)
    return counts


def effective_dropout(p: float, kernels: Kernels) -> float:
    """The adapter dropout probability that really applies: byte-mask dropout rounds p to k/256."""
    return round(p * 256) / 256 if kernels.dropout == "byte" else p
