"""The Python API. The CLI and (later) the HTTP service are thin layers over these functions.

    import tuneforge
    summary = tuneforge.train("examples/demo.yaml", overrides=["training.epochs=1"])
    print(tuneforge.generate("runs/demo", ["Where is my parcel?"]))
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import CheckpointError, SpecError, TuneforgeError
from tuneforge.spec import JobSpec, build_spec, load_spec


def _as_spec(spec: JobSpec | dict | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    if isinstance(spec, JobSpec):
        return build_spec(spec.model_dump(mode="json"), overrides) if overrides else spec
    if isinstance(spec, dict):
        return build_spec(spec, overrides)
    return load_spec(spec, overrides)


def train(spec: JobSpec | dict | str | Path, *, overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
          overwrite: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Fine-tune according to `spec` (a JobSpec, a dict, or a YAML path); return the run summary."""
    from tuneforge.train.recipe import train as run_recipe

    spec = _as_spec(spec, overrides)
    result = run_recipe(spec, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress)
    if result["status"] == "succeeded" and spec.eval and spec.eval.before_after:
        result["report"] = str(report(spec.output_dir, progress=progress))
    return result


def report(run_dir: str | Path, data: str | Path | None = None, *, progress: bool = True) -> Path:
    """Write `report.md`: base vs fine-tuned metrics on held-out data, loss curve, examples side by side."""
    from tuneforge.evaluate.report import write_report
    from tuneforge.spec import load_spec

    spec = load_spec(Path(run_dir) / "spec.yaml") if (Path(run_dir) / "spec.yaml").exists() else None
    ev = spec.eval if spec else None
    return write_report(run_dir, data, max_new_tokens=ev.max_new_tokens if ev else 64,
                        examples=ev.examples if ev else 5, progress=progress)


def evaluate(model: str | Path, data: str | Path, task: str | None = None, **kw) -> dict:
    """Metrics of a model or run on a held-out JSONL file (`tuneforge eval`)."""
    from tuneforge.evaluate.runner import evaluate_file

    return evaluate_file(model, data, task, **kw)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    task: str
    method: str | None  # None for a plain (not fine-tuned) model
    run_dir: Path | None
    labels: list[str] | None = None  # classification label set, from the run's spec
    prompt_template: str | None = None  # the spec's data.prompt_template (None: the task's default)


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "spec.yaml").is_file()


def load(ref: str | Path, *, task: str | None = None, device: str = "cpu", like: JobSpec | None = None,
         prompt_template: str | None = None) -> LoadedModel:
    """Load a finished run (base + adapter, or full model) or a plain model reference for inference.
    `like`: format prompts as this spec does (its task, labels, prompt and chat templates), so a base
    model is asked exactly what the fine-tuned one was trained on. `prompt_template` overrides both."""
    loaded = _load(ref, task=task, device=device, like=like)
    if prompt_template is not None:
        from tuneforge.data.templates import check_template

        problem = check_template(loaded.task, prompt_template)
        if problem:
            raise SpecError(f"--prompt-template: {problem}")
        loaded.prompt_template = prompt_template
    return loaded


def _load(ref: str | Path, *, task: str | None, device: str, like: JobSpec | None) -> LoadedModel:
    from tuneforge.models import load_model, load_tokenizer, resolve_model

    if not is_run_dir(ref):
        path = resolve_model(str(ref))
        tokenizer = load_tokenizer(path)
        if like is not None and like.data.chat_template:
            tokenizer.chat_template = like.data.chat_template
        return LoadedModel(load_model(path, device=device).eval(), tokenizer, task or (like.task if like else "chat"),
                           None, None, like.labels if like else None, like.data.prompt_template if like else None)
    run = Path(ref)
    spec = load_spec(run / "spec.yaml")
    if (run / "model").is_dir():
        model = load_model(run / "model", device=device, trust_remote_code=spec.trust_remote_code)
        tokenizer = load_tokenizer(run / "model")
    elif (run / "adapter").is_dir():
        from peft import PeftModel

        base_path = resolve_model(spec.model)
        # QLoRA adapters are applied to the full-precision base for inference: same weights the 4-bit
        # base was quantised from, without bitsandbytes' slower CPU kernels.
        base = load_model(base_path, device=device, trust_remote_code=spec.trust_remote_code)
        model = PeftModel.from_pretrained(base, run / "adapter")
        tokenizer = load_tokenizer(run / "adapter")
    else:
        raise CheckpointError(f"{run} has no adapter/ or model/ folder: the run has not finished (resume it first)")
    return LoadedModel(model.eval(), tokenizer, task or spec.task, spec.method, run, spec.labels,
                       spec.data.prompt_template)


def _stop_ids(tokenizer) -> list[int]:
    """eos plus the family's end-of-turn markers, so chat replies stop at the end of the turn."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|end|>", "<|eot_id|>", "<|endoftext|>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model: LoadedModel | str | Path, prompts: list[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 8, seed: int = 0, progress: bool = False) -> list[str]:
    """Complete each prompt (chat: as a user turn, through the chat template). Greedy by default."""
    from tuneforge.data.encode import encode_prompt

    loaded = model if isinstance(model, LoadedModel) else load(model)
    tok, net = loaded.tokenizer, loaded.model
    device = next(net.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", leave=False)
    for s in starts:
        encoded = [encode_prompt(tok, loaded.task, p, loaded.prompt_template) for p in prompts[s : s + batch_size]]
        longest = max(len(e) for e in encoded)
        # Left padding: every prompt ends at the same position, where generation starts.
        input_ids = torch.tensor([[pad_id] * (longest - len(e)) + e for e in encoded], device=device)
        attention = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded], device=device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = net.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
            eos_token_id=_stop_ids(tok), pad_token_id=pad_id, **sampling,
        )
        outputs.extend(tok.decode(row[longest:], skip_special_tokens=True).strip() for row in out)
    return outputs


def merge(run_dir: str | Path, out: str | Path) -> Path:
    """Write a standalone model (adapter merged into the base weights) that loads with transformers alone."""
    loaded = load(run_dir)
    out = Path(out)
    if loaded.method == "prompt_tuning":
        raise TuneforgeError(
            "prompt tuning learns virtual input tokens, not weight deltas, so there is nothing to merge; "
            f"use the adapter in {run_dir}/adapter with peft, or `tuneforge generate {run_dir}`"
        )
    model = loaded.model.merge_and_unload() if loaded.method not in (None, "full") else loaded.model
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no summary.json (not a finished run)")
    return json.loads(path.read_text())
