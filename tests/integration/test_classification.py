"""Classification: format validation against the spec's labels, label-scoring evaluation, report."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_spec, write_jsonl
from tuneforge import api
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import DataError, SpecError

LABELS = ["pos", "neg"]
ROWS = [{"text": "good great fine", "label": "pos"}, {"text": "bad awful poor", "label": "neg"},
        {"text": "great good", "label": "pos"}, {"text": "poor bad", "label": "neg"}] * 2


def test_labels_are_validated(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neutrl"},
                                              {"text": "z"}, {"text": "w", "label": 3}])
    report = validate_jsonl(path, "classification", LABELS)
    msgs = [str(p) for p in report.errors]
    assert any(m.startswith(f"{path} line 2: label: 'neutrl' is not one of the spec's labels") for m in msgs)
    assert any(m.startswith(f"{path} line 3: label: missing") for m in msgs)
    assert any(m.startswith(f"{path} line 4: label: must be a string, got int") for m in msgs)
    assert report.lines == [1]


def test_spec_needs_labels(tiny_models, tmp_path):
    spec = tiny_spec(tiny_models["llama"], tmp_path / "t.jsonl", tmp_path / "run")
    spec["task"] = "classification"
    with pytest.raises(SpecError, match="needs `labels"):
        api.train(spec, progress=False)


def test_train_eval_report(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held = write_jsonl(tmp_path / "held.jsonl", ROWS[:4])
    spec = tiny_spec(tiny_models["qwen2"], train, tmp_path / "run", max_steps=40, batch_size=8, lr=1e-2)
    spec.update(task="classification", labels=LABELS, eval={"data": str(held)})
    spec["data"]["prompt_template"] = "Review: {text}\nSentiment:"
    s = api.train(spec, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    tuned = report["fine_tuned"]
    assert {"accuracy", "macro_f1", "loss", "perplexity"} <= set(tuned)
    assert tuned["accuracy"] == 1.0  # a memorisable two-label set
    assert all(o["output"] in LABELS for o in tuned["outputs"])
    assert "| accuracy |" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(DataError):
        api.evaluate(tmp_path / "run", write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "meh"}]))
    assert s.status == "succeeded"
    # The run remembers its template: evaluating with the default template instead gives a higher loss.
    assert api.load(tmp_path / "run").prompt_template == "Review: {text}\nSentiment:"
    other = api.evaluate(tmp_path / "run", held, prompt_template="Text: {text}\nLabel:")
    assert other["loss"] > tuned["loss"]
