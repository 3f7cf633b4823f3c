"""A plain LoRA linear layer as one autograd node on CPU: base GEMM, adapter dropout, adapter, sum.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops. Profiling a SmolLM2
step under bf16 autocast (bench/profile_step.py, batch 4 x 512) showed where that costs on CPU:
- the bool dropout mask converted to bf16 before each multiply, forward and backward (`copy_`
  passes over every adapter input): ~9 % of the step;
- the `* scaling` and the `+` over each layer's full-width output (576-1536 wide), forward and
  backward, and the autograd sum of the base's and the adapter's input gradients;
- the dropped copy of the input and the mask, kept for backward.

Here the scale (LoRA's and dropout's) is applied to the rank-r activations (16 wide), lora_B's
product is accumulated into the base output by one `addmm_`, and backward accumulates the base's
input gradient into the adapter's by another. Saved for backward: the layer input (the same tensor
its q/k/v or gate/up siblings save), the rank-r activations and the generator state the mask was
drawn from; backward redraws the mask. The mask bytes are the ones ByteDropout would draw, so the
global RNG stream is unchanged and resume stays exact. Weights, state dict, saving and merging stay
peft's; any call the fused path does not cover (merged, several or disabled adapters, DoRA, GPU,
trainable base weights, extra arguments) runs peft's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from tuneforge.methods.dropout import ByteDropout, byte_uniforms


def _lora_forward(x2, weight, bias, lora_a, lora_b, scale, threshold, dtype):
    """y = x W^T + bias + s * (drop(x) A^T) B^T for x2 (N, in) in `dtype`; returns (y, rank-r v, rng state)."""
    state = torch.default_generator.get_state() if threshold else None
    dropped = x2.masked_fill(byte_uniforms(x2.shape) < threshold, 0) if threshold else x2
    v = (dropped @ lora_a.to(dtype).t()).mul_(scale)  # (N, r)
    y = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
    y.addmm_(v, lora_b.to(dtype).t())
    return y, v, state


def _lora_backward(g, x2, weight, lora_a, lora_b, v, scale, threshold, state, dtype, needs):
    """Gradients (x2, lora_a, lora_b) of `_lora_forward` for output gradient g (N, out); `needs` says which."""
    drop = None
    if threshold:
        generator = torch.Generator()
        generator.set_state(state)
        drop = byte_uniforms(x2.shape, generator=generator) < threshold  # the forward's mask, redrawn
    grad_b = (g.t() @ v).to(lora_b.dtype) if needs[2] else None
    gu = (g @ lora_b.to(dtype)).mul_(scale)  # d loss / d (dropped x A^T)
    grad_a = None
    if needs[1]:
        dropped = x2.masked_fill(drop, 0) if drop is not None else x2
        grad_a = (gu.t() @ dropped).to(lora_a.dtype)
    grad_x = None
    if needs[0]:
        grad_x = gu @ lora_a.to(dtype)
        if drop is not None:
            grad_x.masked_fill_(drop, 0)
        grad_x.addmm_(g, weight.to(dtype))  # + the base layer's input gradient
    return grad_x, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """A LoRA linear layer; keeps x, the rank-r activations and the rng state for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, threshold, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y, v, state = _lora_forward(x2, weight, bias, lora_a, lora_b, scale, threshold, dtype)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, v)
        ctx.state, ctx.threshold, ctx.scale, ctx.dtype, ctx.x_shape, ctx.x_dtype = (
            state, threshold, scale, dtype, x.shape, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_a, lora_b, v = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.dtype)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        gx, ga, gb = _lora_backward(g, x2, weight, lora_a, lora_b, v, ctx.scale, ctx.threshold, ctx.state,
                                    ctx.dtype, needs)
        return (gx.view(ctx.x_shape).to(ctx.x_dtype) if gx is not None else None), None, None, ga, gb, None, None, None


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) with down a LoRA layer. Keeps gate and up only: backward recomputes
    silu(gate) and the product, which autograd would otherwise keep (two more intermediate-wide
    tensors per layer, 30 % of a SmolLM2 step's saved activations)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scale, threshold, dtype):
        p = (F.silu(gate.to(dtype)) * up.to(dtype)).reshape(-1, gate.shape[-1])
        y, v, state = _lora_forward(p, weight, bias, lora_a, lora_b, scale, threshold, dtype)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, v)
        ctx.state, ctx.threshold, ctx.scale, ctx.dtype = state, threshold, scale, dtype
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, weight, lora_a, lora_b, v = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        gate_c, up_c = gate.to(dtype), up.to(dtype)
        act = F.silu(gate_c)
        p = (act * up_c).reshape(-1, gate.shape[-1])
        needs = (True, ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        gp, ga, gb = _lora_backward(g, p, weight, lora_a, lora_b, v, ctx.scale, ctx.threshold, ctx.state, dtype, needs)
        gp = gp.view(gate.shape)
        grad_up = (gp * act).to(up.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(gp * up_c, gate_c).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None, ga, gb, None, None, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with the fused training forward; see the module docstring."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        return _LoraLinear.apply(x, *self._fused_args(name, x))

    def _fused_args(self, name: str, x: torch.Tensor) -> tuple:
        """(weight, bias, lora_a, lora_b, scale, dropout threshold, compute dtype) for the fused functions."""
        dropout = self.lora_dropout[name]
        threshold, keep_scale = (dropout.threshold, dropout.scale) if isinstance(dropout, ByteDropout) and dropout.training else (0, 1.0)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        base = self.base_layer
        return (base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name] * keep_scale, threshold, dtype)

    def _fusable_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged or x.device.type != "cpu":
            return None
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base, lora_a, lora_b, dropout = self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if type(base) is not nn.Linear or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
            return None
        return name if isinstance(dropout, (ByteDropout, nn.Identity)) else None


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    name = down._fusable_adapter(x, (), {}) if isinstance(down, FusedLoraLinear) and torch.is_grad_enabled() else None
    if name is None:
        return super(type(self), self).forward(x)
    if hasattr(self, "gate_up_proj"):  # Phi-3: one projection, then split
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return _SwiGLUDown.apply(gate, up, *down._fused_args(name, x))


# MLPs whose forward is exactly down(silu(gate(x)) * up(x)) (Phi-3: gate and up from one projection).
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Phi3MLP"}
_FUSED_MLP_CLASSES: dict[type, type] = {}  # original MLP class -> its subclass with the fused forward


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return type(module).__name__ in SWIGLU_MLPS and act in ("silu", "swish")


def use_fused_lora(model: nn.Module) -> int:
    """Give every plain peft LoRA Linear layer the fused forward, and the SWIGLU_MLPS whose down_proj is
    one of them the recomputed product (CPU); return how many LoRA layers were fused."""
    fused = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    for module in model.modules():
        cls = type(module)
        if _is_swiglu_mlp(module) and isinstance(getattr(module, "down_proj", None), FusedLoraLinear):
            if cls not in _FUSED_MLP_CLASSES:
                _FUSED_MLP_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_mlp_forward})
            module.__class__ = _FUSED_MLP_CLASSES[cls]
    return fused
