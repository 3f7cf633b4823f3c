"""Every shipped scenario dataset: enough examples, valid for its task, disjoint splits, deterministic."""
from __future__ import annotations

import json

import pytest

from tuneforge.data.synthetic import GENERATORS, write_dataset
from tuneforge.data.tool_calls import write_tool_dataset
from tuneforge.data.validate import validate_jsonl

WRITERS = {**{name: (lambda out, name=name: write_dataset(name, out), name) for name in GENERATORS},
           "tools": (write_tool_dataset, "chat")}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_dataset_is_valid_and_disjoint(tmp_path, name):
    write, task = WRITERS[name]
    paths = write(tmp_path / "a")
    again = write(tmp_path / "b")
    rows = {}
    for split, path in paths.items():
        report = validate_jsonl(path, task)
        assert report.ok and not report.warnings, [str(p) for p in report.errors + report.warnings][:3]
        rows[split] = {json.dumps(r, sort_keys=True) for r in report.records}
        assert path.read_bytes() == again[split].read_bytes()  # deterministic for the seed
    assert len(rows["train"]) >= 200 and len(rows["heldout"]) >= 100
    assert not (rows["train"] & rows["heldout"]) and not (rows["train"] & rows["valid"])


def test_tool_calls_follow_their_schemas_in_schema_order():
    """Every call's arguments validate against its function's schema and list the properties in the schema's
    order (what a grammar following the schema writes); some records call nothing."""
    import random

    import jsonschema

    from tuneforge.data.tool_calls import TOOLS, expected_call, make_tool_chat

    rng = random.Random(0)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    records = [make_tool_chat(rng) for _ in range(300)]
    calls = [expected_call(r) for r in records]
    assert {c["name"] for c in calls if c} == set(schemas) and 0 < calls.count(None) < 100
    for call in filter(None, calls):
        jsonschema.validate(call["arguments"], schemas[call["name"]])
        assert list(call["arguments"]) == list(schemas[call["name"]]["properties"])


def test_translation_is_real_french():
    import random

    from tuneforge.data.synthetic import make_translation

    rng = random.Random(0)
    pairs = {r["source"]: r["target"] for r in (make_translation(rng) for _ in range(6000))}
    assert len(pairs) == 12 * 8 * 6  # every noun x colour x predicate
    assert pairs["The white house is big."] == "La maison blanche est grande."
    assert pairs["The green bird sleeps."] == "L'oiseau vert dort."
