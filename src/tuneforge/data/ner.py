"""Named-entity recognition as text generation.

Two input formats: `{"tokens": [...], "tags": [...]}` (BIO) or `{"text": "...", "entities":
[{"start", "end", "label"}]}` (character offsets, end exclusive). Both become a text plus character
spans; the model learns to answer `LABEL: span; LABEL: span` (or `none`), and predictions are mapped
back to character spans so entity F1 counts exact span matches only.
"""
from __future__ import annotations

import re

NONE = "none"
_BIO = re.compile(r"^(O|[BI]-.+)$")


def bio_to_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """BIO tags -> (start, end_exclusive, label) token spans.

    Follows conlleval: an I-X that does not continue a span of label X (after O, after another label, or at
    the start) opens a new span instead of being dropped.
    """
    spans: list[tuple[int, int, str]] = []
    start: int | None = None
    label: str | None = None
    for i, tag in enumerate(tags):
        if tag == "O":
            prefix, tag_label = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
            prefix, tag_label = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {i} {tag!r} is not BIO: expected 'O', 'B-<label>' or 'I-<label>'")
        continues = prefix == "I" and label == tag_label
        if not continues and start is not None:
            spans.append((start, i, label))  # type: ignore[arg-type]
            start, label = None, None
        if prefix != "O" and not continues:
            start, label = i, tag_label
    if start is not None:
        spans.append((start, len(tags), label))  # type: ignore[arg-type]
    return spans


def record_text(record: dict) -> str:
    """The text to tag: `text`, or the tokens joined by spaces (entities or tags are not needed)."""
    return " ".join(record["tokens"]) if "tokens" in record else record["text"]


def text_and_spans(record: dict) -> tuple[str, list[tuple[int, int, str]]]:
    """(text, [(start, end, label)]) for either input format."""
    if "tokens" in record:
        starts, pos = [], 0
        for tok in record["tokens"]:
            starts.append(pos)
            pos += len(tok) + 1
        text = " ".join(record["tokens"])
        spans = [(starts[s], starts[e - 1] + len(record["tokens"][e - 1]), label)
                 for s, e, label in bio_to_spans(record["tags"])]
        return text, spans
    return record["text"], [(e["start"], e["end"], e["label"]) for e in record["entities"]]


def answer_text(record: dict) -> str:
    """`LABEL: span; LABEL: span` in text order, or `none`."""
    text, spans = text_and_spans(record)
    return "; ".join(f"{label}: {text[s:e]}" for s, e, label in sorted(spans)) or NONE


def parse_entities(output: str, text: str) -> list[tuple[int, int, str]]:
    """`LABEL: span; ...` -> character spans in `text` (a span not found in the text is a miss)."""
    spans, used = [], set()
    for part in output.split(";"):
        if ":" not in part:
            continue
        label, surface = (x.strip() for x in part.split(":", 1))
        if not label or not surface:
            continue
        start = text.find(surface)
        while start != -1 and (start, label) in used:
            start = text.find(surface, start + 1)
        if start != -1:
            used.add((start, label))
            spans.append((start, start + len(surface), label))
    return spans


def check_ner(rec: dict) -> list[tuple[str, str]]:
    """Problems as (field, message); the same conventions as the other formats."""
    if "tokens" in rec or "tags" in rec:
        tokens, tags = rec.get("tokens"), rec.get("tags")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            return [("tokens", "must be a non-empty list of non-empty strings")]
        if not isinstance(tags, list) or len(tags) != len(tokens):
            got = f"{len(tags)} tags" if isinstance(tags, list) else "no list"
            return [("tags", f"must be a list of one BIO tag per token ({len(tokens)} tokens, {got})")]
        return [(f"tags[{i}]", f"'{t}' is not a BIO tag (O, B-LABEL, I-LABEL)") for i, t in enumerate(tags)
                if not isinstance(t, str) or not _BIO.match(t)]
    text, entities = rec.get("text"), rec.get("entities")
    if not isinstance(text, str) or not text.strip():
        return [("text", "must be a non-empty string (or give tokens + tags)")]
    if not isinstance(entities, list):
        return [("entities", 'must be a list of {"start", "end", "label"} (may be empty)')]
    problems, valid = [], []
    for i, e in enumerate(entities):
        ok = (isinstance(e, dict) and type(e.get("start")) is int and type(e.get("end")) is int
              and isinstance(e.get("label"), str) and e["label"] and 0 <= e["start"] < e["end"] <= len(text))
        if not ok:
            problems.append((f"entities[{i}]", f"needs integer start < end within the text (0..{len(text)}) and a label"))
            continue
        # The answer lists entities in text order; overlapping ones cannot both be exact matches.
        for j, other in valid:
            surface = f"'{text[other['start']:other['end']]}'"
            if (e["start"], e["end"]) == (other["start"], other["end"]):
                same = e["label"] == other["label"]
                problems.append((f"entities[{i}]", f"duplicates entities[{j}] ({other['start']}..{other['end']} {surface})"
                                 if same else f"has the same span as entities[{j}] "
                                 f"({other['start']}..{other['end']} {other['label']} {surface})"))
            elif e["start"] < other["end"] and other["start"] < e["end"]:
                problems.append((f"entities[{i}]", f"overlaps entities[{j}] ({other['start']}..{other['end']} {surface})"))
        valid.append((i, e))
    return problems
