"""Tool calls read back out of a model's text (service/completions/tools.py), whole and streamed in pieces cut
anywhere: the same calls and the same content either way."""
from __future__ import annotations

import json

from tuneforge.service.completions.tools import CallStream, parse_calls

CALL = '<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}\n</tool_call>'
TEXTS = ["Sure.\n" + CALL, CALL + "\n" + CALL.replace("5", "7"), "no call here, just <tool text", CALL[:-3],
         '<tool_call>\n{"name": 3}\n</tool_call> after']


def test_whole_and_streamed_agree_wherever_the_text_is_cut():
    for text in TEXTS:
        content, calls = parse_calls(text)
        for size in (1, 2, 5, 13, len(text)):
            stream, got_content, got_calls = CallStream(), "", []
            pieces = [text[i:i + size] for i in range(0, len(text), size)]
            for k, piece in enumerate(pieces):
                c, new = stream.feed(piece, final=k == len(pieces) - 1)
                got_content += c
                got_calls += new
            assert got_calls == calls, (text, size)
            assert (got_content.strip() or None) == (content.strip() if content else None), (text, size)
    content, calls = parse_calls(TEXTS[1])
    assert content is None and [json.loads(c["arguments"])["minutes"] for c in calls] == [5, 7]
    assert parse_calls(TEXTS[3]) == (TEXTS[3], [])  # an unclosed block (out of tokens) stays text
