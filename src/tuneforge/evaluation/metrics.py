"""Pure-function metrics for the fine-tuning scenarios: classification, NER, translation, QA, chat,
creative generation and domain adaptation.

Empty inputs score 0.0 rather than raising; mismatched prediction/reference lengths raise ValueError.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

from tuneforge.data.ner import bio_to_spans  # re-exported: data formats live in data/, metrics import them

__all__ = [
    "accuracy",
    "macro_f1",
    "bio_to_spans",
    "entity_prf",
    "bleu",
    "chrf",
    "squad_normalize",
    "exact_match",
    "token_f1",
    "squad_scores",
    "distinct_n",
    "perplexity",
    "rule_checks",
    "RULE_KINDS",
]


def _check_lengths(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} differ in length: {len(a)} vs {len(b)}")


def _f1(precision: float, recall: float) -> float:
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --- classification -----------------------------------------------------------------------------------------


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference (0.0 for no examples)."""
    _check_lengths(predictions, references, "predictions", "references")
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: list[str], references: list[str], labels: list[str] | None = None) -> float:
    """Unweighted mean of per-label F1 over `labels`.

    `labels` defaults to the sorted union of labels in references and predictions, so a label that is only
    ever predicted still counts (with F1 0). An explicit label list is scored as given, including labels
    that never occur (F1 0).
    """
    _check_lengths(predictions, references, "predictions", "references")
    if labels is None:
        labels = sorted(set(references) | set(predictions))
    if not labels:
        return 0.0
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter(predictions)
    n_gold: Counter[str] = Counter(references)
    for p, r in zip(predictions, references):
        if p == r:
            tp[p] += 1
    scores = []
    for label in labels:
        precision = tp[label] / n_pred[label] if n_pred[label] else 0.0
        recall = tp[label] / n_gold[label] if n_gold[label] else 0.0
        scores.append(_f1(precision, recall))
    return sum(scores) / len(scores)


# --- NER ----------------------------------------------------------------------------------------------------


def entity_prf(predicted: list[list[tuple]], gold: list[list[tuple]]) -> dict:
    """Micro precision/recall/F1 over exact span matches, one span list per example.

    Spans are any hashable tuples (token or character offsets plus label); only identical tuples match, so a
    partial overlap is both a false positive and a false negative. Undefined ratios (no predictions, no gold
    spans) are 0.0, as in conlleval/seqeval.
    """
    _check_lengths(predicted, gold, "predicted", "gold")
    tp = fp = fn = 0
    for pred_spans, gold_spans in zip(predicted, gold):
        # Counters rather than sets so a duplicated predicted span is not credited twice.
        pred_c: Counter[Hashable] = Counter(pred_spans)
        gold_c: Counter[Hashable] = Counter(gold_spans)
        matched = sum((pred_c & gold_c).values())
        tp += matched
        fp += sum(pred_c.values()) - matched
        fn += sum(gold_c.values()) - matched
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "tp": tp, "fp": fp, "fn": fn}


# --- translation --------------------------------------------------------------------------------------------


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu defaults (13a tokenisation, exp smoothing), one reference each."""
    _check_lengths(hypotheses, references, "hypotheses", "references")
    if not hypotheses:
        return 0.0  # sacrebleu raises IndexError on an empty corpus
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100) with sacrebleu defaults (character 6-grams, beta 2), one reference each."""
    _check_lengths(hypotheses, references, "hypotheses", "references")
    if not hypotheses:
        return 0.0
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


# --- extractive QA (SQuAD v1.1) -----------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """Official SQuAD v1.1 answer normalisation: lowercase, drop ASCII punctuation, drop a/an/the,
    collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(references: list[str] | str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is required")
    return refs


def exact_match(prediction: str, references: list[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = squad_normalize(prediction)
    return max(float(pred == squad_normalize(ref)) for ref in _as_list(references))


def _token_f1_single(prediction: str, reference: str) -> float:
    pred_tokens = squad_normalize(prediction).split()
    ref_tokens = squad_normalize(reference).split()
    # v1.1's script scores empty-vs-empty as 0; an answer that normalises to nothing (e.g. "the") matching an
    # equally empty reference is a match, as in SQuAD v2.
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    return _f1(common / len(pred_tokens), common / len(ref_tokens))


def token_f1(prediction: str, references: list[str] | str) -> float:
    """SQuAD token-overlap F1 (bag of normalised tokens), max over references."""
    return max(_token_f1_single(prediction, ref) for ref in _as_list(references))


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean exact match and token F1 over questions, each in [0, 1]."""
    _check_lengths(predictions, references, "predictions", "references")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    n = len(predictions)
    em = sum(exact_match(p, refs) for p, refs in zip(predictions, references)) / n
    f1 = sum(token_f1(p, refs) for p, refs in zip(predictions, references)) / n
    return {"exact_match": em, "f1": f1}


# --- chat / creative generation -----------------------------------------------------------------------------


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over whitespace tokens, pooled across texts (0.0 when there are none).

    N-grams never span two texts.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


# --- domain adaptation --------------------------------------------------------------------------------------

_MAX_EXPONENT = 700.0  # math.exp overflows just above 709.78


def perplexity(loss_sum: float, n_tokens: int) -> float:
    """exp(mean token loss), from a summed natural-log loss; inf when the mean loss exceeds 700."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n_tokens}")
    mean_loss = loss_sum / n_tokens
    if mean_loss > _MAX_EXPONENT:
        return float("inf")
    return math.exp(mean_loss)


# --- rule-based output checks -------------------------------------------------------------------------------

RULE_KINDS = ("regex", "contains", "not_contains")


def _validate_rule(index: int, rule: dict) -> tuple[str, str]:
    if not isinstance(rule, dict) or len(rule) != 1:
        raise ValueError(f"rule {index} must be a dict with exactly one of {', '.join(RULE_KINDS)}; got {rule!r}")
    ((kind, value),) = rule.items()
    if kind not in RULE_KINDS:
        raise ValueError(f"rule {index}: unknown rule key {kind!r}; valid keys: {', '.join(RULE_KINDS)}")
    if not isinstance(value, str):
        raise ValueError(f"rule {index}: {kind} value must be a string, got {type(value).__name__}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"rule {index}: invalid regex {value!r}: {exc}") from None
    return kind, value


def rule_checks(output: str, rules: list[dict]) -> dict:
    """Check `output` against rules: {"regex": p} (re.search finds p), {"contains": s}, {"not_contains": s}.

    Returns {"passed", "total", "failures"} where failures are the failing rule dicts, in order.
    """
    # Validate every rule up front so a typo fails even when an earlier rule already decided the outcome.
    parsed = [_validate_rule(i, rule) for i, rule in enumerate(rules)]
    failures = []
    for rule, (kind, value) in zip(rules, parsed):
        if kind == "regex":
            ok = re.search(value, output) is not None
        elif kind == "contains":
            ok = value in output
        else:
            ok = value not in output
        if not ok:
            failures.append(rule)
    return {"passed": len(rules) - len(failures), "total": len(rules), "failures": failures}
