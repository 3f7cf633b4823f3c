"""NER records: character-span checks, and the data package standing on its own (no evaluate imports)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import tuneforge.data
from tuneforge.data.ner import check_ner, text_and_spans
from tuneforge.data.validate import validate_jsonl

TEXT = "We met in Paris, France."  # Paris 10..15, France 17..23


def ent(start, end, label="LOC"):
    return {"start": start, "end": end, "label": label}


@pytest.mark.parametrize("entities, expected", [
    ([ent(10, 15), ent(17, 23), ent(10, 23)],
     [("entities[2]", "overlaps entities[0] (10..15 'Paris')"), ("entities[2]", "overlaps entities[1] (17..23 'France')")]),
    ([ent(10, 15), ent(12, 19, "ORG")], [("entities[1]", "overlaps entities[0] (10..15 'Paris')")]),
    ([ent(10, 15), ent(17, 23), ent(10, 15)], [("entities[2]", "duplicates entities[0] (10..15 'Paris')")]),
    ([ent(10, 15), ent(10, 15, "ORG")], [("entities[1]", "has the same span as entities[0] (10..15 LOC 'Paris')")]),
    ([ent(17, 23), ent(10, 15), ent(15, 17, "X")], []),  # touching is not overlapping; any order
    ([ent(10, 15), ent(12, 99), ent(12, 14)],  # a broken entity is reported once, not compared
     [("entities[1]", "needs integer start < end within the text (0..24) and a label"),
      ("entities[2]", "overlaps entities[0] (10..15 'Paris')")]),
])
def test_overlapping_and_duplicate_spans(entities, expected):
    assert check_ner({"text": TEXT, "entities": entities}) == expected


def test_overlap_reported_at_file_line_and_field(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"text": TEXT, "entities": [ent(10, 15)]}) + "\n"
                    + json.dumps({"text": TEXT, "entities": [ent(10, 15), ent(17, 23), ent(10, 23)]}) + "\n")
    report = validate_jsonl(path, "ner")
    assert [str(p) for p in report.errors] == [f"{path} line 2: entities[2]: overlaps entities[0] (10..15 'Paris')",
                                               f"{path} line 2: entities[2]: overlaps entities[1] (17..23 'France')"]
    assert report.lines == [1]


def test_bio_to_spans_lives_in_data_and_metrics_reexports_it():
    from tuneforge.data.ner import bio_to_spans
    from tuneforge.evaluation import metrics

    assert metrics.bio_to_spans is bio_to_spans and "bio_to_spans" in metrics.__all__
    assert text_and_spans({"tokens": ["Ann", "met", "Bo", "Li"], "tags": ["B-PER", "O", "B-PER", "I-PER"]}) == (
        "Ann met Bo Li", [(0, 3, "PER"), (8, 13, "PER")])


def test_data_never_imports_evaluate():
    # imports flow evaluate -> data; a lazy import inside a function counts too
    offenders = []
    for path in sorted(Path(tuneforge.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("tuneforge.evaluation")]
    assert offenders == []
