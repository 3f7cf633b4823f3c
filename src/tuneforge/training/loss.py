"""Causal-LM loss as a *sum* over target tokens, so the caller can normalise by the target count
of the whole accumulated batch (a mean of per-micro-batch means would weight short batches up).

Two paths give the same value and gradients:
- `causal_lm_loss_sum`: from the model's full logits (B, T, V). Works for every method.
- `hidden_states_loss_sum`: from the decoder's last hidden states, projecting only the positions
  that carry loss through the output head, chunk by chunk, with the gradient computed in the
  forward pass. The (B, T, V) logits — 49,152 wide for SmolLM2, the largest activation of a
  step — never exist, and prompt positions cost no output-head FLOPs at all.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.models.head import output_head

CHUNK_TOKENS = 256  # (256, V) fp32 logits at a time: 50 MB for a 49k vocabulary (1024: +240 MB peak, no faster)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the next-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T', V) with T' >= T (prompt tuning prepends virtual tokens), labels (B, T).

    Returns (summed cross-entropy over targets, number of correctly predicted targets).
    """
    T = labels.shape[1]
    logits = logits[:, -T:]  # drop virtual-token positions, if any
    pred = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V): fp32 log-softmax for a stable loss
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    loss = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        mask = target != IGNORE_INDEX
        correct = (pred.argmax(-1)[mask] == target[mask]).sum()
    return loss, correct


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i), chunked; d/dh (and d/dW if W trains) computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk):
        # h (N, H), weight (V, H), targets (N,)
        w = weight.detach().to(compute_dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk].detach().to(compute_dtype), targets[s : s + chunk]
            logits = (hc @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(-1) == tc).sum()
            # d(sum CE)/d logits = softmax - onehot, reusing the logits buffer.
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            grad_h[s : s + chunk] = (probs.to(compute_dtype) @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += probs.T @ hc.float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_loss).to(grad_w.dtype) if ctx.has_grad_w else None
        return grad_h * grad_loss.to(grad_h.dtype), gw, None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of `h @ weight.T` against `targets` without materialising all logits."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk)


class _LinearTokenLogProbs(torch.autograd.Function):
    """log p(t_i | h_i) = (h_i @ W^T)[t_i] - logsumexp(h_i @ W^T) per row i, chunked; d/dh computed in forward
    (a frozen W: each row's log-prob depends on its own h_i only, so backward is a per-row scale)."""

    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk):
        # h (N, H), weight (V, H), targets (N,) -> (N,) fp32
        w = weight.detach().to(compute_dtype)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk].detach().to(compute_dtype), targets[s : s + chunk]
            logits = (hc @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            out[s : s + chunk] = logits.gather(1, tc[:, None]).squeeze(1) - lse
            if need_grad:  # d logp / d logits = onehot - softmax
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
                grad_h[s : s + chunk] = (probs.to(compute_dtype) @ w).neg_().to(h.dtype)
        ctx.save_for_backward(grad_h if need_grad else torch.empty(0))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None


def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Each row's log-probability of its target under `h @ weight.T` (N,), without materialising all logits.
    `weight` must be frozen (its gradient is not computed): the caller falls back to full logits otherwise."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearTokenLogProbs.apply(h, weight, targets, dtype, chunk)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model sees: padded batches carry an attention mask, packed ones restarting positions
    (transformers derives the per-example mask from those only when there is no KV cache)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q") if k in batch}
    return {**inputs, "use_cache": False} if "position_ids" in batch else inputs


def hidden_states_loss_sum(decoder, head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `causal_lm_loss_sum(model(**batch).logits, labels)`, from hidden states."""
    labels = batch["labels"]
    h = decoder(**model_inputs(batch)).last_hidden_state  # (B, T, H)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    selected = h[:, :-1][mask]  # (N, H): only positions that predict a target
    return linear_cross_entropy_sum(selected, head.weight, labels[:, 1:][mask])


def loss_fn_for(model, chunked: bool = True):
    """Return `f(batch) -> (loss_sum, correct)`: the chunked target-only path where it applies to this
    model and `chunked` is on (training.kernels), else the model's full logits."""
    fast = output_head(model) if chunked else None
    if fast is not None:
        return functools.partial(hidden_states_loss_sum, *fast)

    def full(batch):
        logits = model(**model_inputs(batch)).logits
        return causal_lm_loss_sum(logits, batch["labels"])

    return full


@torch.no_grad()
def dataset_loss(model, data, batch_size: int, pad_id: int, device, autocast_dtype, chunked: bool = True,
                 loss_fn=None) -> dict[str, float]:
    """Teacher-forced loss (nats per target token) and next-token accuracy over a whole encoded dataset
    (`data.examples`), batched by length; the model is left in the mode it was in. `loss_fn`: a batch ->
    (loss sum, correct) callable to use instead of the model's own (a distributed strategy's wrapped forward,
    which gathers sharded weights; `model` is then the module to switch to eval mode)."""
    from tuneforge.data.batching import collate
    from tuneforge.hardware import autocast

    was_training = model.training
    model.eval()
    loss_fn = loss_fn or loss_fn_for(model, chunked)
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].input_ids))
    loss_sum = correct = targets = 0.0
    for s in range(0, len(order), batch_size):
        batch = collate([data.examples[i] for i in order[s : s + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, autocast_dtype):
            loss, ok = loss_fn(batch)
        loss_sum += loss.item()
        correct += ok.item()
        targets += count_targets(batch["labels"])
    model.train(was_training)
    return {"eval_loss": loss_sum / max(targets, 1), "eval_token_accuracy": correct / max(targets, 1)}
