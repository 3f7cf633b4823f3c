"""Preference data (task: preference): a prompt and two replies, the preferred one first. Checked and
normalised in one place for every reader (validation, encoding for training, evaluation).

Two formats, one record per line:

- OpenAI's DPO format: `{"input": {"messages": [...], "tools": [...]}, "preferred_output": [{"role":
  "assistant", "content": ...}], "non_preferred_output": [...]}`.
- TRL's: `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a string or a list of messages.

All strings is plain text (prompt + reply + eos, as task completion trains it); a list anywhere makes the
record a conversation, rendered by the chat template: a string prompt is then one user turn, a string reply
one assistant turn. Replies are assistant turns only, and only their tokens carry loss (the chat template's
assistant spans, as for chat). A record may carry `"rules"` (as held-out chat records do), checked against
the reply a model generates in the before/after report.

Every problem names its line and its field in the record's own terms (`preferred_output[0].content`,
`prompt[1].role`): a missing or empty prompt or reply, identical replies (nothing to prefer), and
supervised chat data given where preference data is expected.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tuneforge.data.chat import check_chat, message_text, type_name, unknown_keys

OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output", "rules")
TRL_KEYS = ("prompt", "chosen", "rejected", "tools", "rules")
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
RULE_KINDS = ("regex", "contains", "not_contains")  # evaluation/metrics.py checks them against a reply
SHAPE = ('a preference example is {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", '
         '"content": ...}], "non_preferred_output": [...]} (OpenAI) or {"prompt": ..., "chosen": ..., '
         '"rejected": ...} (TRL)')

Problems = list[tuple[str, str]]  # (field, message)


@dataclass
class PreferenceRecord:
    """A validated record, format-free. Conversational: `prompt` a list of messages, `chosen`/`rejected`
    lists of assistant messages; plain text: three strings."""

    prompt: list[dict] | str
    chosen: list[dict] | str
    rejected: list[dict] | str
    tools: list[dict] | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def is_openai(rec: dict) -> bool:
    return any(k in rec for k in ("input", "preferred_output", "non_preferred_output"))


def normalise(rec: dict) -> PreferenceRecord:
    """A valid record (see `check_preference`) in one form."""
    if is_openai(rec):
        inp = rec["input"]
        return PreferenceRecord(list(inp["messages"]), list(rec["preferred_output"]),
                                list(rec["non_preferred_output"]), inp.get("tools") or None)
    prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    if not any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        return PreferenceRecord(prompt, chosen, rejected)
    return PreferenceRecord(_turns(prompt, "user"), _turns(chosen, "assistant"), _turns(rejected, "assistant"),
                            rec.get("tools") or None)


def _turns(value, role: str) -> list:
    """A list of messages as it is; a string as one message of `role`."""
    return value if isinstance(value, list) else [{"role": role, "content": value}]


# ---------------------------------------------------------------- validation


def check_preference(rec: dict) -> tuple[Problems, Problems]:
    """(errors, warnings) of one preference record, each as (field, message)."""
    if is_openai(rec):
        return _check_openai(rec)
    if any(k in rec for k in ("prompt", "chosen", "rejected")):
        return _check_trl(rec)
    if "messages" in rec:
        return [("messages", "this is supervised chat data ({\"messages\": [...]}), not a preference pair; "
                 f"{SHAPE}. Train chat data with task chat (service: method supervised)")], []
    return [("record", f"not a preference example: {SHAPE}")], unknown_keys(rec, OPENAI_KEYS + TRL_KEYS, "")


def _check_openai(rec: dict) -> tuple[Problems, Problems]:
    errors, warnings = [], unknown_keys(rec, OPENAI_KEYS, "")
    inp = rec.get("input")
    prompt = None
    tools = None
    if "input" not in rec:
        errors.append(("input", 'missing; give the prompt as "input": {"messages": [...]}'))
    elif not isinstance(inp, dict):
        errors.append(("input", f'must be an object {{"messages": [...]}}, got {type_name(inp)}'))
    else:
        warnings += unknown_keys(inp, INPUT_KEYS, "input.")
        if "messages" not in inp:
            errors.append(("input.messages", "missing; the prompt's messages (system, user, ...)"))
        elif not isinstance(inp["messages"], list) or not inp["messages"]:
            errors.append(("input.messages", f"must be a non-empty list of messages, got {_what(inp['messages'])}"))
        else:
            prompt = inp["messages"]
        tools = inp.get("tools")
        if "parallel_tool_calls" in inp and not isinstance(inp["parallel_tool_calls"], bool):
            errors.append(("input.parallel_tool_calls", "must be true or false"))
    sides = {}
    for key in ("preferred_output", "non_preferred_output"):
        sides[key] = _reply_list(rec, key, errors)
    errors += _check_conversation(prompt, sides, tools, "input.messages", "input.tools", False)
    errors += _check_different(sides, ("preferred_output", "non_preferred_output"))
    errors += _check_rules(rec)
    return errors, warnings


def _check_trl(rec: dict) -> tuple[Problems, Problems]:
    errors, warnings = [], unknown_keys(rec, TRL_KEYS, "")
    values = {}
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            why = "the text or messages the replies answer" if key == "prompt" else "a reply (text or messages)"
            errors.append((key, f"missing; {why}: {SHAPE}"))
            continue
        value = rec[key]
        if isinstance(value, str):
            if not value.strip():
                errors.append((key, "is empty" + (": a preference pair answers a prompt" if key == "prompt"
                                                  else ": no reply to compare")))
            else:
                values[key] = value
        elif isinstance(value, list):
            if not value:
                errors.append((key, "is an empty list" + ("" if key == "prompt" else ": no reply to compare")))
            else:
                values[key] = value
        else:
            errors.append((key, f"must be a string or a list of messages, got {type_name(value)}"))
    if errors:
        return errors + _check_rules(rec), warnings
    conversational = any(isinstance(v, list) for v in values.values())
    if "tools" in rec and not conversational:
        errors.append(("tools", "only conversational records (messages) have tools; give prompt as messages"))
    if conversational:
        prompt = values["prompt"]
        sides = {k: values[k] for k in ("chosen", "rejected")}
        for key, value in sides.items():
            if isinstance(value, list):
                errors += [(f"{key}[{i}].role", f"a reply holds assistant turns only, got {_role(m)}")
                           for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") != "assistant"]
        errors += _check_conversation(prompt, sides, rec.get("tools"), "prompt", "tools", True)
    errors += _check_different({k: values.get(k) for k in ("chosen", "rejected")}, ("chosen", "rejected"))
    return errors + _check_rules(rec), warnings


def _what(value) -> str:
    return "an empty list" if isinstance(value, list) else type_name(value)


def _role(message: dict) -> str:
    return json.dumps(message.get("role")) if "role" in message else "no role"


def _reply_list(rec: dict, key: str, errors: Problems) -> list | None:
    """The OpenAI format's list of assistant messages under `key`, or None (its problem added to `errors`)."""
    if key not in rec:
        errors.append((key, 'missing; the reply as [{"role": "assistant", "content": "..."}]'))
        return None
    value = rec[key]
    if not isinstance(value, list) or not value:
        errors.append((key, f"must be a non-empty list of assistant messages, got {_what(value)}"
                       + (": no reply to compare" if isinstance(value, list) else "")))
        return None
    bad = [(f"{key}[{i}].role", f"a reply holds assistant turns only, got {_role(m)}")
           for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") != "assistant"]
    errors += bad
    return None if bad else value


def _check_conversation(prompt, sides: dict, tools, prompt_field: str, tools_field: str,
                        may_be_text: bool) -> Problems:
    """The chat checks (data/chat.py) of prompt + each reply as one conversation, their fields renamed to the
    record's own; a problem of the prompt is reported once."""
    if prompt is None:
        return []
    prompt_turns = _turns(prompt, "user")
    found: Problems = []
    for side, reply in sides.items():
        if reply is None:
            continue
        record = {"messages": prompt_turns + _turns(reply, "assistant")}
        if tools is not None:
            record["tools"] = tools
        errors, _ = check_chat(record)
        for field, message in errors:
            renamed = _rename(field, len(prompt_turns), prompt_field, side, tools_field,
                              isinstance(prompt, str), isinstance(reply, str))
            if (renamed, message) not in found:
                found.append((renamed, message))
    return found


def _rename(field: str, n_prompt: int, prompt_field: str, side: str, tools_field: str, prompt_text: bool,
            reply_text: bool) -> str:
    if field.startswith("tools"):
        return tools_field + field.removeprefix("tools")
    m = re.match(r"messages\[(\d+)\](.*)", field)
    if not m:
        return side if field == "messages" else field
    i, rest = int(m.group(1)), m.group(2)
    if i < n_prompt:
        return prompt_field if prompt_text else f"{prompt_field}[{i}]{rest}"
    return side if reply_text else f"{side}[{i - n_prompt}]{rest}"


def _reply_key(value) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps([{"text": message_text(m).strip(), "tool_calls": m.get("tool_calls")}
                       if isinstance(m, dict) else m for m in value], sort_keys=True)


def _check_different(sides: dict, names: tuple[str, str]) -> Problems:
    a, b = (sides.get(n) for n in names)
    if a is None or b is None:
        return []
    try:
        same = _reply_key(a) == _reply_key(b)
    except (TypeError, KeyError):  # a malformed message: already reported by the chat checks
        return []
    return [(names[1], f"identical to {names[0]}: nothing to prefer")] if same else []


def _check_rules(rec: dict) -> Problems:
    if "rules" not in rec:
        return []
    rules = rec["rules"]
    if not isinstance(rules, list):
        return [("rules", f'must be a list like [{{"regex": "^[0-9]+$"}}], got {type_name(rules)}')]
    errors = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in RULE_KINDS:
            errors.append((f"rules[{i}]", f"must be one of {', '.join(RULE_KINDS)}, e.g. {{\"regex\": \"^[0-9]+$\"}}"))
            continue
        kind, value = next(iter(rule.items()))
        if not isinstance(value, str):
            errors.append((f"rules[{i}].{kind}", f"must be a string, got {type_name(value)}"))
        elif kind == "regex":
            try:
                re.compile(value)
            except re.error as e:
                errors.append((f"rules[{i}].regex", f"not a valid regular expression: {e}"))
    return errors


def looks_like_preference(rec: dict) -> bool:
    """A record in one of the preference formats (for the hint when it is given where chat data is expected)."""
    return is_openai(rec) or all(k in rec for k in ("prompt", "chosen", "rejected"))
