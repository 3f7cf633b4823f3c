"""Constrained decoding with llguidance (a Rust library with a 3 MB wheel; one of vLLM's grammar backends, and
llama.cpp's): `response_format` json_object / json_schema, and tool calls whose arguments follow each
function's JSON schema.

A grammar is compiled once per request into a matcher that is never advanced; every sequence gets its own
copy of it: before each token the copy writes a bitmask of the tokens that keep the output valid, the engine
sets the others' logits to -inf (serving/sampling.py), and the chosen token advances the copy. When the
grammar is complete only a stop token is allowed, so the sequence ends there.

Tool calls are written as the shipped tool template (examples/tools.yaml) and Hermes / Qwen2.5 templates
write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lisbon"}}
    </tool_call>

`tool_choice` auto: free text, and any call the model starts is a valid call of a listed function;
required: one or more calls and nothing else; a named function: one call of it; none: no grammar.
`response_format` JSON is compact apart from one space after ',' and ':' (json.dumps's separators, which chat
templates' `tojson` write too, so a fine-tuned model's output is allowed as it learnt it). A call's arguments
allow at most one whitespace character wherever JSON allows whitespace: json.dumps's spacing, compact JSON,
and a newline or a space inside braces are all accepted; runs of whitespace (a model that pads forever) are
not. `strict` json_schema (the default) closes every object that lists `properties` and every array that
lists `prefixItems` unless the schema says otherwise, as OpenAI's strict mode does.
"""
from __future__ import annotations

import json

from tuneforge.errors import ModelError

CALL_TRIGGER = "<tool_call>"
CALL_END = "}\n</tool_call>"
# json.dumps's spacing; \uXXXX escapes of any character allowed, as json.dumps's ensure_ascii writes them.
RESPONSE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "json_allow_general_unicode_escapes": True}
# At most one whitespace character at each place JSON allows whitespace (the pattern is matched at most once).
ARGUMENTS_JSON = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]", "item_separator": ",", "key_separator": ":",
                  "json_allow_general_unicode_escapes": True}


def call_begin(name: str) -> str:
    return f'{CALL_TRIGGER}\n{{"name": {json.dumps(name)}, "arguments": '


def closed(schema, strict: bool = True):
    """`schema` as strict mode reads it: an object schema that lists `properties` (or `patternProperties`) and
    says nothing of other properties allows no others, and an array schema that lists `prefixItems` and says
    nothing of other items allows no others (what xgrammar's strict_mode and vLLM's llguidance backend do).
    Only subschemas are walked; `enum`, `const`, `default` and `examples` values are left as they are."""
    if not strict or not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
                "propertyNames", "unevaluatedProperties", "unevaluatedItems"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    if isinstance(out.get("items"), list):  # draft 4-7 tuples
        out["items"] = [closed(s) for s in out["items"]]
    if ("properties" in out or "patternProperties" in out) \
            and not {"additionalProperties", "unevaluatedProperties"} & set(out):
        out["additionalProperties"] = False
    if "prefixItems" in out and not {"items", "unevaluatedItems"} & set(out):
        out["items"] = False
    return out


def _lark(text: str) -> str:
    """`text` as a Lark string literal (llguidance reads JSON string escapes)."""
    return json.dumps(text)


class GrammarError(ValueError):
    """A schema or tool definition llguidance cannot compile; the request is answered 400."""


def _message(error: str) -> str:
    """llguidance's error (often several lines: a regex error points at the character) as one short line."""
    return " ".join(line.strip() for line in error.splitlines() if line.strip())[:400] or "invalid grammar"


