"""Before/after report: base vs fine-tuned metrics on the same held-out data, the loss curve and
examples side by side, written as `report.md` (+ `report.json`, `before_after.png`) into the run folder."""
from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import CheckpointError

HIGHER_IS_BETTER = ("accuracy", "macro_f1", "token_accuracy", "exact_match", "f1", "token_f1", "bleu", "chrf",
                    "rule_pass_rate", "distinct_1", "distinct_2", "entity_precision", "entity_recall", "entity_f1")
LOWER_IS_BETTER = ("loss", "perplexity")


def _clip(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _plot(base: dict, tuned: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in HIGHER_IS_BETTER if k in base and k in tuned and k not in ("bleu", "chrf")]  # 0-1 scale only
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
