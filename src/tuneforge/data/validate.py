"""Structural validation of JSONL training files.

Every problem in a file is collected (never just the first) as `FILE line N: field: problem`, so a
user fixes a file in one pass. Pure Python: no tokenizer needed (what a chat template cannot render is
checked when encoding, data/encode.py). Chat records (OpenAI's format) are checked in data/chat.py, NER
records in data/ner.py, preference pairs (OpenAI's DPO format or TRL's) in data/preference.py.
"""
from __future__ import annotations

import difflib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.chat import check_chat, type_name, unknown_keys
from tuneforge.data.ner import check_ner
from tuneforge.data.preference import check_preference, looks_like_preference
from tuneforge.errors import DataError, Problem

TASKS = ("chat", "completion", "text", "classification", "qa", "translation", "creative", "ner", "preference")
RECORD_KEYS = {"completion": ("prompt", "completion"), "text": ("text",),
               "classification": ("text", "label"), "qa": ("question", "answer", "context"),
               "translation": ("source", "target", "source_lang", "target_lang")}
OPTIONAL_KEYS = {"qa": ("context",)}


@dataclass
class ValidationReport:
    path: str
    task: str
    labels: list[str] | None = None  # classification: the label set the file was checked against
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def command(self) -> str:
        """The `tuneforge data validate` command that shows every problem of this report."""
        words = ["tuneforge", "data", "validate", self.path, "--task", self.task]
        if self.labels and self.task == "classification":
            words += ["--labels", ",".join(self.labels)]
        return shlex.join(words)

    def raise_if_errors(self, limit: int = 50) -> None:
        if self.ok:
            return
        shown = [str(p) for p in self.errors[:limit]]
        if len(self.errors) > limit:
            shown.append(f"... and {len(self.errors) - limit} more")
        shown.append(f"fix these lines (see `{self.command()}`) and run again")
        raise DataError(f"{self.path}: {len(self.errors)} problem(s) in {self.task} data:\n  " + "\n  ".join(shown),
                        problems=self.errors)


def _check_strings(rec: dict, task: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    errors, warnings = [], unknown_keys(rec, RECORD_KEYS[task], "")
    for key in RECORD_KEYS[task]:
        if key not in rec and key in OPTIONAL_KEYS.get(task, ()):
            continue
        if key not in rec:
            errors.append((key, f'missing; a {task} example is ' + json.dumps({k: "..." for k in RECORD_KEYS[task]})))
        elif not isinstance(rec[key], str):
            errors.append((key, f"must be a string, got {type_name(rec[key])}"))
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
    report = ValidationReport(path=name, task=task, labels=list(labels) if labels else None)
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
            report.errors.append(Problem(name, number, "json", f"expected a JSON object, got {type_name(rec)}"))
            continue
        if task == "ner":
            errors, warnings = check_ner(rec), []
        elif task == "preference":
            errors, warnings = check_preference(rec)
        elif task == "chat" and "messages" not in rec and looks_like_preference(rec):
            errors, warnings = [("messages", "this is preference data (a prompt with a preferred and a "
                                 "non-preferred reply), not a chat example; train it with task preference "
                                 "(service: method dpo)")], []
        elif task == "creative":  # either a prompt/completion pair or free text
            errors, warnings = _check_strings(rec, "text" if "text" in rec else "completion")
        else:
            errors, warnings = check_chat(rec) if task == "chat" else _check_strings(rec, task)
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
