"""Continuous batching over one loaded model: requests join and leave the decode batch as they arrive and
finish, and rows of one batch may use different LoRA adapters of the same base (peft's `adapter_names`).

One thread owns the model. Each iteration it admits waiting sequences (prefilling each alone, so its
KV cache is exactly what a single request computes), merges their caches into the batch cache, and
runs one decode step for every active row:

    batch cache, per layer: keys/values (B, H_kv, T, D), rows left-padded to the longest
    attention mask (B, T): 0 over each row's left padding
    position ids (B, 1): each row's own next position, so left padding changes nothing

A row that finishes (a stop token, a stop string, max_tokens) or whose client went away is dropped
from the cache at once (`index_select` on the batch dimension), and padding columns no row needs any
more are trimmed. Sampling is per row (temperature, top_p, its own seeded generator).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("tuneforge.serving")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
ARRIVAL_WINDOW_SECONDS = 0.02


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the caller answers 429."""


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Output:
    """What a sequence produced since the last Output: new text, and why it ended (None while running)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    params: SamplingParams
    stop_ids: set[int]
    emit: Callable[[Output], None]  # called from the engine thread; must be quick and thread-safe
    decode: Callable[[list[int]], str]
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    pos: int = 0  # next position id
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits (V,): greedy at temperature 0, else temperature + nucleus (top_p) sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    # In float64 and from the best logit down: a temperature as small as 5e-324 gives 0 for the best token and
    # -inf for the rest (a one-hot distribution), never 0/0 = NaN as float32 would (5e-324 rounds to 0 there).
    probs = torch.softmax((logits.double() - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
        keep[0] = True  # however small top_p is (5e-324 rounds to 0 in float32), the best token stays
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def append_token(seq: Sequence, token: int) -> None:
    """Record one sampled token, emit the new text, and finish the row when it is done (the engines' threads
    call this for every token: BatchEngine and serving.onnx_engine.OnnxEngine)."""
    if token in seq.stop_ids:
        finish(seq, "stop")
        return
    seq.out_ids.append(token)
    seq.text = seq.decode(seq.out_ids)
    for stop in seq.params.stop:
        at = seq.text.find(stop, max(0, seq.sent - len(stop)))
        if at != -1:
            seq.text = seq.text[:at]
            finish(seq, "stop")
            return
    if len(seq.out_ids) >= seq.params.max_tokens:
        finish(seq, "length")
        return
    # Hold back an unfinished UTF-8 character and anything that may be the start of a stop string.
    safe = len(seq.text.rstrip("\ufffd"))
    for stop in seq.params.stop:
        for k in range(min(len(stop) - 1, safe - seq.sent), 0, -1):
            if seq.text[safe - k:safe] == stop[:k]:
                safe -= k
                break
    if safe > seq.sent:
        seq.emit(Output(seq.text[seq.sent:safe], []))
        seq.sent = safe


def finish(seq: Sequence, reason: str, error: str | None = None) -> None:
    """End the sequence once: emit the text it held back, all its tokens, and why it ended."""
    if seq.finish_reason is not None:
        return
    seq.finish_reason = reason
    seq.emit(Output(seq.text[seq.sent:], list(seq.out_ids), reason, error))
    seq.sent = len(seq.text)


class WaitingQueue:
    """The sequences waiting for an engine's thread (every engine: BatchEngine, onnx_engine.OnnxEngine), and the
    condition that wakes that thread when some arrive or the engine stops."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.seqs: collections.deque[Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.stopped = False

    def __len__(self) -> int:
        return len(self.seqs)

    def submit(self, seqs: tuple[Sequence, ...]) -> None:
        """Queue the sequences of one request together (all or none): QueueFull when `max_waiting`
        sequences already wait."""
        with self.cond:
            if len(self.seqs) >= self.max_waiting:
                raise QueueFull(f"{len(self.seqs)} sequences are already waiting for this model")
            self.seqs.extend(seqs)
            self.cond.notify()

    def pop(self) -> Sequence | None:
        with self.cond:
            return self.seqs.popleft() if self.seqs else None

    def push_back(self, seqs: list[Sequence]) -> None:
        """Return sequences taken but not admitted to the front, in their order."""
        with self.cond:
            self.seqs.extendleft(reversed(seqs))

    def wait(self, busy: bool) -> bool:
        """Block the engine thread until a sequence waits (at once when it is `busy` with rows); False once the
        engine is stopping."""
        with self.cond:
            while not self.stopped and not self.seqs and not busy:
                self.cond.wait()
            return not self.stopped

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()


