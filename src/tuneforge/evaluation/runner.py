"""Evaluate a model or run on held-out data: teacher-forced loss / perplexity / token accuracy on the
trained tokens, plus generated answers (and rule checks) for tasks that have a reference answer; for
preference pairs, how often the model prefers the preferred reply, and the rules of its own replies."""
from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.data.batching import collate
from tuneforge.data import chat, templates
from tuneforge.data.encode import IGNORE_INDEX, encode_example, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import SpecError
from tuneforge.hardware import cpu_has_fast_bf16
from tuneforge.training.loss import dataset_loss
from tuneforge.evaluation.metrics import (accuracy, bleu, chrf, distinct_n, entity_prf, exact_match, macro_f1, perplexity,
                                        rule_checks, squad_scores, token_f1)


CREATIVE_PROMPT_WORDS = 5


@torch.no_grad()
def continuation_logprobs(model, tokenizer, examples, batch_size: int = 16) -> list[float]:
    """Sum of log p(target tokens) for each example (labels mark the continuation)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        T = batch["labels"].shape[1]
        logp = torch.log_softmax(logits[:, -T:][:, :-1].float(), dim=-1)  # (B, T-1, V)
        target = batch["labels"][:, 1:].to(device)
        mask = target != IGNORE_INDEX
        picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
        out.extend(picked.sum(-1).tolist())
    return out


def classify(loaded, records: list[dict], labels: list[str], batch_size: int = 16) -> list[str]:
    """Predict by scoring every label's log-likelihood after the prompt: no free generation."""
    tok = loaded.tokenizer
    examples = [encode_example(tok, "classification", {**r, "label": label}, loaded.prompt_template)
                for r in records for label in labels]
    scores = continuation_logprobs(loaded.model, tok, examples, batch_size)
    return [labels[max(range(len(labels)), key=lambda j: scores[i * len(labels) + j])] for i in range(len(records))]


def prompt_and_reference(task: str, record: dict) -> tuple[str | list[dict], str] | None:
    """What to generate from and what it should say; None for tasks without a reference (text)."""
    if task == "chat":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = {"messages": msgs[:last], **({"tools": record["tools"]} if record.get("tools") else {})}
        return prompt, chat.message_text(msgs[last])  # a string, or text parts joined
    if task == "creative" and "text" in record:  # free text: continue its opening words
        words = record["text"].split()
        return {"text": " ".join(words[:CREATIVE_PROMPT_WORDS])}, " ".join(words[CREATIVE_PROMPT_WORDS:])
    if task in templates.DEFAULT_TEMPLATES:  # the record itself is filled into the prompt template
        return record, templates.answer(task, record)
    return None


def preference_scores(loaded, records: list[dict], *, max_seq_len: int = 512, batch_size: int = 8,
                      source: str | None = None) -> dict:
    """Held-out preference pairs: `reward_accuracy`, the share of pairs whose preferred reply the model gives the
    higher log-probability (summed over the reply's tokens, the quantity DPO's reward is made of), and
    `reward_margin`, the mean difference of the two (nats). `pair_logps` keeps each pair's (chosen, rejected)
    log-probs, so a tuned model's DPO reward against its base can be computed from the two models' scores."""
    data = encode_records(loaded.tokenizer, "preference", records, list(range(1, len(records) + 1)), max_seq_len,
                          source=source)
    if not data.examples:
        from tuneforge.errors import DataError

        raise DataError(f"{source or 'the held-out data'}: no pair has a reply left to score at max_seq_len="
                        f"{max_seq_len}; raise --max-seq-len")
    n = len(data.examples)
    scores = continuation_logprobs(loaded.model, loaded.tokenizer, [p.chosen for p in data.examples]
                                   + [p.rejected for p in data.examples], batch_size)
    chosen, rejected = scores[:n], scores[n:]
    return {"examples": len(records), "pairs": n,
            "reward_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "reward_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "pair_logps": [[c, r] for c, r in zip(chosen, rejected)]}


