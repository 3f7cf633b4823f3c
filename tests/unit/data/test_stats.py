"""`tuneforge data validate`: the options `train` has (--labels, --prompt-template, --spec), the hint of a
failed run being a command that shows every problem, and tokenizer checks (tool calls, templates)."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from tuneforge import cli
from tuneforge.data.encode import encode_example
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import DataError
from tuneforge.models.tiny import make_config, make_tokenizer
from tests.unit.data.test_chat import TOOL_CONVO, TOOL_TEMPLATE


def write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A model folder with only a tokenizer (and config.json): enough for `data validate`."""
    folder = tmp_path / "tiny-tok"
    tok = make_tokenizer("llama")
    tok.save_pretrained(folder)
    make_config("llama", len(tok)).save_pretrained(folder)
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_hint_of_a_label_error_is_a_command_that_shows_it(tmp_path, capsys):
    path = write(tmp_path / "cls.jsonl", {"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"},
                 {"text": "bad", "label": "nag"})
    report = validate_jsonl(path, "classification", ["pos", "neg"])
    assert len(report.errors) == 2
    with pytest.raises(DataError) as e:
        report.raise_if_errors()
    command = re.search(r"see `([^`]+)`", str(e.value)).group(1)
    assert command == f"tuneforge data validate {path} --task classification --labels pos,neg"
    argv = shlex.split(command)
    rc, out, _ = run_cli(capsys, *argv[1:], "--model", "none")
    assert rc == 1
    for problem in report.errors:
        assert str(problem) in out.splitlines()


def test_labels_option(tmp_path, capsys):
    path = write(tmp_path / "cls.jsonl", {"text": "good", "label": "pos"}, {"text": "bad", "label": "nag"})
    rc, out, _ = run_cli(capsys, "data", "validate", path, "--task", "classification", "--labels", "pos, neg",
                         "--model", "none")
    assert rc == 1
    assert f"{path} line 2: label: 'nag' is not one of the spec's labels (did you mean 'neg'?): pos, neg" in out


def test_prompt_template_option_is_used_for_token_counts_and_checked(tmp_path, tokenizer_dir, capsys):
    rec = {"text": "good", "label": "pos"}
    path = write(tmp_path / "cls.jsonl", rec)
    template = "Review: {text}\nSentiment:"
    rc, out, _ = run_cli(capsys, "data", "validate", path, "--task", "classification", "--labels", "pos,neg",
                         "--prompt-template", template, "--model", tokenizer_dir)
    ex = encode_example(make_tokenizer("llama"), "classification", rec, template)
    assert ex.num_targets == len(" pos") + 1  # byte tokens + eos
    assert rc == 0 and f"tokens {len(ex.input_ids):,} (targets {ex.num_targets})" in out
    rc, _, err = run_cli(capsys, "data", "validate", path, "--task", "classification", "--prompt-template",
                         "{label}", "--model", "none")
    assert rc == 2 and "--prompt-template: unknown field(s) label for task 'classification'" in err


def test_spec_option_validates_train_and_validation_files(tmp_path, tokenizer_dir, capsys):
    train = write(tmp_path / "train.jsonl", {"text": "good", "label": "pos"}, {"text": "bad", "label": "nag"})
    valid = write(tmp_path / "valid.jsonl", {"text": "fine", "label": "pos"}, {"text": "meh"})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"model": str(tokenizer_dir), "task": "classification", "labels": ["pos", "neg"],
                                    "data": {"train": str(train), "validation": str(valid)}}))
    rc, out, _ = run_cli(capsys, "data", "validate", "--spec", spec)
    assert rc == 1
    assert f"{train} line 2: label: 'nag' is not one of the spec's labels (did you mean 'neg'?): pos, neg" in out
    assert f"{valid} line 2: label: missing" in out


def test_spec_option_uses_model_template_and_max_seq_len(tmp_path, tokenizer_dir, capsys):
    records = [{"text": "good", "label": "pos"}, {"text": "a much longer review text here", "label": "neg"}]
    train = write(tmp_path / "train.jsonl", *records)
    spec = tmp_path / "job.yaml"
    template = "Review: {text}\nSentiment:"
    spec.write_text(yaml.safe_dump({"model": str(tokenizer_dir), "task": "classification", "labels": ["pos", "neg"],
                                    "data": {"train": str(train), "prompt_template": template},
                                    "training": {"max_seq_len": 30}}))
    rc, out, _ = run_cli(capsys, "data", "validate", "--spec", spec, "--json")
    assert rc == 0
    [result] = json.loads(out)
    lengths = [len(encode_example(make_tokenizer("llama"), "classification", r, template).input_ids) for r in records]
    assert (result["file"], result["task"], result["tokens"], result["max_seq_len"]) == (str(train), "classification",
                                                                                        sum(lengths), 30)
    assert result["over_max_seq_len"] == sum(n > 30 for n in lengths) == 1


def test_no_file_and_no_spec_is_a_usage_error(capsys):
    rc, _, err = run_cli(capsys, "data", "validate", "--model", "none")
    assert rc == 2 and "give a FILE to validate, or --spec JOB.yaml" in err


def test_tool_calls_a_template_cannot_render_are_errors_with_a_tokenizer(tmp_path, tokenizer_dir, capsys):
    path = write(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}, TOOL_CONVO)
    rc, out, _ = run_cli(capsys, "data", "validate", path, "--model", tokenizer_dir)
    assert rc == 1
    assert (f"{path} line 2: messages[2].tool_calls: the chat template of this model does not render tool calls; "
            "use a model whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one that does") in out
    assert f"{path} line 2: tools: the chat template of this model does not render tool definitions" in out
    rc, out, _ = run_cli(capsys, "data", "validate", path, "--model", "none")  # structure alone is fine
    assert rc == 0 and "OK, 2 chat examples" in out


def test_spec_chat_template_is_the_one_checked(tmp_path, tokenizer_dir, capsys):
    train = write(tmp_path / "train.jsonl", TOOL_CONVO)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"model": str(tokenizer_dir), "task": "chat",
                                    "data": {"train": str(train), "chat_template": TOOL_TEMPLATE}}))
    rc, out, _ = run_cli(capsys, "data", "validate", "--spec", spec)
    assert rc == 0 and f"{train}: OK, 1 chat examples" in out
