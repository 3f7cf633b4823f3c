"""Before/after report: base vs fine-tuned metrics on the same held-out data, the loss curve and
examples side by side, written as `report.md` (+ `report.json`, `before_after.png`) into the run folder."""
from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import CheckpointError

HIGHER_IS_BETTER = ("accuracy", "macro_f1", "token_accuracy", "exact_match", "f1", "token_f1", "bleu", "chrf",
                    "rule_pass_rate", "distinct_1", "distinct_2", "entity_precision", "entity_recall", "entity_f1",
                    "reward_accuracy", "reward_margin")
NOT_A_SHARE = ("bleu", "chrf", "reward_margin")  # left out of the 0-1 bar chart
LOWER_IS_BETTER = ("loss", "perplexity")


def _clip(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _plot(base: dict, tuned: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in HIGHER_IS_BETTER if k in base and k in tuned and k not in NOT_A_SHARE]  # 0-1 scale only
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [base[k] for k in keys], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [tuned[k] for k in keys], width=0.4, label="fine-tuned")
    ax.set_xticks(list(xs), keys)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out metrics (higher is better)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _preference_notes(spec, base: dict, tuned: dict) -> list[str]:
    """What the preference rows mean, and the tuned model's DPO reward accuracy against its base (the reference
    of an adapter run), from the two models' log-probs of the same pairs."""
    pairs = list(zip(base.pop("pair_logps"), tuned.pop("pair_logps")))
    implicit = sum((t[0] - b[0]) > (t[1] - b[1]) for b, t in pairs) / max(len(pairs), 1)
    tuned["implicit_reward_accuracy"] = implicit
    p = spec.preference_settings
    return ["", f"Preference tuning ({p.loss}, beta {p.beta:g}): reward_accuracy is the share of held-out pairs whose "
            "preferred reply the model gives the higher log-probability, reward_margin the mean difference (nats); "
            "rule_pass_rate checks the model's own greedy replies against each pair's rules. Against the base as "
            f"reference, the fine-tuned model's DPO reward ranks the preferred reply first in {implicit:.1%} of the "
            "pairs."]


def write_report(run_dir: str | Path, data: str | Path | None = None, *, max_new_tokens: int = 64,
                 examples: int = 5, generate_n: int | None = None, progress: bool = True) -> Path:
    from tuneforge.data.validate import validate_jsonl
    from tuneforge.inference import load, require_finished_run
    from tuneforge.evaluation.runner import evaluate_records
    from tuneforge.training.run_dir import RunDir

    run = Path(run_dir)
    require_finished_run(run)  # before evaluating anything
    layout = RunDir(run)
    spec = layout.read_spec()
    data = data or (spec.eval.data if spec.eval else None) or spec.data.validation
    if not data:
        raise CheckpointError("no held-out data: pass --data FILE or set eval.data in the spec")
    records = validate_jsonl(data, spec.task, spec.labels)
    records.raise_if_errors()
    kw = dict(max_seq_len=spec.training.max_seq_len, max_new_tokens=max_new_tokens, generate_n=generate_n,
              labels=spec.labels, progress=progress, source=str(data))
    base = evaluate_records(load(spec.model, like=spec), spec.task, records.records, **kw)
    tuned = evaluate_records(load(run), spec.task, records.records, **kw)

    lines = [f"# Before / after: {spec.method} on {spec.model}", "",
             f"Held-out data: `{data}` ({len(records.records)} examples, task `{spec.task}`); same data and greedy "
             "decoding for both models.", "", "| metric | base | fine-tuned | better |", "|---|---:|---:|---|"]
    for key in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER):
        if key in base and key in tuned:
            b, t = base[key], tuned[key]
            better = (t < b) if key in LOWER_IS_BETTER else (t > b)
            lines.append(f"| {key} | {b:.4g} | {t:.4g} | {'yes' if better else 'no'} |")
    if spec.task == "preference":
        lines += _preference_notes(spec, base, tuned)
    lines += ["", "![loss curve](loss_curve.png)", ""]
    if "outputs" in base:
        _plot(base, tuned, layout.before_after)
        lines += ["![before/after](before_after.png)", "", "## Examples", "",
                  "| input | reference | base | fine-tuned |", "|---|---|---|---|"]
        for b, t in list(zip(base["outputs"], tuned["outputs"]))[:examples]:
            lines.append(f"| {_clip(b['prompt'])} | {_clip(b['reference'])} | {_clip(b['output'])} | {_clip(t['output'])} |")
    out = layout.report
    out.write_text("\n".join(lines) + "\n")
    layout.report_json.write_text(json.dumps({"data": str(data), "base": base, "fine_tuned": tuned}, indent=2,
                                                ensure_ascii=False))
    return out
