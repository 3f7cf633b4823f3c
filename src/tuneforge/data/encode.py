"""Turn validated records into token ids plus labels, where label -100 marks tokens with no loss.

Chat loss masks come from the tokenizer's own chat template, not from hard-coded markers: the
conversation is rendered once, and each trainable assistant turn's character span is found by
rendering the conversation up to that turn with and without it. Tokens that lie inside a span
(the reply or tool calls, and the template's end-of-turn marker) are targets; everything else,
tool results included, is masked.

A record the chat template cannot render (it raises, or would drop the record's tool calls) is a
`DataError` whose problems name the record's line; `encode_records` reports every such record at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data import templates
from tuneforge.data.chat import template_message, template_messages, tool_problems
from tuneforge.errors import DataError, Problem

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def length(self) -> int:
        """Its row length in a padded batch."""
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def truncated(self, n: int) -> Example:
        return Example(self.input_ids[:n], self.labels[:n])


@dataclass
class PreferencePair:
    """A preference example: prompt + preferred reply, prompt + the other reply (labels on the replies only).
    In a batch both are rows (data/batching.py collate_pairs)."""

    chosen: Example
    rejected: Example

    @property
    def num_targets(self) -> int:
        """The fewer of the two replies' target tokens (0: a side has nothing left to score)."""
        return min(self.chosen.num_targets, self.rejected.num_targets)

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)

    @property
    def n_tokens(self) -> int:
        return self.chosen.n_tokens + self.rejected.n_tokens

    @property
    def common_prefix(self) -> int:
        """Tokens both sides start with (the prompt, and any first reply tokens they share)."""
        c, r = self.chosen.input_ids, self.rejected.input_ids
        return next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))

    @property
    def shared_length(self) -> int:
        """Its row length with the prompt once (collate_pairs `shared_prompt`): the common prefix, then the rest
        of each reply."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids) - self.common_prefix

    def truncated(self, n: int) -> PreferencePair:
        return PreferencePair(self.chosen.truncated(n), self.rejected.truncated(n))


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _record_error(problems: list[tuple[str, str]]) -> DataError:
    """A problem of one record; `encode_records` adds its file and line."""
    return DataError("\n".join(f"{field}: {message}" for field, message in problems),
                     problems=[Problem(None, None, field, message) for field, message in problems])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """`messages` (normalised by data/chat.py) as the chat template writes them."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # Templates refuse conversations they do not support (raise_exception -> TemplateError), transformers
    # refuses an empty one (ValueError), and `+` on a value a template did not expect raises TypeError.
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise _record_error([("messages", f"the chat template failed: {e}")]) from None


def _check_renders(tokenizer, record: dict) -> None:
    problems = tool_problems(tokenizer, record)
    if problems:
        raise _record_error(problems)


