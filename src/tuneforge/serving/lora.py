"""LoRA layers for batches whose rows use different adapters, without peft's per-call hooks.

peft serves a mixed batch through `adapter_names`: every forward registers a pre-forward hook on every
module, and every LoRA layer splits the batch into one sub-batch per adapter. On CPU that overhead
dominated a SmolLM2 decode step (measured: 16 rows over 4 adapters decoded at 19.9 tokens/s, the same
rows without adapters at 123 tokens/s). Here the engine says once per step which adapter each row uses
(`RowAdapters`), and each LoRA layer adds its low-rank term for all rows with two batched matmuls over
the adapters' stacked weights (the "gathered LoRA" of S-LoRA / Punica):

    A^T (n+1, in, r), B^T (n+1, r, out): slot 0 is zeros (the base), slot i one loaded adapter, ranks
    padded, in the activations' dtype
    delta = ((x (rows, T, in) @ A^T[slot]) @ B^T[slot]) * scale[slot]

When every row uses the same adapter the layer runs peft's own arithmetic (so a lone request gets
exactly what peft gives); when no row uses one, only the base layer runs. Weights, loading and saving
stay peft's; the stacks are rebuilt when the set of loaded adapters changes.
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class RowAdapters:
    """Set by the engine before each forward: which adapter (peft name, or None) each batch row uses."""

    def __init__(self):
        self.version = 0  # bumped when adapters load or unload: the layers rebuild their stacks
        self.slots: dict[str, int] = {}  # peft adapter name -> stack slot (1..n)
        self.single: str | None = None  # every row uses this adapter
        self.index: torch.Tensor | None = None  # (rows,) slot per row, for a mixed batch
        self.active = False

    def set_rows(self, names: list[str | None], device) -> None:
        distinct = set(names)
        self.active = True
        self.single = next(iter(distinct)) if len(distinct) == 1 else None
        self.index = None
        if len(distinct) > 1:
            self.index = torch.tensor([self.slots[n] if n else 0 for n in names], device=device)

    def clear(self) -> None:
        self.active, self.single, self.index = False, None, None


class GatheredLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear, plus a forward for the engine's per-row adapters (see the module docstring)."""

    _tf_rows: RowAdapters | None = None
    _tf_stack: tuple | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self._tf_rows
        if rows is None or not rows.active or args or kwargs or self.merged or self.disable_adapters:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        if rows.index is None:  # one adapter for the whole batch (or none): peft's arithmetic
            name = rows.single
            if name is not None and name in self.lora_A:
                a, b = self.lora_A[name], self.lora_B[name]
                result = (result + b(a(x.to(a.weight.dtype))) * self.scaling[name]).to(result.dtype)
            return result
        if x.shape[1] > 1:  # a prefill: a few large GEMMs per adapter group beat a gathered bmm (no bf16 bmm kernel)
            return result + self._grouped(x, rows).to(result.dtype)
        At, Bt, scale = self._stacks(rows, x.dtype)
        low = torch.bmm(x, At[rows.index])  # (rows, T, in) @ (rows, in, r) -> (rows, T, r)
        delta = torch.bmm(low, Bt[rows.index]) * scale[rows.index].view(-1, 1, 1)  # -> (rows, T, out)
        return result + delta.to(result.dtype)

    def _grouped(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """delta for a multi-token batch: rows grouped by adapter, each group through peft's own two layers."""
        delta = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for name, slot in rows.slots.items():
            members = (rows.index == slot).nonzero().flatten()
            if len(members) and name in self.lora_A:
                a, b = self.lora_A[name], self.lora_B[name]
                part = b(a(x[members].to(a.weight.dtype))) * self.scaling[name]
                delta[members] = part.to(x.dtype)
        return delta

    def _stacks(self, rows: RowAdapters, dtype: torch.dtype):
        """(A^T (n+1, in, r), B^T (n+1, r, out), scale (n+1,)) in the activations' dtype, stored transposed so
        a gathered slice is already the contiguous right operand of bmm (no copy per step)."""
        if self._tf_stack is None or self._tf_stack[0] != (rows.version, dtype):
            names = sorted(rows.slots, key=rows.slots.get)
            present = [n for n in names if n in self.lora_A]
            device = self.base_layer.weight.device
            rank = max((self.lora_A[n].weight.shape[0] for n in present), default=1)
            At = torch.zeros(len(names) + 1, self.in_features, rank, dtype=dtype, device=device)
            Bt = torch.zeros(len(names) + 1, rank, self.out_features, dtype=dtype, device=device)
            scale = torch.zeros(len(names) + 1, dtype=dtype, device=device)
            for n in present:
                slot, r = rows.slots[n], self.lora_A[n].weight.shape[0]
                At[slot, :, :r] = self.lora_A[n].weight.detach().t()
                Bt[slot, :r] = self.lora_B[n].weight.detach().t()
                scale[slot] = self.scaling[n]
            self._tf_stack = ((rows.version, dtype), At, Bt, scale)
        return self._tf_stack[1:]


def install(model, rows: RowAdapters) -> bool:
    """Give every plain LoRA Linear of `model` the gathered forward; False (nothing changed) if the model has
    LoRA layers of another kind, which then keep peft's `adapter_names` path."""
    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(type(m) not in (PeftLoraLinear, GatheredLoraLinear) for m in layers):
        return False
    for m in layers:
        m.__class__ = GatheredLoraLinear
        m._tf_rows = rows
    return True
