"""`tuneforge compare`: the source document's trade-off table, measured.

Each method trains the same spec (same data, same steps, same seed) in its own process, so each peak RSS
is that run's own. The table puts the source's claimed cell (yes/no) beside each measured figure, and a
verdict from the figure: "cuts compute" = time per step at most 0.9x full fine-tuning's, "cuts memory" =
peak at most 0.9x full's, "trains few parameters" = under 5 % of the weights trainable. Held-out quality
is the validation loss after the last step. The planner's prediction for each run is shown too.

With `strategies` (ddp, zero1, zero2, zero3) the source's DeepSpeed and ZeRO columns are measured too: full
fine-tuning of the same spec at `nproc` ranks per strategy (torch's DDP / ZeroRedundancyOptimizer / FSDP2, or
DeepSpeed with `backend="deepspeed"`), the same micro-batch per rank, each rank's peak RSS read from the
run's summary. For them "cuts compute" compares the time per example (step time / ranks) with one process's,
"cuts memory" the largest rank's peak with one process's, and "memory-efficient data parallelism" the
largest rank's peak with DDP's (when ddp ran; else with one process's).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge import files
from tuneforge.errors import OutputError, SpecError
from tuneforge.planning.measure import Measured, measure_run

COMPARE_MARKER = ".tuneforge-compare"
# The source's table (docs: /work/shared/SOURCE.md): claim -> {column: yes/no}
SOURCE_CLAIMS = {
    "cuts compute and cost": {"LoRA": True, "QLoRA": True, "PEFT": False, "DeepSpeed": True, "ZeRO": True, "DoRA": False},
    "cuts memory use": {"LoRA": False, "QLoRA": True, "PEFT": False, "DeepSpeed": True, "ZeRO": True, "DoRA": True},
    "trains few parameters": {"LoRA": False, "QLoRA": True, "PEFT": True, "DeepSpeed": False, "ZeRO": False, "DoRA": True},
    "memory-efficient data parallelism": {"LoRA": False, "QLoRA": False, "PEFT": False, "DeepSpeed": True, "ZeRO": True,
                                          "DoRA": True},
}
COLUMN = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "ia3": "PEFT", "prompt_tuning": "PEFT",
          "zero1": "ZeRO", "zero2": "ZeRO", "zero3": "ZeRO", "deepspeed:zero1": "DeepSpeed",
          "deepspeed:zero2": "DeepSpeed", "deepspeed:zero3": "DeepSpeed", "deepspeed:ddp": "DeepSpeed"}
STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
FEW_PARAMS = 0.05
CUTS = 0.9


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _yes(v: bool | None) -> str:
    return "–" if v is None else "yes" if v else "no"


def _prepare_out(out: Path, overwrite: bool) -> None:
    files.refuse_special(out, "--out")
    files.check_writable_folder(out, "--out")
    if out.is_dir() and not files.is_empty_folder(out):
        if not (out / COMPARE_MARKER).is_file():
            raise OutputError(f"--out: {out} is not empty and was not made by `tuneforge compare`; choose another folder")
        if not overwrite:
            raise OutputError(f"--out: {out} already holds a comparison; pass --overwrite to replace it")
        for child in out.iterdir():  # only what compare wrote: runs/, compare.md, compare.json, charts
            if child.name in ("runs", "compare.md", "compare.json") or child.suffix == ".png":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_MARKER).write_text("made by tuneforge compare\n")


def run_key(strategy: str, backend: str) -> str:
    """The results key (and chart label) of a strategy run: "zero3", or "deepspeed:zero3"."""
    return strategy if backend == "torch" else f"{backend}:{strategy}"


def compare_methods(spec, *, methods: tuple[str, ...], out, steps: int | None = None, overwrite: bool = False,
                    progress=None, threads: int | None = None, strategies: tuple[str, ...] = (), nproc: int = 2,
                    backend: str = "torch") -> Path:
    """Train `spec` with each method (and, for each of `strategies`, full fine-tuning at `nproc` ranks), measure,
    and write compare.md + charts into `out`."""
    from tuneforge.planning.estimate import METHODS
    from tuneforge.planning.plan import plan

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SpecError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    problems = []
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        problems.append(f"--strategies: unknown {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    if strategies and nproc < 2:
        problems.append(f"--nproc: {nproc}; data-parallel strategies need at least 2 processes")
    if backend not in ("torch", "deepspeed"):
        problems.append(f"--backend: {backend!r}; choose torch or deepspeed")
    if problems:
        raise SpecError("; ".join(problems))
    if strategies and "full" not in methods:
        methods = (*methods, "full")  # the one-process reference the strategies are compared with
    if spec.data.validation is None and spec.data.validation_split is None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"validation_split": 0.1})})
    steps = steps or spec.training.max_steps or 20
    out = files.expand(out)
    _prepare_out(out, overwrite)
    base = spec.model_dump(mode="json")
    base["training"].update(max_steps=steps, eval_every=steps, save_every=steps + 1, log_every=1)
    base["eval"] = None
    base.pop("distributed", None)
    results: dict[str, dict] = {}
    for method in methods:
        if progress:
            progress(f"compare: training {method} for {steps} steps")
        run_spec = {**base, "method": method}
        predicted = plan(spec.model_copy(update={"method": method}), methods=(method,)).rows_[0]
        m: Measured = measure_run(run_spec, out / "runs" / method, threads=threads)
        results[method] = _result(m, predicted)
    full_spec = spec.model_copy(update={"method": "full"})
    for strategy in strategies:
        key = run_key(strategy, backend)
        if progress:
            progress(f"compare: training full fine-tuning under {key} at {nproc} ranks for {steps} steps")
        run_spec = {**base, "method": "full", "distributed": {"strategy": strategy, "backend": backend, "nproc": nproc,
                                                               "master_port": _free_port()}}
        predicted = plan(full_spec, methods=("full",), strategies=(strategy,), nproc=nproc).rows_[0]
        m = measure_run(run_spec, out / "runs" / key.replace(":", "-"), threads=threads)
        ranks = m.summary.get("rank_peak_rss_mb") or [m.peak_rss_mb]
        results[key] = _result(m, predicted, peak_rss_mb=max(ranks), rank_peak_rss_mb=ranks, ranks=nproc,
                               strategy=strategy, backend=backend)
    files.atomic_write_text(out / "compare.json", json.dumps({"model": spec.model, "steps": steps,
                                                              "results": results}, indent=2))
    charts = write_charts(results, out)
    path = out / "compare.md"
    files.atomic_write_text(path, render_markdown(spec, steps, results, charts))
    return path


def _result(m: Measured, predicted, **extra) -> dict:
    """One row of compare.json: the measured run beside the plan's prediction made before it."""
    return {"peak_rss_mb": m.peak_rss_mb, "step_seconds": m.step_seconds,
            "trainable_params": m.summary["trainable_params"], "total_params": m.summary["total_params"],
            "eval_loss": m.summary.get("final_eval_loss"), "train_loss": m.summary.get("final_train_loss"),
            "eval_reward_accuracy": m.summary.get("final_eval_reward_accuracy"),  # task preference
            "predicted_peak_mb": predicted.predicted_peak_mb, "predicted_step_seconds": predicted.predicted_step_seconds,
            "gradient_checkpointing": predicted.gradient_checkpointing, **extra}


