"""QA and translation: formats, loss on the answer only, and their metrics end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_spec, write_jsonl
from tuneforge import api
from tuneforge.data.encode import IGNORE_INDEX, encode_example
from tuneforge.data.validate import validate_jsonl
from tuneforge.models.tiny import make_tokenizer

QA = [{"question": "Capital of France?", "answer": "Paris", "context": "Paris is the capital of France."},
      {"question": "Two plus two?", "answer": "four"}] * 4
TRANSLATION = [{"source": "good morning", "target": "bonjour", "source_lang": "English", "target_lang": "French"},
               {"source": "thank you", "target": "merci", "source_lang": "English", "target_lang": "French"}] * 4


@pytest.mark.parametrize("task, record, answer", [("qa", QA[0], " Paris"), ("translation", TRANSLATION[0], " bonjour")])
def test_loss_on_answer_only(task, record, answer):
    tok = make_tokenizer("llama")
    ex = encode_example(tok, task, record)
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


def test_creative_accepts_both_formats_and_reports_diversity(tiny_models, tmp_path):
    rows = [{"prompt": "A poem about rain:", "completion": " drops on the roof, soft and slow"},
            {"text": "Once upon a time a small robot learned to paint the sea at night"}] * 4
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"text": ""}])
    msgs = [str(p) for p in validate_jsonl(bad, "creative").errors]
    assert msgs[0].startswith(f"{bad} line 1: completion: missing") and msgs[1].startswith(f"{bad} line 2: text:")
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = tiny_spec(tiny_models["mistral"], train, tmp_path / "run", max_steps=10, batch_size=8, lr=1e-2)
    spec.update(task="creative", eval={"data": str(train), "max_new_tokens": 8})
    api.train(spec, progress=False)
    tuned = json.loads((tmp_path / "run" / "report.json").read_text())["fine_tuned"]
    from tuneforge.evaluation.metrics import distinct_n

    outputs = [o["output"] for o in tuned["outputs"]]
    assert len(outputs) == len(rows) and tuned["perplexity"] > 1
    # The report's diversity is that of the samples it shows, not a number from elsewhere.
    assert tuned["distinct_1"] == pytest.approx(distinct_n(outputs, 1))
    assert tuned["distinct_2"] == pytest.approx(distinct_n(outputs, 2))


NER_BIO = {"tokens": ["Alice", "flew", "to", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]}
NER_TEXT = {"text": "Bob met Carol in Rome.", "entities": [{"start": 0, "end": 3, "label": "PER"},
                                                                 {"start": 8, "end": 13, "label": "PER"},
                                                                 {"start": 17, "end": 21, "label": "LOC"}]}


def test_ner_formats_targets_and_span_parsing():
    from tuneforge.data.ner import answer_text, parse_entities, text_and_spans

    assert answer_text(NER_BIO) == "PER: Alice; LOC: New York"
    assert answer_text(NER_TEXT) == "PER: Bob; PER: Carol; LOC: Rome"
    text, spans = text_and_spans(NER_BIO)
    assert [text[s:e] for s, e, _ in spans] == ["Alice", "New York"]
    # A partial span ("York" for "New York") is a different span: entity F1 counts it as a miss.
    assert parse_entities("PER: Alice; LOC: York; ORG: Mars", text) == [(0, 5, "PER"), (18, 22, "LOC")]
    tok = make_tokenizer("llama")
    ex = encode_example(tok, "ner", NER_TEXT)
    assert tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]).startswith(" PER: Bob;")


def test_ner_validation(tmp_path):
    path = write_jsonl(tmp_path / "ner.jsonl", [
        NER_BIO, {"tokens": ["a", "b"], "tags": ["O"]}, {"tokens": ["a"], "tags": ["PER"]},
        {"text": "abc", "entities": [{"start": 2, "end": 9, "label": "X"}]}, NER_TEXT])
    report = validate_jsonl(path, "ner")
    msgs = [str(p) for p in report.errors]
    assert msgs[0].startswith(f"{path} line 2: tags: must be a list of one BIO tag per token (2 tokens, 1 tags)")
    assert msgs[1].startswith(f"{path} line 3: tags[0]: 'PER' is not a BIO tag")
    assert msgs[2].startswith(f"{path} line 4: entities[0]: needs integer start < end within the text (0..3)")
    assert report.lines == [1, 5]


def test_ner_train_and_entity_f1(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [NER_BIO, NER_TEXT] * 4)
    spec = tiny_spec(tiny_models["llama"], train, tmp_path / "run", max_steps=40, batch_size=8, lr=1e-2)
    spec.update(task="ner", eval={"data": str(train), "max_new_tokens": 40})
    api.train(spec, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    assert {"entity_precision", "entity_recall", "entity_f1"} <= set(tuned)
    assert tuned["loss"] < base["loss"] and tuned["entity_f1"] >= base["entity_f1"]


def test_chat_template_override_trains_saves_and_loads(tiny_models, tmp_path):
    from tests.conftest import CHAT_RECORDS
    from tuneforge.data.encode import encode_chat
    from tuneforge.spec import load_spec

    template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    train = write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS)
    spec = tiny_spec(tiny_models["llama"], train, tmp_path / "run", max_steps=2)
    spec["data"]["chat_template"] = template
    api.train(spec, progress=False)
    loaded = api.load(tmp_path / "run")
    assert loaded.tokenizer.chat_template == template
    ex = encode_chat(loaded.tokenizer, CHAT_RECORDS[0])
    assert loaded.tokenizer.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]) == "Paris.\n"
    base = api.load(tiny_models["llama"], like=load_spec(tmp_path / "run" / "spec.yaml"))
    assert base.tokenizer.chat_template == template
