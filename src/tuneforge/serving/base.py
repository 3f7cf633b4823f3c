"""What the HTTP layer uses of an engine, whichever runs the model (serving/engine.py's BatchEngine for PyTorch
models, serving/onnx_engine.py's OnnxEngine for ONNX exports), and the part of the work they share.

    submit(*seqs)       queue one request's sequences (all or none; QueueFull beyond max_waiting)
    load()              {"active": rows decoding, "waiting": sequences queued}
    stop()              end the engine's thread
    context_length      prompt + completion tokens the model takes
    vocab_size          width of the logits (grammars mask this many tokens)
    scores_prompts      whether prompt log-probabilities (completions' echo + logprobs) are available
    adapters            .register(name, source) for the adapters it serves

One thread per engine owns the model. Each iteration it admits waiting sequences (`_prefill`: their prompts,
and each one's first token), then advances every active row by one token (`_step`), and drops the rows that
finished or whose client went away. Every token goes through sampling.decode_step, so constraints,
sampling and log-probabilities mean the same for both engines.
"""
from __future__ import annotations

import abc
import logging
import threading
import time

from tuneforge.serving.sequence import Sequence, WaitingQueue, finish

log = logging.getLogger("tuneforge.serving")
ARRIVAL_WINDOW_SECONDS = 0.02


class Engine(abc.ABC):
    scores_prompts = False
    adapters = None

    def __init__(self, *, name: str, max_batch: int, max_waiting: int):
        self.name, self.max_batch = name, max_batch
        self.waiting = WaitingQueue(max_waiting)
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)

    # ---------------------------------------------------------------- API (any thread)

    def submit(self, *seqs: Sequence) -> None:
        """Queue the sequences of one request (all or none; QueueFull when too many wait)."""
        self.waiting.submit(seqs)

    def load(self) -> dict:
        return {"active": len(self.rows()), "waiting": len(self.waiting)}

    def stop(self) -> None:
        self.waiting.stop()
        self.thread.join(timeout=10)

    @property
    @abc.abstractmethod
    def context_length(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    # ---------------------------------------------------------------- what each engine does (its thread)

    @abc.abstractmethod
    def rows(self) -> list[Sequence]:
        """The sequences being decoded, in row order."""

    @abc.abstractmethod
    def _prefill(self, seqs: list[Sequence]) -> None:
        """Take `seqs` into the rows: run their prompts and choose each one's first token."""

    @abc.abstractmethod
    def _step(self) -> None:
        """Advance every row by one token."""

    @abc.abstractmethod
    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into rows(), in order); [] drops every row."""

    def _ready(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Whether `seq` can join now (False: it waits for a later iteration); raising fails it alone."""
        return True

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            idle = not self.rows()
            if not self.waiting.wait(busy=not idle):
                return
            if idle:  # requests sent together arrive a few ms apart: prefill them together
                time.sleep(ARRIVAL_WINDOW_SECONDS)
            try:
                self._admit()
                self._drop_done()
                if self.rows():
                    self._step()
                    self._drop_done()
            except Exception as e:  # a bug or an out-of-memory: fail the affected requests, keep serving
                log.exception("engine %s failed a step", self.name)
                for seq in self.rows():
                    finish(seq, "error", error=str(e))
                self._keep([])

    def _admit(self) -> None:
        """Take waiting sequences into the rows, up to max_batch, and prefill them."""
        skipped, admitted = [], []
        while len(self.rows()) + len(admitted) < self.max_batch:
            seq = self.waiting.pop()
            if seq is None:
                break
            if seq.cancelled:
                continue
            try:
                ready = self._ready(seq, admitted)
            except Exception as e:  # noqa: BLE001 — e.g. an adapter that cannot load fails its request only
                finish(seq, "error", error=f"adapter {seq.adapter}: {e}")
                continue
            (admitted if ready else skipped).append(seq)
        if skipped:
            self.waiting.push_back(skipped)
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as e:  # the new rows never joined: fail them (the rows are untouched)
                log.exception("engine %s failed a prefill", self.name)
                for seq in admitted:
                    finish(seq, "error", error=str(e))

    def _drop_done(self) -> None:
        keep = []
        for i, seq in enumerate(self.rows()):
            if seq.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"  # its client went away: nothing to emit
            if seq.finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.rows()):
            self._keep(keep)
