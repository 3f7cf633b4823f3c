"""The Python API. The CLI and the HTTP service are thin layers over these functions.

    import tuneforge
    summary = tuneforge.train("examples/demo.yaml", overrides=["training.epochs=1"])
    print(summary.status, summary.final_eval_loss)
    print(tuneforge.generate("runs/demo", ["Where is my parcel?"]))
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tuneforge import files
from tuneforge.errors import CheckpointError, OutputError, SpecError, TuneforgeError
from tuneforge.inference import LoadedModel, generate, is_run_dir, load, require_finished_run
from tuneforge.spec import JobSpec, build_spec, load_spec
from tuneforge.training.run_dir import RunDir
from tuneforge.training.events import ConsoleProgress, EventHandler, RunEvent, RunSummary, StopRequest

__all__ = ["train", "report", "evaluate", "load", "generate", "merge", "summary", "LoadedModel", "RunSummary",
           "RunEvent", "StopRequest", "resolve_job", "is_run_dir", "plan", "compare"]


def resolve_job(spec: JobSpec | dict | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                resume: bool = False) -> JobSpec:
    """A JobSpec from a JobSpec, a dict, a YAML path, or (with `resume`) a run folder or its spec.yaml:
    a run resumes where its folder now lies, even if it was moved or copied there."""
    if isinstance(overrides, str):
        raise SpecError(f"overrides: give a list of KEY=VALUE strings, e.g. [{overrides!r}]")
    if isinstance(spec, JobSpec):
        return build_spec(spec.model_dump(mode="json"), overrides) if overrides else spec
    if isinstance(spec, dict):
        return build_spec(spec, overrides)
    path = files.expand(spec)
    run = None
    if resume and RunDir(path).is_run:
        run = RunDir(path)
    elif resume and path == RunDir(path.parent).spec and RunDir(path.parent).is_ours:
        run = RunDir(path.parent)
    if run is not None:
        return run.read_spec([*overrides, f"output_dir={run.path}"])
    if path.is_dir() and RunDir(path).is_run:
        raise SpecError(f"{spec}: is a run folder, not a spec file; add --resume to continue it (resume=True)")
    return load_spec(path, overrides)


def train(spec: JobSpec | dict | str | Path, *, overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
          overwrite: bool = False, stop_after: int | None = None, progress: bool = True,
          on_event: EventHandler | None = None, stop: StopRequest | None = None, predict_memory: bool = False,
          strict_memory: bool = False) -> RunSummary:
    """Fine-tune according to `spec` (a JobSpec, a dict, a YAML path, or a run folder to resume); return the
    run's summary. `progress`: draw a progress bar on stderr (ignored when `on_event` receives the events).
    `stop`: a StopRequest another thread or a signal handler may set; training then stops at the next step
    boundary with a checkpoint (status "stopped"). `predict_memory`: predict the run's peak memory first
    (`tuneforge plan`, in a child process), warn through the events when it exceeds this machine's memory and
    record it in the summary as `predicted_peak_mb`; `strict_memory`: refuse to start instead of warning.

    A spec with several ranks on this node (distributed.nproc > 1) is trained by the training entry in a child
    process (training/entry.py), which launches them; `on_event` then receives the main rank's events, the same
    `started` / `step` / `checkpoint` / `finished` as one process, and the main rank's summary is returned."""
    from tuneforge.distributed import needs_launch

    job = resolve_job(spec, overrides, resume=resume)
    handler = on_event or (ConsoleProgress() if progress else None)
    predicted = _predict_peak(job, handler, strict_memory) if predict_memory or strict_memory else None
    try:
        if needs_launch(job.distributed):  # this process only watches: the training stack loads in the ranks
            from tuneforge.training.entry import TrainingProcess

            child = TrainingProcess(job, resume=resume, overwrite=overwrite, stop_after=stop_after)
            result = child.wait(handler, stop)
        else:
            from tuneforge.training.recipe import train as run_recipe

            result = run_recipe(job, resume=resume, overwrite=overwrite, stop_after=stop_after, on_event=handler,
                                stop=stop)
    finally:
        if handler is not on_event:
            handler.close()  # an error message must not land inside the progress bar
    if predicted is not None and not result.already_finished:
        result.predicted_peak_mb = predicted
        _record_prediction(Path(result.output_dir), predicted)
    if (result.status == "succeeded" and not result.already_finished and job.eval and job.eval.before_after
            and os.environ.get("RANK", "0") == "0"):  # under torchrun every rank calls this: one report, the main's
        result.report = str(report(result.output_dir, progress=progress and on_event is None))
    return result


