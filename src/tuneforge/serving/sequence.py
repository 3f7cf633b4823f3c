"""One request's sequence as every engine decodes it (serving/base.py), what it emits, and the queue it waits in.

A sequence's tokens go through `decode_step` (serving/sampling.py), then `append_token` here: stop tokens,
stop strings, max_tokens and min_tokens end it or not; its new text is emitted, held back while it may still
turn into a stop string or an unfinished UTF-8 character. Each Output also carries the log-probabilities of
the tokens chosen since the last one (when the request asked for them), so a streamed answer's chunks carry
their own tokens' log-probabilities.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the caller answers 429."""


@dataclass
class SamplingParams:
    max_tokens: int = 128  # 0: score the prompt only (with prompt_logprobs), sample nothing
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: each chosen token's log-probability and the k best
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)
    min_tokens: int = 0  # stop tokens and stop strings cannot end the sequence before this many tokens
    ignore_eos: bool = False  # stop tokens are never sampled (load testers: always max_tokens tokens)


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability (None for a prompt's first token, which nothing
    predicts) and the `k` most likely tokens, best first, as (token id, log-probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What a sequence produced since the last Output: new text, and why it ended (None while running)."""

    text: str
    token_ids: list[int]  # every token of the sequence, on the last Output only
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens chosen since the last Output
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first Output, when asked for
    tokens: int = 0  # tokens the sequence has produced so far


@dataclass
class Sequence:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    params: SamplingParams
    stop_ids: set[int]
    emit: Callable[[Output], None]  # called from the engine thread; must be quick and thread-safe
    decode: Callable[[list[int]], str]
    constraint: object | None = None  # serving.grammar.Constraint: the tokens a grammar allows next
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    cancelled: bool = False
    generator: object | None = None  # torch.Generator of a seeded request
    pos: int = 0  # next position id
    submitted: float = field(default_factory=time.perf_counter)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # chosen tokens' entries not yet emitted
    prompt_logprobs: list[TokenLogprob] | None = None  # set by the prefill, emitted with the first Output

    def cancel(self) -> None:
        self.cancelled = True

    def may_stop(self) -> bool:
        """Whether a stop token or a stop string may end the sequence now (min_tokens reached)."""
        return len(self.out_ids) >= self.params.min_tokens

    def _output(self, text: str, finish_reason: str | None = None, error: str | None = None) -> Output:
        out = Output(text, list(self.out_ids) if finish_reason else [], finish_reason, error, self.logprobs,
                     self.prompt_logprobs, len(self.out_ids))
        self.logprobs, self.prompt_logprobs = [], None
        return out


def append_token(seq: Sequence, token: int) -> None:
    """Record one chosen token, emit the new text, and finish the row when it is done (every engine's thread
    calls this for every token, through sampling.decode_step)."""
    if token in seq.stop_ids and seq.may_stop():
        finish(seq, "stop")
        return
    seq.out_ids.append(token)
    seq.text = seq.decode(seq.out_ids)
    if seq.may_stop():
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
    if safe > seq.sent:  # (log-probabilities of held-back tokens ride with the next text)
        seq.emit(seq._output(seq.text[seq.sent:safe]))
        seq.sent = safe


def finish(seq: Sequence, reason: str, error: str | None = None) -> None:
    """End the sequence once: emit the text it held back, all its tokens, and why it ended."""
    if seq.finish_reason is not None:
        return
    seq.finish_reason = reason
    seq.emit(seq._output(seq.text[seq.sent:], reason, error))
    seq.sent = len(seq.text)


class WaitingQueue:
    """The sequences waiting for an engine's thread, and the condition that wakes that thread when some arrive
    or the engine stops."""

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
