"""Every validation problem names its file, line and field, and all are reported at once."""
from __future__ import annotations

import json
import re

import pytest

from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import DataError

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path, *lines: str | bytes, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def chat(*messages) -> str:
    return json.dumps({"messages": list(messages)})


def problems(report) -> list[str]:
    return [str(p) for p in report.errors]


@pytest.mark.parametrize("line, field, fragment", [
    ("{bad json", "json", "invalid JSON"),
    ("[1, 2]", "json", "expected a JSON object, got list"),
    ('{"msgs": []}', "messages", "missing"),
    ('{"messages": "hi"}', "messages", "non-empty list of messages, got string"),
    ('{"messages": []}', "messages", "got an empty list"),
    (chat("hello", {"role": "assistant", "content": "x"}), "messages[0]", "must be an object"),
    (chat({"content": "x"}, {"role": "assistant", "content": "y"}), "messages[0].role", "missing"),
    (chat({"role": 3, "content": "x"}, {"role": "assistant", "content": "y"}), "messages[0].role", "must be a string, got int"),
    (chat({"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}), "messages[0].role", "unknown role 'robot'"),
    (chat({"role": "user"}, {"role": "assistant", "content": "y"}), "messages[0].content", "missing"),
    (chat({"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}), "messages[0].content[0]", "must be a text part"),
    (chat({"role": "user", "content": {"x": 1}}, {"role": "assistant", "content": "y"}), "messages[0].content", "must be a string or a list of text parts, got object"),
    (chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}), "messages[1].content", "empty"),
    (chat({"role": "user", "content": "x"}), "messages", "no assistant turn to train on"),
    (chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}), "messages", "no assistant turn"),
    (chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}), "messages[1].weight", "must be 0 or 1"),
    (chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}), "messages[1].weight", "must be 0 or 1"),
    (chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 1.0}), "messages[1].weight", "must be 0 or 1"),
    (chat({"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}), "messages[0].weight", "only applies to assistant"),
    (chat({"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}), "messages[1].role", "system message must come first"),
])
def test_chat_problem_names_line_and_field(tmp_path, line, field, fragment):
    path = write(tmp_path, json.dumps(GOOD_CHAT), line)  # the bad record is on line 2
    report = validate_jsonl(path, "chat")
    assert not report.ok
    assert any(p.startswith(f"{path} line 2: {field}: ") and fragment in p for p in problems(report)), problems(report)
    assert report.lines == [1] and len(report.records) == 1


@pytest.mark.parametrize("task, line, field, fragment", [
    ("completion", '{"prompt": "q"}', "completion", "missing"),
    ("completion", '{"prompt": 1, "completion": "a"}', "prompt", "must be a string, got int"),
    ("completion", '{"prompt": "q", "completion": " "}', "completion", "empty"),
    ("text", '{"txt": "x"}', "text", "missing"),
    ("text", '{"text": null}', "text", "must be a string, got null"),
    ("text", '{"text": ""}', "text", "empty"),
])
def test_other_tasks(tmp_path, task, line, field, fragment):
    good = {"completion": '{"prompt": "", "completion": "a"}', "text": '{"text": "t"}'}[task]
    path = write(tmp_path, good, line)
    report = validate_jsonl(path, task)
    assert any(p.startswith(f"{path} line 2: {field}: ") and fragment in p for p in problems(report)), problems(report)


def test_all_problems_at_once_and_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "oops", "", json.dumps(GOOD_CHAT), "[]", chat({"role": "user", "content": "x"}))
    report = validate_jsonl(path, "chat")
    assert [p.line for p in report.errors] == [1, 4, 5]
    assert report.lines == [3]


def test_non_utf8_line_reported_and_rest_validated(tmp_path):
    path = write(tmp_path, json.dumps(GOOD_CHAT), b'{"messages": "\xff\xfe"}', "not json")
    report = validate_jsonl(path, "chat")
    msgs = problems(report)
    assert msgs[0].startswith(f"{path} line 2: encoding: not UTF-8 (byte 0xff")
    assert msgs[1].startswith(f"{path} line 3: json:")
    assert report.lines == [1]


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode() + b"\n")
    assert validate_jsonl(path, "chat").ok


def test_empty_and_missing_files(tmp_path):
    path = write(tmp_path, "", "   ")
    report = validate_jsonl(path, "chat")
    assert problems(report) == [f"{path}: file: file is empty: expected one JSON chat example per line"]
    with pytest.raises(DataError, match="not found"):
        validate_jsonl(tmp_path / "missing.jsonl", "chat")
    with pytest.raises(DataError, match="unknown task 'chatty'; choose one of: chat, completion, text"):
        validate_jsonl(path, "chatty")


def test_duplicates_and_unknown_keys_warn(tmp_path):
    rec = {"messages": [{"role": "user", "content": "x", "contnet": "?"}, {"role": "assistant", "content": "y"}]}
    path = write(tmp_path, json.dumps(rec), json.dumps(GOOD_CHAT), json.dumps(rec))
    report = validate_jsonl(path, "chat")
    assert report.ok and len(report.records) == 3
    warnings = [str(w) for w in report.warnings]
    assert f"{path} line 3: record: duplicate of line 1" in warnings
    assert any(w.startswith(f"{path} line 1: messages[0].contnet: unknown key 'contnet' (did you mean 'content'?)")
               for w in warnings)


def test_raise_if_errors_lists_and_truncates(tmp_path):
    path = write(tmp_path, *["nope"] * 7)
    report = validate_jsonl(path, "chat")
    with pytest.raises(DataError) as e:
        report.raise_if_errors(limit=5)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 7 problem(s) in chat data:")
    assert f"{path} line 5: json" in msg and f"{path} line 6" not in msg
    assert "... and 2 more" in msg and "tuneforge data validate" in msg


# --- good files, exact messages, and files that must not crash the validator -------------------------------------

@pytest.mark.parametrize("task, records", [
    ("chat", [GOOD_CHAT, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a", "weight": 0},
                                       {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "weight": 1}]}]),
    ("completion", [{"prompt": "", "completion": "a"}, {"prompt": "q", "completion": "b"}]),
    ("text", [{"text": "one"}, {"text": "two"}]),
])
def test_good_file_per_task(tmp_path, task, records):
    path = tmp_path / "good.jsonl"  # CRLF endings and blank lines are fine; line numbers still count them
    path.write_bytes(b"\r\n".join([json.dumps(records[0]).encode(), b"", b"  ", json.dumps(records[1]).encode()]))
    report = validate_jsonl(str(path), task)
    assert report.ok and not report.warnings
    assert report.records == records and report.lines == [1, 4]
    assert (report.path, report.task) == (str(path), task)
    report.raise_if_errors()  # nothing to raise


