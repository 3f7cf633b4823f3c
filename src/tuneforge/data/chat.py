"""OpenAI's chat fine-tuning format, checked and normalised in one place for every reader of chat data
(validation, encoding for training, evaluation prompts).

A record is `{"messages": [...], "tools": [...] (optional), "parallel_tool_calls": bool (optional)}`.
A message has a `role` (system | user | assistant | tool) and `content`: a string, or a list of text
parts `[{"type": "text", "text": "..."}]` that are joined. Optional: `name`; `weight` 0/1 on assistant
turns; `tool_calls` on assistant turns (then `content` may be null or absent); `tool_call_id` on tool
messages, which answer the tool calls of the assistant turn before them.

Chat templates receive each message with its content as one string, plus `tool_calls` (arguments
parsed from their JSON string into an object, the form Hugging Face templates expect), `tool_call_id`
and `name`, and the record's `tools`. A template that does not mention tool calls would drop them
silently, so such a record is refused for that model (`tool_problems`).
"""
from __future__ import annotations

import difflib
import json
import re

ROLES = ("system", "user", "assistant", "tool")
RECORD_KEYS = ("messages", "tools", "parallel_tool_calls")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
TEXT_PART = '{"type": "text", "text": "..."}'
TOOL_SUPPORT_FIX = ("use a model whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one "
                    "that does")

Problems = list[tuple[str, str]]  # (field, message)


# --- normalisation -----------------------------------------------------------------------------------------

def message_text(message: dict) -> str:
    """The text of a (validated) message: its content string, its text parts joined, or "" for none."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _template_call(call: dict) -> dict:
    function = dict(call["function"])
    try:  # templates print arguments with `| tojson`: give them the object, not its JSON string
        arguments = json.loads(function["arguments"])
    except (TypeError, ValueError):
        arguments = None
    if isinstance(arguments, dict):
        function["arguments"] = arguments
    return {**call, "function": function}


def template_message(message: dict) -> dict:
    """A message as chat templates read it: content as one string, plus name / tool_calls / tool_call_id."""
    out = {"role": message["role"], "content": message_text(message)}
    if "name" in message:
        out["name"] = message["name"]
    if message.get("tool_calls"):
        out["tool_calls"] = [_template_call(c) for c in message["tool_calls"]]
    if "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def template_messages(record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to pass to `tokenizer.apply_chat_template(messages, tools=tools)`."""
    return [template_message(m) for m in record["messages"]], record.get("tools") or None


# --- what a model's chat template can render ---------------------------------------------------------------

def _template_source(tokenizer, tools: list[dict] | None) -> str:
    try:  # picks the "tool_use" template of a tokenizer that has several, as apply_chat_template does
        return tokenizer.get_chat_template(tools=tools)
    except (ValueError, TypeError, AttributeError):
        return getattr(tokenizer, "chat_template", None) or ""


def tool_problems(tokenizer, record: dict) -> Problems:
    """Tool definitions and tool calls in `record` that the tokenizer's chat template would silently drop."""
    tools = record.get("tools") or None
    uses_calls = [i for i, m in enumerate(record["messages"]) if m.get("tool_calls")]
    if not tools and not uses_calls:
        return []
    source = _template_source(tokenizer, tools)
    problems = []
    if tools and not re.search(r"\btools\b", source):
        problems.append(("tools", f"the chat template of this model does not render tool definitions; {TOOL_SUPPORT_FIX}"))
    if "tool_calls" not in source:
        problems += [(f"messages[{i}].tool_calls", "the chat template of this model does not render tool calls; "
                      + TOOL_SUPPORT_FIX) for i in uses_calls]
    return problems


# --- validation --------------------------------------------------------------------------------------------