def _predict_peak(job: JobSpec, handler: EventHandler | None, strict: bool) -> float | None:
    """The planner's predicted peak (MB) for `job` as written, from a child process (its probe must not count
    in this process's peak); warn, or with `strict` raise, when it exceeds the memory available."""
    import subprocess
    import sys

    d = getattr(job, "distributed", None)
    if d is not None and d.world_size > 1:
        return None  # per-rank predictions: `tuneforge plan --nproc N`
    code = ("import json, sys; from tuneforge.api import plan; from tuneforge.spec import JobSpec; "
            "p = plan(JobSpec.model_validate(json.load(sys.stdin)), methods=(sys.argv[1],)); "
            "print(json.dumps(p.as_dict()))")
    proc = subprocess.run([sys.executable, "-c", code, job.method], input=job.model_dump_json(), capture_output=True,
                          text=True)
    try:
        planned = json.loads(proc.stdout.strip().splitlines()[-1])
        row = planned["combinations"][0]
    except (ValueError, IndexError, KeyError):
        problem = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if strict:
            raise TuneforgeError(f"--strict-memory: could not predict this run's memory ({problem})") from None
        if handler:
            handler(RunEvent("warning", f"memory prediction skipped ({problem})"))
        return None
    peak, memory = row["predicted_peak_mb"], planned["memory_mb"]
    from tuneforge.planning.plan import HEADROOM

    if peak is not None and peak > HEADROOM * memory:
        message = (f"predicted peak memory {peak:,.0f} MB exceeds {HEADROOM:.0%} of this machine's {memory:,.0f} MB "
                   f"({job.method} on {job.model}, batch {job.training.batch_size} x {job.training.max_seq_len}); "
                   "lower training.batch_size or max_seq_len, turn on training.gradient_checkpointing, or use "
                   "method qlora (see `tuneforge plan SPEC`)")
        if strict:
            raise TuneforgeError(f"--strict-memory: {message}")
        if handler:
            handler(RunEvent("warning", message))
    elif handler and peak is not None:
        handler(RunEvent("info", f"predicted peak memory {peak:,.0f} MB of {memory:,.0f} MB"))
    return peak


def _record_prediction(run_dir: Path, predicted: float) -> None:
    """Add the prediction to a finished run's summary.json (the recipe wrote the measured peak)."""
    run = RunDir(run_dir)
    data = run.read_summary()
    if data is None:
        return
    data["predicted_peak_mb"] = predicted
    files.atomic_write_text(run.summary, json.dumps(data, indent=2))


def report(run_dir: str | Path, data: str | Path | None = None, *, progress: bool = True) -> Path:
    """Write `report.md`: base vs fine-tuned metrics on held-out data, loss curve, examples side by side."""
    from tuneforge.evaluation.report import write_report

    run = Path(run_dir)
    require_finished_run(run)
    spec = RunDir(run).read_spec()
    ev = spec.eval
    return write_report(run, data, max_new_tokens=ev.max_new_tokens if ev else 64,
                        examples=ev.examples if ev else 5, progress=progress)


def evaluate(model: str | Path, data: str | Path, task: str | None = None, **kw) -> dict:
    """Metrics of a model or run on a held-out JSONL file (`tuneforge eval`)."""
    from tuneforge.evaluation.runner import evaluate_file

    return evaluate_file(model, data, task, **kw)