def test_json_error_quotes_the_parser(tmp_path):
    path = write(tmp_path, '{"text": "a"}', '{"text": "b"}', '{"prompt": "a" "completion": "b"}')
    assert problems(validate_jsonl(path, "completion"))[-1] == (
        f"{path} line 3: json: invalid JSON: Expecting ',' delimiter at column 16")


@pytest.mark.parametrize("task, line, field, fragment", [
    ("completion", '{"completion": "a"}', "prompt", 'missing; a completion example is {"prompt": "...", "completion": "..."}'),
    ("completion", '{"prompt": "q", "completion": 7}', "completion", "must be a string, got int"),
    ("completion", '{"prompt": "q", "completion": {"a": 1}}', "completion", "must be a string, got object"),
    ("text", '{"text": ["x"]}', "text", "must be a string, got list"),
    ("text", '{"text": " \\n\\t"}', "text", "empty"),
    ("chat", '{"messages": null}', "messages", "got null"),
    ("chat", chat({"role": "asistant", "content": "y"}), "messages[0].role", "did you mean 'assistant'?"),
    ("chat", chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}),
     "messages[1].weight", "got boolean true"),
    ("chat", chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 1.0}),
     "messages[1].weight", "got float 1.0"),
    ("chat", chat({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": "1"}),
     "messages[1].weight", "got string \"1\""),
    ("chat", chat({"role": "system", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}),
     "messages[0].weight", "only applies to assistant turns"),
    ("chat", chat({"role": "user", "content": "x"}, {"role": "assistant"}), "messages[1].content", "missing"),
])
def test_more_problems_on_line_3(tmp_path, task, line, field, fragment):
    good = {"chat": json.dumps(GOOD_CHAT), "completion": '{"prompt": "", "completion": "a"}', "text": '{"text": "t"}'}
    path = write(tmp_path, good[task], "", line)
    report = validate_jsonl(path, task)
    assert any(p.startswith(f"{path} line 3: {field}: ") and fragment in p for p in problems(report)), problems(report)
    assert report.lines == [1]


def test_every_problem_in_one_record_is_reported(tmp_path):
    line = chat({"role": "user", "content": 5, "weight": 1}, {"role": "user", "content": "x"},
                {"role": "system", "content": "late"})
    path = write(tmp_path, line)
    fields = [p.field for p in validate_jsonl(path, "chat").errors]
    # "no assistant turn" too, so the user is not surprised by it on the second run
    assert fields == ["messages[0].content", "messages[0].weight", "messages[2].role", "messages"]


def test_no_assistant_claim_skipped_when_a_broken_turn_may_be_the_assistant(tmp_path):
    for msgs in ([{"role": "user", "content": "x"}, "assistant: hi"],
                 [{"role": "user", "content": "x"}, {"content": "y"}],
                 [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]):
        report = validate_jsonl(write(tmp_path, chat(*msgs)), "chat")
        assert report.errors and "messages" not in [p.field for p in report.errors], problems(report)


