"""Equivalence gates: prove that an export is the model the run trained, not just a model that loads.

Three measurements on held-out data, each compared with the PyTorch model with the adapter *applied*
(peft's forward, not a merged copy) and with its base (the adapter disabled):

- `greedy_tokens` (exact precisions: ONNX fp32, GGUF f16): the export's greedy continuation of every
  held-out prompt is token for token the PyTorch model's.
- `heldout_loss` (every precision): mean cross-entropy of the held-out answers under teacher forcing. The
  export may drift from the PyTorch model by a stated fraction of that loss, or (quantised exports) of the
  fine-tune's gain over its base, whichever is larger: "keeps at least 90 % of what the fine-tune learned"
  is what int4 can promise, while a few % of a small fine-tuned loss is not.
- `task_metric` (int8 / int4 / q8_0, when the task has reference answers): token F1 of the greedy answers
  against the references, at most a stated number of points below the PyTorch model's.
- `adapter_present` (always): at every answer position where the fine-tuned and the base model predict
  different next tokens, the export must predict the fine-tuned model's token more often than the
  base's, and in at least half of those positions. An export that dropped the adapter (or the merge)
  predicts the base's tokens there and fails, whatever its precision.

An export is driven through a `Runner` (greedy decoding + teacher-forced scoring), so the same gates
check ONNX Runtime GenAI, a GGUF file read back by transformers, or llama.cpp.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tuneforge.data.encode import IGNORE_INDEX, Example, encode_prompt, encode_records
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.inference import LoadedModel, stop_ids

# Held-out loss drift allowed per export precision: (fraction of the PyTorch model's loss, fraction of the
# fine-tune's gain over its base); the larger bound applies. Measured on SmolLM2-135M + LoRA (docs/benchmarks.md,
# "Export speed"): fp32 drifts < 0.01 %, int8 0.6 % of the loss, int4 (block 32, RTN) 41 % of the loss = 3 % of
# the gain. The adapter_present gate catches a dropped adapter at any precision whatever these allow.
LOSS_TOLERANCE = {"fp32": (0.002, 0.0), "f16": (0.01, 0.0), "int8": (0.05, 0.05), "q8_0": (0.05, 0.05),
                  "int4": (0.10, 0.10)}
# Token-F1 points (0-1) the greedy answers of a quantised export may lose against the PyTorch model's.
TASK_TOLERANCE = {"int8": 0.05, "q8_0": 0.05, "int4": 0.10}
EXACT_PRECISIONS = ("fp32", "f16")
MIN_AGREEMENT = 0.5


class ExportError(TuneforgeError):
    """The export could not be made: an unsupported model or method, a builder failure, a missing runtime."""

    kind = "export"
    exit_code = 1


class GateFailed(ExportError):
    """The export was built but is not the trained model: an equivalence gate failed (exit code 3)."""

    kind = "gate_failed"
    exit_code = 3

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record or {}


@dataclass
class HeldOut:
    """Held-out prompts (for greedy decoding) and examples (for teacher-forced scoring)."""

    source: str
    held_out: bool  # False when only the training file was available
    prompts: list[list[int]]
    examples: list[Example]
    references: list[str | None] = field(default_factory=list)  # the reference answer of each prompt

    def describe(self) -> dict:
        return {"source": self.source, "held_out": self.held_out, "prompts": len(self.prompts),
                "examples": len(self.examples), "target_tokens": sum(e.num_targets for e in self.examples)}


@dataclass
class Scores:
    """What one model did on the held-out data."""

    greedy: list[list[int]]  # new tokens per prompt (stop token included when reached)
    nll: list[list[float]]  # per example, -log p(target) at each answer position
    argmax: list[list[int]]  # per example, the predicted token at each answer position

    @property
    def loss(self) -> float:
        flat = [x for row in self.nll for x in row]
        return sum(flat) / max(len(flat), 1)


class Runner(Protocol):
    """One way of running a model: greedy decoding and teacher-forced scoring of token ids."""

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]: ...

    def score(self, example: Example) -> tuple[list[float], list[int]]: ...


def target_positions(example: Example) -> list[int]:
    """Positions t whose token is an answer token; the model's output at t-1 predicts it."""
    return [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX and t > 0]