def merge(run_dir: str | Path, out: str | Path) -> Path:
    """Write a standalone model (adapter merged into the base weights) that loads with transformers alone.

    `out` must be new, empty, or an earlier merge output (which is replaced); it may not be, hold or lie
    inside the run. Everything is checked before the model loads; a failed write leaves nothing behind."""
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise SpecError(f"--out: give the folder for the merged model, got {out!r}")
    run, out = Path(run_dir), files.expand(out)
    require_finished_run(run)
    spec = RunDir(run).read_spec()
    if spec.method == "prompt_tuning":
        raise TuneforgeError(
            "prompt tuning learns virtual input tokens, not weight deltas, so there is nothing to merge; "
            f"use the adapter in {run}/adapter with peft, or `tuneforge generate {run}`"
        )
    files.refuse_special(out, "--out")
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise OutputError(f"--out: {out} {'is' if o == r else 'is inside' if r in o.parents else 'holds'} the run "
                          f"being merged ({run}); write the merged model to a folder of its own")
    files.check_writable_folder(out, "--out")
    if out.is_dir() and files.owner_of(out) == "run":
        raise OutputError(f"--out: {out} is a tuneforge run folder, not a merged model; merge into a folder of its own")
    if out.is_dir() and not files.is_empty_folder(out) and files.owner_of(out) != "merge":
        raise OutputError(files.not_ours_message(out, files.MERGE_MARKER, "--out"))

    loaded = load(run)
    model = loaded.model.merge_and_unload() if loaded.method not in (None, "full") else loaded.model
    tmp = files.temporary_folder(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        files.mark(tmp, files.MERGE_MARKER)
    except (OSError, RuntimeError) as e:
        files.remove_temporary(tmp)
        raise files.disk_error(e, out) from None
    except BaseException:
        files.remove_temporary(tmp)
        raise
    if files.is_empty_folder(out):
        out.rmdir()
    elif out.exists():
        files.remove_owned(out)
    tmp.rename(out)
    return out


def plan(spec: JobSpec | dict | str | Path, *, overrides: list[str] | tuple[str, ...] = (), methods=None,
         strategies=None, device: str | None = None, memory_gb: float | None = None, nproc: int = 1,
         progress=None, use_cache: bool = True):
    """Predict each method's (x strategy's) parameters, memory and step time for `spec` before training, and
    which fit (`tuneforge plan`); returns a tuneforge.planning.plan.Plan (`.as_dict()` for JSON)."""
    from tuneforge.planning.estimate import METHODS
    from tuneforge.planning.plan import plan as make_plan

    job = resolve_job(spec, overrides)
    d = getattr(job, "distributed", None)
    if d is not None and nproc == 1 and d.world_size > 1:
        nproc = d.world_size
        strategies = strategies or (d.strategy,)
    return make_plan(job, methods=methods or METHODS, strategies=strategies or ("none",), device=device,
                     memory_gb=memory_gb, nproc=nproc, progress=progress, use_cache=use_cache)


def compare(spec: JobSpec | dict | str | Path, *, methods=("lora", "dora", "qlora", "ia3", "full"), out: str | Path,
            overrides: list[str] | tuple[str, ...] = (), steps: int | None = None, overwrite: bool = False,
            strategies: tuple[str, ...] = (), nproc: int = 2, backend: str = "torch", progress=None) -> Path:
    """Train `spec` once per method (same data and steps, each in its own process), and with `strategies` full
    fine-tuning at `nproc` ranks under each, and write `compare.md` with PNG charts beside the source document's
    claims (`tuneforge compare`); returns the path of compare.md."""
    from tuneforge.planning.compare import compare_methods

    return compare_methods(resolve_job(spec, overrides), methods=tuple(methods), out=out, steps=steps,
                           overwrite=overwrite, progress=progress, strategies=tuple(strategies), nproc=nproc,
                           backend=backend)


def summary(run_dir: str | Path) -> dict:
    """A finished run's summary.json."""
    data = RunDir(run_dir).read_summary()
    if data is None:
        raise CheckpointError(f"{run_dir}: no readable summary.json (not a finished run)")
    return data

