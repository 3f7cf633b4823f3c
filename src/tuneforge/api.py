"""The Python API. The CLI and the HTTP service are thin layers over these functions.

    import tuneforge
    summary = tuneforge.train("examples/demo.yaml", overrides=["training.epochs=1"])
    print(summary.status, summary.final_eval_loss)
    print(tuneforge.generate("runs/demo", ["Where is my parcel?"]))
"""
from __future__ import annotations

import json
from pathlib import Path

from tuneforge import files
from tuneforge.errors import CheckpointError, OutputError, SpecError, TuneforgeError
from tuneforge.inference import LoadedModel, generate, is_run_dir, load, require_finished_run
from tuneforge.spec import JobSpec, build_spec, load_spec
from tuneforge.training.events import ConsoleProgress, EventHandler, RunEvent, RunSummary, StopRequest

__all__ = ["train", "report", "evaluate", "load", "generate", "merge", "summary", "LoadedModel", "RunSummary",
           "RunEvent", "StopRequest", "resolve_job", "is_run_dir"]


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
    run_dir = None
    if resume and path.is_dir() and (path / "spec.yaml").is_file():
        run_dir, path = path, path / "spec.yaml"
    elif resume and path.name == "spec.yaml" and files.owner_of(path.parent) == "run":
        run_dir = path.parent
    if run_dir is not None:
        return load_spec(path, [*overrides, f"output_dir={run_dir}"])
    return load_spec(path, overrides)


def train(spec: JobSpec | dict | str | Path, *, overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
          overwrite: bool = False, stop_after: int | None = None, progress: bool = True,
          on_event: EventHandler | None = None, stop: StopRequest | None = None) -> RunSummary:
    """Fine-tune according to `spec` (a JobSpec, a dict, a YAML path, or a run folder to resume); return the
    run's summary. `progress`: draw a progress bar on stderr (ignored when `on_event` receives the events).
    `stop`: a StopRequest another thread or a signal handler may set; training then stops at the next step
    boundary with a checkpoint (status "stopped")."""
    from tuneforge.training.recipe import train as run_recipe

    job = resolve_job(spec, overrides, resume=resume)
    handler = on_event or (ConsoleProgress() if progress else None)
    result = run_recipe(job, resume=resume, overwrite=overwrite, stop_after=stop_after, on_event=handler, stop=stop)
    if result.status == "succeeded" and not result.already_finished and job.eval and job.eval.before_after:
        result.report = str(report(result.output_dir, progress=progress and on_event is None))
    return result


def report(run_dir: str | Path, data: str | Path | None = None, *, progress: bool = True) -> Path:
    """Write `report.md`: base vs fine-tuned metrics on held-out data, loss curve, examples side by side."""
    from tuneforge.evaluation.report import write_report

    run = Path(run_dir)
    require_finished_run(run)
    spec = load_spec(run / "spec.yaml")
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
    spec = load_spec(run / "spec.yaml")
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


def summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no summary.json (not a finished run)")
    return json.loads(path.read_text())

