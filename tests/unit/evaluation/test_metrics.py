"""Metrics against hand-computed values; BLEU/chrF against sacrebleu itself."""
from __future__ import annotations

import math

import pytest

from tuneforge.evaluation.metrics import (
    accuracy,
    bio_to_spans,
    bleu,
    chrf,
    distinct_n,
    entity_prf,
    exact_match,
    macro_f1,
    perplexity,
    rule_checks,
    squad_normalize,
    squad_scores,
    token_f1,
)

# --- classification -----------------------------------------------------------------------------------------

REFS = ["a", "a", "a", "b", "b", "c"]
PREDS = ["a", "a", "b", "b", "c", "c"]


def test_accuracy():
    # positions 0, 1, 3, 5 agree -> 4/6
    assert accuracy(PREDS, REFS) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(["a"], ["a", "b"])


def test_macro_f1_three_labels():
    # a: predicted at 0,1 (both right)   P = 2/2 = 1,   gold 0,1,2 -> R = 2/3, F1 = 2*1*(2/3)/(5/3) = 4/5
    # b: predicted at 2,3 (3 right)      P = 1/2,       gold 3,4   -> R = 1/2, F1 = 1/2
    # c: predicted at 4,5 (5 right)      P = 1/2,       gold 5     -> R = 1,   F1 = 2*(1/2)*1/(3/2) = 2/3
    # macro = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90
    assert macro_f1(PREDS, REFS) == pytest.approx(59 / 90)
    # an explicit label with no support and no predictions still counts, as F1 0 -> 59/30 / 4
    assert macro_f1(PREDS, REFS, labels=["a", "b", "c", "d"]) == pytest.approx(59 / 120)
    assert macro_f1(PREDS, REFS, labels=["a"]) == pytest.approx(4 / 5)


def test_macro_f1_edge_cases():
    # every prediction wrong: P = R = 0 for both labels -> F1 0, no ZeroDivisionError
    assert macro_f1(["y", "x"], ["x", "y"]) == 0.0
    # a label only ever predicted joins the default set: a: P 1, R 1/2 -> 2/3; z: P 0, R 0 -> 0; mean 1/3
    assert macro_f1(["a", "z"], ["a", "a"]) == pytest.approx(1 / 3)
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert macro_f1([], []) == 0.0


# --- NER ----------------------------------------------------------------------------------------------------


def test_bio_to_spans():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-PER", "O", "B-MISC"]
    # 0-1 PER; stray I-LOC at 3 opens a span that 4 continues; B-ORG twice = two spans;
    # I-PER after B-ORG is a label change, so it opens a new span; B-MISC closes at the end of the sequence.
    assert bio_to_spans(tags) == [(0, 2, "PER"), (3, 5, "LOC"), (5, 6, "ORG"), (6, 7, "ORG"), (7, 8, "PER"),
                                  (9, 10, "MISC")]
    assert bio_to_spans(["I-LOC"]) == [(0, 1, "LOC")]
    assert bio_to_spans(["O", "O"]) == []
    assert bio_to_spans([]) == []
    assert bio_to_spans(["B-GPE-CITY", "I-GPE-CITY"]) == [(0, 2, "GPE-CITY")]
    for bad in ("PER", "X-PER", "B-", "o"):
        with pytest.raises(ValueError, match="not BIO"):
            bio_to_spans(["O", bad])


def test_entity_prf_exact_partial_missed():
    gold = [[(0, 2, "PER"), (5, 7, "LOC")], [(1, 3, "ORG")]]
    pred = [[(0, 2, "PER"), (5, 6, "LOC")], []]
    # (0,2,PER) exact -> tp; (5,6,LOC) vs (5,7,LOC) overlap only -> fp AND fn; (1,3,ORG) missed -> fn
    # tp 1, fp 1, fn 2: P = 1/2, R = 1/3, F1 = 2*(1/6)/(5/6) = 2/5
    out = entity_prf(pred, gold)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 2)
    assert out["precision"] == pytest.approx(1 / 2)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(2 / 5)


def test_entity_prf_label_mismatch_duplicates_and_char_spans():
    # same offsets, wrong label: fp + fn
    out = entity_prf([[(0, 1, "ORG")]], [[(0, 1, "LOC")]])
    assert (out["tp"], out["fp"], out["fn"], out["f1"]) == (0, 1, 1, 0.0)
    # a duplicated prediction is credited once: tp 1, fp 1 -> P 1/2, R 1
    out = entity_prf([[(0, 1, "X"), (0, 1, "X")]], [[(0, 1, "X")]])
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 0)
    assert out["f1"] == pytest.approx(2 / 3)
    # character offsets work the same way
    char_gold = [[(0, 5, "PER"), (15, 21, "LOC")]]
    assert entity_prf(char_gold, char_gold)["f1"] == 1.0
    empty = entity_prf([[]], [[]])
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    with pytest.raises(ValueError, match="differ in length"):
        entity_prf([[]], [])


# --- translation --------------------------------------------------------------------------------------------

HYPS = ["The cat sat on the mat.", "A quick brown fox jumps over the dog.", "Hello world"]
TRANS_REFS = ["The cat is sitting on the mat.", "The quick brown fox jumps over the lazy dog.", "Hello, world!"]