class Constraint:
    """One sequence's matcher (engine thread only)."""

    def __init__(self, matcher, vocab_size: int):
        import torch  # here, not at the top: the API process imports this module (CALL_TRIGGER) before any model

        self.matcher = matcher
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # (ceil(V / 32),)
        self.bit = torch.arange(32, dtype=torch.int32)  # bit i of a bitmask word is token 32 * word + i

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of tokens the grammar does not allow next to -inf, in place."""
        # What llguidance.torch.fill_next_token_bitmask does; that module is not imported: it costs ~4 s
        # (torch._dynamo, for its torch.compile'd apply kernel, which on CPU compiles C++ at first use).
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        allowed = ((self.bitmask[:, None] >> self.bit) & 1).flatten()[:logits.shape[-1]]  # (V,)
        logits.masked_fill_(allowed.to(logits.device) == 0, float("-inf"))

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        """Why the matcher stopped working (a resource limit hit while computing a mask), or None."""
        return _message(self.matcher.get_error()) if self.matcher.is_error() else None


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special ones and how text is encoded."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int], eos: int):
        self.tokenizer, self.tokens, self.special_token_ids = tokenizer, tokens, special
        self.eos_token_id, self.bos_token_id = eos, None

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tokenizer.encode(text, add_special_tokens=False)


class Vocabulary:
    """A tokenizer's vocabulary (as wide as the model's logits, which may exceed the tokenizer's) as grammars and
    log-probabilities need it: llguidance's tokenizer, and each token's bytes. The special tokens are never
    allowed inside a grammar (they would vanish from the decoded text and leave it invalid); the stop tokens
    end it. Added tokens that are not special (Qwen2.5's `<tool_call>`) are text, as the tokenizer treats them."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise ModelError("structured outputs need llguidance: pip install llguidance") from None
        if not stop_ids:
            raise ModelError("structured outputs need a stop token, and this tokenizer has none (no eos_token)")
        self.llg, self.vocab_size = llguidance, vocab_size
        known = min(len(tokenizer), vocab_size)
        try:  # llguidance reads each token's bytes (byte-level and byte-fallback vocabularies)...
            read = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(len(tokenizer), vocab_size))
        except ValueError as e:
            raise ModelError(f"structured outputs: llguidance cannot read this tokenizer: {e}") from None
        self._bytes = [read.decode_bytes([i]) for i in range(known)]  # special tokens as their text
        # ...but marks every added token special; only the tokenizer's special ones (stop tokens included) are.
        special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i < vocab_size)
        tokens = self._bytes + [b""] * (vocab_size - known)  # ids past the tokenizer: no text, never allowed
        table = _TokenTable(tokenizer, tokens, special, stop_ids[0])
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(table), n_vocab=vocab_size,
                                                eos_token=list(stop_ids))

    def _compile(self, grammar: str):
        """A matcher over `grammar`, never advanced: each sequence advances a copy (`constraint`)."""
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_message(matcher.get_error()))
        return matcher

    def _json(self, schema: dict, style: dict) -> str:
        schema = {k: v for k, v in schema.items() if k != "x-guidance"}  # llguidance's options are ours to set
        try:
            return self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=style)
        except ValueError as e:  # not a JSON object
            raise GrammarError(_message(str(e))) from None

    def json(self, schema: dict | None, strict: bool = True):
        """A JSON object (json_object: `schema` None) or a value of `schema` (json_schema)."""
        return self._compile(self._json(closed(schema or {"type": "object"}, strict), RESPONSE_JSON))

    def tools(self, functions: list[dict], choice: str, parallel: bool = True):
        """Calls of `functions` (each {"name", "parameters"}) as `choice` says: "auto", "required" or
        "named" (`functions` is then the named one alone)."""
        rules = []
        for i, f in enumerate(functions):
            schema = closed(f.get("parameters") or {"type": "object"})
            error = self.llg.LLMatcher.validate_grammar(self._json(schema, ARGUMENTS_JSON), self.tokenizer)
            if error:  # checked alone, so the message names the function
                raise GrammarError(f"{f['name']}: {_message(error)}")
            # The rest of a call after the trigger; x-guidance (llguidance's options) is read at the top level.
            args = json.dumps({**schema, "x-guidance": ARGUMENTS_JSON})
            after_trigger = call_begin(f["name"])[len(CALL_TRIGGER):]
            rules.append(f"fn_{i}: {_lark(after_trigger)} %json {args} {_lark(CALL_END)}")
        rules.append("body: " + " | ".join(f"fn_{i}" for i in range(len(functions))))
        if choice == "auto":
            # `opening` is one lazy lexeme: any text up to the first CALL_TRIGGER, which must then open a call.
            top = "start: (opening body)* TEXT" if parallel else "start: TEXT | opening body"
            rules += [f"opening[lazy]: TEXT {_lark(CALL_TRIGGER)}", r"TEXT: /(.|\n)*/"]
        else:  # required and named: calls only, one per line
            top = 'start: call ("\\n" call)*' if parallel and choice == "required" else "start: call"
            rules.append(f"call: {_lark(CALL_TRIGGER)} body")
        return self._compile(self.llg.LLMatcher.grammar_from_lark("\n".join([top, *rules])))

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if token < len(self._bytes) else b""

    def constraint(self, grammar) -> Constraint:
        return Constraint(grammar.deep_copy(), self.vocab_size)