def type_name(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _got(value) -> str:
    """A value as the user wrote it: `string "yes"`, `null`, `int`."""
    if value is None:
        return "null"
    return f"{type_name(value)} {json.dumps(value)}" if isinstance(value, (str, bool)) else type_name(value)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_keys(obj: dict, known: tuple[str, ...], prefix: str) -> Problems:
    return [(f"{prefix}{key}", f"unknown key '{key}'{_suggest(key, known)}; it is ignored") for key in obj if key not in known]


def _string(obj: dict, key: str, at: str) -> Problems:
    """A required non-empty string field."""
    if key not in obj:
        return [(f"{at}.{key}", "missing")]
    if not isinstance(obj[key], str):
        return [(f"{at}.{key}", f"must be a string, got {type_name(obj[key])}")]
    if not obj[key].strip():
        return [(f"{at}.{key}", "is empty")]
    return []


def _check_content(m: dict, at: str, role, has_calls: bool) -> Problems:
    content = m.get("content")
    if "content" not in m:
        return [] if has_calls else [(f"{at}.content", 'missing; add "content": "<the text of this turn>"')]
    if content is None and has_calls:
        return []
    if isinstance(content, list):
        errors = []
        for j, part in enumerate(content):
            where = f"{at}.content[{j}]"
            if not isinstance(part, dict):
                errors.append((where, f"must be a text part {TEXT_PART}, got {type_name(part)}"))
            elif part.get("type") != "text":
                kind = part.get("type")
                what = f"'{kind}' parts are not supported" if isinstance(kind, str) else f"type {_got(kind)} is not supported"
                errors.append((f"{where}.type", f"{what}; only text parts ({TEXT_PART}) can be trained on"))
            elif not isinstance(part.get("text"), str):
                errors.append((f"{where}.text", f"must be a string, got {type_name(part.get('text'))}"))
        if errors:
            return errors
    elif not isinstance(content, str):
        return [(f"{at}.content", f"must be a string or a list of text parts, got {type_name(content)}")]
    if role == "assistant" and not has_calls and not message_text(m).strip():
        return [(f"{at}.content", "assistant reply is empty: nothing to learn")]
    return []


def _check_tool_calls(calls, at: str, tool_names: list[str] | None) -> tuple[Problems, set[str] | None]:
    """Problems of an assistant turn's tool_calls, and the ids they declare (None if a broken call's id is
    unknown: then tool messages are not matched against them, which would report the same problem twice)."""
    if not isinstance(calls, list) or not calls:
        what = "an empty list" if isinstance(calls, list) else type_name(calls)
        return [(f"{at}.tool_calls", f"must be a non-empty list of tool calls, got {what}")], None
    errors, ids, known = [], set(), True
    for k, call in enumerate(calls):
        where = f"{at}.tool_calls[{k}]"
        if not isinstance(call, dict):
            errors.append((where, f'must be an object {{"id", "type": "function", "function"}}, got {type_name(call)}'))
            known = False
            continue
        if "id" not in call:
            errors.append((f"{where}.id", "missing; give each tool call an id that its tool message's tool_call_id names"))
            known = False
        elif not isinstance(call["id"], str) or not call["id"]:
            errors.append((f"{where}.id", f"must be a non-empty string, got {_got(call['id'])}"))
            known = False
        else:
            ids.add(call["id"])
        if call.get("type") != "function":
            errors.append((f"{where}.type", f'must be "function", got {json.dumps(call.get("type"))}'))
        function = call.get("function")
        if "function" not in call:
            errors.append((f"{where}.function", "missing"))
            continue
        if not isinstance(function, dict):
            errors.append((f"{where}.function", f"must be an object with name and arguments, got {type_name(function)}"))
            continue
        name_problems = _string(function, "name", f"{where}.function")
        errors += name_problems
        if not name_problems and tool_names is not None and function["name"] not in tool_names:
            errors.append((f"{where}.function.name", f"'{function['name']}' is not one of the record's tools"
                           f"{_suggest(function['name'], tool_names)}: {', '.join(tool_names)}"))
        arguments = function.get("arguments")
        if "arguments" not in function:
            errors.append((f"{where}.function.arguments", 'missing; give the arguments as a JSON string, e.g. "{}"'))
        elif not isinstance(arguments, str):
            errors.append((f"{where}.function.arguments",
                           f"must be a string holding JSON (OpenAI format), got {type_name(arguments)}"))
        else:
            try:
                json.loads(arguments)
            except ValueError as e:
                errors.append((f"{where}.function.arguments", f"not valid JSON: {e.msg} at column {e.colno}"))
    return errors, (ids if known else None)


def _check_tools(tools) -> tuple[Problems, list[str] | None]:
    """Problems of the record's `tools`, and the tool names (None when they cannot be known)."""
    if not isinstance(tools, list):
        return [("tools", f"must be a list of tools, got {type_name(tools)}")], None
    errors, names = [], []
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict):
            errors.append((where, f'must be an object {{"type": "function", "function": {{"name", ...}}}}, got {type_name(tool)}'))
            continue
        if tool.get("type") != "function":
            errors.append((f"{where}.type", f'must be "function", got {json.dumps(tool.get("type"))}'))
        function = tool.get("function")
        if "function" not in tool:
            errors.append((f"{where}.function", "missing"))
        elif not isinstance(function, dict):
            errors.append((f"{where}.function", f"must be an object with a name, got {type_name(function)}"))
        else:
            name_problems = _string(function, "name", f"{where}.function")
            errors += name_problems
            if not name_problems:
                names.append(function["name"])
    return errors, (names if not errors else None)