def test_bleu_and_chrf_match_sacrebleu():
    import sacrebleu

    expected_bleu = sacrebleu.corpus_bleu(HYPS, [TRANS_REFS]).score
    expected_chrf = sacrebleu.corpus_chrf(HYPS, [TRANS_REFS]).score
    assert 0 < expected_bleu < 100 and 0 < expected_chrf < 100
    assert bleu(HYPS, TRANS_REFS) == expected_bleu
    assert chrf(HYPS, TRANS_REFS) == expected_chrf


def test_bleu_chrf_hand_checkable():
    same = ["the cat sat on the mat", "a dog barked"]
    assert bleu(same, same) == pytest.approx(100.0)
    assert chrf(same, same) == pytest.approx(100.0)
    # no shared word or character
    assert bleu(["abc def"], ["xyz uvw"]) == 0.0
    assert chrf(["abc def"], ["xyz uvw"]) == 0.0
    # every n-gram precision is 1 (5/5, 4/4, 3/3, 2/2); only the brevity penalty applies:
    # BP = exp(1 - ref_len/hyp_len) = exp(1 - 6/5) -> BLEU = 100 * exp(-0.2) = 81.873...
    assert bleu(["one two three four five"], ["one two three four five six"]) == pytest.approx(100 * math.exp(-0.2))
    assert bleu([], []) == 0.0 and chrf([], []) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        bleu(["a"], [])


# --- QA -----------------------------------------------------------------------------------------------------


def test_squad_normalize():
    # lower -> "the  cat's hat!"; punctuation -> "the  cats hat"; articles -> "  cats hat"; whitespace -> "cats hat"
    assert squad_normalize("The  Cat's hat!") == "cats hat"
    assert squad_normalize("An apple, a day.") == "apple day"
    assert squad_normalize("  Hello\tWORLD\n") == "hello world"
    # articles only as whole words
    assert squad_normalize("Theatre and anthem") == "theatre and anthem"
    assert squad_normalize("The") == ""


def test_exact_match():
    assert exact_match("The Cat's hat", ["dog", "cats hat!"]) == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("the", "a") == 1.0  # both normalise to ""
    with pytest.raises(ValueError, match="reference"):
        exact_match("x", [])


def test_token_f1():
    # "the black cat sat" -> [black, cat, sat]; "a cat sat down" -> [cat, sat, down]; common 2
    # P = 2/3, R = 2/3, F1 = 2/3
    assert token_f1("the black cat sat", "a cat sat down") == pytest.approx(2 / 3)
    assert token_f1("the black cat sat", ["dog", "a cat sat down"]) == pytest.approx(2 / 3)  # max over refs
    # Counter intersection: min(3, 1) = 1 common; P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 2/5
    assert token_f1("cat cat cat", "cat dog") == pytest.approx(2 / 5)
    assert token_f1("The", "a") == 1.0  # both empty after normalisation
    assert token_f1("the", "cat") == 0.0  # one empty
    assert token_f1("cat", "the") == 0.0
    assert token_f1("dog", "cat") == 0.0


def test_squad_scores():
    preds = ["Paris", "the black cat sat"]
    refs = [["paris", "Paris, France"], ["a cat sat down"]]
    # EM: 1 and 0 -> 0.5; F1: 1 and 2/3 -> 5/6
    out = squad_scores(preds, refs)
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(5 / 6)
    assert squad_scores([], []) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="differ in length"):
        squad_scores(["a"], [])


# --- generation ---------------------------------------------------------------------------------------------


def test_distinct_n():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique / 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 / 4; none spans the two texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


# --- domain adaptation --------------------------------------------------------------------------------------


def test_perplexity():
    assert perplexity(10 * math.log(2), 10) == pytest.approx(2.0)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(3 * 700.0, 3) == pytest.approx(math.exp(700))  # at the cap: still finite
    assert perplexity(3 * 701.0, 3) == float("inf")
    assert perplexity(1e9, 1) == float("inf")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_tokens > 0"):
            perplexity(1.0, bad)


# --- rule checks --------------------------------------------------------------------------------------------


def test_rule_checks():
    output = "Answer: 42. Thanks!"
    rules = [
        {"regex": r"^Answer: \d+"},  # pass
        {"contains": "Thanks"},  # pass
        {"not_contains": "sorry"},  # pass
        {"contains": "please"},  # fail
        {"regex": r"\d{3}"},  # fail
        {"not_contains": "42"},  # fail
    ]
    out = rule_checks(output, rules)
    assert out == {"passed": 3, "total": 6, "failures": [rules[3], rules[4], rules[5]]}
    assert rule_checks(output, []) == {"passed": 0, "total": 0, "failures": []}


def test_rule_checks_errors():
    with pytest.raises(ValueError, match=r"'startswith'.*regex, contains, not_contains"):
        rule_checks("x", [{"contains": "x"}, {"startswith": "x"}])
    with pytest.raises(ValueError, match="exactly one"):
        rule_checks("x", [{"contains": "x", "regex": "x"}])
    with pytest.raises(ValueError, match="invalid regex"):
        rule_checks("x", [{"regex": "("}])
    with pytest.raises(ValueError, match="must be a string"):
        rule_checks("x", [{"contains": 3}])
