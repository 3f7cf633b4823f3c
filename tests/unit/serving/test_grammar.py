"""Grammars on llguidance (serving/grammar.py): what each tool_choice and response_format admits (the table xgrammar,
the backend before it, admitted, apart from the `\\/` escape), which tokens a grammar may choose, and the mask
against llguidance's own reference kernel. On the tiny byte-level tokenizer: every text is spelt byte by byte."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.models.tiny import make_tokenizer
from tuneforge.serving.grammar import GrammarError, Vocabulary, closed
from tuneforge.serving.sampling import decode_step
from tuneforge.serving.sequence import SamplingParams, Sequence

F = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                 "required": ["a"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def tok():
    tok = make_tokenizer("llama")
    tok.add_tokens(["<tool_call>"])  # an added token that is not special, as Qwen2.5's
    return tok


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocabulary(tok, 300, [tok.eos_token_id])  # logits wider than the tokenizer (261), as a real LM head


def spelt(tok, text: str) -> list[int]:
    """`text` one byte token at a time (no added tokens: `<tool_call>` as 11 bytes)."""
    chars = "".join(word for word, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text))
    return tok.convert_tokens_to_ids(list(chars))


def admits(vocab, tok, grammar, text: str | list[int], end: bool = True) -> bool:
    """The grammar takes `text` (token ids, or a text spelt byte by byte) and, with `end`, a stop token after it."""
    m = vocab.constraint(grammar).matcher
    ids = spelt(tok, text) if isinstance(text, str) else text
    return all(m.consume_token(t) for t in ids) and (not end or m.consume_token(tok.eos_token_id))


def call(args: str) -> str:
    return '<tool_call>\n{"name": "f", "arguments": ' + args + '}\n</tool_call>'


def test_tool_choice_admits_what_it_promises(vocab, tok):
    one, two = call('{"a": 1}'), call('{"a": 1}') + "\n" + call('{"a": 2}')
    texts = {"one": one, "two": two, "text": "hello", "text then call": "hi " + one, "call then text": one + " bye",
             "empty": "", "not a function": '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
             "bad arguments": call('{"a": "x"}'), "other property": call('{"a": 1, "c": 2}')}
    want = {  # (choice, parallel): the texts admitted
        ("named", True): {"one"},
        ("required", True): {"one", "two"},
        ("required", False): {"one"},
        ("auto", True): {"one", "two", "text", "text then call", "call then text", "empty"},
        ("auto", False): {"one", "text", "text then call", "empty"},
    }
    for (choice, parallel), admitted in want.items():
        grammar = vocab.tools([F], choice, parallel)
        got = {name for name, text in texts.items() if admits(vocab, tok, grammar, text)}
        assert got == admitted, (choice, parallel)
    auto = vocab.tools([F], "auto")
    assert not admits(vocab, tok, auto, "hi <tool_call>\nnot a call", end=False)  # once opened, a call it is
    assert admits(vocab, tok, auto, "an unfinished <tool_call")
    with_added = tok.encode("hi " + two, add_special_tokens=False)  # <tool_call> as the one added token
    assert tok.convert_tokens_to_ids("<tool_call>") in with_added and admits(vocab, tok, auto, with_added)
    assert not admits(vocab, tok, auto, tok.encode("hi <tool_call>\nnot a call", add_special_tokens=False),
                      end=False)


def test_arguments_take_one_whitespace_character_where_json_allows_it(vocab, tok):
    grammar = vocab.tools([F], "required")
    for args in ('{"a": 1, "b": "x"}', '{"a":1,"b":"x"}', '{ "a" : 1 }', '{"a":\n1}'):
        assert admits(vocab, tok, grammar, call(args)), args
    assert not admits(vocab, tok, grammar, call('{"a":  1}'))


def test_response_format_is_json_dumps_spacing_and_strict_closes_objects(vocab, tok):
    any_object = vocab.json(None)
    for text, ok in (('{}', True), ('{"x": [1, 2], "y": {"z": null}}', True), ('{"x": "\\u00e9"}', True),
                     ('{"x":1}', False), ('[1]', False)):
        assert admits(vocab, tok, any_object, text) == ok, text
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert not admits(vocab, tok, vocab.json(schema), '{"a": 1, "b": 2}')
    assert admits(vocab, tok, vocab.json(schema, strict=False), '{"a": 1, "b": 2}')
    pair = {"type": "array", "prefixItems": [{"type": "integer"}]}
    assert not admits(vocab, tok, vocab.json(pair), '[1, 2]')
    assert admits(vocab, tok, vocab.json(pair, strict=False), '[1, 2]')


def test_strings_never_take_raw_control_characters(vocab, tok):
    """xgrammar 0.2.9 let them into length-bounded strings (tuneforge rewrote those as patterns); llguidance does
    not, bounded or not."""
    for schema in ({"type": "string", "maxLength": 4}, {"type": "string", "minLength": 1}, {"type": "string"}):
        grammar = vocab.json(schema)
        assert admits(vocab, tok, grammar, '"a\\tb"') and admits(vocab, tok, grammar, '"a\\nb"')
        for raw in ('"a\tb"', '"a\nb"', '"a\x01b"'):
            assert not admits(vocab, tok, grammar, raw), (schema, raw)
    assert not admits(vocab, tok, vocab.json({"type": "string", "maxLength": 4}), '"abcde"')


def test_which_tokens_a_grammar_may_choose(vocab, tok):
    added = tok.convert_tokens_to_ids("<tool_call>")
    constraint = vocab.constraint(vocab.tools([F], "auto"))
    logits = torch.zeros(300)
    constraint.mask(logits)
    allowed = set(logits.isfinite().nonzero().flatten().tolist())
    assert tok.eos_token_id in allowed and added in allowed  # free text may stop, or open a call in one token
    assert not allowed & {256, 257}  # special tokens that are not stop tokens: never
    assert not [t for t in allowed if t >= len(tok)]  # logits past the tokenizer: never
    constraint = vocab.constraint(vocab.json({"enum": ["x"]}))
    for t in tok.encode('"x"', add_special_tokens=False):
        assert constraint.accept(t)
    logits = torch.zeros(300)
    constraint.mask(logits)
    assert logits.isfinite().nonzero().flatten().tolist() == [tok.eos_token_id]  # complete: only the stop token
    assert vocab.token_bytes(tok.eos_token_id) == b"<|im_end|>" and vocab.token_bytes(added) == b"<tool_call>"
    assert vocab.token_bytes(299) == b""


def test_mask_equals_llguidances_reference_kernel(vocab, tok):
    from llguidance.numpy import apply_token_bitmask_inplace

    constraint = vocab.constraint(vocab.json({"type": "object", "properties": {"a": {"type": "string"}}}))
    for t in tok.encode('{"a": "', add_special_tokens=False):
        constraint.accept(t)
    logits = torch.randn(300)
    reference = logits.numpy().copy()[None]
    constraint.mask(logits)  # fills constraint.bitmask, then applies it
    apply_token_bitmask_inplace(reference, constraint.bitmask.numpy()[None])
    assert np.array_equal(logits.numpy(), reference[0])
    assert 0 < int(logits.isfinite().sum()) < 300


def test_schemas_that_cannot_be_followed_are_grammar_errors(vocab):
    for bad in ({"$ref": "#/nowhere"}, {"type": "wat"}, {"type": "string", "pattern": "("}):
        with pytest.raises(GrammarError):
            vocab.json(bad)
        with pytest.raises(GrammarError, match="^g: "):  # names the function
            vocab.tools([F, {"name": "g", "parameters": bad}], "auto")


def test_closed_walks_subschemas_only():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"x": {}}},
                                               "e": {"enum": [{"properties": {}}]}},
              "anyOf": [{"properties": {"y": {}}}], "additionalProperties": True}
    out = closed(schema)
    assert out["additionalProperties"] is True  # said: kept
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # the property map itself is not a schema
    assert out["properties"]["e"]["enum"] == [{"properties": {}}]  # values are not schemas
    assert out["anyOf"][0]["additionalProperties"] is False
    assert closed(schema, strict=False) is schema


def test_a_grammar_that_cannot_go_on_ends_its_sequence_with_an_error():
    class Stuck:  # a matcher past one of llguidance's limits
        error = "step lexer fuel exhausted"

        def mask(self, logits):
            pass

        def accept(self, token):
            raise AssertionError("never sampled")

    out = []
    seq = Sequence([1], None, SamplingParams(max_tokens=4, temperature=0), set(), out.append, lambda ids: "",
                   constraint=Stuck())
    decode_step(seq, torch.zeros(4))
    assert seq.finish_reason == "error" and "step lexer fuel" in out[-1].error
