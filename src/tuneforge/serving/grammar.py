"""Constrained decoding with xgrammar (vLLM's default grammar backend): `response_format` json_object /
json_schema, and tool calls whose arguments follow each function's JSON schema.

A grammar is compiled once per request (xgrammar caches compiled schemas per tokenizer) and every sequence
gets its own matcher: before each token the matcher writes a bitmask of the tokens that keep the output
valid, the engine sets the others' logits to -inf (serving/sampling.py), and the chosen token advances the
matcher. When the grammar is complete only a stop token is allowed, so the sequence ends there.

Tool calls are written as the shipped tool template (examples/tools.yaml) and Hermes / Qwen2.5 templates
write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lisbon"}}
    </tool_call>

`tool_choice` auto: free text, and any call the model starts is a valid call of a listed function;
required: one or more calls and nothing else; a named function: one call of it; none: no grammar.
The JSON is compact apart from one space after ',' and ':' (json.dumps's separators, which chat templates'
`tojson` write too, so a fine-tuned model's output is allowed as it learnt it).
"""
from __future__ import annotations

import json
import threading

import torch

from tuneforge.errors import ModelError

CALL_TRIGGER = "<tool_call>"
CALL_END = "}\n</tool_call>"
# One character of a JSON string as written: anything but a quote, a backslash or a control character, or an escape.
JSON_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'


def call_begin(name: str) -> str:
    return f'{CALL_TRIGGER}\n{{"name": {json.dumps(name)}, "arguments": '


def bounded_strings(schema):
    """`schema` with each length-bounded string (minLength / maxLength, no pattern, format or enum) written as the
    equivalent pattern over JSON_CHAR: xgrammar 0.2.9's rule for such strings lets raw control characters (a tab,
    a newline) into them, which no JSON parser reads."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings(v) for k, v in schema.items()}
    if out.get("type") == "string" and ("minLength" in out or "maxLength" in out) \
            and not {"pattern", "format", "enum", "const"} & set(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{JSON_CHAR}{{{low},{high}}}$"
    return out


class GrammarError(ValueError):
    """A schema or tool definition xgrammar cannot compile; the request is answered 400."""


class Constraint:
    """One sequence's matcher over a compiled grammar (engine thread only)."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of tokens the grammar does not allow next to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)


class Vocabulary:
    """A tokenizer's vocabulary (as wide as the model's logits, which may exceed the tokenizer's) as grammars and
    log-probabilities need it: its grammar compiler, and each token's bytes. The special tokens other than the
    stop tokens are never allowed inside a grammar: they would vanish from the decoded text and leave it
    invalid."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ModelError("structured outputs need xgrammar: pip install xgrammar") from None
        self.xgr, self.vocab_size = xgr, vocab_size
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - set(stop_ids)
        vocab = [""] * vocab_size  # xgrammar never allows an empty token
        for token, i in tokenizer.get_vocab().items():
            if i < vocab_size and i not in special:
                vocab[i] = token
        info = xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_ids,
                                 add_prefix_space=detected.add_prefix_space)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._bytes = detected.decoded_vocab  # each token's bytes, special tokens as their text
        self.lock = threading.Lock()  # one compile at a time: requests compile on the server's worker threads

    def _compile(self, how, *args, **kw):
        with self.lock:
            try:
                return how(*args, **kw)
            except Exception as e:  # noqa: BLE001 — xgrammar raises RuntimeError, ValueError or its FFI's errors
                raise GrammarError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def json(self, schema: dict | None, strict: bool = True):
        """A JSON object (json_object: `schema` None) or a value of `schema` (json_schema)."""
        return self._compile(self.compiler.compile_json_schema, json.dumps(bounded_strings(schema or {"type": "object"})),
                             any_whitespace=False, strict_mode=strict)

    def tools(self, functions: list[dict], choice: str, parallel: bool = True):
        """Calls of `functions` (each {"name", "parameters"}) as `choice` says: "auto", "required" or
        "named" (`functions` is then the named one alone)."""
        from xgrammar.structural_tag import (JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat,
                                             TriggeredTagsFormat)

        def compile_calls():
            tags = [TagFormat(begin=call_begin(f["name"]), end=CALL_END,
                              content=JSONSchemaFormat(json_schema=bounded_strings(f.get("parameters") or {"type": "object"}),
                                                       max_whitespace_cnt=1))
                    for f in functions]
            if choice == "auto":
                form = TriggeredTagsFormat(triggers=[CALL_TRIGGER], tags=tags, stop_after_first=not parallel)
            elif choice == "named":
                form = tags[0]
            else:
                form = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
            return self.compiler.compile_structural_tag(StructuralTag(format=form))

        return self._compile(compile_calls)

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if token < len(self._bytes) else b""

    def constraint(self, compiled) -> Constraint:
        return Constraint(compiled, self.vocab_size)
