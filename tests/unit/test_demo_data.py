from __future__ import annotations

import json

from tuneforge.demo_data import make_examples, score_answer, summarise, write_demo_data


def test_deterministic_and_disjoint(tmp_path):
    assert make_examples(30, seed=1) == make_examples(30, seed=1)
    assert make_examples(30, seed=1) != make_examples(30, seed=2)
    paths = write_demo_data(tmp_path, n_train=50, n_heldout=20, n_valid=10)
    tickets = {name: {json.loads(l)["messages"][1]["content"] for l in p.read_text().splitlines()}
               for name, p in paths.items()}
    assert [len(t) for t in tickets.values()] == [50, 10, 20]
    assert not (tickets["train"] & tickets["heldout"]) and not (tickets["train"] & tickets["valid"])


def test_references_score_perfectly():
    for row in make_examples(50, seed=0):
        ref = row["messages"][-1]["content"]
        assert score_answer(ref, ref) == {"valid_format": True, "category_correct": True,
                                          "urgency_correct": True, "exact": True}


def test_malformed_outputs_are_invalid():
    ref = json.dumps({"category": "billing", "urgency": "high", "summary": "Double charge"})
    bad = [
        "This ticket is about billing and is urgent.",
        json.dumps({"category": "billing", "urgency": "high", "summary": "x", "extra": 1}),
        json.dumps({"category": "refunds", "urgency": "high", "summary": "x"}),
        "```json\n" + ref + "\n```",
        json.dumps({"urgency": "high", "category": "billing", "summary": "x"}),  # key order is part of the format
    ]
    for out in bad:
        assert score_answer(out, ref)["valid_format"] is False, out
    wrong = score_answer(json.dumps({"category": "shipping", "urgency": "high", "summary": "x"}), ref)
    assert wrong == {"valid_format": True, "category_correct": False, "urgency_correct": True, "exact": False}


def test_summarise():
    scores = [{"valid_format": True, "category_correct": True, "urgency_correct": False, "exact": False},
              {"valid_format": True, "category_correct": True, "urgency_correct": True, "exact": True},
              {"valid_format": False, "category_correct": False, "urgency_correct": False, "exact": False},
              {"valid_format": True, "category_correct": False, "urgency_correct": True, "exact": False}]
    assert summarise(scores) == {"format_rate": 0.75, "category_accuracy": 0.5, "urgency_accuracy": 0.5,
                                 "exact_match": 0.25, "n": 4}
