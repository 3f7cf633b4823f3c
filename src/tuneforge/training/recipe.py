"""The training recipe: check -> setup -> train -> save. One file, read top to bottom.

Features and their cost:
- Methods through peft: LoRA, DoRA, QLoRA (base linear weights stored as NF4 by bitsandbytes),
  IA3, prompt tuning; or full fine-tuning (all weights + their optimizer state: ~4x model memory).
- Mixed precision: `precision: auto` = bf16 autocast where the hardware has fast bf16 (CUDA with
  bf16, CPUs with AVX512-BF16/AMX), fp32 otherwise; fp16 always with a gradient scaler.
- Gradient accumulation normalised by the target tokens of the whole accumulated batch, so
  batch 8 x accum 1 and batch 2 x accum 4 follow the same trajectory.
- Length-grouped batches (less padding); gradient checkpointing (less memory, ~30 % slower).
- `training.kernels`: tuneforge's fused loss / norm / dropout / LoRA paths or the libraries' own,
  resolved once and recorded in the summary (training/kernels.py).
- Periodic validation (loss, token accuracy); atomic checkpoints with optimizer, scheduler, scaler,
  RNG, data position and the schedule's horizon, so `resume=True` continues exactly where a run
  stopped, was stopped (`stop`), or was killed; a damaged newest checkpoint falls back to the one before.
- Everything is checked (spec, output folder, model, data, eval data) before anything is written or
  deleted; `overwrite=True` then removes only what an earlier run wrote (files.py).
- No printing: progress, metrics and warnings go to `on_event` (the CLI draws a bar from them);
  a `StopRequest` is polled at every step boundary.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from tuneforge import files
from tuneforge.data.batching import collate, collate_packed, real_tokens, split_by_tokens, step_groups
from tuneforge.data.encode import EncodedData, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.distributed import ForwardLoss, Strategy, build_strategy
from tuneforge.errors import CheckpointError, DataError, OutputError, SpecError, Stopped
from tuneforge.hardware import autocast, grad_scaler, resolve_base_dtype, resolve_device, resolve_precision
from tuneforge.methods.peft_builders import apply_method, base_weight_bytes, count_parameters
from tuneforge.models import load_model, load_tokenizer, resolve_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.spec import JobSpec
from tuneforge.training import checkpoint as ckpt
from tuneforge.training.allocator import release_free_memory
from tuneforge.training.events import EventHandler, RunEvent, RunSummary, StopRequest
from tuneforge.training.kernels import Kernels, effective_dropout, install_kernels, resolve_kernels
from tuneforge.training.loss import count_targets, dataset_loss, loss_fn_for, output_head
from tuneforge.training.metrics import MetricsLogger, peak_rss_mb, plot_loss_curve

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption. max_steps / epochs only move where the run
# stops (at most to the schedule's horizon, fixed at the start); output_dir is where the run now lies.
RESUMABLE_CHANGES = {f"training.{k}" for k in ("max_steps", "epochs", "eval_every", "save_every", "log_every",
                                                  "keep_checkpoints")} | {"output_dir"} | {
    f"distributed.{k}" for k in ("node_rank", "master_addr", "master_port", "timeout_seconds")}


# ---------------------------------------------------------------- setup helpers


def uses_gradient_checkpointing(spec: JobSpec) -> bool:
    gc = spec.training.gradient_checkpointing
    return spec.method == "qlora" if gc is None else gc


def build_model(spec: JobSpec, model_path: Path, device: torch.device, base_dtype: torch.dtype,
                kernels: Kernels | None = None):
    """The base model with the method applied and the chosen kernels installed (training/kernels.py)."""
    t = spec.training
    kernels = kernels or resolve_kernels(t.kernels.model_dump(), device, spec.method, spec.adapter.dropout)
    model = load_model(
        model_path,
        dtype=base_dtype,
        load_in_4bit=spec.method == "qlora",
        device=str(device),
        trust_remote_code=spec.trust_remote_code,
    )
    model.config.use_cache = False  # no KV cache while training
    install_kernels(model, kernels, before_peft=True)
    if t.packing:
        use_packed_attention(model)
    model = apply_method(model, spec.method, spec.adapter, tokenizer_path=str(model_path),
                         gradient_checkpointing=uses_gradient_checkpointing(spec), checkpoint_every=t.checkpoint_every)
    install_kernels(model, kernels, before_peft=False)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # fp32 trainable weights and optimizer state
            p.data = p.data.float()
    release_free_memory()  # the loading's freed buffers back to the OS before the steps allocate theirs
    return model


def build_optimizer(params: list, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # fused: one kernel for all adapter tensors (5.3-6.4 ms vs 23-24 ms per step for SmolLM2's 420 LoRA tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def build_scheduler(optimizer, name: str, warmup_ratio: float, schedule_steps: int):
    from transformers import get_scheduler

    return get_scheduler("constant_with_warmup" if name == "constant" else name, optimizer,
                         num_warmup_steps=round(warmup_ratio * schedule_steps), num_training_steps=schedule_steps)


def check_data_files(spec: JobSpec) -> list:
    """Validate every data file the run will read (train, validation, eval) before anything else;
    return the reports (train first). All problems of all files are reported at once."""
    paths = [spec.data.train] + ([spec.data.validation] if spec.data.validation else [])
    if spec.eval is not None:
        paths.append(spec.eval.data)
    reports = [validate_jsonl(p, spec.task, spec.labels) for p in paths]
    problems = [p for r in reports for p in r.errors]
    if len([r for r in reports if not r.ok]) > 1:
        raise DataError("\n".join(str(e) for e in _each_error(reports)), problems)
    for r in reports:
        r.raise_if_errors()
    return reports


def _each_error(reports):
    for r in reports:
        if not r.ok:
            try:
                r.raise_if_errors()
            except DataError as e:
                yield e


def prepare_data(spec: JobSpec, tokenizer, reports: list) -> tuple[EncodedData, EncodedData | None, list[str]]:
    """Split and encode validated data; return (train, validation, warnings)."""
    report = reports[0]
    warnings = [str(p) for r in reports for p in r.warnings]
    records, lines = report.records, report.lines
    valid_records, valid_lines = (reports[1].records, reports[1].lines) if spec.data.validation else ([], [])
    valid_source = spec.data.validation or spec.data.train
    if spec.data.validation_split:
        idx = list(range(len(records)))
        random.Random(spec.training.seed).shuffle(idx)
        n_val = max(1, round(len(idx) * spec.data.validation_split))
        if n_val >= len(idx):
            raise DataError(
                f"{spec.data.train}: {len(idx)} example(s), and data.validation_split={spec.data.validation_split} "
                f"holds out {n_val} of them for validation, leaving none to train on; add examples, give a "
                "validation file (data.validation), or drop validation_split")
        held = set(idx[:n_val])
        valid_records = [records[i] for i in sorted(held)]
        valid_lines = [lines[i] for i in sorted(held)]
        records = [r for i, r in enumerate(records) if i not in held]
        lines = [l for i, l in enumerate(lines) if i not in held]
    t = spec.training
    template = spec.data.prompt_template
    train = encode_records(tokenizer, spec.task, records, lines, t.max_seq_len, spec.data.overlong, template,
                           source=spec.data.train)
    if not train.examples:
        raise DataError(
            f"{spec.data.train}: no trainable examples left: {train.dropped} of {len(records)} dropped (longer than "
            f"training.max_seq_len={t.max_seq_len}, or no target tokens left after truncation; the longest is "
            f"{train.longest} tokens); raise max_seq_len or use data.overlong: truncate")
    valid = (encode_records(tokenizer, spec.task, valid_records, valid_lines, t.max_seq_len, "truncate", template,
                            source=valid_source)
             if valid_records else None)
    if train.truncated or train.dropped:
        warnings.append(
            f"{spec.data.train}: {train.truncated} example(s) truncated, {train.dropped} dropped "
            f"(longer than max_seq_len={t.max_seq_len}; longest is {train.longest} tokens)"
        )
    return train, valid, warnings


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class OutputPlan:
    """What the output folder holds and what this call will do with it (decided before any write)."""

    out: Path
    resume: bool  # continue from a checkpoint
    overwrite: bool  # remove an earlier run's outputs first
    finished: RunSummary | None = None  # the summary of a finished run being resumed
    checkpoint_state: dict | None = None  # state.json of the newest checkpoint (step, schedule horizon)


def plan_output(spec: JobSpec, resume: bool, overwrite: bool) -> OutputPlan:
    """Check the output folder for this run; raise before anything is written if it cannot be used."""
    if resume and overwrite:
        raise SpecError("--resume continues the run in output_dir and --overwrite deletes it: pass one of them")
    out = files.expand(spec.output_dir)
    files.refuse_special(out, "output_dir")
    files.check_writable_folder(out, "output_dir")
    owner = files.owner_of(out) if out.is_dir() else None
    if owner == "merge":
        raise OutputError(f"output_dir: {out} holds a merged model made by `tuneforge merge`; choose another folder")
    latest = ckpt.latest_checkpoint(out) if out.is_dir() else None
    legacy_run = owner is None and out.is_dir() and (out / "spec.yaml").is_file() and (
        latest is not None or (out / "summary.json").is_file())
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; start without --resume")
        _check_same_run(spec, out)
        return OutputPlan(out, resume=True, overwrite=False, finished=_finished_summary(out),
                          checkpoint_state=ckpt.read_state(latest))
    if out.is_dir() and not files.is_empty_folder(out):
        if owner is None and not legacy_run:
            raise OutputError(files.not_ours_message(out, files.RUN_MARKER, "output_dir"))
        has_run = latest is not None or (out / "summary.json").is_file()
        if overwrite and owner is None:
            raise OutputError(files.not_ours_message(out, files.RUN_MARKER, "output_dir"))
        if has_run and not overwrite:
            raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    return OutputPlan(out, resume=False, overwrite=overwrite and out.is_dir())


def _check_same_run(spec: JobSpec, out: Path) -> None:
    if not (out / "spec.yaml").exists():
        return
    try:
        saved = yaml.safe_load((out / "spec.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{out / 'spec.yaml'} is unreadable ({e}); cannot check that --resume continues the same run") from None
    now, before = _flatten(spec.model_dump(mode="json")), _flatten(saved or {})
    diffs = [k for k in now if now[k] != before.get(k) and k not in RESUMABLE_CHANGES]
    if diffs:
        raise CheckpointError(
            f"--resume: the spec differs from the one {out} was started with ({', '.join(diffs)}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )


def _finished_summary(out: Path) -> RunSummary | None:
    try:
        data = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("status") != "succeeded":
        return None
    return RunSummary.model_validate({**data, "output_dir": data.get("output_dir", str(out))})


def save_final(model, tokenizer, method: str, out: Path, state_dict: dict | None = None) -> Path:
    """Write `adapter/` (PEFT format) or `model/` (full fine-tuning), each with the tokenizer.
    `state_dict`: the trained weights gathered from sharded ranks (the model's own tensors are shards)."""
    target = out / ("model" if method == "full" else "adapter")
    model.config.use_cache = True  # turned off for training; a saved model should generate with a KV cache
    tmp = out / f".tmp-{target.name}"
    try:
        if tmp.exists():
            files.remove_owned(tmp)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as e:
        files.remove_temporary(tmp)
        raise files.disk_error(e, target) from None
    if target.exists():
        files.remove_owned(target)
    tmp.rename(target)
    return target


# ---------------------------------------------------------------- the recipe


def train(spec: JobSpec, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          on_event: EventHandler | None = None, stop: StopRequest | None = None,
          strategy: Strategy | None = None) -> RunSummary:
    """Run a fine-tuning job and return its summary (also written to `<output_dir>/summary.json`).

    `resume=True` continues from the newest complete checkpoint (a finished run: nothing to do);
    `overwrite=True` first removes what an earlier run wrote in output_dir. `stop_after=N` stops after
    N optimizer steps of this session and `stop` (a StopRequest) at the next step boundary, each
    leaving a checkpoint; the summary's status is then "stopped". `on_event` receives progress.
    """
    started = time.time()
    stop = stop if stop is not None else StopRequest()
    emit = _emitter(on_event)
    t = spec.training

    # ---- check everything before writing or deleting anything
    plan = plan_output(spec, resume, overwrite)
    out = plan.out
    device = resolve_device(spec.device)
    owns_strategy = strategy is None
    autocast_dtype = resolve_precision(t.precision, device)
    # Launched as one of several ranks: this joins their process group.
    strategy = strategy or build_strategy(spec.distributed, device, batch_size=t.batch_size,
                                          max_grad_norm=t.max_grad_norm, autocast_dtype=autocast_dtype)
    device = strategy.device  # a rank's own GPU (LOCAL_RANK)
    base_dtype = resolve_base_dtype(t.base_dtype, spec.method, autocast_dtype)
    reports = check_data_files(spec)
    model_path = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_path, spec.trust_remote_code)
    if spec.data.chat_template:  # saved with the tokenizer, so the trained model keeps using it
        tokenizer.chat_template = spec.data.chat_template
    train_data, valid_data, warnings = prepare_data(spec, tokenizer, reports)
    lengths = [len(e.input_ids) for e in train_data.examples]
    steps_per_epoch = len(step_groups(lengths, t.batch_size, t.grad_accum, t.seed, 0, t.group_by_length,
                                      strategy.rank, strategy.world_size))
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    # The learning-rate schedule is fixed when a run starts; resuming may stop it earlier, not stretch it.
    schedule_steps = plan.checkpoint_state.get("schedule_steps", total_steps) if plan.resume else total_steps
    if plan.finished is not None and total_steps <= plan.finished.steps:
        emit("info", f"{out} already finished (step {plan.finished.steps}/{plan.finished.total_steps}); nothing to do")
        return plan.finished.model_copy(update={"already_finished": True})
    if total_steps > schedule_steps:
        raise CheckpointError(
            f"--resume: this run would now stop at step {total_steps}, past the {schedule_steps}-step learning-rate "
            f"schedule it was started with; stretching the schedule would change every remaining step. Stop at "
            f"{schedule_steps} or earlier (training.max_steps), or start a new run in another output_dir")
    if plan.resume and plan.checkpoint_state["step"] > total_steps:
        raise CheckpointError(
            f"--resume: the newest checkpoint is at step {plan.checkpoint_state['step']}, past where the run "
            f"would now stop ({total_steps}); resume with training.max_steps={plan.checkpoint_state['step']} or more")

    try:
        return _run(spec, plan, device, strategy, autocast_dtype, base_dtype, model_path, tokenizer, train_data,
                    valid_data, warnings, lengths, total_steps, schedule_steps, stop_after, stop,
                    emit if strategy.is_main else _silent, started)
    except RuntimeError as e:  # a dead or silent peer: name it instead of a collective's traceback
        diagnosis = strategy.diagnose(e)
        if diagnosis is None:
            raise
        raise diagnosis from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop: no step boundary to wait for
        latest = ckpt.latest_checkpoint(out) if out.is_dir() else None
        where = (f"the newest checkpoint is {latest.name}: continue with `tuneforge train {out} --resume`" if latest
                 else "nothing was saved, so there is nothing to resume")
        raise Stopped(f"interrupted ({stop.reason or 'KeyboardInterrupt'}) before a step boundary; {where}",
                      exit_code=143 if stop.reason == "SIGTERM" else 130) from None
    finally:
        if owns_strategy:
            strategy.close()