class TorchRunner:
    """A transformers/peft model in PyTorch (the reference, or a GGUF file read back by transformers)."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        new = out[0, len(prompt):].tolist()
        # generate pads finished rows with pad ids after the stop token: keep up to the first stop
        for i, token in enumerate(new):
            if token in stops:
                return new[: i + 1]
        return new

    @torch.no_grad()
    def score(self, example: Example) -> tuple[list[float], list[int]]:
        ids = torch.tensor([example.input_ids])
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()  # (T, V)
        positions = target_positions(example)
        logp = torch.log_softmax(logits[[t - 1 for t in positions]], dim=-1)  # (N, V)
        targets = torch.tensor([example.input_ids[t] for t in positions])
        nll = (-logp.gather(-1, targets[:, None]).squeeze(-1)).tolist()
        return nll, logp.argmax(-1).tolist()


def run(runner: Runner, held: HeldOut, max_new_tokens: int, stops: list[int]) -> Scores:
    greedy = [runner.greedy(p, max_new_tokens, stops) for p in held.prompts]
    scored = [runner.score(e) for e in held.examples]
    return Scores(greedy, [s[0] for s in scored], [s[1] for s in scored])


def heldout_data(loaded: LoadedModel, spec, data: str | Path | None = None, *, max_prompts: int = 8,
                 max_examples: int = 16, max_seq_len: int = 256) -> HeldOut:
    """The run's held-out data: `data` if given, else the spec's eval.data, else its validation file; the
    training file only when nothing else exists (recorded as not held out)."""
    from tuneforge.data.validate import validate_jsonl
    from tuneforge.evaluation.runner import prompt_and_reference

    candidates = [(data, True)] if data is not None else [
        (spec.eval.data if spec.eval else None, True), (spec.data.validation, True), (spec.data.train, False)]
    path, held_out = next(((Path(p), h) for p, h in candidates if p is not None and Path(p).is_file()), (None, False))
    if path is None:
        shown = data if data is not None else ", ".join(str(p) for p, _ in candidates if p)
        raise DataError(f"no held-out data for the export gates: {shown} not found; pass --data FILE.jsonl "
                        f"in the run's format ({spec.task})")
    report = validate_jsonl(path, spec.task, spec.labels)
    report.raise_if_errors()
    records = report.records
    tok, template = loaded.tokenizer, loaded.prompt_template
    encoded = encode_records(tok, spec.task, records[:max_examples], report.lines[:max_examples], max_seq_len,
                             template=template, source=str(path))
    prompts, references = [], []
    for record in records:
        pair = prompt_and_reference(spec.task, record)
        if pair is None:
            break
        ids = encode_prompt(tok, spec.task, pair[0], template)
        if len(ids) <= max_seq_len:
            prompts.append(ids)
            references.append(pair[1])
        if len(prompts) == max_prompts:
            break
    if spec.task == "text":  # no prompt/answer split: continue the opening tokens of each text
        prompts = [e.input_ids[: max(1, min(16, len(e.input_ids) // 2))] for e in encoded.examples[:max_prompts]]
        references = [None] * len(prompts)
    if not encoded.examples:
        raise DataError(f"{path}: no example with answer tokens within {max_seq_len} tokens for the export gates")
    return HeldOut(str(path), held_out, prompts, encoded.examples, references)


@dataclass
class Gate:
    name: str
    passed: bool
    message: str
    detail: dict = field(default_factory=dict)


def token_gate(reference: Scores, export: Scores) -> Gate:
    same = [a == b for a, b in zip(reference.greedy, export.greedy)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    detail = {"prompts": len(same), "identical": sum(same),
              "tokens": sum(len(g) for g in reference.greedy)}
    if first is None:
        return Gate("greedy_tokens", True, f"greedy tokens identical on {len(same)}/{len(same)} prompts", detail)
    a, b = reference.greedy[first], export.greedy[first]
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    detail.update(first_mismatch={"prompt": first, "position": at, "pytorch": a[at: at + 5], "export": b[at: at + 5]})
    return Gate("greedy_tokens", False, f"greedy tokens differ on {len(same) - sum(same)}/{len(same)} prompts "
                f"(first: prompt {first}, new token {at})", detail)


def loss_gate(reference: Scores, export: Scores, base: Scores, tolerance: tuple[float, float]) -> Gate:
    ref, got = reference.loss, export.loss
    of_loss, of_gain = tolerance
    gain = base.loss - ref
    allowed = max(of_loss * abs(ref), of_gain * gain)
    drift = abs(got - ref) / max(abs(ref), 1e-8)
    lost = (got - ref) / gain if gain > 0 else None
    detail = {"pytorch": ref, "export": got, "base": base.loss, "relative_drift": drift, "tolerance": of_loss,
              "gain_tolerance": of_gain, "share_of_gain_lost": lost, "allowed_drift": allowed}
    ok = math.isfinite(got) and abs(got - ref) <= allowed
    bound = f"{of_loss:.1%} of the loss" + (f" or {of_gain:.0%} of the fine-tune's gain {gain:.4f}" if of_gain else "")
    lost_text = f", {lost:.1%} of the gain over the base" if lost is not None and of_gain else ""
    return Gate("heldout_loss", ok, f"held-out loss {got:.4f} vs PyTorch {ref:.4f} (base {base.loss:.4f}): drift "
                f"{drift:.2%}{lost_text}; {'within' if ok else 'outside'} the tolerance ({bound})", detail)


def task_gate(reference: Scores, export: Scores, references: list[str | None], decode, tolerance: float) -> Gate:
    """Token F1 (and exact match) of the greedy answers against the references, PyTorch vs export."""
    from tuneforge.evaluation.metrics import exact_match, token_f1

    pairs = [(decode(r), decode(e), ref) for r, e, ref in zip(reference.greedy, export.greedy, references)
             if ref is not None]
    n = len(pairs)
    f1_ref = sum(token_f1(r, ref) for r, _, ref in pairs) / n
    f1_exp = sum(token_f1(e, ref) for _, e, ref in pairs) / n
    em_ref = sum(exact_match(r, ref) for r, _, ref in pairs) / n
    em_exp = sum(exact_match(e, ref) for _, e, ref in pairs) / n
    ok = f1_exp >= f1_ref - tolerance
    detail = {"answers": n, "token_f1_pytorch": f1_ref, "token_f1_export": f1_exp, "exact_match_pytorch": em_ref,
              "exact_match_export": em_exp, "tolerance": tolerance}
    return Gate("task_metric", ok, f"token F1 of {n} greedy answers {f1_exp:.3f} vs PyTorch {f1_ref:.3f} (exact match "
                f"{em_exp:.2f} vs {em_ref:.2f}): {'within' if ok else 'more than'} {tolerance:.2f} below", detail)


def adapter_gate(reference: Scores, export: Scores, base: Scores) -> Gate:
    """Where the fine-tune changed the prediction, does the export predict like the fine-tune or like the base?"""
    differ = like_tuned = like_base = 0
    for ft_row, base_row, ex_row in zip(reference.argmax, base.argmax, export.argmax):
        for ft, b, ex in zip(ft_row, base_row, ex_row):
            if ft != b:
                differ += 1
                like_tuned += ex == ft
                like_base += ex == b
    detail = {"positions_where_finetune_differs": differ, "export_agrees_with_finetune": like_tuned,
              "export_agrees_with_base": like_base, "min_agreement": MIN_AGREEMENT}
    if differ == 0:
        return Gate("adapter_present", False, "the fine-tuned model predicts the same tokens as its base at every "
                    "held-out answer position, so the export cannot be told apart from one that lost the adapter; "
                    "pass --data with examples the fine-tune changed", detail)
    share = like_tuned / differ
    ok = share >= MIN_AGREEMENT and like_tuned > like_base
    return Gate("adapter_present", ok, f"at the {differ} answer positions where the fine-tune changes the prediction, "
                f"the export predicts the fine-tuned token {like_tuned} times and the base's {like_base} times"
                + ("" if ok else ": the export behaves like the base model (adapter lost?)"), detail)


def evaluate(reference: Scores, base: Scores, export: Scores, precision: str, tolerance: float | None = None, *,
             references: list[str | None] | None = None, decode=None) -> list[Gate]:
    """The gates for an export at `precision` (fp32/f16 exact; int8/int4/q8_0 by held-out loss and, when the
    prompts have reference answers and `decode` turns ids into text, by the task metric)."""
    loss_tol = LOSS_TOLERANCE[precision] if tolerance is None else (tolerance, tolerance if precision not in
                                                                   EXACT_PRECISIONS else 0.0)
    gates = [token_gate(reference, export)] if precision in EXACT_PRECISIONS else []
    gates += [loss_gate(reference, export, base, loss_tol), adapter_gate(reference, export, base)]
    if precision not in EXACT_PRECISIONS:
        if decode is not None and references and any(r is not None for r in references):
            gates.append(task_gate(reference, export, references, decode, TASK_TOLERANCE[precision]))
        # reported, not gated: quantised models drift from PyTorch within a few tokens
        info = token_gate(reference, export)
        gates.append(Gate("greedy_tokens_info", True, info.message + " (informational at this precision)",
                          info.detail))
    return gates


def reference_scores(loaded: LoadedModel, held: HeldOut, max_new_tokens: int,
                     base_greedy: bool = False) -> tuple[Scores, Scores | None]:
    """(fine-tuned, base) scores in PyTorch: the adapter applied through peft, then disabled for the base
    (teacher-forced scores only, unless `base_greedy`: the gates compare greedy tokens with the fine-tune).
    The base is None for a full fine-tune (its base is another model: `base_scores`)."""
    stops = stop_ids(loaded.tokenizer)
    model = loaded.model
    tuned = run(TorchRunner(model), held, max_new_tokens, stops)
    if not hasattr(model, "disable_adapter"):
        return tuned, None
    with model.disable_adapter():
        runner = TorchRunner(model)
        greedy = [runner.greedy(p, max_new_tokens, stops) for p in held.prompts] if base_greedy else []
        scored = [runner.score(e) for e in held.examples]
    return tuned, Scores(greedy, [s[0] for s in scored], [s[1] for s in scored])


def base_scores(spec, held: HeldOut, max_new_tokens: int, stops: list[int], greedy: bool = False) -> Scores:
    """Scores of a full fine-tune's base model (loaded on its own)."""
    from tuneforge.models import load_model, resolve_model

    runner = TorchRunner(load_model(resolve_model(spec.model), trust_remote_code=spec.trust_remote_code))
    scored = [runner.score(e) for e in held.examples]
    return Scores([runner.greedy(p, max_new_tokens, stops) for p in held.prompts] if greedy else [],
                  [s[0] for s in scored], [s[1] for s in scored])


def gates_record(gates: list[Gate]) -> list[dict]:
    return [asdict(g) for g in gates]


def failure_message(what: str, gates: list[Gate]) -> str:
    failed = [g for g in gates if not g.passed]
    return f"{what} failed its equivalence gate(s):\n  " + "\n  ".join(f"{g.name}: {g.message}" for g in failed)
