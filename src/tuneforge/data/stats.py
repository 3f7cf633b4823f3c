"""`tuneforge data validate`: problems, or statistics of a valid file (examples, tokens, over-long).

It takes what `train` takes (task, labels, prompt template, model, max_seq_len), from flags or from a
job spec, so every problem a training run would report on a file is shown here first: the structural
ones (data/validate.py) and, with a tokenizer, the ones of its chat template (tool calls it cannot
render, conversations it refuses).
"""
from __future__ import annotations

import json
import statistics

from tuneforge.data.encode import Example, PreferencePair, encode_each
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import DataError, SpecError, TuneforgeError

DEFAULT_MODEL = "smollm2-135m-instruct"


def token_stats(examples: list[Example] | list[PreferencePair], max_seq_len: int) -> dict:
    """Token counts of encoded examples (a preference pair: both sequences; its length: the longer one)."""
    lengths = [e.length for e in examples]
    sides = [side for e in examples for side in ((e.chosen, e.rejected) if isinstance(e, PreferencePair) else (e,))]
    return {
        "tokens": sum(len(side.input_ids) for side in sides),
        "target_tokens": sum(side.num_targets for side in sides),
        "longest": max(lengths, default=0),
        "mean_length": round(statistics.fmean(lengths), 1) if lengths else 0,
        "over_max_seq_len": sum(1 for n in lengths if n > max_seq_len),
        "max_seq_len": max_seq_len,
    }


def load_tokenizer_for(model: str | None, chat_template: str | None = None, trust_remote_code: bool = False):
    """(tokenizer, None), or (None, why not); model None or 'none' skips the tokenizer checks."""
    if not model or model.lower() == "none":
        return None, None
    from tuneforge.models import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(model), trust_remote_code=trust_remote_code)
    except TuneforgeError as e:
        return None, str(e)
    if chat_template:  # the spec's data.chat_template replaces the model's, as in training
        tokenizer.chat_template = chat_template
    return tokenizer, None


def check_file(path: str, task: str, *, tokenizer=None, tokenizer_error: str | None = None,
               labels: list[str] | None = None, prompt_template: str | None = None,
               max_seq_len: int = 512) -> dict:
    """Every problem of one file (structural, and the tokenizer's when one is given) and, when there are
    none, its token statistics."""
    report = validate_jsonl(path, task, labels)
    errors = list(report.errors)
    result: dict = {"file": str(path), "task": task, "examples": len(report.records)}
    if tokenizer is not None:
        try:
            encoded, problems = encode_each(tokenizer, task, report.records, report.lines, prompt_template, str(path))
        except DataError as e:  # the setup, not a line (e.g. a chat task on a model without a chat template)
            tokenizer_error, encoded, problems = str(e), None, []
        errors = sorted(errors + problems, key=lambda p: (p.line is None, p.line or 0))
        result["examples"] = len(report.records) - len({p.line for p in problems})
        if encoded is not None and not errors:
            result.update(token_stats([ex for _, ex in encoded], max_seq_len))
    result.update(valid=not errors, errors=[str(p) for p in errors], warnings=[str(p) for p in report.warnings])
    if tokenizer_error:
        result["tokenizer_error"] = tokenizer_error
    return result


def format_result(result: dict) -> str:
    path, task = result["file"], result["task"]
    lines = [*result["errors"], *(f"warning: {w}" for w in result["warnings"])]
    if not result["valid"]:
        lines.append(f"{path}: {len(result['errors'])} error(s); fix them and run again")
    else:
        lines.append(f"{path}: OK, {result['examples']} {task} examples")
    if "tokens" in result:
        lines.append(
            f"  tokens {result['tokens']:,} (targets {result['target_tokens']:,}), mean {result['mean_length']}, "
            f"longest {result['longest']}, over max_seq_len={result['max_seq_len']}: {result['over_max_seq_len']}"
        )
    elif "tokenizer_error" in result:
        lines.append(f"  (no token counts or template checks: {result['tokenizer_error']})")
    return "\n".join(lines)


def describe_file(path: str, task: str, *, model: str | None = DEFAULT_MODEL, max_seq_len: int = 512,
                  as_json: bool = False, labels: list[str] | None = None,
                  prompt_template: str | None = None) -> tuple[str, bool]:
    """Return (text to print, file is valid)."""
    return describe(path, task=task, model=model, max_seq_len=max_seq_len, as_json=as_json, labels=labels,
                    prompt_template=prompt_template)


def describe(file: str | None = None, *, spec: str | None = None, task: str | None = None,
             labels: list[str] | None = None, prompt_template: str | None = None, model: str | None = None,
             max_seq_len: int | None = None, as_json: bool = False) -> tuple[str, bool]:
    """`tuneforge data validate`: (text to print, every file is valid).

    With `spec` (a job spec file) its task, labels, prompt and chat templates, model and max_seq_len are
    the defaults, and without `file` its train, validation and eval files are checked; given options win.
    """
    chat_template, trust_remote_code, files = None, False, [file] if file else []
    if spec:
        from tuneforge.spec import load_spec

        job = load_spec(spec)
        task, labels = task or job.task, labels or job.labels
        prompt_template = prompt_template or job.data.prompt_template
        model, max_seq_len = model or job.model, max_seq_len or job.training.max_seq_len
        chat_template, trust_remote_code = job.data.chat_template, job.trust_remote_code
        if not file:
            files = [job.data.train, job.data.validation, job.eval.data if job.eval else None]
            files = list(dict.fromkeys(f for f in files if f))
    if not files:
        raise SpecError("data validate: give a FILE to validate, or --spec JOB.yaml for the files of a job")
    task, model, max_seq_len = task or "chat", model or DEFAULT_MODEL, max_seq_len or 512
    if prompt_template is not None:
        from tuneforge.data.templates import check_template

        try:
            problem = check_template(task, prompt_template)
        except ValueError as e:
            problem = str(e)
        if problem:
            raise SpecError(f"--prompt-template: {problem}")
    tokenizer, tokenizer_error = load_tokenizer_for(model, chat_template, trust_remote_code)
    results = [check_file(f, task, tokenizer=tokenizer, tokenizer_error=tokenizer_error, labels=labels,
                          prompt_template=prompt_template, max_seq_len=max_seq_len) for f in files]
    for r in results:
        if tokenizer is not None:
            r["tokenizer"] = model
    ok = all(r["valid"] for r in results)
    if as_json:
        shown = results if spec and not file else results[0]
        return json.dumps(shown, indent=2, ensure_ascii=False), ok
    return "\n".join(format_result(r) for r in results), ok