def _silent(kind: str, message: str, **kw) -> None:
    """Events of ranks other than the main one: the main rank reports for all."""


def _emitter(on_event: EventHandler | None):
    def emit(kind: str, message: str, **kw) -> None:
        event = RunEvent(kind, message, **kw)
        (log.warning if kind == "warning" else log.info)(message) if on_event is None else on_event(event)

    return emit


def _run(spec, plan, device, strategy, autocast_dtype, base_dtype, model_path, tokenizer, train_data, valid_data,
         warnings, lengths, total_steps, schedule_steps, stop_after, stop, emit, started) -> RunSummary:
    t = spec.training
    out = plan.out
    for w in warnings[:20]:
        emit("warning", w)
    if len(warnings) > 20:
        emit("warning", f"... and {len(warnings) - 20} more warnings (see `tuneforge data validate --spec ...`)")

    # ---- model, optimizer, schedule
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    kernels = resolve_kernels(t.kernels.model_dump(), device, spec.method, spec.adapter.dropout)
    model = build_model(spec, model_path, device, base_dtype, kernels)
    if kernels.loss == "chunked" and output_head(model) is None:  # e.g. prompt tuning: virtual tokens need logits
        kernels = replace(kernels, loss="library")
    model.train()
    trainable, total = count_parameters(model)
    weight_bytes = base_weight_bytes(model)
    # forward(batch) -> (loss sum, correct) as one module, so DDP / FSDP2 / DeepSpeed see every forward
    strategy.heartbeat("sharding the model")
    forward = strategy.wrap(ForwardLoss(model, loss_fn_for(model, chunked=kernels.loss == "chunked")))
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2's shards, if sharded
    optimizer = strategy.build_optimizer(params, lambda ps: build_optimizer(ps, t.optimizer, t.lr, t.weight_decay),
                                         t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.scheduler, t.warmup_ratio, schedule_steps)
    scaler = grad_scaler(device, autocast_dtype)

    # ---- resume
    step, epoch, step_in_epoch, tokens_seen = 0, 0, 0, 0
    if plan.resume:
        strategy.heartbeat("loading the checkpoint")
        if strategy.world_size > 1:  # every rank loads its part
            found_path, state, skipped = ckpt.load_distributed(out, model, optimizer, scheduler, scaler, strategy)
        else:
            found, skipped = ckpt.newest_readable(out)
        for message in skipped:
            emit("warning", f"{message}; falling back to the checkpoint before it")
        if (found_path if strategy.world_size > 1 else found) is None:
            raise CheckpointError(f"--resume: every checkpoint in {out / 'checkpoints'} is damaged: "
                                  + "; ".join(skipped))
        if strategy.world_size == 1:
            state, found_path = ckpt.apply_checkpoint(found, model, optimizer, scheduler, scaler), found.path
        step, epoch, step_in_epoch, tokens_seen = state["step"], state["epoch"], state["step_in_epoch"], state["tokens_seen"]
        emit("info", f"resuming from {found_path} (step {step}/{total_steps})")

    # ---- the output folder: everything above is checked, so now it may be prepared
    if strategy.is_main:
        try:
            if plan.overwrite:
                files.remove_run_outputs(out)
            files.mark(out, files.RUN_MARKER)
            files.atomic_write_text(out / "spec.yaml", spec.model_copy(update={"output_dir": str(out)}).to_yaml())
        except OSError as e:
            raise files.disk_error(e, out) from None
    strategy.check_peers()  # every rank is here and a collective works, or the silent rank is named
    metrics = MetricsLogger(out, resume_step=step) if strategy.is_main else None
    if metrics is not None and metrics.repaired:
        emit("warning", f"{metrics.path}: dropped {metrics.repaired} unreadable line(s) (a write cut short)")

    emit("started",
         f"tuneforge: {spec.method} on {spec.model} ({model.config.model_type}), {trainable:,} trainable / "
         f"{total:,} params ({100 * trainable / max(total, 1):.2f}%), {len(train_data.examples)} train examples, "
         f"{total_steps} steps, device {device}, precision {autocast_dtype or torch.float32}"
         + (f", {strategy.world_size} ranks ({strategy.name}), global batch {t.batch_size} x {t.grad_accum} x "
            f"{strategy.world_size} = {t.batch_size * t.grad_accum * strategy.world_size}" if strategy.world_size > 1 else ""),
         step=step, total_steps=total_steps,
         data={"trainable_params": trainable, "total_params": total, "train_examples": len(train_data.examples),
               "schedule_steps": schedule_steps, "kernels": kernels.as_dict(),
               "world_size": strategy.world_size, "strategy": strategy.name,
               "global_batch": t.batch_size * t.grad_accum * strategy.world_size})

    # ---- train
    pad_id = tokenizer.pad_token_id
    train_seconds, session_tokens, session_steps = 0.0, 0, 0
    last_loss = last_eval = None
    last_eval_step = -1
    stop_reason = None
    stop.armed = True  # from here a signal handler may defer to the step boundary
    try:
        while step < total_steps:
            # This rank's share of each step: micro-batches rank, rank + world, ... of the global step
            steps = step_groups(lengths, t.batch_size, t.grad_accum, t.seed, epoch, t.group_by_length,
                                strategy.rank, strategy.world_size)
            for micro_batches in steps[step_in_epoch:]:
                tick = time.perf_counter()
                strategy.heartbeat(f"step {step + 1}: forward/backward")
                micro_batches = [part for mb in micro_batches
                                 for part in split_by_tokens(mb, lengths, t.micro_batch_tokens, t.packing)]
                batches = [collate_packed([train_data.examples[i] for i in mb]) if t.packing
                           else collate([train_data.examples[i] for i in mb], pad_id) for mb in micro_batches]
                step_tokens = sum(real_tokens(b) for b in batches)
                if strategy.world_size > 1:  # equal forward counts on every rank (wrappers communicate in each)
                    batches += [_empty_batch(train_data, pad_id, t.packing)] * (
                        int(strategy.all_reduce_max(len(batches))) - len(batches))
                # Normalise by the targets of the whole accumulated batch (across processes too).
                n_targets = strategy.all_reduce_sum(sum(count_targets(b["labels"]) for b in batches))
                loss_sum = correct_sum = 0.0
                for m, batch in enumerate(batches):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with strategy.accumulate(forward, is_last=m == len(batches) - 1):
                        with autocast(device, autocast_dtype):
                            loss, correct = forward(batch)
                        # grad_scale undoes the wrappers' average over ranks (distributed/strategy.py)
                        scaled = loss if strategy.grad_scale == 1 else loss * strategy.grad_scale
                        strategy.backward(scaler.scale(scaled / n_targets))  # scale: identity unless fp16
                    loss_sum += loss.item()
                    correct_sum += correct.item()
                step_tokens = int(strategy.all_reduce_sum(step_tokens))  # the global batch's real tokens
                session_tokens += step_tokens
                strategy.heartbeat(f"step {step + 1}: optimizer step")
                scaler.unscale_(optimizer)  # clip the true gradients
                grad_norm = strategy.clip_grad_norm(params, t.max_grad_norm) if t.max_grad_norm else None
                scaler.step(optimizer)  # skipped if fp16 gradients overflowed
                scaler.update()
                if grad_norm is None and t.max_grad_norm:  # DeepSpeed clips inside its step
                    grad_norm = strategy.step_grad_norm()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_in_epoch += 1
                session_steps += 1
                train_seconds += time.perf_counter() - tick
                last_loss = strategy.all_reduce_sum(loss_sum) / n_targets
                tokens_seen += step_tokens

                is_last = step >= total_steps
                record = {"train_loss": last_loss, "train_token_accuracy": strategy.all_reduce_sum(correct_sum) / n_targets,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "epoch": epoch + step_in_epoch / len(steps), "tokens_per_second": session_tokens / train_seconds}
                if valid_data is not None and (step % t.eval_every == 0 or is_last):
                    strategy.heartbeat(f"step {step}: validation")
                    # Distributed: through the wrapped forward (sharded weights are gathered only inside it);
                    # every rank evaluates the whole validation set, in the same order.
                    last_eval = dataset_loss(forward if strategy.world_size > 1 else model, valid_data, t.batch_size,
                                             pad_id, device, autocast_dtype, chunked=kernels.loss == "chunked",
                                             loss_fn=forward if strategy.world_size > 1 else None)
                    last_eval_step = step
                    record.update(last_eval)
                if metrics is not None and (step % t.log_every == 0 or is_last or "eval_loss" in record):
                    metrics.log(step, **record)
                emit("step", f"step {step}/{total_steps}: train loss {last_loss:.4f}", step=step,
                     total_steps=total_steps, data=record)
                if not is_last and stop_after is not None and session_steps >= stop_after:
                    stop_reason = "stop_after"
                elif not is_last and (stop if strategy.world_size == 1 else strategy.all_reduce_max(bool(stop))):
                    stop_reason = stop.reason or "stopped on another rank"  # all ranks stop at the same step
                # Every rank takes part in a checkpoint when there are several (each writes its shards).
                if (strategy.is_main or strategy.world_size > 1) and (step % t.save_every == 0 or stop_reason or is_last):
                    strategy.heartbeat(f"step {step}: writing checkpoint")
                    path = ckpt.save_checkpoint(
                        out, step, model, optimizer, scheduler,
                        {"epoch": epoch, "step_in_epoch": step_in_epoch, "tokens_seen": tokens_seen,
                         "schedule_steps": schedule_steps},
                        keep=t.keep_checkpoints, scaler=scaler, strategy=strategy if strategy.world_size > 1 else None,
                    )
                    emit("checkpoint", f"checkpoint {path.name}", step=step, total_steps=total_steps,
                         data={"path": str(path)})
                if is_last or stop_reason:
                    break
            else:  # epoch finished
                epoch += 1
                step_in_epoch = 0
                continue
            break
    finally:
        stop.armed = False
        if metrics is not None:
            metrics.close()

    # ---- save
    finished = step >= total_steps
    latest = ckpt.latest_checkpoint(out)
    rank_peaks = strategy.gather_floats(peak_rss_mb()) if strategy.world_size > 1 else None  # collective
    summary = RunSummary(
        status="succeeded" if finished else "stopped",
        stop_reason=None if finished else stop_reason,
        output_dir=str(out),
        method=spec.method,
        task=spec.task,
        model=spec.model,
        model_path=str(model_path),
        model_type=model.config.model_type,
        trainable_params=trainable,
        total_params=total,
        base_weight_bytes=weight_bytes,
        train_examples=len(train_data.examples),
        validation_examples=len(valid_data.examples) if valid_data else 0,
        train_tokens=train_data.total_tokens,
        steps=step,
        total_steps=total_steps,
        schedule_steps=schedule_steps,
        tokens_seen=tokens_seen,
        tokens_per_second=session_tokens / train_seconds if train_seconds else 0.0,
        peak_rss_mb=peak_rss_mb(),
        rank_peak_rss_mb=rank_peaks,
        final_train_loss=last_loss,
        final_eval_loss=last_eval["eval_loss"] if last_eval else None,
        final_eval_token_accuracy=last_eval["eval_token_accuracy"] if last_eval else None,
        eval_step=last_eval_step if last_eval else None,
        precision=str(autocast_dtype or torch.float32).removeprefix("torch."),
        grad_scaler=scaler.is_enabled(),
        base_dtype=str(base_dtype).removeprefix("torch."),
        device=str(device),
        kernels=kernels.as_dict(),
        adapter_dropout=effective_dropout(spec.adapter.dropout, kernels) if spec.method in ("lora", "dora", "qlora") else None,
        checkpoint=None if finished or latest is None else str(latest),
        wall_seconds=time.time() - started,
    )
    loss_text = f"loss {last_loss:.4f}, " if last_loss is not None else ""
    strategy.heartbeat("gathering the final weights")
    full_state = strategy.full_state_dict(model) if finished else None  # collective for sharded strategies
    if strategy.is_main:
        if finished:
            summary.output = str(save_final(model, tokenizer, spec.method, out, full_state))
            plot_loss_curve(out)
            summary.wall_seconds = time.time() - started
            files.atomic_write_text(out / "summary.json", summary.model_dump_json(indent=2))
            emit("finished", f"done: step {step}/{total_steps}, {loss_text}{summary.tokens_per_second:.0f} tokens/s, "
                             f"peak RSS {summary.peak_rss_mb:.0f} MB -> {out}", step=step, total_steps=total_steps)
        else:
            emit("stopped", f"stopped at step {step}/{total_steps} ({stop_reason}); checkpoint {latest.name if latest else '-'} "
                            f"in {out}: continue with `tuneforge train {out} --resume`", step=step,
                 total_steps=total_steps, data={"reason": stop_reason})
    strategy.barrier()
    return summary


def _empty_batch(data: EncodedData, pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """A micro-batch with no targets (loss 0, gradient 0): keeps a rank in step with its peers when the
    global step has fewer micro-batches than ranks x accumulation (the end of an epoch)."""
    from tuneforge.data.encode import IGNORE_INDEX

    example = data.examples[0]
    batch = collate_packed([example]) if packing else collate([example], pad_id)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch
