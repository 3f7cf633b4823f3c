"""Preference data: OpenAI's DPO format and TRL's, validated line by line in the record's own terms, and
encoded with loss on the replies only (masks from the chat template)."""
from __future__ import annotations

import pytest

from tests.conftest import CHAT_RECORDS, write_jsonl
from tuneforge.data.encode import IGNORE_INDEX, encode_example, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.models.tiny import make_tokenizer

pytestmark = pytest.mark.timeout(60)

OPENAI = {"input": {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]},
          "preferred_output": [{"role": "assistant", "content": "4"}],
          "non_preferred_output": [{"role": "assistant", "content": "Let me think... it is 4."}]}
TRL_TEXT = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " four, I believe"}
TRL_MESSAGES = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Colour of the sky?"}],
                "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}]}
MIXED = {"prompt": "Colour of grass?", "chosen": [{"role": "assistant", "content": "Green."}], "rejected": "Blue."}


def errors_of(tmp_path, records, task="preference") -> list[str]:
    return [str(p) for p in validate_jsonl(write_jsonl(tmp_path / "d.jsonl", records), task).errors]


def test_both_formats_validate(tmp_path):
    report = validate_jsonl(write_jsonl(tmp_path / "d.jsonl", [OPENAI, TRL_TEXT, TRL_MESSAGES, MIXED,
                                                             {**OPENAI, "rules": [{"regex": "^[0-9]+$"}]}]),
                            "preference")
    assert report.ok and len(report.records) == 5 and not report.warnings


def test_problems_name_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    bad = [
        {**OPENAI, "non_preferred_output": OPENAI["preferred_output"]},  # 1: identical
        {**TRL_TEXT, "rejected": TRL_TEXT["chosen"]},  # 2: identical
        {**TRL_TEXT, "chosen": "  "},  # 3: empty side
        {**OPENAI, "preferred_output": []},  # 4: empty side
        {"chosen": "a", "rejected": "b"},  # 5: no prompt
        {k: v for k, v in OPENAI.items() if k != "input"},  # 6: no prompt
        {**OPENAI, "preferred_output": [{"role": "assistant", "content": ""}]},  # 7: empty reply
        {**TRL_MESSAGES, "rejected": [{"role": "user", "content": "x"}]},  # 8: a reply that is not the assistant's
        {**TRL_MESSAGES, "prompt": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},  # 9
        {**OPENAI, "rules": [{"regx": "a"}]},  # 10
        CHAT_RECORDS[0],  # 11: supervised data
    ]
    msgs = errors_of(tmp_path, bad)
    expected = [
        (1, "non_preferred_output: identical to preferred_output: nothing to prefer"),
        (2, "rejected: identical to chosen: nothing to prefer"),
        (3, "chosen: is empty: no reply to compare"),
        (4, "preferred_output: must be a non-empty list of assistant messages, got an empty list"),
        (5, "prompt: missing"),
        (6, "input: missing"),
        (7, "preferred_output[0].content: assistant reply is empty"),
        (8, "rejected[0].role: a reply holds assistant turns only, got \"user\""),
        (9, "prompt[1].role: a tool message must follow an assistant turn with tool_calls"),
        (10, "rules[0]: must be one of regex, contains, not_contains"),
        (11, "messages: this is supervised chat data"),
    ]
    for line, text in expected:
        assert any(m.startswith(f"{path} line {line}: {text}") for m in msgs), (line, text, msgs)
    assert len({m.split(":")[0] for m in msgs}) == len(bad)  # every bad line reported, each once at least


def test_preference_data_given_as_chat_is_named(tmp_path):
    msgs = errors_of(tmp_path, [CHAT_RECORDS[0], OPENAI, TRL_MESSAGES], task="chat")
    assert len(msgs) == 2
    assert msgs[0].startswith(f"{tmp_path / 'd.jsonl'} line 2: messages: this is preference data")
    assert "task preference (service: method dpo)" in msgs[0]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_loss_only_on_the_replies(arch):
    tok = make_tokenizer(arch)
    pair = encode_example(tok, "preference", TRL_MESSAGES)
    for side, reply in ((pair.chosen, "Blue."), (pair.rejected, "Green.")):
        targets = [i for i, l in zip(side.input_ids, side.labels) if l != IGNORE_INDEX]
        # the reply and its end of turn (and what the template writes after the last turn), never the prompt's turns
        assert tok.decode(targets) == reply + tok.end_of_turn_token + ("\n<|endoftext|>" if arch == "phi3" else "\n")
        assert "Hello." in tok.decode(side.input_ids)
    prompt_len = len(tok.apply_chat_template(TRL_MESSAGES["prompt"], add_generation_prompt=True,
                                             tokenize=True)["input_ids"])
    assert pair.chosen.input_ids[:prompt_len] == pair.rejected.input_ids[:prompt_len]
    same = encode_example(tok, "preference", {"input": {"messages": TRL_MESSAGES["prompt"]},
                                              "preferred_output": TRL_MESSAGES["chosen"],
                                              "non_preferred_output": TRL_MESSAGES["rejected"]})
    assert same == pair  # the two formats are one thing


def test_plain_text_pairs_train_the_reply_and_eos():
    tok = make_tokenizer("llama")
    pair = encode_example(tok, "preference", TRL_TEXT)
    targets = [i for i, l in zip(pair.rejected.input_ids, pair.rejected.labels) if l != IGNORE_INDEX]
    assert tok.decode(targets) == " four, I believe" + tok.eos_token
    assert tok.decode(pair.chosen.input_ids).startswith("Q: 2+2?\nA:")


def test_overlong_pairs_truncate_both_sides_or_drop():
    tok = make_tokenizer("llama")
    record = {**TRL_TEXT, "rejected": " no" * 40}
    kept = encode_records(tok, "preference", [record], [1], max_seq_len=20)
    assert kept.truncated == 1 and kept.examples[0].rejected.length == 20 and kept.examples[0].chosen.length < 20
    assert encode_records(tok, "preference", [record], [1], max_seq_len=20, overlong="drop").dropped == 1
    short = encode_records(tok, "preference", [record], [1], max_seq_len=8)  # prompt alone fills it: no reply left
    assert short.dropped == 1 and not short.examples


def test_shipped_dataset_prefers_the_reply_that_follows_its_rule(tmp_path):
    from tuneforge.data.preference import normalise
    from tuneforge.data.synthetic import write_dataset
    from tuneforge.evaluation.metrics import rule_checks

    paths = write_dataset("preference", tmp_path)
    for split, path in paths.items():
        report = validate_jsonl(path, "preference")
        assert report.ok and not report.warnings
        for rec in report.records:
            pref = normalise(rec)
            passed = [rule_checks(side[0]["content"], rec["rules"])["passed"] for side in (pref.chosen, pref.rejected)]
            assert passed == [1, 0], rec
    assert len(validate_jsonl(paths["train"], "preference").records) >= 200
    assert len(validate_jsonl(paths["heldout"], "preference").records) >= 100
