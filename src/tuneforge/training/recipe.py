"""The training recipe: check -> setup -> train -> save. One class, read top to bottom.

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
- task preference (training/preference.py): DPO or ORPO over (chosen, rejected) pairs, both replies of a pair
  rows of one batch (2x the sequences of a supervised step). DPO's reference is the model with its adapter
  off, a no-grad pass per micro-batch (~+50 % step time for LoRA, no second model in memory), or precomputed
  once before the first step (one forward over the data; full fine-tuning always) and kept in the run folder.
  The loss is normalised by the pairs of the whole accumulated step, as supervised losses by target tokens.
- Periodic validation (loss, token accuracy; preference: loss, reward accuracy and margin); atomic checkpoints
  with optimizer, scheduler, scaler, RNG, data position and the schedule's horizon, so `resume=True` continues
  exactly where a run stopped, was stopped (`stop`), or was killed; a damaged newest checkpoint falls back to
  the one before.
- Everything is checked (spec, output folder, model, data, eval data) before anything is written or
  deleted; `overwrite=True` then removes only what an earlier run wrote (files.py).
- No printing: progress, metrics and warnings go to `on_event` (the CLI draws a bar from them);
  a `StopRequest` is polled at every step boundary.
- Several processes (DDP, ZeRO 1-3, DeepSpeed): whatever depends on the rank (wrapping, sharded optimizer
  state, reductions, checkpoint files) is the `Strategy`'s; the loop is the same for one process and for N.

The planner's probe (planning/probe.py) builds its model with `prepare_model` and times `forward_backward` and
`optimizer_step`, the functions a step of this recipe is made of: a change here changes the prediction with it.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from tuneforge import files
from tuneforge.data.batching import collate, collate_packed, split_by_tokens, step_groups
from tuneforge.data.encode import EncodedData, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.distributed import ForwardLoss, Strategy, build_strategy
from tuneforge.errors import CheckpointError, DataError, OutputError, SpecError, Stopped
from tuneforge.hardware import autocast, grad_scaler, resolve_base_dtype, resolve_device, resolve_precision
from tuneforge.methods.peft_builders import apply_method, base_weight_bytes, count_parameters
from tuneforge.models import load_model, load_tokenizer, resolve_model
from tuneforge.models.attention import use_tuneforge_attention
from tuneforge.spec import JobSpec
from tuneforge.training import checkpoint as ckpt
from tuneforge.training.allocator import release_free_memory
from tuneforge.training.events import EventHandler, RunEvent, RunSummary, StopRequest
from tuneforge.training.kernels import Kernels, effective_dropout, install_kernels, resolve_kernels
from tuneforge.models.head import output_head
from tuneforge.training.loss import count_targets, dataset_loss, loss_fn_for
from tuneforge.training.metrics import MetricsLogger, peak_rss_mb, plot_loss_curve
from tuneforge.training.preference import (PreferenceLoss, attach_reference, count_pairs, dataset_preference_metrics,
                                          load_reference, metrics_from_stats, precompute_reference,
                                          reference_fingerprint, save_reference, without_targets)
from tuneforge.training.run_dir import (EVAL_ACCURACY, EVAL_LOSS, EVAL_REWARD_ACCURACY, TRAIN_ACCURACY, TRAIN_LOSS,
                                        RunDir)

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption. max_steps / epochs only move where the run
# stops (at most to the schedule's horizon, fixed at the start); output_dir is where the run now lies.
RESUMABLE_CHANGES = {f"training.{k}" for k in ("max_steps", "epochs", "eval_every", "save_every", "log_every",
                                                  "keep_checkpoints")} | {"output_dir"} | {
    f"distributed.{k}" for k in ("node_rank", "master_addr", "master_port", "timeout_seconds")}


# ---------------------------------------------------------------- the model, and a step: shared with the planner


def uses_gradient_checkpointing(spec: JobSpec) -> bool:
    gc = spec.training.gradient_checkpointing
    return spec.method == "qlora" if gc is None else gc


def model_settings(spec: JobSpec) -> dict:
    """`prepare_model`'s settings from a spec (the planner's RunShape is filled from the same)."""
    return {"method": spec.method, "adapter": spec.adapter, "packing": spec.training.packing,
            "gradient_checkpointing": uses_gradient_checkpointing(spec),
            "checkpoint_every": spec.training.checkpoint_every}


def load_base(spec: JobSpec, model_path: Path, device: torch.device, base_dtype: torch.dtype):
    """The base model, frozen weights in `base_dtype` (NF4 for QLoRA), no KV cache while training."""
    model = load_model(model_path, dtype=base_dtype, load_in_4bit=spec.method == "qlora", device=str(device),
                       trust_remote_code=spec.trust_remote_code)
    model.config.use_cache = False
    return model


def prepare_model(base, *, method: str, adapter, kernels: Kernels, packing: bool, gradient_checkpointing: bool,
                  checkpoint_every: int = 1, tokenizer_path: str | None = None):
    """`base` with the chosen kernels installed (training/kernels.py; models/attention.py for packed rows and the
    attention kernel), the method
    applied (peft), and its trainable weights in fp32 (their optimizer state too). Used by the recipe on the
    loaded base and by the planner's probe on a randomly initialised cut of it."""
    install_kernels(base, kernels, before_peft=True)
    short_math = kernels.attention == "math-short" and base.config._attn_implementation == "sdpa"
    if packing or short_math:
        use_tuneforge_attention(base, short_math=short_math)
    model = apply_method(base, method, adapter, tokenizer_path=tokenizer_path,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every)
    install_kernels(model, kernels, before_peft=False)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # fp32 trainable weights and optimizer state
            p.data = p.data.float()
    return model