def _parallel_reference(results: dict[str, dict], r: dict) -> dict | None:
    """What a data-parallel run's memory is held against: DDP's run (when it ran and is not `r`), else one process."""
    ddp = results.get("ddp") or results.get("deepspeed:ddp")
    return ddp if ddp is not None and ddp is not r else results.get("full")


def verdicts(results: dict[str, dict]) -> dict[str, dict[str, bool | None]]:
    """claim -> method -> measured yes/no (None: not measurable here)."""
    full = results.get("full")
    out: dict[str, dict[str, bool | None]] = {claim: {} for claim in SOURCE_CLAIMS}
    for method, r in results.items():
        share = r["trainable_params"] / max(r["total_params"], 1)
        ranks = r.get("ranks", 1)
        per_example = r["step_seconds"] / ranks  # each rank trains its own micro-batch: N x the examples per step
        out["cuts compute and cost"][method] = (per_example <= CUTS * full["step_seconds"]) if full and method != "full" else None
        out["cuts memory use"][method] = (r["peak_rss_mb"] <= CUTS * full["peak_rss_mb"]) if full and method != "full" else None
        out["trains few parameters"][method] = share < FEW_PARAMS
        if ranks == 1:
            out["memory-efficient data parallelism"][method] = False  # a method, not a way of spreading memory
        else:
            reference = _parallel_reference(results, r)
            out["memory-efficient data parallelism"][method] = (r["peak_rss_mb"] <= CUTS * reference["peak_rss_mb"]
                                                                 if reference else None)
    return out


