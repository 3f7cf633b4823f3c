"""Tool calls in a model's output: read back into OpenAI's `tool_calls`, whole or while streaming.

The model writes each call as serving/grammar.py's CALL_TRIGGER block (the shipped tool template and Hermes /
Qwen2.5 templates write them so):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lisbon"}}
    </tool_call>

The text outside the blocks is the message's content (None when it is only whitespace). A block that is not
a JSON object with a name and object arguments (the output ran out of tokens, or tool_choice auto without a
grammar went astray) stays in the content, as text.
"""
from __future__ import annotations

import json
import re
import secrets

from tuneforge.serving.grammar import CALL_TRIGGER

CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_TRIGGER) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _call(body: str) -> dict | None:
    """{"name", "arguments" (a JSON string)} of one block's body, or None when it is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not isinstance(
            value.get("arguments", {}), dict):
        return None
    return {"name": value["name"], "arguments": json.dumps(value.get("arguments", {}), ensure_ascii=False)}


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole output; each call {"name", "arguments"}."""
    content, calls, at = [], [], 0
    for block in _BLOCK.finditer(text):
        call = _call(block.group(1))
        if call is None:
            continue
        content.append(text[at:block.start()])
        calls.append(call)
        at = block.end()
    content.append(text[at:])
    joined = "".join(content)
    return (joined if joined.strip() else None) if calls else (text or None), calls


class CallStream:
    """Splits a streamed output into content pieces and whole calls: content is passed on at once, except what
    may be the start of a call block, which waits until the block closes (then one call) or turns out to be
    text."""

    def __init__(self):
        self.pending = ""  # text not yet passed on: an open block, or what may start one
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content to send now, calls completed now) after `text`; `final`: the output has ended."""
        self.pending += text
        content, calls = "", []
        while self.pending:
            start = self.pending.find(CALL_TRIGGER)
            if start == -1:
                keep = 0 if final else _partial_prefix(self.pending, CALL_TRIGGER)
                content += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            end = self.pending.find(CALL_CLOSE, start)
            if end == -1:
                if final:  # an unclosed block: it was text after all
                    content += self.pending[start:]
                    self.pending = ""
                else:
                    self.pending = self.pending[start:]
                break
            block = self.pending[start:end + len(CALL_CLOSE)]
            call = _call(block[len(CALL_TRIGGER):-len(CALL_CLOSE)])
            if call is None:
                content += block
            else:
                calls.append(call)
            self.pending = self.pending[end + len(CALL_CLOSE):]
        if self.calls or calls:
            content = content if content.strip() else ""  # the whitespace between calls is not content
        self.calls += len(calls)
        return content, calls


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