def test_not_utf8_names_byte_offset_and_other_lines_survive(tmp_path):
    path = write(tmp_path, '{"text": "a"}', '{"text": "b"}', b"\xff\xfe", b'{"text": "caf\xe9"}', '{"text": "c"}')
    report = validate_jsonl(path, "text")
    assert problems(report) == [
        f"{path} line 3: encoding: not UTF-8 (byte 0xff at offset 0); re-save the file as UTF-8",
        f"{path} line 4: encoding: not UTF-8 (byte 0xe9 at offset 13); re-save the file as UTF-8",
    ]
    assert report.lines == [1, 2, 5]


@pytest.mark.parametrize("data", [b"", b"\n\n", b"\xef\xbb\xbf", b" \t\r\n\r\n"])
def test_empty_file_variants(tmp_path, data):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(data)
    report = validate_jsonl(path, "text")
    assert [(p.line, p.field) for p in report.errors] == [(None, "file")]
    assert str(report.errors[0]) == f"{path}: file: file is empty: expected one JSON text example per line"


def test_unreadable_paths_raise_data_error_naming_them(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: data file not found$"):
        validate_jsonl(missing, "chat")
    with pytest.raises(DataError, match="is a folder"):
        validate_jsonl(tmp_path, "chat")


def test_pathological_json_is_a_problem_not_a_crash(tmp_path):
    path = write(tmp_path, "[" * 100_000, '{"text": ' + "9" * 5000 + "}", '{"text": NaN}')
    report = validate_jsonl(path, "text")
    assert [(p.line, p.field) for p in report.errors] == [(1, "json"), (2, "json"), (3, "text")]
    assert "got float" in str(report.errors[2])


def test_unknown_record_keys_warn_with_and_without_suggestion(tmp_path):
    path = write(tmp_path, '{"prompt": "q", "completion": "a", "completon": "?", "source": "web"}')
    report = validate_jsonl(path, "completion")
    assert report.ok and report.lines == [1]
    assert [str(w) for w in report.warnings] == [
        f"{path} line 1: completon: unknown key 'completon' (did you mean 'completion'?); it is ignored",
        f"{path} line 1: source: unknown key 'source'; it is ignored",
    ]


def test_duplicates_compare_canonically_and_only_against_valid_records(tmp_path):
    path = write(tmp_path, '{"text": "x", "id": 1}', '{"text": "", "id": 1}', '{"id": 1, "text": "x"}',
                 '{"text": "", "id": 1}')
    report = validate_jsonl(path, "text")
    assert report.lines == [1, 3] and report.records[0] == report.records[1]
    dupes = [str(w) for w in report.warnings if w.field == "record"]
    assert dupes == [f"{path} line 3: record: duplicate of line 1"]


def test_raise_if_errors_format(tmp_path):
    path = write(tmp_path, "nope", '{"text": 1}')
    report = validate_jsonl(path, "text")
    with pytest.raises(DataError) as e:
        report.raise_if_errors()
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 2 problem(s) in text data:"
    assert [l.strip() for l in lines[1:3]] == [str(p) for p in report.errors]
    assert len(lines) == 4 and "and run again" in lines[3] and "more" not in str(e.value)
    with pytest.raises(DataError, match=r"\.\.\. and 1 more"):
        report.raise_if_errors(limit=1)


@pytest.mark.parametrize("first, role", [
    ({"role": "assistant", "content": "Hello!"}, "assistant"),
    ({"role": "tool", "tool_call_id": "call_1", "content": "21"}, "tool"),
])
def test_conversation_must_start_with_system_or_user(tmp_path, first, role):
    # Training renders the prompt before each reply; before a first reply there is none to render.
    path = write(tmp_path, json.dumps(GOOD_CHAT), chat(first, {"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": "y"}))
    report = validate_jsonl(path, "chat")
    assert problems(report) == [
        f"{path} line 2: messages[0].role: a conversation must start with a system or user message, got {role}"]


def test_only_an_assistant_message_is_rejected(tmp_path):
    path = write(tmp_path, chat({"role": "assistant", "content": "Hello!"}))
    assert problems(validate_jsonl(path, "chat")) == [
        f"{path} line 1: messages[0].role: a conversation must start with a system or user message, got assistant"]


def test_raise_if_errors_hint_names_the_labels(tmp_path):
    path = write(tmp_path, '{"text": "good", "label": "pos"}', '{"text": "bad", "label": "negative"}')
    report = validate_jsonl(path, "classification", ["pos", "neg", "very bad"])
    with pytest.raises(DataError) as e:
        report.raise_if_errors()
    assert f"(see `tuneforge data validate {path} --task classification --labels 'pos,neg,very bad'`)" in str(e.value)
