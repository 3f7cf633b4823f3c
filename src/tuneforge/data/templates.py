"""Prompt templates: how a scenario record becomes a causal-LM prompt plus the answer to learn.

Every prompt/answer task has a default template (below); `data.prompt_template` in the spec replaces
it with any Python format string over the record's fields. The answer is always the record's
reference (label, answer, target, entity list, completion), then eos; only the
answer's tokens are trained on. Chat uses the tokenizer's chat template (`data.chat_template`
replaces it); `text` has no prompt.
"""
from __future__ import annotations

import string

DEFAULT_TEMPLATES = {
    "classification": "Text: {text}\nLabel:",
    "qa": "{context_block}Question: {question}\nAnswer:",
    "translation": "Translate from {source_lang} to {target_lang}.\n{source_lang}: {source}\n{target_lang}:",
    "ner": "Text: {text}\nEntities:",
    "completion": "{prompt}",
    "creative": "{prompt}",
}

# Fields a template may use. qa's `context_block` is "Context: ...\n" or "" when the record has none.
TEMPLATE_FIELDS = {
    "classification": ("text",),
    "qa": ("question", "context", "context_block"),
    "translation": ("source", "source_lang", "target_lang"),
    "ner": ("text",),
    "completion": ("prompt",),
    "creative": ("prompt",),
}

# A bare string given at inference time (generate, chat) fills this field.
_MAIN_FIELD = {"classification": "text", "ner": "text", "qa": "question", "completion": "prompt", "creative": "prompt"}

_ANSWER_FIELD = {"classification": "label", "qa": "answer", "translation": "target", "completion": "completion",
                 "creative": "completion"}


def template_fields(template: str) -> list[str]:
    """Field names used by a format string; ValueError if it is not one (e.g. an unmatched brace)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a format string ({e}); write literal braces as '{{{{' and '}}}}'") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"'{{{name}}}' is not a plain field name; write literal braces as '{{{{' and '}}}}'")
        names.append(name)
    return names


def check_template(task: str, template: str) -> str | None:
    """None if `template` suits `task`, else a message naming the allowed fields."""
    if task not in TEMPLATE_FIELDS:
        hint = " (use data.chat_template for chat)" if task == "chat" else ""
        return f"task '{task}' has no prompt template{hint}; prompt_template applies to: {', '.join(TEMPLATE_FIELDS)}"
    allowed = TEMPLATE_FIELDS[task]
    try:
        used = template_fields(template)
    except ValueError as e:
        return str(e)
    unknown = [n for n in used if n not in allowed]
    if unknown:
        return f"unknown field(s) {', '.join(unknown)} for task '{task}'; a template may use: {', '.join(allowed)}"
    if not used:
        return f"the template uses no field of the record; task '{task}' offers: {', '.join(allowed)}"
    return None


def _fields(task: str, record: dict) -> dict:
    if task == "ner":  # only the text: a bare prompt at inference time has no entities
        from tuneforge.data.ner import record_text

        return {"text": record_text(record)}
    fields = {k: v for k, v in record.items() if isinstance(v, str)}
    if task == "qa":
        context = record.get("context")
        fields["context_block"] = f"Context: {context}\n" if context else ""
        fields.setdefault("context", "")
    return fields


def fill(task: str, record: dict | str, template: str | None = None) -> str:
    """The prompt for `record` (a dict in the task's format, or a bare string for its main field)."""
    if isinstance(record, str):
        if task not in _MAIN_FIELD:
            return record  # e.g. translation needs languages too: the string is the whole prompt
        record = {_MAIN_FIELD[task]: record}
    if task == "creative" and "text" in record:  # free text trains without a prompt: its opening is the prompt
        return record["text"]
    return (template or DEFAULT_TEMPLATES[task]).format(**_fields(task, record))


def answer(task: str, record: dict) -> str:
    """The reference the model learns to produce (without the leading space)."""
    if task == "ner":
        from tuneforge.data.ner import answer_text

        return answer_text(record)
    return record[_ANSWER_FIELD[task]]


def pair(task: str, record: dict, template: str | None = None) -> dict:
    """{"prompt", "completion"} for a record of a prompt/answer task."""
    # Scenario answers follow the prompt after a space; a completion record's own spacing is kept.
    sep = "" if task in ("completion", "creative") else " "
    return {"prompt": fill(task, record, template), "completion": sep + answer(task, record)}
