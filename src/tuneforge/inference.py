"""Inference: load a finished run (base + adapter, or a full model) or a plain model, and generate.

Used by evaluation, reports, the CLI's generate/chat and (later) the server; it imports nothing
above it (not `api`, not `evaluate`), so those can all build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import CheckpointError, SpecError
from tuneforge.spec import JobSpec
from tuneforge.training.run_dir import RunDir


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
    return RunDir(path).is_run


def is_finished_run(path: str | Path) -> bool:
    return RunDir(path).is_finished


def require_finished_run(run: Path) -> None:
    """CheckpointError unless `run` is a run folder whose training finished (adapter/ or model/ saved)."""
    if not is_run_dir(run):
        raise CheckpointError(f"{run} is not a run folder (no spec.yaml)")
    if not is_finished_run(run):
        raise CheckpointError(f"{run}: the run has not finished (no adapter/ or model/ yet); "
                              f"continue it with `tuneforge train {run} --resume`")


def load(ref: str | Path, *, task: str | None = None, device: str = "cpu", like: JobSpec | None = None,
         prompt_template: str | None = None) -> LoadedModel:
    """Load a finished run (base + adapter, or full model) or a plain model reference for inference.
    `like`: format prompts as this spec does (its task, labels, prompt and chat templates), so a base
    model is asked exactly what the fine-tuned one was trained on. `prompt_template` overrides both."""
    from tuneforge.data.validate import TASKS

    if task is not None and task not in TASKS:
        raise SpecError(f"task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if prompt_template is not None:
        from tuneforge.data.templates import check_template

        run_task = RunDir(ref).read_spec().task if is_run_dir(ref) else None
        problem = check_template(task or run_task or (like.task if like else "chat"), prompt_template)
        if problem:
            raise SpecError(f"--prompt-template: {problem}")
    loaded = _load(ref, task=task, device=device, like=like)
    if prompt_template is not None:
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
    run = RunDir(ref)
    require_finished_run(run.path)
    spec = run.read_spec()
    if run.model.is_dir():
        model = load_model(run.model, device=device, trust_remote_code=spec.trust_remote_code)
        tokenizer = load_tokenizer(run.model)
    else:
        base_path = resolve_model(spec.model)
        # QLoRA adapters are applied to the full-precision base for inference: same weights the 4-bit
        # base was quantised from, without bitsandbytes' slower CPU kernels.
        base = load_model(base_path, device=device, trust_remote_code=spec.trust_remote_code)
        model = load_adapter(base, run.adapter)
        tokenizer = load_tokenizer(run.adapter)
    return LoadedModel(model.eval(), tokenizer, task or spec.task, spec.method, run.path, spec.labels,
                       spec.data.prompt_template)


def load_adapter(base, folder: Path):
    """peft's PeftModel over `base`; a missing or damaged adapter is a CheckpointError naming the file."""
    from peft import PeftModel

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: the run's adapter is incomplete")
    try:
        return PeftModel.from_pretrained(base, folder)
    except Exception as e:  # noqa: BLE001 — bad JSON, a config without peft_type, damaged or mismatched weights
        raise CheckpointError(f"the adapter in {folder} cannot be loaded ({type(e).__name__}: {str(e)[:300]}): "
                              f"adapter_config.json or adapter_model.safetensors there is damaged, or the adapter "
                              "was trained on another base model") from None


def stop_ids(tokenizer) -> list[int]:
    """eos plus the family's end-of-turn markers, so chat replies stop at the end of the turn."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)  # not get_vocab(): that builds the whole vocabulary
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == marker:  # not unk
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def check_generation_args(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise SpecError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # also catches NaN
        raise SpecError(f"temperature: must be 0 (greedy) or more, got {temperature}")


def generate(model: LoadedModel | str | Path, prompts: list, *, max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 8, seed: int = 0, progress: bool = False) -> list[str]:
    """Complete each prompt (chat: a string as a user turn, or a message list, through the chat template).
    Greedy by default."""
    import torch

    from tuneforge.data.encode import encode_prompt

    check_generation_args(max_new_tokens, temperature)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise SpecError(f"prompts: give a list of prompts, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, dict)):
            raise SpecError(f"prompts[{i}]: a prompt is a string, a list of messages or a record, "
                            f"got {type(p).__name__}")
    loaded = model if isinstance(model, LoadedModel) else load(model)
    tok, net = loaded.tokenizer, loaded.model
    device = next(net.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for s in starts:
                encoded = [encode_prompt(tok, loaded.task, p, loaded.prompt_template)
                           for p in prompts[s : s + batch_size]]
                longest = max(len(e) for e in encoded)
                # Left padding: every prompt ends at the same position, where generation starts.
                input_ids = torch.tensor([[pad_id] * (longest - len(e)) + e for e in encoded], device=device)
                attention = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded], device=device)
                sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
                out = net.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids(tok), pad_token_id=pad_id, **sampling,
                )
                outputs.extend(tok.decode(row[longest:], skip_special_tokens=True).strip() for row in out)
    finally:
        torch.set_rng_state(generator_state)  # a library call leaves the caller's random stream as it found it
    return outputs
