"""ONNX exports (`tuneforge export onnx`) served through the engine interface (serving/base.py) that
BatchEngine implements too: `submit(*Sequence)`, `load()`, `stop()`, `context_length`, `vocab_size`, and
`adapters.register(name, source)`.

    tuneforge serve --adapter chat=exports/chat-int4          # a merged export: model `chat`
    tuneforge serve --adapter lora=exports/smollm2-lora       # an adapters export: `lora:base`, `lora:NAME`...

One worker thread owns the ONNX Runtime GenAI model. Requests are not batched: every sequence gets a
generator of its own (a batch of one, its own KV cache and its own adapter, as ORT GenAI 0.18 takes one
adapter per generator), and each iteration advances every in-flight sequence (up to `max_batch`) by one
token in turn. So concurrent requests stream side by side and fairly, but the tokens/s of the whole engine
are those of one sequence; same-adapter batching would need prompts padded to one length, which GenAI's
generator does not take.

Sampling is tuneforge's own (`sampling.decode_step` on GenAI's last-position logits, then `append_tokens` of
the chosen token), not GenAI's search: temperature 0 is greedy (the tokens of `tuneforge generate --engine
onnx`), and temperature, top_p, seed, grammars (response_format, tools), min_tokens, ignore_eos and
log-probabilities mean exactly what they mean for PyTorch-served models (GenAI's sampler would add its own
top_k). Stop tokens, stop strings and max_tokens are handled as in BatchEngine. GenAI gives the logits of the
last position only, so prompts are not scored (no echo with logprobs), and there is no prefix caching.
An adapters export keeps every adapter it was asked for loaded (they are small: LoRA matrices only);
`--max-adapters`, `--max-adapter-mb` and `--inference-precision` apply to PyTorch models only.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.serving.base import Engine
from tuneforge.serving.exports import read_export
from tuneforge.serving.sampling import decode_step
from tuneforge.serving.sequence import Sequence, finish

log = logging.getLogger("tuneforge.serving")


@dataclass
class _Row:
    seq: Sequence
    generator: object  # onnxruntime_genai.Generator


class OnnxAdapters:
    """The adapter files of one adapters export, loaded into the engine's model on first use (engine thread)."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        self.loaded: set[str] = set()
        self.lock = threading.Lock()

    def register(self, name: str, source) -> None:
        """`source`: an AdapterSource whose `weights` is the adapter's .onnx_adapter file."""
        with self.lock:
            self.files.setdefault(name, Path(source.weights))

    def ensure(self, runner, name: str) -> None:
        if name in self.loaded:
            return
        with self.lock:
            path = self.files.get(name)
        if path is None:
            raise ModelError(f"adapter {name} is not registered")
        runner.load_adapter(name, path)
        self.loaded.add(name)
        log.info("loaded ONNX adapter %s from %s", name, path)


class OnnxEngine(Engine):
    """Decodes every submitted Sequence of one ONNX export, one generator per sequence (module docstring)."""

    def __init__(self, folder: Path, *, threads: int | None = None, max_batch: int = 16, max_waiting: int = 64,
                 name: str = "onnx"):
        from tuneforge.export.onnx import OnnxRunner

        super().__init__(name=name, max_batch=max_batch, max_waiting=max_waiting)
        self.folder = Path(folder)
        self.record = read_export(self.folder)
        self.runner = OnnxRunner(self.folder, threads=threads)
        config = json.loads((self.folder / "genai_config.json").read_text())["model"]
        self._context_length = int(config.get("context_length") or 10**9)
        self._vocab_size = int(config["vocab_size"])
        self.adapters = OnnxAdapters()
        # an adapters export's graph takes LoRA inputs: some adapter must always be active (base = rank 0)
        self.default_adapter = "base" if self.record["format"] == "onnx-adapters" else None
        if self.default_adapter:
            from tuneforge.serving.adapters import AdapterSource

            file = self.folder / self.record["adapters"][self.default_adapter]["file"]
            self.adapters.register(self.default_adapter, AdapterSource(weights=file))
        self._rows: list[_Row] = []
        self.thread.start()

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    # ---------------------------------------------------------------- the engine thread

    def rows(self) -> list[Sequence]:
        return [row.seq for row in self._rows]

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]  # one assignment: load() on another thread sees old or new

    def _prefill(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            try:
                adapter = seq.adapter or self.default_adapter
                if adapter is not None:
                    self.adapters.ensure(self.runner, adapter)
                max_length = min(self.context_length, len(seq.prompt_ids) + max(seq.params.max_tokens, 1))
                row = _Row(seq, self.runner.generator(max_length, adapter=adapter))
            except Exception as e:  # noqa: BLE001 — an adapter or generator that fails, fails its request only
                log.exception("engine %s could not start a sequence", self.name)
                finish(seq, "error", error=str(e))
                continue
            if seq.params.seed is not None:
                import torch

                seq.generator = torch.Generator().manual_seed(seq.params.seed % 2**64)
            self._rows.append(row)
            if seq.params.max_tokens == 0:
                finish(seq, "length")
            else:
                self._advance(row, first=True)

    def _step(self) -> None:
        for row in list(self._rows):
            if row.seq.finish_reason is None and not row.seq.cancelled:
                self._advance(row, first=False)

    def _advance(self, row: _Row, first: bool) -> None:
        """Feed the row's prompt (first) or its last token, then choose the next token from the logits."""
        import numpy as np
        import torch

        seq = row.seq
        try:
            row.generator.append_tokens(seq.prompt_ids if first else [seq.out_ids[-1]])
            logits = torch.from_numpy(np.asarray(row.generator.get_logits(), dtype=np.float32).reshape(-1))  # (V,)
            decode_step(seq, logits)
        except Exception as e:  # noqa: BLE001 — fail this request, keep serving the others
            log.exception("engine %s failed a step", self.name)
            finish(seq, "error", error=str(e))
