"""Continuous batching over one loaded model: requests join and leave the decode batch as they arrive and
finish, and rows of one batch may use different LoRA adapters of the same base (peft's `adapter_names`).

One thread owns the model (serving/base.py). Each iteration it admits waiting sequences (prefilling them
together, left-padded; a lone prompt without padding, so its KV cache is exactly what a single request
computes), merges their caches into the batch cache, and runs one decode step for every active row:

    batch cache, per layer: keys/values (B, H_kv, T, D), rows left-padded to the longest
    attention mask (B, T): 0 over each row's left padding
    position ids (B, 1): each row's own next position, so left padding changes nothing

A row that finishes (a stop token, a stop string, max_tokens) or whose client went away is dropped
from the cache at once (`index_select` on the batch dimension), and padding columns no row needs any
more are trimmed. Sampling is per row (serving/sampling.py: constraints, temperature, top_p, its own
seeded generator, log-probabilities).

Prefix caching (serving/prefix_cache.py): a prompt whose first blocks were computed before (for the same
adapter) computes only the rest, in the same batched prefill as the other new prompts (each row: padding,
its cached prefix's KV, padding, the rest of its prompt; the mask says which columns are real); every
prefill stores its prompt's whole blocks. Prompts whose log-probabilities are asked for (echo) are computed whole, alone, with the
logits of every position.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tuneforge.models.head import output_head
from tuneforge.serving.base import Engine
from tuneforge.serving.prefix_cache import PrefixCache
from tuneforge.serving.sampling import decode_step, prompt_logprobs
from tuneforge.serving.sequence import Sequence, finish

log = logging.getLogger("tuneforge.serving")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class Batch:
    """The active rows and their shared, left-padded KV cache."""

    def __init__(self):
        self.rows: list[Sequence] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, T, D)
        self.mask: torch.Tensor | None = None  # (B, T)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, seqs: list[Sequence], layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache: (n, H, L, D) per layer, left-padded as `mask` (n, L) says),
        left-padding whichever side is shorter."""
        if not self.rows:
            self.rows, self.layers, self.mask = list(seqs), list(layers), mask
            return
        T = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, to: int) -> torch.Tensor:  # pad the time axis (-2) on the left
            return F.pad(t, (0, 0, to - t.shape[2], 0)) if t.shape[2] < to else t

        self.layers = [(torch.cat([pad(k, T), pad(nk, T)]), torch.cat([pad(v, T), pad(nv, T)]))
                       for (k, v), (nk, nv) in zip(self.layers, layers)]
        self.mask = torch.cat([F.pad(self.mask, (T - self.mask.shape[1], 0)), F.pad(mask, (T - mask.shape[1], 0))])
        self.rows.extend(seqs)

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep`; drop padding columns no remaining row attends to."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.layers, self.mask = [], [], None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column some row uses
        self.mask = mask[:, start:]
        self.layers = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                       for k, v in self.layers]


def _cache(model, layers):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers, config=model.config) if layers else DynamicCache(config=model.config)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class BatchEngine(Engine):
    """Decodes every submitted Sequence of one model, batching across requests and adapters."""

    scores_prompts = True

    def __init__(self, model, *, adapters=None, max_batch: int = 16, max_waiting: int = 64, name: str = "model",
                 prefix_cache_bytes: int = 0):
        super().__init__(name=name, max_batch=max_batch, max_waiting=max_waiting)
        self.model = model
        self.adapters = adapters  # serving.adapters.AdapterSet, or None for a model served without adapters
        self.batch = Batch()
        self.device = next(model.parameters()).device
        self._head, self._head_for = None, None  # (decoder, output head) of the model last run
        # A sliding-window layer keeps only its window: prompts that long are not cached (their KV is cut).
        self.window = getattr(model.config, "sliding_window", None) or 10**9
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.thread.start()

    @property
    def context_length(self) -> int:
        """Prompt + completion tokens the model takes."""
        return getattr(self.net.config, "max_position_embeddings", None) or 10**9

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def net(self):
        """The model to run: the AdapterSet's (a PeftModel once an adapter has loaded), else our own."""
        return self.adapters.model if self.adapters is not None else self.model

    # ---------------------------------------------------------------- the engine thread

    def rows(self) -> list[Sequence]:
        return self.batch.rows

    def _keep(self, keep: list[int]) -> None:
        self.batch.keep(keep)

    def _ready(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """A row's adapter must be loaded; False while every adapter slot is in use by running rows."""
        if self.adapters is None or seq.adapter is None:
            return True
        return self.adapters.acquire(seq.adapter, {s.adapter for s in (*self.batch.rows, *admitted)})

    def _forward(self, input_ids, adapters: list[str | None], all_positions: bool = False,
                 **kw) -> tuple[torch.Tensor, object]:
        """(next-token logits (B, V) at each row's last position, or (B, T, V) at every position, the updated
        cache)."""
        aset = self.adapters
        if aset is None or not aset.wrapped:
            return self._run(input_ids, kw, all_positions=all_positions)
        names = [aset.internal[a] if a else None for a in adapters]
        if not aset.gathered:  # LoRA layers the gathered path does not cover: peft's own mixed batches
            return self._run(input_ids, {**kw, "adapter_names": [n or BASE for n in names]}, whole_model=True,
                             all_positions=all_positions)
        aset.rows.set_rows(names, self.device)
        try:
            return self._run(input_ids, kw, all_positions=all_positions)
        finally:
            aset.rows.clear()

    def _run(self, input_ids, kw: dict, whole_model: bool = False, all_positions: bool = False):
        net = self.net
        if self._head_for is not net:
            self._head, self._head_for = output_head(net), net
        if whole_model or self._head is None:
            out = net(input_ids=input_ids, use_cache=True, logits_to_keep=0 if all_positions else 1, **kw)
            return (out.logits if all_positions else out.logits[:, -1]), out.past_key_values
        # Decoder, then the output head on the last position only, as a plain (B, H) x (H, V) matmul: the
        # model's own logits_to_keep path multiplies a strided (B, 1, H) slice, which bf16 runs as a bmm
        # over a copied weight (measured: half a second per prefill).
        decoder, head = self._head
        out = decoder(input_ids=input_ids, use_cache=True, **kw)
        hidden = out.last_hidden_state if all_positions else out.last_hidden_state[:, -1].contiguous()
        return head(hidden), out.past_key_values

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prompts to score alone (every position's logits); the others in one forward, each after the KV of
        its cached prefix."""
        together = []
        for seq in seqs:
            if seq.params.prompt_logprobs is not None:
                self._prefill_rows([seq], scored=True)
            else:
                together.append(seq)
        if together:
            self._prefill_rows(together)

    def _cached(self, seq: Sequence) -> tuple[int, list | None]:
        if self.prefix_cache is None or len(seq.prompt_ids) >= self.window:
            return 0, None
        return self.prefix_cache.lookup(seq.adapter, seq.prompt_ids)

    def _stores(self, seq: Sequence, cached: int) -> bool:
        """Whether `seq`'s prompt has whole blocks the prefix cache lacks (its first `cached` tokens it holds)."""
        if self.prefix_cache is None or len(seq.prompt_ids) >= self.window:
            return False
        return len(seq.prompt_ids) // self.prefix_cache.block * self.prefix_cache.block > cached

    def _prefill_rows(self, seqs: list[Sequence], scored: bool = False) -> None:
        """One forward over the sequences' prompts, less the prefix of each whose KV the prefix cache holds (a
        prompt to score computes every position); each samples its first token. A row is laid out as
        [padding, cached prefix, padding, rest of its prompt] (the mask says which columns are real), so every
        row's last prompt token is the last column; a lone prompt has no padding at all, so it computes exactly
        what a single request computes."""
        hits = [(0, None) if scored else self._cached(s) for s in seqs]
        fresh = [len(s.prompt_ids) - c for s, (c, _) in zip(seqs, hits)]
        C, S = max(c for c, _ in hits), max(fresh)
        ids = torch.tensor([[0] * (S - n) + s.prompt_ids[c:] for s, (c, _), n in zip(seqs, hits, fresh)],
                           device=self.device)
        mask = torch.tensor([[0] * (C - c) + [1] * c + [0] * (S - n) + [1] * n for (c, _), n in zip(hits, fresh)],
                            device=self.device)
        past = []
        if C:
            like = next(p for _, p in hits if p)

            def padded(p, layer: int, kv: int) -> torch.Tensor:  # (1, H, C, D), left-padded
                if p is None:
                    t = like[layer][kv]
                    return t.new_zeros(t.shape[0], t.shape[1], C, t.shape[3])
                return F.pad(p[layer][kv], (0, 0, C - p[layer][kv].shape[2], 0))

            past = [tuple(torch.cat([padded(p, layer, kv) for _, p in hits]) for kv in (0, 1))
                    for layer in range(len(like))]
        kw = {}
        if len(seqs) > 1:
            kw = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, C:]}
        logits, cache = self._forward(ids, [s.adapter for s in seqs], all_positions=scored,
                                      past_key_values=_cache(self.net, past), **kw)
        layers = _layers(cache)
        for i, seq in enumerate(seqs):
            if self._stores(seq, hits[i][0]):
                real = mask[i].nonzero().squeeze(1)  # the prompt's own columns
                self.prefix_cache.store(seq.adapter, seq.prompt_ids, [(k[i:i + 1].index_select(2, real),
                                                                       v[i:i + 1].index_select(2, real))
                                                                      for k, v in layers])
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed % 2**64)
            seq.pos = len(seq.prompt_ids)
            if scored:
                seq.prompt_logprobs = prompt_logprobs(logits[i], seq.prompt_ids, seq.params.prompt_logprobs)
            if seq.params.max_tokens == 0:  # the prompt scored, nothing to generate
                finish(seq, "length")
            else:
                decode_step(seq, logits[i, -1] if scored else logits[i])
        self.batch.add(seqs, layers, mask)  # finished ones leave at the next _drop_done

    def _step(self) -> None:
        rows = self.batch.rows
        ids = torch.tensor([[s.out_ids[-1]] for s in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.pos] for s in rows], device=self.device)  # (B, 1)
        mask = torch.cat([self.batch.mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], 1)
        logits, cache = self._forward(ids, [s.adapter for s in rows], attention_mask=mask, position_ids=positions,
                                      past_key_values=_cache(self.net, self.batch.layers))
        self.batch.layers, self.batch.mask = _layers(cache), mask  # logits: (B, V)
        for i, seq in enumerate(rows):
            seq.pos += 1
            if not seq.cancelled:
                decode_step(seq, logits[i])
