"""Turn validated records into token ids plus labels, where label -100 marks tokens with no loss.

Chat loss masks come from the tokenizer's own chat template, not from hard-coded markers: the
conversation is rendered once, and each trainable assistant turn's character span is found by
rendering the conversation up to that turn with and without it. Tokens that lie inside a span
(the reply and the template's end-of-turn marker) are targets; everything else is masked.
"""
from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data import templates
from tuneforge.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the (start, end) character spans of trainable replies."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located; use task: completion instead"
            )
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


def encode_chat(tokenizer, record: dict) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "task 'chat' needs a tokenizer with a chat template, and this model's has none; "
            "use task: completion (prompt/completion pairs) or a chat/instruct model"
        )
    text, spans = assistant_spans(tokenizer, record["messages"])
    return _tokens_in_spans(tokenizer, text, spans)


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


def encode_example(tokenizer, task: str, record: dict, template: str | None = None) -> Example:
    """One record -> token ids and labels. Prompt/answer tasks go through their prompt template
    (data/templates.py; `template` overrides the default), so only the answer is trained on."""
    if task == "chat":
        return encode_chat(tokenizer, record)
    if task == "text" or (task == "creative" and "text" in record):
        return encode_text(tokenizer, record)
    return encode_completion(tokenizer, templates.pair(task, record, template))


def encode_prompt(tokenizer, task: str, prompt: str | list[dict] | dict, template: str | None = None) -> list[int]:
    """Token ids a model should continue at inference time (chat: the chat template plus generation
    prompt; other tasks: a record dict or a bare string, filled into the task's prompt template)."""
    if task == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = _render(tokenizer, messages, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if task in templates.DEFAULT_TEMPLATES:
        prompt = templates.fill(task, prompt, template)
    return _bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass
class EncodedData:
    examples: list[Example]
    lines: list[int]
    truncated: int
    dropped: int
    longest: int
    total_tokens: int


def encode_records(tokenizer, task: str, records: list[dict], lines: list[int], max_seq_len: int,
                   overlong: str = "truncate", template: str | None = None) -> EncodedData:
    """Encode every record; over-long examples are truncated (keeping the start) or dropped."""
    out, kept_lines = [], []
    truncated = dropped = longest = total = 0
    for record, line in zip(records, lines):
        ex = encode_example(tokenizer, task, record, template)
        longest = max(longest, len(ex.input_ids))
        if len(ex.input_ids) > max_seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            truncated += 1
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
        if ex.num_targets == 0:  # nothing to learn after truncation
            dropped += 1
            continue
        total += len(ex.input_ids)
        out.append(ex)
        kept_lines.append(line)
    return EncodedData(out, kept_lines, truncated, dropped, longest, total)
