"""Preference tuning in the one training loop: the DPO (sigmoid) and ORPO losses over (chosen, rejected) pairs.

A micro-batch of B pairs is one batch (data/batching.py `collate_pairs`) whose single forward scores both replies
of every pair: by default one row per pair, the shared prompt once and then both replies, each masked from the
other (`shared_prompt`); or TRL's 2B rows, prompt + reply each. Labels are on the replies' tokens only; the batch
lists them (`reply_*`), and the forward gives each reply's summed log-probability,
log pi(y | x) = sum_t log p(y_t | x, y_<t) (`logps_fn_for`), the preferred replies first (2B,).

- DPO (Rafailov et al. 2023), per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). The reference
  log-probabilities ref_* come from a no-grad pass of the same batch with the adapter switched off (peft's
  `disable_adapter`: the frozen base is the reference, no second model in memory), or from the batch itself
  (`ref_logps`, computed once before training by `precompute_reference` and kept with the run). Reference
  passes run in eval mode: the reference is one fixed function, whichever way it is computed.
- ORPO (Hong et al. 2024), per pair: -mean_t log p(chosen_t) - beta * log sigmoid(log odds(chosen) - log
  odds(rejected)), odds(y) = p / (1 - p) with p = exp(mean token log-prob); no reference. The NLL term is the
  chosen reply's mean token loss (the paper's L_SFT); TRL's experimental ORPOTrainer averages it over the whole
  batch, prompt tokens included.

As for supervised runs the loss is a *sum* (over pairs) and the loop divides it by the pairs of the whole
accumulated step across ranks (`count_pairs`), so accumulating micro-batches equals one big batch. Rewards
follow TRL: beta * (pi - ref) for DPO, beta * mean token log-prob for ORPO; reward accuracy is the share of
pairs whose preferred reply gets the higher reward. `PreferenceLoss` sums them over a step in `stats`.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from tuneforge.models.head import output_head
from tuneforge.training.loss import linear_token_logprobs, model_inputs

# Sums a step's pairs contribute (PreferenceLoss.stats), in this order.
STATS = ("pairs", "correct", "margin", "logps_chosen", "logps_rejected")


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs of a batch (data/batching.py `collate_pairs`) that carry loss (a filler batch that keeps ranks in
    step has none)."""
    B, seq = int(batch["pairs"]), batch["reply_seq"]
    return int((torch.bincount(seq[seq < B], minlength=B) > 0).sum())


def without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with no reply tokens to score: loss 0 and gradient 0, the same forward."""
    empty = {k: batch[k][:0] for k in ("reply_rows", "reply_positions", "reply_targets", "reply_seq")}
    return {**batch, **empty}


def _sums(batch: dict[str, torch.Tensor], token_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (2B,): the summed reply log-prob and the reply's token count."""
    n, seq = 2 * int(batch["pairs"]), batch["reply_seq"]
    logps = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    return logps, torch.bincount(seq, minlength=n)