def check_chat(rec: dict) -> tuple[Problems, Problems]:
    """(errors, warnings) of one chat record, each as (field, message)."""
    warnings = unknown_keys(rec, RECORD_KEYS, "")
    record_errors, tool_names = _check_tools(rec["tools"]) if "tools" in rec else ([], None)
    if "parallel_tool_calls" in rec and not isinstance(rec["parallel_tool_calls"], bool):
        record_errors.append(("parallel_tool_calls", f"must be true or false, got {_got(rec['parallel_tool_calls'])}"))
    if "messages" not in rec:
        return [("messages", "missing; a chat example is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"),
                *record_errors], warnings
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else type_name(messages)
        return [("messages", f"must be a non-empty list of messages, got {what}"), *record_errors], warnings
    errors, message_warnings = _check_messages(messages, tool_names)
    return errors + record_errors, warnings + message_warnings


def check_prompt(messages, tools=None) -> Problems:
    """Problems of a conversation given to a model to continue (a chat completion request): the checks of
    training data, less the need for an assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        return [("messages", "must be a non-empty list of messages")]
    errors, tool_names = _check_tools(tools) if tools is not None else ([], None)
    more, _ = _check_messages(messages, tool_names)
    return errors + [(f, m) for f, m in more if not (f == "messages" and m.startswith("no assistant turn"))]


def _check_messages(messages: list, tool_names: list[str] | None) -> tuple[Problems, Problems]:
    errors, warnings = [], []
    trainable = 0
    unsure = False  # a broken message might have been the assistant turn: then don't also claim there is none
    # (index, ids) of the assistant turn whose tool calls the next tool messages answer; ids None: unknown
    open_calls: tuple[int, set[str] | None] | None = None
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            errors.append((at, f"must be an object with role and content, got {type_name(m)}"))
            unsure, open_calls = True, None
            continue
        warnings += unknown_keys(m, MESSAGE_KEYS, f"{at}.")
        role = m.get("role")
        if "role" not in m:
            errors.append((f"{at}.role", "missing; use one of " + ", ".join(ROLES)))
        elif not isinstance(role, str):
            errors.append((f"{at}.role", f"must be a string, got {type_name(role)}"))
        elif role not in ROLES:
            errors.append((f"{at}.role", f"unknown role '{role}'{_suggest(role, ROLES)}; use one of " + ", ".join(ROLES)))
        elif i == 0 and role not in ("system", "user"):
            # training renders the prompt before every reply: before a first reply there is none
            errors.append((f"{at}.role", f"a conversation must start with a system or user message, got {role}"))
        elif role == "system" and i != 0:
            errors.append((f"{at}.role", "a system message must come first"))
        elif role == "tool" and open_calls is None:
            errors.append((f"{at}.role", "a tool message must follow an assistant turn with tool_calls"))
        unsure = unsure or role not in ROLES
        has_calls = m.get("tool_calls") is not None
        if has_calls and role != "assistant":
            errors.append((f"{at}.tool_calls", "only assistant turns make tool calls"))
        errors += _check_content(m, at, role, has_calls and role == "assistant")
        if "name" in m and not isinstance(m["name"], str):
            errors.append((f"{at}.name", f"must be a string, got {type_name(m['name'])}"))
        if role == "tool":
            if i == 0:
                pass  # the conversation-start problem says it all
            elif "tool_call_id" not in m:
                errors.append((f"{at}.tool_call_id", "missing; a tool message names the tool call it answers"))
            elif not isinstance(m["tool_call_id"], str):
                errors.append((f"{at}.tool_call_id", f"must be a string, got {type_name(m['tool_call_id'])}"))
            elif open_calls is not None and open_calls[1] is not None and m["tool_call_id"] not in open_calls[1]:
                errors.append((f"{at}.tool_call_id",
                               f"'{m['tool_call_id']}' matches no tool call of messages[{open_calls[0]}]"))
        elif "tool_call_id" in m and role in ROLES:
            errors.append((f"{at}.tool_call_id", "only tool messages answer a tool call; remove it"))
        if role == "assistant" and has_calls:
            call_errors, ids = _check_tool_calls(m["tool_calls"], at, tool_names)
            errors += call_errors
            open_calls = (i, ids)
        elif role != "tool":
            open_calls = None
        if "weight" in m:
            w = m["weight"]
            if type(w) is not int or w not in (0, 1):  # bools and floats are refused on purpose
                got = str(w) if type(w) is int else f"{type_name(w)} {json.dumps(w)}"
                errors.append((f"{at}.weight", f"must be 0 or 1 (an integer), got {got}"))
                unsure = unsure or role == "assistant"
            elif role in ROLES and role != "assistant":
                errors.append((f"{at}.weight", "weight only applies to assistant turns; remove it"))
        if role == "assistant" and m.get("weight", 1) == 1:
            trainable += 1
    if not trainable and not unsure:
        errors.append(("messages", "no assistant turn to train on (add one, or set its weight to 1)"))
    return errors, warnings