def render_markdown(spec, steps: int, results: dict[str, dict], charts: list[str]) -> str:
    full = results.get("full")
    lines = [f"# Method trade-offs, measured: {spec.model}", "",
             f"Each method trained the same spec for {steps} optimizer steps (batch {spec.training.batch_size}, "
             f"max_seq_len {spec.training.max_seq_len}, the engine's defaults per method), each in its own process. "
             "Time per step is the median after the first step; peak is the process's peak RSS; held-out quality is "
             "the validation loss after the last step. Predicted = `tuneforge plan` before the run.", "",
             "| method | time/step (s) | × full | peak RSS (MB) | × full | trainable | share | held-out loss | predicted peak (MB) | predicted s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    parallel = [r for r in results.values() if r.get("ranks", 1) > 1]
    if parallel:
        lines[4:4] = [f"Data-parallel rows (`--strategies`): full fine-tuning at {parallel[0]['ranks']} ranks, the same "
                      "micro-batch per rank (so each step trains that many times the examples); their peak is the "
                      "largest rank's, each rank's in brackets, predicted per rank.", ""]
    for method, r in results.items():
        share = r["trainable_params"] / max(r["total_params"], 1)
        t_rel = f"{r['step_seconds'] / full['step_seconds']:.2f}" if full else "–"
        m_rel = f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}" if full else "–"
        loss = f"{r['eval_loss']:.3f}" if r["eval_loss"] is not None else "–"
        pstep = f"{r['predicted_step_seconds']:.2f}" if r["predicted_step_seconds"] is not None else "–"
        ppeak = f"{r['predicted_peak_mb']:.0f}" if r["predicted_peak_mb"] is not None else "–"
        label = method + (" (+ checkpointing)" if r["gradient_checkpointing"] else "")
        peak = f"{r['peak_rss_mb']:.0f}"
        if r.get("ranks", 1) > 1:
            label = f"full, {method} × {r['ranks']} ranks" + (" (+ checkpointing)" if r["gradient_checkpointing"] else "")
            peak += " (" + " / ".join(f"{p:.0f}" for p in r["rank_peak_rss_mb"]) + ")"
        lines.append(f"| {label} | {r['step_seconds']:.2f} | {t_rel} | {peak} | {m_rel} | {r['trainable_params']:,} | "
                     f"{100 * share:.2f} % | {loss} | {ppeak} | {pstep} |")
    v = verdicts(results)
    lines += ["", "## The source's table beside the measurements", "",
              "Each cell: the source's claim → what was measured here (and the figure). PEFT is measured as IA3 "
              "(and prompt tuning, when run), peft's other methods. "
              + ("ZeRO is measured as torch's zero1/zero2/zero3 and DeepSpeed as its own ZeRO stages, each full "
                 "fine-tuning at several ranks: compute per example (step time / ranks) and the largest rank's peak "
                 "against one process's; data-parallel memory efficiency against DDP's per-rank peak (or one "
                 "process's, when ddp did not run)." if parallel else
                 "DeepSpeed and ZeRO are data-parallel strategies: run `tuneforge compare --strategies "
                 "ddp,zero1,zero2,zero3` to measure their columns (`tuneforge plan --nproc N` predicts their "
                 "per-rank memory)."), ""]
    cols = [m for m in results if m != "full"]
    lines.append("| claim | " + " | ".join(f"{COLUMN.get(m, m)} ({m})" for m in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for claim, claimed in SOURCE_CLAIMS.items():
        cells = []
        for m in cols:
            r = results[m]
            source = claimed.get(COLUMN.get(m, ""))
            measured = v[claim][m]
            figure = ""
            if claim == "cuts compute and cost" and full:
                ranks = r.get("ranks", 1)
                figure = (f" ({r['step_seconds'] / full['step_seconds']:.2f}× full's time)" if ranks == 1 else
                          f" ({r['step_seconds'] / ranks / full['step_seconds']:.2f}× one process's time per example)")
            elif claim == "cuts memory use" and full:
                figure = f" ({r['peak_rss_mb'] / full['peak_rss_mb']:.2f}× full's peak)"
            elif claim == "trains few parameters":
                figure = f" ({100 * r['trainable_params'] / max(r['total_params'], 1):.2f} %)"
            elif claim == "memory-efficient data parallelism" and r.get("ranks", 1) == 1:
                figure = " (a method, not a data-parallel scheme)"
            elif claim == "memory-efficient data parallelism":
                reference = _parallel_reference(results, r)
                name = "one process's" if reference is full else "ddp's"
                figure = f" ({r['peak_rss_mb'] / reference['peak_rss_mb']:.2f}× {name} peak)" if reference else ""
            agree = "" if source is None or measured is None else (" ✓" if source == measured else " ✗")
            cells.append(f"{_yes(source)} → {_yes(measured)}{figure}{agree}")
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += ["", "✓: the measurement agrees with the source's cell; ✗: it contradicts it.", ""]
    for chart in charts:
        lines.append(f"![{chart}]({chart})")
    lines.append("")
    return "\n".join(lines)


def write_charts(results: dict[str, dict], out: Path) -> list[str]:
    """Four bar charts (time per step vs full, peak RSS, trainable share, held-out loss); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    full = results.get("full")
    panels = [
        ("time_per_step.png", "time per step (× full fine-tuning)" if full else "time per step (s)",
         [results[m]["step_seconds"] / (full["step_seconds"] if full else 1) for m in methods]),
        ("peak_memory.png", "peak RSS (MB)", [results[m]["peak_rss_mb"] for m in methods]),
        ("trainable_share.png", "trainable parameters (% of all)",
         [100 * results[m]["trainable_params"] / max(results[m]["total_params"], 1) for m in methods]),
        ("heldout_loss.png", "held-out loss after training (nats/token)",
         [results[m]["eval_loss"] if results[m]["eval_loss"] is not None else 0.0 for m in methods]),
    ]
    names = []
    for name, label, values in panels:
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
        bars = ax.bar(methods, values, color=["#888888" if m == "full" else "#3b75af" for m in methods])
        ax.bar_label(bars, fmt="%.2f" if max(values, default=0) < 100 else "%.0f", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        names.append(name)
    return names
