"""Every shipped scenario dataset: enough examples, valid for its task, disjoint splits, deterministic."""
from __future__ import annotations

import json

import pytest

from tuneforge.data.synthetic import GENERATORS, write_dataset
from tuneforge.data.validate import validate_jsonl


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_dataset_is_valid_and_disjoint(tmp_path, name):
    paths = write_dataset(name, tmp_path / "a")
    again = write_dataset(name, tmp_path / "b")
    rows = {}
    for split, path in paths.items():
        report = validate_jsonl(path, name)
        assert report.ok and not report.warnings, [str(p) for p in report.errors + report.warnings][:3]
        rows[split] = {json.dumps(r, sort_keys=True) for r in report.records}
        assert path.read_bytes() == again[split].read_bytes()  # deterministic for the seed
    assert len(rows["train"]) >= 200 and len(rows["heldout"]) >= 100
    assert not (rows["train"] & rows["heldout"]) and not (rows["train"] & rows["valid"])


def test_translation_is_real_french():
    import random

    from tuneforge.data.synthetic import make_translation

    rng = random.Random(0)
    pairs = {r["source"]: r["target"] for r in (make_translation(rng) for _ in range(6000))}
    assert len(pairs) == 12 * 8 * 6  # every noun x colour x predicate
    assert pairs["The white house is big."] == "La maison blanche est grande."
    assert pairs["The green bird sleeps."] == "L'oiseau vert dort."