def evaluate_preference(loaded, records: list[dict], *, max_seq_len: int = 512, batch_size: int = 8,
                        max_new_tokens: int = 64, generate_n: int | None = None, progress: bool = True,
                        source: str | None = None) -> dict:
    """`preference_scores`, plus the model's own replies to the prompts and the share of their `rules` they pass
    (the rule the preferred replies follow)."""
    from tuneforge.data.preference import normalise
    from tuneforge.inference import generate

    result = preference_scores(loaded, records, max_seq_len=max_seq_len, batch_size=batch_size, source=source)
    shown = records[:generate_n] if generate_n else records
    outputs = generate(loaded, list(shown), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    rules = [r.get("rules") for r in shown]
    if any(rules):
        checks = [rule_checks(o, rs) for o, rs in zip(outputs, rules) if rs]
        result["rule_pass_rate"] = sum(c["passed"] for c in checks) / max(sum(c["total"] for c in checks), 1)

    def text(value) -> str:
        return value if isinstance(value, str) else chat.message_text(value[-1]) if value else ""

    prefs = [normalise(r) for r in shown]
    result["outputs"] = [{"prompt": text(p.prompt), "reference": text(p.chosen), "output": o}
                         for p, o in zip(prefs, outputs)]
    return result


def evaluate_records(loaded, task: str, records: list[dict], *, max_seq_len: int = 512, batch_size: int = 8,
                     max_new_tokens: int = 64, generate_n: int | None = None, labels: list[str] | None = None,
                     progress: bool = True, source: str | None = None) -> dict:
    """Metrics for `loaded` (an api.LoadedModel) on validated records; outputs kept for reports."""
    from tuneforge.inference import generate

    if task == "preference":
        return evaluate_preference(loaded, records, max_seq_len=max_seq_len, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, generate_n=generate_n, progress=progress,
                                   source=source)
    tok, model = loaded.tokenizer, loaded.model
    data = encode_records(tok, task, records, list(range(1, len(records) + 1)), max_seq_len,
                          template=loaded.prompt_template, source=source)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    scores = dataset_loss(model, data, batch_size, tok.pad_token_id, device, autocast)
    n_targets = sum(e.num_targets for e in data.examples)
    if n_targets == 0:
        from tuneforge.errors import DataError

        raise DataError(f"{source or 'the held-out data'}: no answer tokens left to score at max_seq_len={max_seq_len} "
                        f"({data.dropped} of {len(records)} examples dropped); raise --max-seq-len")
    result = {"examples": len(records), "target_tokens": n_targets, "loss": scores["eval_loss"],
              "perplexity": perplexity(scores["eval_loss"] * n_targets, n_targets),
              "token_accuracy": scores["eval_token_accuracy"]}
    if task == "classification":
        labels = labels or loaded.labels
        if not labels:
            raise SpecError("classification evaluation needs the label set: a run with `labels`, or --labels a,b,c")
        predictions = classify(loaded, records, labels, batch_size)
        references = [r["label"] for r in records]
        result.update(accuracy=accuracy(predictions, references), macro_f1=macro_f1(predictions, references, labels))
        result["outputs"] = [{"prompt": r["text"], "reference": r["label"], "output": p}
                             for r, p in zip(records, predictions)]
        return result
    pairs = [p for p in (prompt_and_reference(task, r) for r in records) if p is not None]
    if pairs:
        pairs = pairs[:generate_n] if generate_n else pairs
        outputs = generate(loaded, [p for p, _ in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress)
        refs = [r for _, r in pairs]
        result["exact_match"] = sum(exact_match(o, r) for o, r in zip(outputs, refs)) / len(outputs)
        result["token_f1"] = sum(token_f1(o, r) for o, r in zip(outputs, refs)) / len(outputs)
        if task == "qa":  # SQuAD-normalised, the QA convention
            result.update(squad_scores(outputs, [[r] for r in refs]))
        if task == "translation":
            result.update(bleu=bleu(outputs, refs), chrf=chrf(outputs, refs))
        if task == "ner":  # exact character-span matches; partial overlaps are misses
            from tuneforge.data.ner import parse_entities, text_and_spans

            texts = [text_and_spans(p)[0] for p, _ in pairs]
            scores = entity_prf([parse_entities(o, t) for o, t in zip(outputs, texts)],
                                [text_and_spans(p)[1] for p, _ in pairs])
            result.update(entity_precision=scores["precision"], entity_recall=scores["recall"],
                          entity_f1=scores["f1"])
        if task == "creative":  # diversity of the samples; references are one of many good answers
            result.update(distinct_1=distinct_n(outputs, 1), distinct_2=distinct_n(outputs, 2))
        rules = [r.get("rules") for r in records[: len(outputs)]]
        if any(rules):
            checks = [rule_checks(o, rs) for o, rs in zip(outputs, rules) if rs]
            result["rule_pass_rate"] = sum(c["passed"] for c in checks) / max(sum(c["total"] for c in checks), 1)
        def shown(p):
            if task == "chat":  # the last turn before the reply
                return chat.message_text(p["messages"][-1]) if p["messages"] else ""
            return templates.fill(task, p, loaded.prompt_template) if isinstance(p, dict) else p

        result["outputs"] = [{"prompt": shown(p), "reference": r, "output": o}
                             for (p, r), o in zip(pairs, outputs)]
    return result


def evaluate_file(model_ref: str | Path, data: str | Path, task: str | None = None, *,
                  prompt_template: str | None = None, **kw) -> dict:
    """`tuneforge eval`: validate `data`, load the model or run, and return its metrics. The data is
    checked before the model loads (with the run's task and labels when `model_ref` is a run)."""
    from tuneforge.inference import is_run_dir, load, require_finished_run
    from tuneforge.training.run_dir import RunDir

    for name in ("max_seq_len", "max_new_tokens", "batch_size"):
        if name in kw and not (isinstance(kw[name], int) and kw[name] >= 1):
            raise SpecError(f"{name}: must be a whole number of at least 1, got {kw[name]!r}")

    run_spec = None
    if is_run_dir(model_ref):
        require_finished_run(Path(model_ref))
        run_spec = RunDir(model_ref).read_spec()
    check_task = task or (run_spec.task if run_spec else "chat")
    labels = kw.get("labels") or (run_spec.labels if run_spec else None)
    if check_task == "classification" and not labels:
        raise SpecError("classification evaluation needs the label set: a run with `labels`, or --labels a,b,c")
    report = validate_jsonl(data, check_task, labels)
    report.raise_if_errors()
    loaded = load(model_ref, task=task, prompt_template=prompt_template)
    kw.setdefault("source", str(data))
    return evaluate_records(loaded, loaded.task, report.records, **kw)
