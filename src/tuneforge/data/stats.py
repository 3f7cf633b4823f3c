"""`tuneforge data validate`: problems, or statistics of a valid file (examples, tokens, over-long)."""
from __future__ import annotations

import json
import statistics

from tuneforge.data.encode import encode_example
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import TuneforgeError


def token_stats(tokenizer, task: str, records: list[dict], max_seq_len: int) -> dict:
    examples = [encode_example(tokenizer, task, r) for r in records]
    lengths = [len(e.input_ids) for e in examples]
    return {
        "tokens": sum(lengths),
        "target_tokens": sum(e.num_targets for e in examples),
        "longest": max(lengths, default=0),
        "mean_length": round(statistics.fmean(lengths), 1) if lengths else 0,
        "over_max_seq_len": sum(1 for n in lengths if n > max_seq_len),
        "max_seq_len": max_seq_len,
    }


def describe_file(path: str, task: str, *, model: str | None = "smollm2-135m-instruct", max_seq_len: int = 512,
                  as_json: bool = False) -> tuple[str, bool]:
    """Return (text to print, file is valid)."""
    report = validate_jsonl(path, task)
    result: dict = {
        "file": str(path), "task": task, "valid": report.ok, "examples": len(report.records),
        "errors": [str(p) for p in report.errors], "warnings": [str(p) for p in report.warnings],
    }
    if report.ok and model and model.lower() != "none":
        from tuneforge.models import load_tokenizer, resolve_model

        try:
            tokenizer = load_tokenizer(resolve_model(model))
            result.update(token_stats(tokenizer, task, report.records, max_seq_len))
            result["tokenizer"] = model
        except TuneforgeError as e:
            result["tokenizer_error"] = str(e)
    if as_json:
        return json.dumps(result, indent=2, ensure_ascii=False), report.ok
    lines = [*result["errors"], *(f"warning: {w}" for w in result["warnings"])]
    if not report.ok:
        lines.append(f"{path}: {len(report.errors)} error(s); fix them and run again")
        return "\n".join(lines), False
    lines.append(f"{path}: OK, {result['examples']} {task} examples")
    if "tokens" in result:
        lines.append(
            f"  tokens {result['tokens']:,} (targets {result['target_tokens']:,}), mean {result['mean_length']}, "
            f"longest {result['longest']}, over max_seq_len={max_seq_len}: {result['over_max_seq_len']}"
        )
    elif "tokenizer_error" in result:
        lines.append(f"  (no token counts: {result['tokenizer_error']})")
    return "\n".join(lines), True
