"""Deterministic batch order and collation.

Each optimizer step sees the same `batch_size * grad_accum` examples whatever the split into
micro-batches, so changing `grad_accum` leaves the training trajectory unchanged. The order is a
pure function of (seed, epoch): resuming re-derives it and skips the steps already done.
"""
from __future__ import annotations

import random

import torch

from tuneforge.data.encode import IGNORE_INDEX, Example, PreferencePair

# Length grouping sorts within windows of this many steps, keeping batches random across windows.
GROUP_WINDOW_STEPS = 16


def step_groups(lengths: list[int], batch_size: int, grad_accum: int, seed: int, epoch: int,
                group_by_length: bool = True, rank: int = 0, world_size: int = 1) -> list[list[list[int]]]:
    """Return, for one epoch, a list of steps; each step is a list of micro-batches of example indices.

    With `world_size` ranks a step is the global batch of `batch_size * grad_accum * world_size`
    examples, ordered exactly as one process with `grad_accum * world_size` would order them; rank r
    gets micro-batches r, r + world_size, ... of it. So every example is seen once per epoch across
    the ranks, and the ranks together follow the 1-process trajectory of the same global batch. Near
    the end of an epoch a rank may get fewer micro-batches (even none) than its peers."""
    if world_size > 1:
        steps = step_groups(lengths, batch_size, grad_accum * world_size, seed, epoch, group_by_length)
        return [step[rank::world_size] for step in steps]
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    per_step = batch_size * grad_accum
    if group_by_length:
        window = per_step * GROUP_WINDOW_STEPS
        grouped = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: lengths[i], reverse=True)
            steps = [chunk[s : s + per_step] for s in range(0, len(chunk), per_step)]
            rng.shuffle(steps)  # don't always start a window with its longest step
            grouped.extend(i for step in steps for i in step)
        order = grouped
    steps = []
    for s in range(0, len(order), per_step):
        ids = order[s : s + per_step]
        if group_by_length:  # similar lengths within each micro-batch
            ids = sorted(ids, key=lambda i: lengths[i], reverse=True)
        steps.append([ids[m : m + batch_size] for m in range(0, len(ids), batch_size)])
    return steps


