"""Evaluate a model or run on held-out data: teacher-forced loss / perplexity / token accuracy on the
trained tokens, plus generated answers (and rule checks) for tasks that have a reference answer."""
from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.data.encode import encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.evaluate.metrics import exact_match, perplexity, rule_checks, token_f1


def prompt_and_reference(task: str, record: dict) -> tuple[str | list[dict], str] | None:
    """What to generate from and what it should say; None for tasks without a reference (text)."""
    if task == "chat":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    if task == "completion":
        return record["prompt"], record["completion"]
    return None


def evaluate_records(loaded, task: str, records: list[dict], *, max_seq_len: int = 512, batch_size: int = 8,
                     max_new_tokens: int = 64, generate_n: int | None = None, progress: bool = False) -> dict:
    """Metrics for `loaded` (an api.LoadedModel) on validated records; outputs kept for reports."""
    from tuneforge import api
    from tuneforge.train.recipe import cpu_has_fast_bf16, evaluate

    tok, model = loaded.tokenizer, loaded.model
    data = encode_records(tok, task, records, list(range(1, len(records) + 1)), max_seq_len)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    scores = evaluate(model, data, batch_size, tok.pad_token_id, device, autocast)
    n_targets = sum(e.num_targets for e in data.examples)
    result = {"examples": len(records), "target_tokens": n_targets, "loss": scores["eval_loss"],
              "perplexity": perplexity(scores["eval_loss"] * n_targets, n_targets),
              "token_accuracy": scores["eval_token_accuracy"]}
    pairs = [p for p in (prompt_and_reference(task, r) for r in records) if p is not None]
    if pairs:
        pairs = pairs[:generate_n] if generate_n else pairs
        outputs = api.generate(loaded, [p for p, _ in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size)
        refs = [r for _, r in pairs]
        result["exact_match"] = sum(exact_match(o, r) for o, r in zip(outputs, refs)) / len(outputs)
        result["token_f1"] = sum(token_f1(o, r) for o, r in zip(outputs, refs)) / len(outputs)
        rules = [r.get("rules") for r in records[: len(outputs)]]
        if any(rules):
            checks = [rule_checks(o, rs) for o, rs in zip(outputs, rules) if rs]
            result["rule_pass_rate"] = sum(c["passed"] for c in checks) / max(sum(c["total"] for c in checks), 1)
        result["outputs"] = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "reference": r, "output": o}
                             for (p, r), o in zip(pairs, outputs)]
    return result


def evaluate_file(model_ref: str | Path, data: str | Path, task: str | None = None, **kw) -> dict:
    """`tuneforge eval`: validate `data`, load the model or run, and return its metrics."""
    from tuneforge import api

    loaded = api.load(model_ref, task=task)
    report = validate_jsonl(data, loaded.task)
    report.raise_if_errors()
    return evaluate_records(loaded, loaded.task, report.records, **kw)
