"""Loss masks: exactly the assistant replies (+ the template's end-of-turn) are targets."""
from __future__ import annotations

import pytest

from tuneforge.data.encode import IGNORE_INDEX, encode_chat, encode_completion, encode_text
from tuneforge.models.tiny import make_tokenizer

CONVO = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]}


def target_runs(tokenizer, example) -> list[str]:
    """Decode each contiguous run of target tokens."""
    runs, current = [], []
    for tok_id, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == tok_id
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_chatml_targets_are_replies_plus_end_of_turn():
    tok = make_tokenizer("llama")
    ex = encode_chat(tok, CONVO)
    assert target_runs(tok, ex) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


def test_phi3_targets_include_end_and_final_eos():
    tok = make_tokenizer("phi3")
    ex = encode_chat(tok, CONVO)
    # Phi-3's template ends a conversation with eos: the last reply learns to emit it.
    assert target_runs(tok, ex) == ["Paris.<|end|>\n", "Rome.<|end|>\n<|endoftext|>"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_weight_zero_turn_is_not_a_target(arch):
    tok = make_tokenizer(arch)
    convo = {"messages": [dict(m) for m in CONVO["messages"]]}
    convo["messages"][2]["weight"] = 0
    runs = target_runs(tok, encode_chat(tok, convo))
    assert len(runs) == 1 and runs[0].startswith("Rome.")


def test_prompt_text_never_a_target():
    tok = make_tokenizer("llama")
    ex = encode_chat(tok, CONVO)
    text = "".join(target_runs(tok, ex))
    for m in CONVO["messages"]:
        if m["role"] != "assistant":
            assert m["content"] not in text


def test_chat_without_template_is_a_clear_error():
    from tuneforge.errors import DataError

    tok = make_tokenizer("llama")
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        encode_chat(tok, CONVO)


def test_completion_loss_on_completion_and_eos_only():
    tok = make_tokenizer("llama")
    ex = encode_completion(tok, {"prompt": "Q: 1+1?\nA:", "completion": " 2"})
    assert target_runs(tok, ex) == [" 2" + tok.eos_token]
    assert tok.decode(ex.input_ids).startswith("Q: 1+1?")


def test_text_loss_on_everything():
    tok = make_tokenizer("llama")
    ex = encode_text(tok, {"text": "domain words"})
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "domain words" + tok.eos_token


@pytest.mark.slow
def test_smollm2_real_tokenizer_masks(smollm2_tokenizer):
    # pad == eos == <|im_end|> here: masks come from labels, never from pad ids.
    ex = encode_chat(smollm2_tokenizer, CONVO)
    assert target_runs(smollm2_tokenizer, ex) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


# Llama-2 / Mistral style: the template itself refuses conversations whose roles do not alternate.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_exceptions_become_data_errors_naming_file_and_line():
    from tuneforge.data.encode import encode_records
    from tuneforge.errors import DataError, Problem

    tok = make_tokenizer("llama")
    tok.chat_template = ALTERNATING_TEMPLATE
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    two_users = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                              {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError) as e:
        encode_records(tok, "chat", [good, two_users, good, two_users], [1, 2, 5, 7], 512, source="train.jsonl")
    failed = "the chat template failed: Conversation roles must alternate user/assistant/user/assistant/..."
    assert e.value.problems == [Problem("train.jsonl", 2, "messages", failed), Problem("train.jsonl", 7, "messages", failed)]
    assert f"\n  train.jsonl line 2: messages: {failed}\n  train.jsonl line 7: messages: {failed}" in str(e.value)
    # without a file name the line is still named; the old positional call still works
    with pytest.raises(DataError, match="^data: 1 example.*\n  line 2: messages: the chat template failed: Conv"):
        encode_records(tok, "chat", [good, two_users], [1, 2], 512, "truncate", None)
    assert len(encode_records(tok, "chat", [good], [1], 512, "truncate", None).examples) == 1


def test_reply_first_is_a_data_error_not_a_crash():
    # transformers raises ValueError("Cannot apply chat template to an empty conversation") for the prompt before it
    from tuneforge.data.encode import encode_records
    from tuneforge.errors import DataError, Problem

    reply_first = {"messages": [{"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError) as e:
        encode_records(make_tokenizer("llama"), "chat", [reply_first], [4], 512, source="train.jsonl")
    assert e.value.problems == [Problem("train.jsonl", 4, "messages", "the chat template failed: Cannot apply chat "
                                        "template to an empty conversation. Provide at least one message.")]