def assistant_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` (a record's); return the text and the (start, end) character spans of trainable
    assistant turns (replies and tool calls)."""
    rendered = [template_message(m) for m in messages]
    full = _render(tokenizer, rendered, False, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, rendered[:i], True, tools)
        upto = _render(tokenizer, rendered[: i + 1], False, tools)
        if not full.startswith(prompt):
            raise _record_error([(
                f"messages[{i}]", "the tokenizer's chat template renders the conversation before this turn "
                "differently from the whole conversation, so the turn cannot be located; use task: completion instead"
            )])
        # `upto` may end with text the full rendering does not have at that point (Phi-3 appends
        # eos after the last turn), so the span ends where the two renderings part.
        end = _common_prefix_len(upto, full)
        spans.append((len(prompt), end))
    return full, spans


def _tokens_in_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(offsets):
        # Whole tokens only: a character-level common prefix can end inside a marker ("<|" of
        # "<|endoftext|>" vs "<|user|>"), and that marker must not become a target.
        if any(s <= start and end <= e for s, e in spans):
            labels[k] = ids[k]
    return Example(list(ids), labels)


def _require_chat_template(tokenizer, task: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"task '{task}' needs a tokenizer with a chat template for conversations, and this model's has none; "
            + ("use task: completion (prompt/completion pairs) or a chat/instruct model" if task == "chat" else
               "give prompt, chosen and rejected as plain strings, or use a chat/instruct model"))


def encode_chat(tokenizer, record: dict) -> Example:
    _require_chat_template(tokenizer, "chat")
    _check_renders(tokenizer, record)
    text, spans = assistant_spans(tokenizer, record["messages"], record.get("tools") or None)
    return _tokens_in_spans(tokenizer, text, spans)


def encode_preference(tokenizer, record: dict) -> PreferencePair:
    """A preference record (data/preference.py) -> its two sequences. A conversation is rendered by the chat
    template and only the reply's assistant turns are targets (assistant turns of the prompt are context:
    weight 0); plain text is prompt + reply + eos with the reply as target, as task completion does."""
    from tuneforge.data.preference import normalise

    pref = normalise(record)
    if not pref.conversational:
        return PreferencePair(*(encode_completion(tokenizer, {"prompt": pref.prompt, "completion": reply})
                                for reply in (pref.chosen, pref.rejected)))
    _require_chat_template(tokenizer, "preference")
    context = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m
               for m in pref.prompt]
    sides = []
    for reply in (pref.chosen, pref.rejected):
        conversation = {"messages": context + reply, **({"tools": pref.tools} if pref.tools else {})}
        _check_renders(tokenizer, conversation)
        text, spans = assistant_spans(tokenizer, conversation["messages"], pref.tools)
        sides.append(_tokens_in_spans(tokenizer, text, spans))
    return PreferencePair(*sides)


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _bos_ids(tokenizer) -> list[int]:
    # Only families that expect a leading bos (Llama 2/3 style) get one.
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def encode_completion(tokenizer, record: dict) -> Example:
    prompt = _bos_ids(tokenizer) + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + _eos_ids(tokenizer)
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def encode_text(tokenizer, record: dict) -> Example:
    ids = _bos_ids(tokenizer) + tokenizer(record["text"], add_special_tokens=False)["input_ids"] + _eos_ids(tokenizer)
    return Example(ids, list(ids))


def encode_example(tokenizer, task: str, record: dict, template: str | None = None) -> Example | PreferencePair:
    """One record -> token ids and labels. Prompt/answer tasks go through their prompt template
    (data/templates.py; `template` overrides the default), so only the answer is trained on."""
    if task == "chat":
        return encode_chat(tokenizer, record)
    if task == "preference":
        return encode_preference(tokenizer, record)
    if task == "text" or (task == "creative" and "text" in record):
        return encode_text(tokenizer, record)
    return encode_completion(tokenizer, templates.pair(task, record, template))


def encode_prompt(tokenizer, task: str, prompt: str | list[dict] | dict, template: str | None = None) -> list[int]:
    """Token ids a model should continue at inference time (chat: a user message, a list of messages or a
    record with `messages` and `tools`, through the chat template plus generation prompt; preference: the
    same, or a preference record's prompt (plain text as written); other tasks: a record dict or a bare
    string, filled into the task's prompt template)."""
    if task == "preference":  # a preference record's prompt, a message list, or a string (a user turn, or text)
        if isinstance(prompt, dict) and not ("messages" in prompt):
            from tuneforge.data.preference import normalise

            pref = normalise(prompt)
            if not pref.conversational:  # plain text trains prompt + reply: generate from the prompt's text
                return _bos_ids(tokenizer) + tokenizer(pref.prompt, add_special_tokens=False)["input_ids"]
            prompt = {"messages": pref.prompt, **({"tools": pref.tools} if pref.tools else {})}
        if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
            return _bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        task = "chat"
    if task == "chat":
        if isinstance(prompt, str):
            record = {"messages": [{"role": "user", "content": prompt}]}
        else:
            record = prompt if isinstance(prompt, dict) else {"messages": prompt}
        _check_renders(tokenizer, record)
        messages, tools = template_messages(record)
        text = _render(tokenizer, messages, True, tools)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if task in templates.DEFAULT_TEMPLATES:
        prompt = templates.fill(task, prompt, template)
    return _bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass
class EncodedData:
    examples: list[Example] | list[PreferencePair]
    lines: list[int]
    truncated: int
    dropped: int
    longest: int
    total_tokens: int


def encode_each(tokenizer, task: str, records: list[dict], lines: list[int], template: str | None = None,
                source: str | None = None) -> tuple[list[tuple[int, Example]], list[Problem]]:
    """(line, example) for every record that encodes, and the problems of those that do not, at their
    `source` (file name) and line. A problem of the whole setup (no chat template) still raises."""
    encoded, problems = [], []
    for record, line in zip(records, lines):
        try:
            encoded.append((line, encode_example(tokenizer, task, record, template)))
        except DataError as e:
            if not e.problems:
                raise
            problems += [Problem(source, line, p.field, p.message) for p in e.problems]
    return encoded, problems


def raise_problems(problems: list[Problem], source: str | None, limit: int = 50) -> None:
    """Raise the problems of records the tokenizer cannot encode, all at once (nothing if there are none)."""
    if not problems:
        return
    shown = [str(p) if p.source else f"line {p.line}: {p.field}: {p.message}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    n = len({p.line for p in problems})
    raise DataError(f"{source or 'data'}: {n} example(s) cannot be rendered by this model's chat template:\n  "
                    + "\n  ".join(shown), problems=problems)


def encode_records(tokenizer, task: str, records: list[dict], lines: list[int], max_seq_len: int,
                   overlong: str = "truncate", template: str | None = None, source: str | None = None) -> EncodedData:
    """Encode every record; over-long examples are truncated (keeping the start) or dropped. Records the
    tokenizer cannot encode are one DataError naming `source` (the file) and each line."""
    encoded, problems = encode_each(tokenizer, task, records, lines, template, source)
    raise_problems(problems, source)
    out, kept_lines = [], []
    truncated = dropped = longest = total = 0
    for line, ex in encoded:
        longest = max(longest, ex.length)
        if ex.length > max_seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            truncated += 1
            ex = ex.truncated(max_seq_len)  # keeps the start (a preference pair: both sequences)
        if ex.num_targets == 0:  # nothing to learn after truncation (a pair: on either side)
            dropped += 1
            continue
        total += ex.n_tokens
        out.append(ex)
        kept_lines.append(line)
    return EncodedData(out, kept_lines, truncated, dropped, longest, total)
