from __future__ import annotations

import json
import re
from collections import Counter

from tuneforge.demo_data import (CATEGORIES, SYSTEM_PROMPT, make_examples, score_answer, summarise,
                                 write_demo_data)

PERFECT = {"valid_format": True, "category_correct": True, "urgency_correct": True, "exact": True}
HIGH_CUE = re.compile(r"urgent|immediately|today|can't work|third time|!!", re.IGNORECASE)


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_deterministic_for_a_seed(tmp_path):
    assert make_examples(30, seed=1) == make_examples(30, seed=1)
    assert make_examples(30, seed=1) != make_examples(30, seed=2)
    a = write_demo_data(tmp_path / "a", seed=3)
    b = write_demo_data(tmp_path / "b", seed=3)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in ("train", "valid", "heldout"))
    assert _read(a["train"]) == make_examples(160, seed=3)


def test_default_splits_disjoint_and_balanced(tmp_path):
    paths = write_demo_data(tmp_path)
    assert set(paths) == {"train", "valid", "heldout"}
    assert [p.name for p in paths.values()] == ["train.jsonl", "valid.jsonl", "heldout.jsonl"]
    rows = {name: _read(p) for name, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"train": 160, "valid": 20, "heldout": 40}
    tickets = {k: [r["messages"][1]["content"] for r in v] for k, v in rows.items()}
    assert all(len(set(t)) == len(t) for t in tickets.values())
    t, v, h = (set(tickets[k]) for k in ("train", "valid", "heldout"))
    assert not (t & v) and not (t & h) and not (v & h)
    for name, split in rows.items():
        answers = [json.loads(r["messages"][2]["content"]) for r in split]
        cats = Counter(a["category"] for a in answers)
        assert set(cats) == set(CATEGORIES) and max(cats.values()) - min(cats.values()) <= 1, name
        high = sum(a["urgency"] == "high" for a in answers) / len(answers)
        assert 0.3 <= high <= 0.5, (name, high)


def test_records_shape_and_cues():
    for row in make_examples(80, seed=0):
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[0]["content"] == SYSTEM_PROMPT and "json" not in SYSTEM_PROMPT.lower()
        answer_text = msgs[2]["content"]
        assert "\n" not in answer_text
        answer = json.loads(answer_text)
        assert list(answer) == ["category", "urgency", "summary"]
        assert answer_text == json.dumps(answer, ensure_ascii=False)
        assert 3 <= len(answer["summary"].split()) <= 8
        assert bool(HIGH_CUE.search(msgs[1]["content"])) == (answer["urgency"] == "high"), msgs[1]["content"]


def test_references_score_perfectly():
    for row in make_examples(50, seed=0):
        ref = row["messages"][-1]["content"]
        assert score_answer(ref, ref) == PERFECT
        assert score_answer("  " + ref + "\n", ref) == PERFECT  # surrounding whitespace is stripped


def test_malformed_outputs_are_invalid():
    ref = json.dumps({"category": "billing", "urgency": "high", "summary": "Double charge"})
    bad = [
        "This ticket is about billing and is urgent.",
        "",
        json.dumps({"category": "billing", "urgency": "high", "summary": "x", "extra": 1}),
        json.dumps({"category": "billing", "urgency": "high"}),
        json.dumps({"category": "refunds", "urgency": "high", "summary": "x"}),
        json.dumps({"category": "billing", "urgency": "medium", "summary": "x"}),
        json.dumps({"category": "billing", "urgency": "high", "summary": ""}),
        json.dumps({"category": "billing", "urgency": "high", "summary": 3}),
        json.dumps([{"category": "billing", "urgency": "high", "summary": "x"}]),
        "```json\n" + ref + "\n```",
        "```\n" + ref + "\n```",
        ref + " I hope this helps!",
        json.dumps({"urgency": "high", "category": "billing", "summary": "x"}),  # key order is part of the format
    ]
    for out in bad:
        assert score_answer(out, ref) == {"valid_format": False, "category_correct": False,
                                          "urgency_correct": False, "exact": False}, out
    wrong = score_answer(json.dumps({"category": "shipping", "urgency": "high", "summary": "x"}), ref)
    assert wrong == {"valid_format": True, "category_correct": False, "urgency_correct": True, "exact": False}
    other_summary = score_answer(json.dumps({"category": "billing", "urgency": "high", "summary": "Charged 2x"}), ref)
    assert other_summary == PERFECT  # the summary is not compared


def test_summarise():
    scores = [{"valid_format": True, "category_correct": True, "urgency_correct": False, "exact": False},
              {"valid_format": True, "category_correct": True, "urgency_correct": True, "exact": True},
              {"valid_format": False, "category_correct": False, "urgency_correct": False, "exact": False},
              {"valid_format": True, "category_correct": False, "urgency_correct": True, "exact": False}]
    assert summarise(scores) == {"format_rate": 0.75, "category_accuracy": 0.5, "urgency_accuracy": 0.5,
                                 "exact_match": 0.25, "n": 4}
    assert summarise([]) == {"format_rate": 0.0, "category_accuracy": 0.0, "urgency_accuracy": 0.0,
                             "exact_match": 0.0, "n": 0}