def split_by_tokens(ids: list[int], lengths: list[int], max_tokens: int | None, packed: bool = False) -> list[list[int]]:
    """Split one micro-batch into the fewest near-equal parts (longest examples first) whose padded size
    (rows x longest; packed: the sum of lengths) is at most `max_tokens`. An example longer than the
    budget gets a part of its own. None: no split."""
    if max_tokens is None:
        return [ids]
    ids = sorted(ids, key=lambda i: lengths[i], reverse=True)

    def cost(part):
        return sum(lengths[i] for i in part) if packed else len(part) * lengths[part[0]]

    for k in range(1, len(ids) + 1):
        size = -(-len(ids) // k)
        parts = [ids[s : s + size] for s in range(0, len(ids), size)]
        if all(cost(p) <= max_tokens for p in parts):
            return parts
    return [[i] for i in ids]


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (B, T), attention_mask (B, T), labels (B, T)."""
    longest = max(len(e.input_ids) for e in examples)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: list[PreferencePair], pad_id: int, shared_prompt: bool = False,
                  window: int | None = None) -> dict[str, torch.Tensor]:
    """B preference pairs as one batch whose forward scores both replies of every pair.

    - `shared_prompt=False` (TRL's layout): 2B padded rows, 0..B-1 the preferred replies, B..2B-1 the others;
      input_ids, attention_mask, labels (2B, T).
    - `shared_prompt=True`: B rows, each [the two sides' common prefix (the prompt), the rest of the preferred
      side, the rest of the other], right-padded; the prompt is computed once for both replies. A 4D boolean
      attention_mask (B, 1, L, L) lets each reply see the prompt and itself (never the other reply), and
      position_ids restart the other reply where the prompt ends, so every token sees exactly what it would
      in its own row: the same log-probabilities as TRL's layout with ~(1 + reply/prompt)/2 of its tokens.
      `window`: the model's sliding attention window (a key is then visible from a query fewer than `window`
      positions on, as transformers masks it).

    Both carry the replies' target tokens as flat (N,) indices: `reply_rows`, `reply_positions` (the position
    whose output predicts the token), `reply_targets` (its id) and `reply_seq` (0..B-1 preferred side of pair
    b, B..2B-1 the other), and `pairs` (B, a 0-d tensor)."""
    B = len(pairs)
    if not shared_prompt:
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        rows, positions = mask.nonzero(as_tuple=True)
        return {**batch, "reply_rows": rows, "reply_positions": positions,
                "reply_targets": batch["labels"][:, 1:][mask], "reply_seq": rows, "pairs": torch.tensor(B)}
    layouts = [_shared_row(p) for p in pairs]
    L = max(len(ids) for ids, *_ in layouts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    attention_mask = torch.zeros((B, 1, L, L), dtype=torch.bool)
    rows, positions, targets, seq = [], [], [], []
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for b, (ids, pos, segment, (chosen_targets, rejected_targets)) in enumerate(layouts):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        position_ids[b, :n] = torch.tensor(pos)
        position_ids[b, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + L - n)
        seg = torch.tensor(segment + [3] * (L - n))  # 0 prompt, 1 preferred reply, 2 the other, 3 padding
        # a key is visible from a query when it comes no later and is the prompt or the query's own part;
        # a padding query sees itself only (an all-masked row would give NaN)
        visible = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
        if window is not None:
            visible &= (position_ids[b][:, None] - position_ids[b][None, :]) < window
        attention_mask[b, 0] = visible
        attention_mask[b, 0, n:, n:] = torch.eye(L - n, dtype=torch.bool)
        for s, found in ((b, chosen_targets), (B + b, rejected_targets)):
            for position, token in found:
                rows.append(b), positions.append(position), targets.append(token), seq.append(s)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            **{f"reply_{k}": torch.tensor(v, dtype=torch.long)
               for k, v in (("rows", rows), ("positions", positions), ("targets", targets), ("seq", seq))},
            "pairs": torch.tensor(B)}


def _shared_row(pair: PreferencePair) -> tuple[list[int], list[int], list[int], tuple[list, list]]:
    """One pair's shared-prompt row: (token ids, positions, segment per token, and per side the (row index
    whose output predicts it, token id) of each target token)."""
    c, r, s = pair.chosen, pair.rejected, pair.common_prefix
    ids = c.input_ids + r.input_ids[s:]
    pos = list(range(len(c.input_ids))) + list(range(s, len(r.input_ids)))
    segment = [0] * s + [1] * (len(c.input_ids) - s) + [2] * (len(r.input_ids) - s)

    def row_index(i: int, side: int) -> int:  # where token i of a side sits in the row
        return i if (i < s or side == 1) else i + len(c.input_ids) - s

    found = tuple([(row_index(i - 1, side), e.labels[i]) for i in range(1, len(e.input_ids))
                   if e.labels[i] != IGNORE_INDEX] for side, e in ((1, c), (2, r)))
    return ids, pos, segment, found


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: the micro-batch as one row (1, sum of lengths), positions restarting at 0 for each
    example and no attention mask, so transformers masks attention within each example only. Each
    example's first label is dropped: in the packed row it would be predicted from the previous
    example's last token; unpacked, nothing predicts it either. Loss and gradients equal `collate`'s.
    `cu_seq_lens_q` (example boundaries) lets models/attention.py attend to each example separately."""
    input_ids, labels, positions, starts = [], [], [], []
    for e in examples:
        starts.append(len(input_ids))
        input_ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]
        positions += range(len(e.input_ids))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens_q": torch.tensor(starts + [len(input_ids)])}