class BatchEngine:
    """Decodes every submitted Sequence of one model, batching across requests and adapters."""

    def __init__(self, model, *, adapters=None, max_batch: int = 16, max_waiting: int = 64, name: str = "model"):
        self.model = model
        self.adapters = adapters  # serving.adapters.AdapterSet, or None for a model served without adapters
        self.max_batch, self.name = max_batch, name
        self.waiting = WaitingQueue(max_waiting)
        self.batch = Batch()
        self.device = next(model.parameters()).device
        self._head, self._head_for = None, None  # (decoder, output head) of the model last run
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- API (any thread)

    def submit(self, *seqs: Sequence) -> None:
        """Queue the sequences of one request (all or none; QueueFull when too many wait)."""
        self.waiting.submit(seqs)

    def load(self) -> dict:
        return {"active": len(self.batch), "waiting": len(self.waiting)}

    @property
    def context_length(self) -> int:
        """Prompt + completion tokens the model takes."""
        return getattr(self.net.config, "max_position_embeddings", None) or 10**9

    def stop(self) -> None:
        self.waiting.stop()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            idle = not self.batch.rows
            if not self.waiting.wait(busy=not idle):
                return
            if idle:  # requests sent together arrive a few ms apart: prefill them in one forward
                time.sleep(ARRIVAL_WINDOW_SECONDS)
            try:
                self._admit()
                self._drop_done()
                if self.batch.rows:
                    self._decode_step()
                    self._drop_done()
            except Exception as e:  # a bug or an out-of-memory: fail the affected requests, keep serving
                log.exception("engine %s failed a step", self.name)
                for seq in self.batch.rows:
                    finish(seq, "error", error=str(e))
                self.batch = Batch()

    def _admit(self) -> None:
        """Take waiting sequences into the batch, up to max_batch, and prefill them together."""
        skipped, admitted = [], []
        while len(self.batch) + len(admitted) < self.max_batch:
            seq = self.waiting.pop()
            if seq is None:
                break
            if seq.cancelled:
                continue
            if self.adapters is not None and seq.adapter is not None:
                in_use = {s.adapter for s in (*self.batch.rows, *admitted)}
                try:
                    ready = self.adapters.acquire(seq.adapter, in_use)
                except Exception as e:  # noqa: BLE001 — an adapter that cannot load fails its request only
                    finish(seq, "error", error=f"adapter {seq.adapter}: {e}")
                    continue
                if not ready:  # every adapter slot is in use by running rows: wait for one to finish
                    skipped.append(seq)
                    continue
            admitted.append(seq)
        if skipped:
            self.waiting.push_back(skipped)
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as e:  # the new rows never joined the batch: fail them (the batch is untouched)
                log.exception("engine %s failed a prefill", self.name)
                for seq in admitted:
                    finish(seq, "error", error=str(e))

    @property
    def net(self):
        """The model to run: the AdapterSet's (a PeftModel once an adapter has loaded), else our own."""
        return self.adapters.model if self.adapters is not None else self.model

    def _forward(self, input_ids, adapters: list[str | None], **kw) -> tuple[torch.Tensor, object]:
        """(next-token logits (B, V) at each row's last position, the updated cache)."""
        aset = self.adapters
        if aset is None or not aset.wrapped:
            return self._run(input_ids, kw)
        names = [aset.internal[a] if a else None for a in adapters]
        if not aset.gathered:  # LoRA layers the gathered path does not cover: peft's own mixed batches
            return self._run(input_ids, {**kw, "adapter_names": [n or BASE for n in names]}, whole_model=True)
        aset.rows.set_rows(names, self.device)
        try:
            return self._run(input_ids, kw)
        finally:
            aset.rows.clear()

    def _run(self, input_ids, kw: dict, whole_model: bool = False):
        from tuneforge.training.loss import output_head

        net = self.net
        if self._head_for is not net:
            self._head, self._head_for = output_head(net), net
        if whole_model or self._head is None:
            out = net(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kw)
            return out.logits[:, -1], out.past_key_values
        # Decoder, then the output head on the last position only, as a plain (B, H) x (H, V) matmul: the
        # model's own logits_to_keep path multiplies a strided (B, 1, H) slice, which bf16 runs as a bmm
        # over a copied weight (measured: half a second per prefill).
        decoder, head = self._head
        out = decoder(input_ids=input_ids, use_cache=True, **kw)
        return head(out.last_hidden_state[:, -1].contiguous()), out.past_key_values

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One forward over the new sequences' prompts, left-padded (a lone prompt: no padding at all, so it
        computes exactly what a single request computes); each samples its first token."""
        L = max(len(s.prompt_ids) for s in seqs)
        ids = torch.tensor([[0] * (L - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (L - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs], device=self.device)
        kw = {}
        if len(seqs) > 1:
            kw = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        logits, cache = self._forward(ids, [s.adapter for s in seqs], past_key_values=_cache(self.net, []), **kw)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed % 2**64)
            seq.pos = len(seq.prompt_ids)
            append_token(seq, sample(logits[i], seq.params, seq.generator))
        self.batch.add(seqs, _layers(cache), mask)  # finished ones leave at the next _drop_done

    def _decode_step(self) -> None:
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
                append_token(seq, sample(logits[i], seq.params, seq.generator))

    def _drop_done(self) -> None:
        keep = [i for i, s in enumerate(self.batch.rows) if s.finish_reason is None and not s.cancelled]
        for s in self.batch.rows:
            if s.cancelled and s.finish_reason is None:
                s.finish_reason = "cancelled"  # its client went away: nothing to emit
        self.batch.keep(keep)
