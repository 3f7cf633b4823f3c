"""QA and translation: formats, loss on the answer only, and their metrics end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_spec, write_jsonl
from tuneforge import api
from tuneforge.data.encode import IGNORE_INDEX, ENCODERS
from tuneforge.data.validate import validate_jsonl
from tuneforge.models.tiny import make_tokenizer

QA = [{"question": "Capital of France?", "answer": "Paris", "context": "Paris is the capital of France."},
      {"question": "Two plus two?", "answer": "four"}] * 4
TRANSLATION = [{"source": "good morning", "target": "bonjour", "source_lang": "English", "target_lang": "French"},
               {"source": "thank you", "target": "merci", "source_lang": "English", "target_lang": "French"}] * 4


@pytest.mark.parametrize("task, record, answer", [("qa", QA[0], " Paris"), ("translation", TRANSLATION[0], " bonjour")])
def test_loss_on_answer_only(task, record, answer):
    tok = make_tokenizer("llama")
    ex = ENCODERS[task](tok, record)
    targets = [i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]
    assert tok.decode(targets) == answer + tok.eos_token
    assert record.get("context", record.get("source")) in tok.decode(ex.input_ids)


def test_format_errors_name_line_and_field(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [QA[1], {"question": "q"}, {"question": "q", "answer": "a", "context": 3}])
    msgs = [str(p) for p in validate_jsonl(qa, "qa").errors]
    assert any(m.startswith(f"{qa} line 2: answer: missing") for m in msgs)
    assert any(m.startswith(f"{qa} line 3: context: must be a string, got int") for m in msgs)
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"source": "a", "target": "b", "source_lang": "en"}])
    assert [str(p).split(": ")[1] for p in validate_jsonl(tr, "translation").errors] == ["target_lang"]


@pytest.mark.parametrize("task, rows, keys", [("qa", QA, {"exact_match", "f1"}),
                                              ("translation", TRANSLATION, {"bleu", "chrf"})])
def test_train_and_evaluate(tiny_models, tmp_path, task, rows, keys):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = tiny_spec(tiny_models["llama"], train, tmp_path / "run", max_steps=30, batch_size=8, lr=1e-2)
    spec.update(task=task, eval={"data": str(train), "max_new_tokens": 6})
    api.train(spec, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    assert keys <= set(tuned) and tuned["loss"] < base["loss"]
    assert len(tuned["outputs"]) == len(rows)