def _hidden_states_logps(decoder, head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h = decoder(**model_inputs(batch)).last_hidden_state  # (R, T, H)
    picked = h[batch["reply_rows"], batch["reply_positions"]]  # (N, H): only the outputs that predict a reply token
    return _sums(batch, linear_token_logprobs(picked, head.weight, batch["reply_targets"]))


def _logits_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = batch["input_ids"].shape[1]
    logits = model(**model_inputs(batch)).logits[:, -T:]  # (R, T, V); prompt tuning prepends virtual tokens
    picked = logits[batch["reply_rows"], batch["reply_positions"]].float()  # (N, V)
    token_logps = picked.gather(-1, batch["reply_targets"][:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return _sums(batch, token_logps)


def logps_fn_for(model, chunked: bool = True):
    """`f(batch) -> (summed reply log-prob per sequence (2B,), reply tokens per sequence (2B,))`: from hidden
    states through the head chunk by chunk (no (R, T, V) logits) when the head is frozen and `chunked`, else
    the full logits."""
    fast = output_head(model) if chunked else None
    if fast is not None and not fast[1].weight.requires_grad:
        return functools.partial(_hidden_states_logps, *fast)
    return functools.partial(_logits_logps, model)


def shared_prompt_window(model) -> tuple[bool, int | None]:
    """Whether a batch for `model` can put both replies of a pair in one row after their prompt (collate_pairs
    `shared_prompt`), and the sliding attention window its mask must apply (None: none). It can when attention
    goes through SDPA, which takes the 4D mask as given, every layer attends alike (one mask serves all; models
    that mix full and sliding layers take TRL's layout), and there are no virtual tokens (prompt tuning prepends
    them to every row, and its mask is 2D)."""
    from tuneforge.models.attention import NAMES

    config = getattr(model, "config", None)
    peft_config = getattr(model, "active_peft_config", None)
    if (getattr(config, "_attn_implementation", None) not in ("sdpa", *NAMES)
            or getattr(peft_config, "is_prompt_learning", False)):
        return False, None
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        return False, None
    window = getattr(config, "sliding_window", None)
    if kinds == {"full_attention"} or not isinstance(window, int):
        window = None
    return True, window


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each (B,): the sigmoid loss of DPO."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    x = x.clamp(max=-1e-12)  # a mean log-prob of exactly 0 would make the odds infinite
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each (B,), from the replies' mean token log-probs."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


class PreferenceLoss:
    """`loss_fn` of the loop's ForwardLoss for task preference: batch -> (loss summed over pairs, correct pairs).

    `reference`: "adapter" (a no-grad pass with the adapter off), "precomputed" (read `ref_logps` from the
    batch; see `precompute_reference`) or "none" (ORPO). `stats` sums STATS over the calls since the last
    `take_stats()`. Batches come from `collate(pairs, pad_id)` (the layout this model takes). While
    `reference_only` is set a call returns the reference log-probs (2B,) instead, so a precomputation goes
    through the same (possibly wrapped) forward as training."""

    def __init__(self, model, *, loss: str, beta: float, reference: str, chunked: bool = True,
                 shared_prompt: bool = True):
        if loss == "orpo":
            reference = "none"
        self.model, self.loss, self.beta, self.reference = model, loss, beta, reference
        can_share, self.window = shared_prompt_window(model)
        self.shared_prompt = shared_prompt and can_share  # the layout of collate_pairs for this model
        self.logps = logps_fn_for(model, chunked)
        self.stats = torch.zeros(len(STATS), dtype=torch.float64)
        self.reference_only = False

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_only:
            return self.reference_logps(batch), torch.zeros((), dtype=torch.long)
        logps, counts = self.logps(batch)  # (2B,), (2B,)
        half = logps.shape[0] // 2
        valid = counts[:half] > 0  # (B,): pairs with targets (both sides have some when the chosen side does)
        if self.loss == "dpo":
            ref = batch["ref_logps"] if self.reference == "precomputed" else self.reference_logps(batch)
            ref = ref.to(logps.dtype)
            losses, chosen_reward, rejected_reward = dpo_losses(logps[:half], logps[half:], ref[:half], ref[half:],
                                                                self.beta)
        else:
            means = logps / counts.clamp(min=1)
            losses, chosen_reward, rejected_reward = orpo_losses(means[:half], means[half:], self.beta)
        loss = (losses * valid).sum()
        correct = ((chosen_reward > rejected_reward) & valid).sum()
        with torch.no_grad():
            v = valid.to(torch.float64)
            self.stats += torch.stack([v.sum(), correct.to(torch.float64),
                                       ((chosen_reward - rejected_reward).double() * v).sum(),
                                       (logps[:half].detach().double() * v).sum(),
                                       (logps[half:].detach().double() * v).sum()]).cpu()
        return loss, correct

    def collate(self, pairs, pad_id: int) -> dict[str, torch.Tensor]:
        """`pairs` as one batch in this loss's layout (data/batching.py collate_pairs)."""
        from tuneforge.data.batching import collate_pairs

        return collate_pairs(pairs, pad_id, shared_prompt=self.shared_prompt, window=self.window)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reply log-probs (2B,) of the reference: the model with its adapter off (a full fine-tune's
        model as it is: call this before its first step), in eval mode."""
        was_training = self.model.training
        self.model.eval()
        disabled = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        try:
            with disabled:
                return self.logps(batch)[0].detach()
        finally:
            self.model.train(was_training)

    def take_stats(self) -> dict[str, float]:
        """The sums since the last call (STATS as a dict), and start again from zero."""
        out = dict(zip(STATS, self.stats.tolist()))
        self.stats.zero_()
        return out


def metrics_from_stats(stats: dict[str, float], prefix: str = "") -> dict[str, float]:
    """A step's (or a dataset's) summed STATS as the run's metric names (training/run_dir.py)."""
    from tuneforge.training.run_dir import LOGPS_CHOSEN, LOGPS_REJECTED, REWARD_ACCURACY, REWARD_MARGIN

    n = max(stats["pairs"], 1)
    out = {REWARD_ACCURACY: stats["correct"] / n, REWARD_MARGIN: stats["margin"] / n}
    if not prefix:
        out.update({LOGPS_CHOSEN: stats["logps_chosen"] / n, LOGPS_REJECTED: stats["logps_rejected"] / n})
    return {f"{prefix}{k}": v for k, v in out.items()}


def attach_reference(batch: dict[str, torch.Tensor], table: torch.Tensor | None, ids: list[int]) -> dict:
    """`batch` (pairs `ids`, in order) with its precomputed reference log-probs `ref_logps` (2B,) from `table`
    (N, 2): chosen column then rejected column; unchanged when there is no table."""
    if table is None:
        return batch
    rows = table[torch.tensor(ids, dtype=torch.long)]
    return {**batch, "ref_logps": torch.cat([rows[:, 0], rows[:, 1]])}


def batches_in_order(n: int, lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of similar length (least padding): what evaluation passes iterate over."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


@torch.no_grad()
def precompute_reference(forward, loss: PreferenceLoss, data, batch_size: int, pad_id: int, device,
                         autocast_dtype) -> torch.Tensor:
    """The reference log-probs of every pair of `data` (EncodedData of PreferencePairs) as an (N, 2) fp32 table
    (chosen, rejected), through `forward` (the loop's ForwardLoss, wrapped or not) with `loss.reference_only`."""
    from tuneforge.hardware import autocast

    pairs = data.examples
    table = torch.zeros(len(pairs), 2, dtype=torch.float32)
    loss.reference_only = True
    try:
        for ids in batches_in_order(len(pairs), [p.length for p in pairs], batch_size):
            batch = {k: v.to(device) for k, v in loss.collate([pairs[i] for i in ids], pad_id).items()}
            with autocast(device, autocast_dtype):
                ref, _ = forward(batch)
            ref = ref.float().cpu()
            table[torch.tensor(ids)] = torch.stack([ref[: len(ids)], ref[len(ids):]], dim=1)
    finally:
        loss.reference_only = False
    return table


@torch.no_grad()
def dataset_preference_metrics(forward, loss: PreferenceLoss, model, data, batch_size: int, pad_id: int, device,
                               autocast_dtype, table: torch.Tensor | None = None) -> dict[str, float]:
    """Validation for task preference: the mean loss per pair and the reward accuracy and margin over a whole
    encoded dataset; `model` (the module whose mode switches) is left as it was."""
    from tuneforge.hardware import autocast
    from tuneforge.training.run_dir import EVAL_LOSS

    was_training = model.training
    model.eval()
    loss.take_stats()  # the caller took the step's already; start clean
    pairs, loss_sum = data.examples, 0.0
    for ids in batches_in_order(len(pairs), [p.length for p in pairs], batch_size):
        batch = attach_reference(loss.collate([pairs[i] for i in ids], pad_id), table, ids)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, autocast_dtype):
            value, _ = forward(batch)
        loss_sum += value.item()
    model.train(was_training)
    stats = loss.take_stats()
    return {EVAL_LOSS: loss_sum / max(stats["pairs"], 1), **metrics_from_stats(stats, prefix="eval_")}


# ---------------------------------------------------------------- a precomputed reference, kept with the run


def reference_fingerprint(train, valid, spec, autocast_dtype) -> str:
    """What a precomputed reference depends on: every pair's tokens and labels, the base model, the method
    (full fine-tuning or an adapter's base), the stored and computed precisions."""
    import hashlib
    from array import array

    digest = hashlib.sha256()
    digest.update(f"{spec.model}|{spec.method}|{spec.training.base_dtype}|{autocast_dtype}".encode())
    for name, data in (("train", train), ("validation", valid)):
        digest.update(name.encode())
        for pair in (data.examples if data is not None else []):
            for side in (pair.chosen, pair.rejected):
                digest.update(array("q", side.input_ids).tobytes())
                digest.update(array("q", side.labels).tobytes())
    return digest.hexdigest()


def save_reference(path, tables: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write the (N, 2) tables atomically (a crash leaves the old file or the new one)."""
    import os

    from safetensors.torch import save_file

    from tuneforge import files

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file({k: v.contiguous() for k, v in tables.items()}, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise files.disk_error(e, path) from None


def load_reference(path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The tables saved at `path`, or None when there are none, they are unreadable, or were made for other
    data or settings (`fingerprint`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 — missing, truncated or damaged: computed again (or refused) by the caller
        return None
