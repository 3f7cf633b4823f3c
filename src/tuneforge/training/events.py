"""How a training run talks to its caller: events out (progress, metrics, warnings), a stop request in,
and a typed summary at the end. The recipe never prints; the CLI renders events on the console, the
service stores them as job events.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

EventKind = Literal["info", "warning", "started", "step", "checkpoint", "stopped", "finished"]


@dataclass(frozen=True)
class RunEvent:
    """One thing that happened in a run. `step` events carry the step's metrics in `data`
    (train_loss, lr, grad_norm, epoch, tokens_per_second, and eval_loss/eval_token_accuracy when
    validation ran at that step; task preference: reward_accuracy, reward_margin, logps_chosen,
    logps_rejected, eval_reward_accuracy, eval_reward_margin instead of the token accuracies);
    `started` carries the run's shape (steps, examples, parameters)."""

    kind: EventKind
    message: str
    step: int | None = None
    total_steps: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


EventHandler = Callable[[RunEvent], None]


class StopRequest:
    """Set from anywhere (a signal handler, another thread, a service's cancel); the loop polls it at
    every step boundary, writes a checkpoint and returns a summary with status "stopped".

    `armed` is true while the loop runs: a signal handler can then defer to the loop; before and after
    it there is no step boundary to wait for, so the handler may interrupt at once."""

    def __init__(self) -> None:
        self._reason: str | None = None
        self._lock = threading.Lock()
        self.armed = False

    def request(self, reason: str = "stop requested") -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    @property
    def reason(self) -> str | None:
        return self._reason

    def __bool__(self) -> bool:
        return self._reason is not None


class RunSummary(BaseModel):
    """What a run did; also written to `<output_dir>/summary.json` when it finishes."""

    model_config = ConfigDict(extra="ignore")  # summaries written by older versions load too

    status: Literal["succeeded", "stopped"]
    stop_reason: str | None = None  # why a stopped run stopped: "stop_after", "SIGINT", "SIGTERM", a caller's reason
    output_dir: str
    method: str
    task: str
    model: str
    model_path: str
    model_type: str
    trainable_params: int
    total_params: int
    base_weight_bytes: dict[str, int]
    train_examples: int
    validation_examples: int
    train_tokens: int
    steps: int
    total_steps: int  # where this run stops (max_steps or epochs)
    schedule_steps: int | None = None  # the learning-rate schedule's horizon, fixed when the run started
    tokens_seen: int
    tokens_per_second: float
    peak_rss_mb: float
    rank_peak_rss_mb: list[float] | None = None  # several processes: each rank's peak RSS (MB), in rank order
    predicted_peak_mb: float | None = None  # `tuneforge plan`'s prediction of peak_rss_mb, made before the run
    final_train_loss: float | None
    final_eval_loss: float | None
    final_eval_token_accuracy: float | None
    final_eval_reward_accuracy: float | None = None  # task preference: validation pairs whose preferred reply wins
    preference_reference: str | None = None  # task preference: "adapter" (switched off), "precomputed" or "none"
    eval_step: int | None
    precision: str
    grad_scaler: bool = False
    base_dtype: str
    device: str
    kernels: dict[str, str] = {}
    adapter_dropout: float | None = None  # the effective adapter dropout (byte-mask dropout rounds p to k/256)
    checkpoint: str | None = None  # newest checkpoint of a stopped run
    output: str | None = None  # adapter/ or model/ of a finished run
    report: str | None = None  # report.md, when the spec asked for a before/after report
    already_finished: bool = False  # resumed a run that had finished: nothing was done
    wall_seconds: float


class ConsoleProgress:
    """Renders events on stderr: messages as lines, steps as a tqdm bar (loss, lr, tokens/s, ETA).
    `bar=False` (the CLI's --quiet): only warnings and the final line."""

    def __init__(self, stream=None, bar: bool = True):
        self.stream = stream or sys.stderr
        self.show_bar = bar
        self.bar = None

    def __call__(self, event: RunEvent) -> None:
        if not self.show_bar and event.kind not in ("warning", "finished", "stopped"):
            return
        if event.kind == "started":
            from tqdm.auto import tqdm

            self._print(event.message)
            self.bar = tqdm(total=event.total_steps, initial=event.step or 0, desc="train", unit="step",
                            dynamic_ncols=True, file=self.stream)
        elif event.kind == "step":
            if self.bar is not None:
                d = event.data
                post = {"loss": f"{d['train_loss']:.4f}", "lr": f"{d['lr']:.2e}", "tok/s": f"{d['tokens_per_second']:.0f}"}
                if "reward_accuracy" in d:  # task preference
                    post["acc"] = f"{d['reward_accuracy']:.2f}"
                    post["margin"] = f"{d['reward_margin']:.3f}"
                if "eval_loss" in d:
                    post["eval"] = f"{d['eval_loss']:.4f}"
                self.bar.set_postfix(post, refresh=False)
                self.bar.update(1)
        elif event.kind != "checkpoint":
            text = ("warning: " if event.kind == "warning" else "") + event.message
            if event.kind in ("finished", "stopped"):
                self._close_bar()
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
            else:
                self._print(text)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