def build_model(spec: JobSpec, model_path: Path, device: torch.device, base_dtype: torch.dtype,
                kernels: Kernels | None = None):
    """The run's model: its base loaded, then `prepare_model`."""
    kernels = kernels or resolve_kernels(spec.training.kernels.model_dump(), device, spec.method, spec.adapter.dropout)
    model = prepare_model(load_base(spec, model_path, device, base_dtype), kernels=kernels,
                          tokenizer_path=str(model_path), **model_settings(spec))
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


def forward_backward(forward, batches: list[dict], n_targets: float, strategy: Strategy, scaler, device: torch.device,
                     autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Forward and backward over a step's micro-batches, each loss divided by the targets of the whole step
    (`n_targets`, across ranks), so accumulating micro-batches equals one big batch. (loss sum, correct)."""
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
    return loss_sum, correct_sum


def optimizer_step(optimizer, params: list, strategy: Strategy, scaler, scheduler, max_grad_norm: float | None):
    """Clip (the true gradients: unscaled first), step (skipped when fp16 gradients overflowed), schedule, zero;
    returns the gradient norm before clipping (None when not clipping)."""
    scaler.unscale_(optimizer)
    grad_norm = strategy.clip_grad_norm(params, max_grad_norm) if max_grad_norm else None
    scaler.step(optimizer)
    scaler.update()
    if grad_norm is None and max_grad_norm:  # DeepSpeed clips inside its step
        grad_norm = strategy.step_grad_norm()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------- checks before anything is written


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
    run = RunDir(out)
    files.refuse_special(out, "output_dir")
    files.check_writable_folder(out, "output_dir")
    owner = files.owner_of(out) if out.is_dir() else None
    if owner == "merge":
        raise OutputError(f"output_dir: {out} holds a merged model made by `tuneforge merge`; choose another folder")
    latest = run.latest_checkpoint()
    legacy_run = owner is None and run.is_run and (latest is not None or run.summary.is_file())
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {run.checkpoints_root}; start without --resume")
        _check_same_run(spec, run)
        return OutputPlan(out, resume=True, overwrite=False, finished=_finished_summary(run),
                          checkpoint_state=ckpt.read_state(latest))
    if out.is_dir() and not files.is_empty_folder(out):
        if owner is None and not legacy_run:
            raise OutputError(files.not_ours_message(out, files.RUN_MARKER, "output_dir"))
        has_run = latest is not None or run.summary.is_file()
        if overwrite and owner is None:
            raise OutputError(files.not_ours_message(out, files.RUN_MARKER, "output_dir"))
        if has_run and not overwrite:
            raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    return OutputPlan(out, resume=False, overwrite=overwrite and out.is_dir())


def _check_same_run(spec: JobSpec, run: RunDir) -> None:
    if not run.spec.exists():
        return
    try:
        saved = yaml.safe_load(run.spec.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{run.spec} is unreadable ({e}); cannot check that --resume continues the same run") from None
    now, before = _flatten(spec.model_dump(mode="json")), _flatten(saved or {})
    diffs = [k for k in now if now[k] != before.get(k) and k not in RESUMABLE_CHANGES]
    if diffs:
        raise CheckpointError(
            f"--resume: the spec differs from the one {run.path} was started with ({', '.join(diffs)}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )


def _finished_summary(run: RunDir) -> RunSummary | None:
    data = run.read_summary()
    if data is None or data.get("status") != "succeeded":
        return None
    return RunSummary.model_validate({**data, "output_dir": data.get("output_dir", str(run.path))})


def save_final(model, tokenizer, method: str, out: Path, state_dict: dict | None = None) -> Path:
    """Write `adapter/` (PEFT format) or `model/` (full fine-tuning), each with the tokenizer.
    `state_dict`: the trained weights gathered from sharded ranks (the model's own tensors are shards)."""
    target = RunDir(out).output(method)
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


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves, and what the summary reports."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0


class Recipe:
    """One fine-tuning run: `Recipe(spec, ...).run()` checks everything, sets up data, model and optimizer,
    restores a checkpoint when resuming, trains, and saves; `train()` below is the same in one call. Every
    stage is a method, and what it makes is the object's state (data, model, optimizer, progress).

    `resume=True` continues from the newest complete checkpoint (a finished run: nothing to do);
    `overwrite=True` first removes what an earlier run wrote in output_dir. `stop_after=N` stops after N
    optimizer steps of this session and `stop` (a StopRequest) at the next step boundary, each leaving a
    checkpoint; the summary's status is then "stopped". `on_event` receives progress. `strategy`: the process
    group this rank belongs to (default: built from the spec; one process outside a launch)."""

    def __init__(self, spec: JobSpec, *, resume: bool = False, overwrite: bool = False,
                 stop_after: int | None = None, on_event: EventHandler | None = None,
                 stop: StopRequest | None = None, strategy: Strategy | None = None):
        self.spec, self.t = spec, spec.training
        self.resume, self.overwrite, self.stop_after = resume, overwrite, stop_after
        self.stop = stop if stop is not None else StopRequest()
        self.on_event = on_event
        self.strategy, self.owns_strategy = strategy, strategy is None
        self.started = time.time()
        self.progress = Progress()
        self.last_loss: float | None = None
        self.last_eval: dict | None = None
        self.last_eval_step: int | None = None
        self.stop_reason: str | None = None
        self.train_seconds, self.session_tokens, self.session_steps = 0.0, 0, 0

    # ---------------------------------------------------------------- check (nothing written yet)

    def check(self) -> RunSummary | None:
        """Check the output folder, spec and data; make the process group; encode the data. Returns the summary
        of a finished run being resumed (nothing left to do), else None."""
        spec, t = self.spec, self.t
        self.plan = plan_output(spec, self.resume, self.overwrite)
        self.run_dir = RunDir(self.plan.out)
        device = resolve_device(spec.device)
        self.autocast_dtype = resolve_precision(t.precision, device)
        # Launched as one of several ranks: this joins their process group.
        self.strategy = self.strategy or build_strategy(spec.distributed, device, batch_size=t.batch_size,
                                                        max_grad_norm=t.max_grad_norm,
                                                        autocast_dtype=self.autocast_dtype)
        self.device = self.strategy.device  # a rank's own GPU (LOCAL_RANK)
        self.emit = _emitter(self.on_event) if self.strategy.is_main else _silent  # the main rank reports for all
        self.base_dtype = resolve_base_dtype(t.base_dtype, spec.method, self.autocast_dtype)
        return self.setup_data()

    def setup_data(self) -> RunSummary | None:
        spec, t, plan = self.spec, self.t, self.plan
        reports = check_data_files(spec)
        self.model_path = resolve_model(spec.model)
        self.tokenizer = load_tokenizer(self.model_path, spec.trust_remote_code)
        if spec.data.chat_template:  # saved with the tokenizer, so the trained model keeps using it
            self.tokenizer.chat_template = spec.data.chat_template
        self.train_data, self.valid_data, self.warnings = prepare_data(spec, self.tokenizer, reports)
        self.lengths = [e.length for e in self.train_data.examples]  # a preference pair: its longer side
        self.steps_per_epoch = len(self.step_groups(epoch=0))
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)
        # The learning-rate schedule is fixed when a run starts; resuming may stop it earlier, not stretch it.
        self.schedule_steps = plan.checkpoint_state.get("schedule_steps", self.total_steps) if plan.resume \
            else self.total_steps
        if plan.finished is not None and self.total_steps <= plan.finished.steps:
            self.emit("info", f"{plan.out} already finished (step {plan.finished.steps}/{plan.finished.total_steps}); "
                              "nothing to do")
            return plan.finished.model_copy(update={"already_finished": True})
        if self.total_steps > self.schedule_steps:
            raise CheckpointError(
                f"--resume: this run would now stop at step {self.total_steps}, past the {self.schedule_steps}-step "
                f"learning-rate schedule it was started with; stretching the schedule would change every remaining "
                f"step. Stop at {self.schedule_steps} or earlier (training.max_steps), or start a new run in another "
                "output_dir")
        if plan.resume and plan.checkpoint_state["step"] > self.total_steps:
            raise CheckpointError(
                f"--resume: the newest checkpoint is at step {plan.checkpoint_state['step']}, past where the run "
                f"would now stop ({self.total_steps}); resume with training.max_steps="
                f"{plan.checkpoint_state['step']} or more")
        return None

    def step_groups(self, epoch: int) -> list:
        """This rank's share of each step of `epoch`: micro-batches rank, rank + world, ... of the global step."""
        t, s = self.t, self.strategy
        return step_groups(self.lengths, t.batch_size, t.grad_accum, t.seed, epoch, t.group_by_length, s.rank,
                           s.world_size)

    # ---------------------------------------------------------------- setup

    def setup_model(self) -> None:
        spec, t = self.spec, self.t
        for w in self.warnings[:20]:
            self.emit("warning", w)
        if len(self.warnings) > 20:
            self.emit("warning", f"... and {len(self.warnings) - 20} more warnings (see `tuneforge data validate --spec ...`)")
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.kernels = resolve_kernels(t.kernels.model_dump(), self.device, spec.method, spec.adapter.dropout)
        self.model = build_model(spec, self.model_path, self.device, self.base_dtype, self.kernels)
        if self.kernels.loss == "chunked" and output_head(self.model) is None:  # prompt tuning: virtual tokens need logits
            self.kernels = replace(self.kernels, loss="library")
        self.model.train()
        self.trainable, self.total_params = count_parameters(self.model)
        self.weight_bytes = base_weight_bytes(self.model)

    def setup_optimizer(self) -> None:
        t, strategy = self.t, self.strategy
        self.preference = self.reference_table = self.valid_reference_table = None
        if self.spec.task == "preference":  # the loss sums over pairs; reference passes go through the same forward
            p = self.spec.preference_settings
            self.preference = PreferenceLoss(self.model, loss=p.loss, beta=p.beta, reference=self.reference,
                                             chunked=self.chunked, shared_prompt=p.shared_prompt)
        # forward(batch) -> (loss sum, correct) as one module, so DDP / FSDP2 / DeepSpeed see every forward
        strategy.heartbeat("sharding the model")
        loss_fn = self.preference or loss_fn_for(self.model, chunked=self.chunked)
        self.forward = strategy.wrap(ForwardLoss(self.model, loss_fn))
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # after wrap: FSDP2's shards, if sharded
        self.optimizer = strategy.build_optimizer(
            self.params, lambda ps: build_optimizer(ps, t.optimizer, t.lr, t.weight_decay), t.lr, t.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, t.scheduler, t.warmup_ratio, self.schedule_steps)
        self.scaler = grad_scaler(self.device, self.autocast_dtype)

    @property
    def chunked(self) -> bool:
        return self.kernels.loss == "chunked"

    @property
    def reference(self) -> str | None:
        """Where DPO's reference log-probs come from: "adapter" (switched off, per micro-batch), "precomputed"
        (full fine-tuning has no adapter to switch off), "none" (ORPO); None for other tasks."""
        if self.spec.task != "preference":
            return None
        p = self.spec.preference_settings
        if p.loss == "orpo":
            return "none"
        return "precomputed" if p.reference == "precomputed" or self.spec.method == "full" else "adapter"

    def setup_reference(self) -> None:
        """A precomputed reference: read back from the run folder (resuming: a full fine-tune's weights have moved
        on, so it cannot be recomputed), or one no-grad pass over the train and validation pairs before the first
        step, written atomically beside the checkpoints."""
        if self.reference != "precomputed":
            return
        path = self.run_dir.reference_logps
        fingerprint = reference_fingerprint(self.train_data, self.valid_data, self.spec, self.autocast_dtype)
        tables = load_reference(path, fingerprint) if self.plan.resume else None
        if tables is None and self.plan.resume and self.progress.step > 0 and self.spec.method == "full":
            raise CheckpointError(f"--resume: {path} is missing or was made for other data or settings; a full "
                                  "fine-tune's reference is its weights before the first step, which are gone: "
                                  "start the run again (--overwrite)")
        if tables is None:
            self.strategy.heartbeat("computing the reference log-probs")
            self.emit("info", f"computing the reference log-probs of {len(self.train_data.examples)} pairs "
                              "(once, before the first step)")
            args = (self.t.batch_size, self.tokenizer.pad_token_id, self.device, self.autocast_dtype)
            tables = {"train": precompute_reference(self.forward, self.preference, self.train_data, *args)}
            if self.valid_data is not None:
                tables["validation"] = precompute_reference(self.forward, self.preference, self.valid_data, *args)
            if self.strategy.is_main:
                save_reference(path, tables, fingerprint)
        self.reference_table, self.valid_reference_table = tables["train"], tables.get("validation")

    def load_checkpoint(self) -> None:
        """Resume: restore the newest readable checkpoint (a damaged one is named, and the one before it used)."""
        if not self.plan.resume:
            return
        self.strategy.heartbeat("loading the checkpoint")
        found, state, skipped = ckpt.load_newest(self.run_dir.path, self.model, self.optimizer, self.scheduler,
                                                 self.scaler, self.strategy)
        for message in skipped:
            self.emit("warning", f"{message}; falling back to the checkpoint before it")
        if found is None:
            raise CheckpointError(f"--resume: every checkpoint in {self.run_dir.checkpoints_root} is damaged: "
                                  + "; ".join(skipped))
        self.progress = Progress(state["step"], state["epoch"], state["step_in_epoch"], state["tokens_seen"])
        self.emit("info", f"resuming from {found} (step {self.progress.step}/{self.total_steps})")

    def prepare_output(self) -> None:
        """Everything is checked, so now the output folder may be prepared: an old run's outputs removed, the
        marker and the resolved spec written, metrics opened (continued when resuming)."""
        out = self.run_dir.path
        if self.strategy.is_main:
            try:
                if self.plan.overwrite:
                    files.remove_run_outputs(out)
                files.mark(out, files.RUN_MARKER)
                files.atomic_write_text(self.run_dir.spec,
                                        self.spec.model_copy(update={"output_dir": str(out)}).to_yaml())
            except OSError as e:
                raise files.disk_error(e, out) from None
        self.strategy.check_peers()  # every rank is here and a collective works, or the silent rank is named
        self.metrics = MetricsLogger(out, resume_step=self.progress.step) if self.strategy.is_main else None
        if self.metrics is not None and self.metrics.repaired:
            self.emit("warning", f"{self.metrics.path}: dropped {self.metrics.repaired} unreadable line(s) "
                                 "(a write cut short)")

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        """Steps until total_steps, a stop request or stop_after; validation, metrics and checkpoints on the way."""
        spec, t, strategy, p = self.spec, self.t, self.strategy, self.progress
        world = strategy.world_size
        self.emit(
            "started",
            f"tuneforge: {spec.method} on {spec.model} ({self.model.config.model_type}), {self.trainable:,} trainable "
            f"/ {self.total_params:,} params ({100 * self.trainable / max(self.total_params, 1):.2f}%), "
            f"{len(self.train_data.examples)} train {'pairs' if self.preference else 'examples'}, {self.total_steps} "
            f"steps, device {self.device}, "
            f"precision {self.autocast_dtype or torch.float32}"
            + (f", {world} ranks ({strategy.name}), global batch {t.batch_size} x {t.grad_accum} x {world} = "
               f"{t.batch_size * t.grad_accum * world}" if world > 1 else ""),
            step=p.step, total_steps=self.total_steps,
            data={"trainable_params": self.trainable, "total_params": self.total_params,
                  "train_examples": len(self.train_data.examples), "schedule_steps": self.schedule_steps,
                  "kernels": self.kernels.as_dict(), "world_size": world, "strategy": strategy.name,
                  "global_batch": t.batch_size * t.grad_accum * world})
        self.stop.armed = True  # from here a signal handler may defer to the step boundary
        try:
            while p.step < self.total_steps:
                steps = self.step_groups(p.epoch)
                for micro_batches in steps[p.step_in_epoch:]:
                    record = self.train_step(micro_batches, len(steps))
                    is_last = p.step >= self.total_steps
                    if self.valid_data is not None and (p.step % t.eval_every == 0 or is_last):
                        record.update(self.validate())
                    if self.metrics is not None and (p.step % t.log_every == 0 or is_last or EVAL_LOSS in record):
                        self.metrics.log(p.step, **record)
                    self.emit("step", f"step {p.step}/{self.total_steps}: train loss {self.last_loss:.4f}",
                              step=p.step, total_steps=self.total_steps, data=record)
                    if not is_last and self.stop_after is not None and self.session_steps >= self.stop_after:
                        self.stop_reason = "stop_after"
                    elif not is_last and (self.stop if world == 1 else strategy.all_reduce_max(bool(self.stop))):
                        self.stop_reason = self.stop.reason or "stopped on another rank"  # all ranks stop together
                    if p.step % t.save_every == 0 or self.stop_reason or is_last:
                        self.save_checkpoint()
                    if is_last or self.stop_reason:
                        return
                p.epoch += 1  # the epoch finished
                p.step_in_epoch = 0
        finally:
            self.stop.armed = False
            if self.metrics is not None:
                self.metrics.close()

    def train_step(self, micro_batches: list[list[int]], steps_in_epoch: int) -> dict:
        """One optimizer step over this rank's micro-batches (example indices); returns the step's metrics."""
        t, strategy, p = self.t, self.strategy, self.progress
        tick = time.perf_counter()
        strategy.heartbeat(f"step {p.step + 1}: forward/backward")
        pairs = self.preference is not None  # a pair is two rows: half the examples fit a token budget
        budget = t.micro_batch_tokens // 2 if pairs and t.micro_batch_tokens else t.micro_batch_tokens
        micro_batches = [part for mb in micro_batches
                         for part in split_by_tokens(mb, self.lengths, budget, t.packing)]
        batches = [self.collate(mb) for mb in micro_batches]
        # the examples' tokens (a pair: both replies with their prompt, however a batch lays them out)
        step_tokens = sum(self.train_data.examples[i].n_tokens for mb in micro_batches for i in mb)
        if strategy.world_size > 1:  # equal forward counts on every rank (wrappers communicate in each)
            batches += [self.empty_batch()] * (int(strategy.all_reduce_max(len(batches))) - len(batches))
        # Normalise by the targets (preference: pairs) of the whole accumulated batch (across processes too).
        count = count_pairs if pairs else (lambda b: count_targets(b["labels"]))
        n_targets = strategy.all_reduce_sum(sum(count(b) for b in batches))
        loss_sum, correct_sum = forward_backward(self.forward, batches, n_targets, strategy, self.scaler, self.device,
                                                 self.autocast_dtype)
        step_tokens = int(strategy.all_reduce_sum(step_tokens))  # the global batch's real tokens
        self.session_tokens += step_tokens
        strategy.heartbeat(f"step {p.step + 1}: optimizer step")
        grad_norm = optimizer_step(self.optimizer, self.params, strategy, self.scaler, self.scheduler,
                                   t.max_grad_norm)
        p.step += 1
        p.step_in_epoch += 1
        self.session_steps += 1
        self.train_seconds += time.perf_counter() - tick
        self.last_loss = strategy.all_reduce_sum(loss_sum) / n_targets
        p.tokens_seen += step_tokens
        if pairs:
            stats = {k: strategy.all_reduce_sum(v) for k, v in self.preference.take_stats().items()}
            task_metrics = metrics_from_stats(stats)
        else:
            task_metrics = {TRAIN_ACCURACY: strategy.all_reduce_sum(correct_sum) / n_targets}
        return {TRAIN_LOSS: self.last_loss, **task_metrics,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "epoch": p.epoch + p.step_in_epoch / steps_in_epoch,
                "tokens_per_second": self.session_tokens / self.train_seconds}

    def collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """The micro-batch of training examples `ids`: padded, packed, or (preference) 2 x len(ids) rows with
        their precomputed reference log-probs when there are some."""
        examples, pad_id = self.train_data.examples, self.tokenizer.pad_token_id
        if self.preference is not None:
            return attach_reference(self.preference.collate([examples[i] for i in ids], pad_id), self.reference_table,
                                    ids)
        return collate_packed([examples[i] for i in ids]) if self.t.packing else collate([examples[i] for i in ids],
                                                                                           pad_id)

    def empty_batch(self) -> dict[str, torch.Tensor]:
        """A micro-batch with no targets (loss 0, gradient 0): keeps a rank in step with its peers when the
        global step has fewer micro-batches than ranks x accumulation (the end of an epoch)."""
        from tuneforge.data.encode import IGNORE_INDEX

        batch = self.collate([0])
        if self.preference is not None:
            return without_targets(batch)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch

    def validate(self) -> dict:
        """Validation loss and token accuracy (preference: loss, reward accuracy and margin) over the whole
        validation set. Several ranks: through the wrapped forward (sharded weights are gathered only inside it),
        every rank over the whole set, in the same order."""
        self.strategy.heartbeat(f"step {self.progress.step}: validation")
        distributed = self.strategy.world_size > 1
        if self.preference is not None:
            self.last_eval = dataset_preference_metrics(
                self.forward, self.preference, self.model, self.valid_data, self.t.batch_size,
                self.tokenizer.pad_token_id, self.device, self.autocast_dtype, self.valid_reference_table)
            self.last_eval_step = self.progress.step
            return self.last_eval
        self.last_eval = dataset_loss(self.forward if distributed else self.model, self.valid_data, self.t.batch_size,
                                      self.tokenizer.pad_token_id, self.device, self.autocast_dtype,
                                      chunked=self.chunked, loss_fn=self.forward if distributed else None)
        self.last_eval_step = self.progress.step
        return self.last_eval

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of this step (every rank writes its part when there are several)."""
        p = self.progress
        self.strategy.heartbeat(f"step {p.step}: writing checkpoint")
        path = ckpt.save_checkpoint(
            self.run_dir.path, p.step, self.model, self.optimizer, self.scheduler,
            {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "tokens_seen": p.tokens_seen,
             "schedule_steps": self.schedule_steps},
            keep=self.t.keep_checkpoints, scaler=self.scaler, strategy=self.strategy)
        self.emit("checkpoint", f"checkpoint {path.name}", step=p.step, total_steps=self.total_steps,
                  data={"path": str(path)})

    # ---------------------------------------------------------------- save

    def finish(self) -> RunSummary:
        """The summary; a finished run also writes its adapter or model, the loss curve and summary.json."""
        spec, strategy, p = self.spec, self.strategy, self.progress
        finished = p.step >= self.total_steps
        latest = self.run_dir.latest_checkpoint()
        rank_peaks = strategy.gather_floats(peak_rss_mb()) if strategy.world_size > 1 else None  # collective
        summary = RunSummary(
            status="succeeded" if finished else "stopped",
            stop_reason=None if finished else self.stop_reason,
            output_dir=str(self.run_dir.path), method=spec.method, task=spec.task, model=spec.model,
            model_path=str(self.model_path), model_type=self.model.config.model_type,
            trainable_params=self.trainable, total_params=self.total_params, base_weight_bytes=self.weight_bytes,
            train_examples=len(self.train_data.examples),
            validation_examples=len(self.valid_data.examples) if self.valid_data else 0,
            train_tokens=self.train_data.total_tokens, steps=p.step, total_steps=self.total_steps,
            schedule_steps=self.schedule_steps, tokens_seen=p.tokens_seen,
            tokens_per_second=self.session_tokens / self.train_seconds if self.train_seconds else 0.0,
            peak_rss_mb=peak_rss_mb(), rank_peak_rss_mb=rank_peaks, final_train_loss=self.last_loss,
            final_eval_loss=self.last_eval[EVAL_LOSS] if self.last_eval else None,
            final_eval_token_accuracy=self.last_eval.get(EVAL_ACCURACY) if self.last_eval else None,
            final_eval_reward_accuracy=self.last_eval.get(EVAL_REWARD_ACCURACY) if self.last_eval else None,
            preference_reference=self.reference,
            eval_step=self.last_eval_step if self.last_eval else None,
            precision=str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            grad_scaler=self.scaler.is_enabled(), base_dtype=str(self.base_dtype).removeprefix("torch."),
            device=str(self.device), kernels=self.kernels.as_dict(),
            adapter_dropout=(effective_dropout(spec.adapter.dropout, self.kernels)
                             if spec.method in ("lora", "dora", "qlora") else None),
            checkpoint=None if finished or latest is None else str(latest.path),
            wall_seconds=time.time() - self.started,
        )
        strategy.heartbeat("gathering the final weights")
        full_state = strategy.full_state_dict(self.model) if finished else None  # collective for sharded strategies
        if strategy.is_main:
            out = self.run_dir.path
            if finished:
                summary.output = str(save_final(self.model, self.tokenizer, spec.method, out, full_state))
                plot_loss_curve(out)
                summary.wall_seconds = time.time() - self.started
                files.atomic_write_text(self.run_dir.summary, summary.model_dump_json(indent=2))
                loss_text = f"loss {self.last_loss:.4f}, " if self.last_loss is not None else ""
                self.emit("finished", f"done: step {p.step}/{self.total_steps}, {loss_text}"
                                      f"{summary.tokens_per_second:.0f} tokens/s, peak RSS {summary.peak_rss_mb:.0f} MB "
                                      f"-> {out}", step=p.step, total_steps=self.total_steps)
            else:
                self.emit("stopped", f"stopped at step {p.step}/{self.total_steps} ({self.stop_reason}); checkpoint "
                                     f"{latest.path.name if latest else '-'} in {out}: continue with `tuneforge train "
                                     f"{out} --resume`", step=p.step, total_steps=self.total_steps,
                          data={"reason": self.stop_reason})
        strategy.barrier()
        return summary

    # ---------------------------------------------------------------- all of it

    def run(self) -> RunSummary:
        done = self.check()
        if done is not None:
            return done
        try:
            self.setup_model()
            self.setup_optimizer()
            self.load_checkpoint()
            self.prepare_output()
            self.setup_reference()
            self.train()
            return self.finish()
        except RuntimeError as e:  # a dead or silent peer: name it instead of a collective's traceback
            diagnosis = self.strategy.diagnose(e)
            if diagnosis is None:
                raise
            raise diagnosis from None
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the loop: no step boundary to wait for
            latest = self.run_dir.latest_checkpoint()
            where = (f"the newest checkpoint is {latest.path.name}: continue with `tuneforge train {self.run_dir.path} "
                     "--resume`" if latest else "nothing was saved, so there is nothing to resume")
            raise Stopped(f"interrupted ({self.stop.reason or 'KeyboardInterrupt'}) before a step boundary; {where}",
                          exit_code=143 if self.stop.reason == "SIGTERM" else 130) from None
        finally:
            if self.owns_strategy:
                self.release()
                self.strategy.close()

    def release(self) -> None:
        """Drop the model, its wrappers and the optimizer before the process group goes: DDP's reducer (and
        ZeRO's optimizer) hold the group, and the last of it freed after destroy_process_group joins gloo's
        worker thread while that thread waits for the GIL this one holds (a rank then never exits)."""
        for name in ("forward", "optimizer", "scheduler", "params", "model"):
            self.__dict__.pop(name, None)
        if self.strategy is not None and self.strategy.world_size > 1:
            import gc

            gc.collect()  # the wrappers' reference cycles, while the group still exists


def train(spec: JobSpec, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          on_event: EventHandler | None = None, stop: StopRequest | None = None,
          strategy: Strategy | None = None) -> RunSummary:
    """Run a fine-tuning job and return its summary (also written to `<output_dir>/summary.json`); see Recipe."""
    return Recipe(spec, resume=resume, overwrite=overwrite, stop_after=stop_after, on_event=on_event, stop=stop,
                  strategy=strategy).run()


def _silent(kind: str, message: str, **kw) -> None:
    """Events of ranks other than the main one: the main rank reports for all."""


def _emitter(on_event: EventHandler | None):
    def emit(kind: str, message: str, **kw) -> None:
        event = RunEvent(kind, message, **kw)
        (log.warning if kind == "warning" else log.info)(message) if on_event is None else on_event(event)

    return emit
