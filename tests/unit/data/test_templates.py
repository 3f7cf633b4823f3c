"""Prompt templates: defaults, overrides, and that only the answer is ever trained on."""
from __future__ import annotations

import pytest

from tuneforge.data import templates
from tuneforge.data.encode import IGNORE_INDEX, encode_example, encode_prompt
from tuneforge.models.tiny import make_tokenizer

RECORDS = {
    "classification": ({"text": "Loved it", "label": "pos"}, "pos"),
    "qa": ({"question": "Who?", "answer": "Ann", "context": "Ann did."}, "Ann"),
    "translation": ({"source": "hi", "target": "salut", "source_lang": "en", "target_lang": "fr"}, "salut"),
    "ner": ({"tokens": ["Ann", "ran"], "tags": ["B-PER", "O"]}, "PER: Ann"),
    "completion": ({"prompt": "Q: 1+1", "completion": " 2"}, " 2"),
}


@pytest.mark.parametrize("task", list(RECORDS))
def test_custom_template_changes_prompt_not_answer(task):
    tok = make_tokenizer("llama")
    record, answer = RECORDS[task]
    field = templates.TEMPLATE_FIELDS[task][0]
    custom = f"<<{{{field}}}>> =>"
    default, custom_ex = encode_example(tok, task, record), encode_example(tok, task, record, custom)
    for ex in (default, custom_ex):
        targets = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
        assert targets.strip() == answer.strip() + tok.eos_token
    prompt = tok.decode([i for i, l in zip(custom_ex.input_ids, custom_ex.labels) if l == IGNORE_INDEX])
    assert prompt.startswith((tok.bos_token or "") + "<<") and prompt.endswith(" =>")
    # Inference asks exactly the prompt that training used.
    n_prompt = sum(1 for l in custom_ex.labels if l == IGNORE_INDEX)
    assert encode_prompt(tok, task, record, custom) == custom_ex.input_ids[:n_prompt]


def test_defaults_and_qa_context_block():
    assert templates.fill("qa", {"question": "Who?"}) == "Question: Who?\nAnswer:"
    assert templates.fill("qa", {"question": "Who?", "context": "C."}) == "Context: C.\nQuestion: Who?\nAnswer:"
    assert templates.fill("qa", {"question": "Who?"}, "{context}|{question}") == "|Who?"
    assert templates.fill("classification", "just text") == "Text: just text\nLabel:"
    assert templates.fill("creative", {"text": "Once upon"}, "Story: {prompt}") == "Once upon"


def test_check_template():
    assert templates.check_template("qa", "{question}") is None
    assert "a template may use: text" in templates.check_template("classification", "{label}")
    assert "uses no field" in templates.check_template("ner", "Entities:")
    assert "no prompt template" in templates.check_template("text", "{text}")
    with pytest.raises(ValueError, match="not a plain field name"):
        templates.template_fields("{text[0]}")


@pytest.mark.parametrize("record", ["Ann lives in Paris", {"text": "Ann lives in Paris"},
                                    {"tokens": ["Ann", "lives", "in", "Paris"]}])
def test_ner_prompt_from_bare_text(record):
    # `tuneforge generate RUN --prompt "..."` on a NER run: no entities, only the text to tag
    assert templates.fill("ner", record) == "Text: Ann lives in Paris\nEntities:"
    assert templates.fill("ner", record, "Tag: {text} =>") == "Tag: Ann lives in Paris =>"


def test_ner_encode_prompt_of_bare_text_is_the_training_prompt():
    tok = make_tokenizer("llama")
    full = {"text": "Ann lives in Paris", "entities": [{"start": 0, "end": 3, "label": "PER"}]}
    ex = encode_example(tok, "ner", full)
    n_prompt = sum(1 for l in ex.labels if l == IGNORE_INDEX)
    assert encode_prompt(tok, "ner", "Ann lives in Paris") == ex.input_ids[:n_prompt]
    assert tok.decode(encode_prompt(tok, "ner", "Ann lives in Paris")) == "Text: Ann lives in Paris\nEntities:"
