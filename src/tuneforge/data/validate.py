"""Structural validation of JSONL training files.

Every problem in a file is collected (never just the first) as `FILE line N: field: problem`, so a
user fixes a file in one pass. Pure Python: no tokenizer needed.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import DataError, Problem

TASKS = ("chat", "completion", "text", "classification", "qa", "translation", "creative", "ner")
ROLES = ("system", "user", "assistant")
RECORD_KEYS = {"chat": ("messages",), "completion": ("prompt", "completion"), "text": ("text",),
               "classification": ("text", "label"), "qa": ("question", "answer", "context"),
               "translation": ("source", "target", "source_lang", "target_lang")}
OPTIONAL_KEYS = {"qa": ("context",)}
MESSAGE_KEYS = ("role", "content", "weight")


@dataclass
class ValidationReport:
    path: str
    task: str
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_errors(self, limit: int = 50) -> None:
        if self.ok:
            return
        shown = [str(p) for p in self.errors[:limit]]
        if len(self.errors) > limit:
            shown.append(f"... and {len(self.errors) - limit} more")
        shown.append(f"fix these lines (see `tuneforge data validate {self.path} --task {self.task}`) and run again")
        raise DataError(f"{self.path}: {len(self.errors)} problem(s) in {self.task} data:\n  " + "\n  ".join(shown),
                        problems=self.errors)


def _type_name(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _unknown_keys(obj: dict, known: tuple[str, ...], prefix: str) -> list[tuple[str, str]]:
    out = []
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            out.append((f"{prefix}{key}", f"unknown key '{key}'{hint}; it is ignored"))
    return out


def _check_chat(rec: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    errors, warnings = [], _unknown_keys(rec, RECORD_KEYS["chat"], "")
    if "messages" not in rec:
        return [("messages", "missing; a chat example is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")], warnings
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else _type_name(messages)
        return [("messages", f"must be a non-empty list of messages, got {what}")], warnings
    trainable = 0
    unsure = False  # a broken message might have been the assistant turn: then don't also claim there is none
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            errors.append((at, f"must be an object with role and content, got {_type_name(m)}"))
            unsure = True
            continue
        warnings += _unknown_keys(m, MESSAGE_KEYS, f"{at}.")
        role = m.get("role")
        if "role" not in m:
            errors.append((f"{at}.role", "missing; use one of " + ", ".join(ROLES)))
        elif not isinstance(role, str):
            errors.append((f"{at}.role", f"must be a string, got {_type_name(role)}"))
        elif role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append((f"{at}.role", f"unknown role '{role}'{hint}; use one of " + ", ".join(ROLES)))
        elif role == "system" and i != 0:
            errors.append((f"{at}.role", "a system message must come first"))
        unsure = unsure or role not in ROLES
        content = m.get("content")
        if "content" not in m:
            errors.append((f"{at}.content", 'missing; add "content": "<the text of this turn>"'))
        elif not isinstance(content, str):
            errors.append((f"{at}.content", f"must be a string, got {_type_name(content)}"))
        elif role == "assistant" and not content.strip():
            errors.append((f"{at}.content", "assistant reply is empty: nothing to learn"))
        if "weight" in m:
            w = m["weight"]
            if type(w) is not int or w not in (0, 1):  # bools and floats are refused on purpose
                got = str(w) if type(w) is int else f"{_type_name(w)} {json.dumps(w)}"
                errors.append((f"{at}.weight", f"must be 0 or 1 (an integer), got {got}"))
                unsure = unsure or role == "assistant"
            elif role in ROLES and role != "assistant":
                errors.append((f"{at}.weight", "weight only applies to assistant turns; remove it"))
        if role == "assistant" and m.get("weight", 1) == 1:
            trainable += 1
    if not trainable and not unsure:
        errors.append(("messages", "no assistant turn to train on (add one, or set its weight to 1)"))
    return errors, warnings


def _check_strings(rec: dict, task: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    errors, warnings = [], _unknown_keys(rec, RECORD_KEYS[task], "")
    for key in RECORD_KEYS[task]:
        if key not in rec and key in OPTIONAL_KEYS.get(task, ()):
            continue
        if key not in rec:
            errors.append((key, f'missing; a {task} example is ' + json.dumps({k: "..." for k in RECORD_KEYS[task]})))
        elif not isinstance(rec[key], str):
            errors.append((key, f"must be a string, got {_type_name(rec[key])}"))
        elif key not in ("prompt", *OPTIONAL_KEYS.get(task, ())) and not rec[key].strip():
            errors.append((key, "is empty: nothing to learn"))
    return errors, warnings


def _check_label(rec: dict, labels: list[str] | None) -> list[tuple[str, str]]:
    label = rec.get("label")
    if labels and isinstance(label, str) and label.strip() and label not in labels:
        close = difflib.get_close_matches(label, labels, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [("label", f"'{label}' is not one of the spec's labels{hint}: {', '.join(labels)}")]
    return []


def validate_jsonl(path: str | os.PathLike, task: str, labels: list[str] | None = None) -> ValidationReport:
    """Validate a JSONL file for `task`; the report holds the valid records and every problem.

    `labels` (classification) is the allowed label set; a label outside it is an error.
    """
    if task not in TASKS:
        raise DataError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, expected a JSONL file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read data file: {e.strerror or e}") from None
    report = ValidationReport(path=name, task=task)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    seen: dict[str, int] = {}
    non_blank = 0
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            non_blank += 1
            report.errors.append(Problem(name, number, "encoding",
                                         f"not UTF-8 (byte 0x{line_bytes[e.start]:02x} at offset {e.start}); re-save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        non_blank += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            report.errors.append(Problem(name, number, "json", f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except (ValueError, RecursionError) as e:  # integers over 4300 digits, absurdly deep nesting
            report.errors.append(Problem(name, number, "json", f"unreadable JSON value: {str(e).split(';')[0]}"))
            continue
        if not isinstance(rec, dict):
            report.errors.append(Problem(name, number, "json", f"expected a JSON object, got {_type_name(rec)}"))
            continue
        if task == "ner":
            from tuneforge.data.ner import check_ner

            errors, warnings = check_ner(rec), []
        elif task == "creative":  # either a prompt/completion pair or free text
            errors, warnings = _check_strings(rec, "text" if "text" in rec else "completion")
        else:
            errors, warnings = _check_chat(rec) if task == "chat" else _check_strings(rec, task)
        if task == "classification":
            errors += _check_label(rec, labels)
        report.errors += [Problem(name, number, f, m) for f, m in errors]
        report.warnings += [Problem(name, number, f, m) for f, m in warnings]
        if errors:
            continue
        key = json.dumps(rec, sort_keys=True, ensure_ascii=False)
        if key in seen:
            report.warnings.append(Problem(name, number, "record", f"duplicate of line {seen[key]}"))
        else:
            seen[key] = number
        report.records.append(rec)
        report.lines.append(number)
    if non_blank == 0:
        report.errors.append(Problem(name, None, "file", f"file is empty: expected one JSON {task} example per line"))
    return report
