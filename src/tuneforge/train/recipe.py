"""The training recipe: setup -> train -> save. One file, read top to bottom.

Features and their cost:
- Methods through peft: LoRA, DoRA, QLoRA (base linear weights stored as NF4 by bitsandbytes),
  IA3, prompt tuning; or full fine-tuning (all weights + their optimizer state: ~4x model memory).
- Mixed precision: `precision: auto` = bf16 autocast where the hardware has fast bf16 (CUDA with
  bf16, CPUs with AVX512-BF16/AMX), fp32 otherwise. fp16 is refused on CPU (no fast path there).
- Gradient accumulation normalised by the target tokens of the whole accumulated batch, so
  batch 8 x accum 1 and batch 2 x accum 4 follow the same trajectory.
- Length-grouped batches (less padding); gradient checkpointing (less memory, ~30 % slower).
- Periodic validation (loss, token accuracy); atomic checkpoints with optimizer, scheduler, RNG and
  data position, so `resume=True` continues exactly where a run stopped or was killed.
- Metrics to metrics.jsonl and TensorBoard; a tqdm bar with loss, lr, tokens/s and ETA.
"""
from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from tuneforge.data.batching import collate, collate_packed, real_tokens, split_by_tokens, step_groups
from tuneforge.data.encode import EncodedData, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.distributed import SingleDevice, Strategy
from tuneforge.errors import CheckpointError, SpecError, TuneforgeError
from tuneforge.methods.dropout import use_byte_dropout
from tuneforge.methods.fused_lora import use_fused_lora
from tuneforge.methods.peft_builders import apply_method, base_weight_bytes, count_parameters
from tuneforge.models import load_model, load_tokenizer, resolve_model
from tuneforge.models.attention import use_packed_attention
from tuneforge.models.rmsnorm import use_fused_rmsnorm
from tuneforge.spec import JobSpec
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.allocator import return_big_buffers_to_os
from tuneforge.train.loss import count_targets, loss_fn_for
from tuneforge.train.metrics import MetricsLogger, peak_rss_mb, plot_loss_curve

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption (they don't change the trajectory).
RESUMABLE_CHANGES = {f"training.{k}" for k in ("max_steps", "epochs", "eval_every", "save_every", "log_every",
                                                  "keep_checkpoints")}


# ---------------------------------------------------------------- setup helpers


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: cuda was asked for but no CUDA device is visible; use device: auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~3x faster than fp32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type == "cpu":
            raise SpecError("training.precision: fp16 has no fast path on CPU (measured 0.4 GFLOP/s); use bf16 or auto")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def resolve_base_dtype(base_dtype: str, method: str, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype frozen base weights are stored in (trainable weights always stay fp32)."""
    if base_dtype == "bf16" and method == "full":
        raise SpecError("training.base_dtype: bf16 needs a frozen base; full fine-tuning keeps fp32 master weights")
    if base_dtype == "auto":
        return torch.bfloat16 if autocast_dtype == torch.bfloat16 and method != "full" else torch.float32
    return torch.bfloat16 if base_dtype == "bf16" else torch.float32


def uses_gradient_checkpointing(spec: JobSpec) -> bool:
    gc = spec.training.gradient_checkpointing
    return spec.method == "qlora" if gc is None else gc


def build_model(spec: JobSpec, model_path: Path, device: torch.device, base_dtype: torch.dtype):
    """The base model with the method applied and the training-time fast paths installed."""
    t = spec.training
    model = load_model(
        model_path,
        dtype=base_dtype,
        load_in_4bit=spec.method == "qlora",
        device=str(device),
        trust_remote_code=spec.trust_remote_code,
    )
    model.config.use_cache = False  # no KV cache while training
    use_fused_rmsnorm(model)  # same math, keeps bf16 input + 1/rms instead of two fp32 copies
    if t.packing:
        use_packed_attention(model)
    model = apply_method(model, spec.method, spec.adapter, tokenizer_path=str(model_path),
                         gradient_checkpointing=uses_gradient_checkpointing(spec), checkpoint_every=t.checkpoint_every)
    if spec.method == "qlora" and device.type == "cpu":
        return_big_buffers_to_os()  # QLoRA's per-call dequantised weights fragment the heap
    if device.type == "cpu":
        use_byte_dropout(model)  # CPU mask generation was ~30 % of a LoRA step
        use_fused_lora(model)  # one autograd node per LoRA layer: fewer full-width passes, less kept
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # fp32 trainable weights and optimizer state
            p.data = p.data.float()
    return model


def build_optimizer(params: list, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # fused: one kernel for all adapter tensors (5.3-6.4 ms vs 23-24 ms per step for SmolLM2's 420 LoRA tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def prepare_data(spec: JobSpec, tokenizer) -> tuple[EncodedData, EncodedData | None, list[str]]:
    """Validate (all problems at once), split and encode the data; return (train, validation, warnings)."""
    report = validate_jsonl(spec.data.train, spec.task, spec.labels)
    reports = [report]
    if spec.data.validation:
        reports.append(validate_jsonl(spec.data.validation, spec.task, spec.labels))
    for r in reports:
        r.raise_if_errors()
    warnings = [str(p) for r in reports for p in r.warnings]
    records, lines = report.records, report.lines
    valid_records, valid_lines = (reports[1].records, reports[1].lines) if spec.data.validation else ([], [])
    if spec.data.validation_split:
        idx = list(range(len(records)))
        random.Random(spec.training.seed).shuffle(idx)
        n_val = max(1, round(len(idx) * spec.data.validation_split))
        held = set(idx[:n_val])
        valid_records = [records[i] for i in sorted(held)]
        valid_lines = [lines[i] for i in sorted(held)]
        records = [r for i, r in enumerate(records) if i not in held]
        lines = [l for i, l in enumerate(lines) if i not in held]
    t = spec.training
    template = spec.data.prompt_template
    train = encode_records(tokenizer, spec.task, records, lines, t.max_seq_len, spec.data.overlong, template)
    if not train.examples:
        raise TuneforgeError(f"{spec.data.train}: no trainable examples left after encoding (all too long or empty)")
    valid = (encode_records(tokenizer, spec.task, valid_records, valid_lines, t.max_seq_len, "truncate", template)
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


def check_output_dir(spec: JobSpec, out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to silently mix two runs in one folder."""
    latest = ckpt.latest_checkpoint(out)
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {out}/checkpoints; start without --resume")
        saved = yaml.safe_load((out / "spec.yaml").read_text()) if (out / "spec.yaml").exists() else None
        if saved is not None:
            now, before = _flatten(spec.model_dump(mode="json")), _flatten(saved)
            diffs = [k for k in now if now[k] != before.get(k) and k not in RESUMABLE_CHANGES]
            if diffs:
                raise CheckpointError(
                    f"--resume: the spec differs from the one {out} was started with ({', '.join(diffs)}); "
                    f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
                )
        return latest
    if overwrite:
        shutil.rmtree(out, ignore_errors=True)
    elif latest is not None or (out / "summary.json").exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    return None


@torch.no_grad()
def evaluate(model, data: EncodedData, batch_size: int, pad_id: int, device, autocast_dtype) -> dict[str, float]:
    """Validation loss (nats per target token) and next-token accuracy over the whole set."""
    model.eval()
    loss_fn = loss_fn_for(model)
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].input_ids))
    loss_sum = correct = targets = 0.0
    for s in range(0, len(order), batch_size):
        batch = collate([data.examples[i] for i in order[s : s + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, autocast_dtype):
            loss, ok = loss_fn(batch)
        loss_sum += loss.item()
        correct += ok.item()
        targets += count_targets(batch["labels"])
    model.train()
    return {"eval_loss": loss_sum / max(targets, 1), "eval_token_accuracy": correct / max(targets, 1)}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def save_final(model, tokenizer, method: str, out: Path) -> Path:
    """Write `adapter/` (PEFT format) or `model/` (full fine-tuning), each with the tokenizer."""
    target = out / ("model" if method == "full" else "adapter")
    model.config.use_cache = True  # turned off for training; a saved model should generate with a KV cache
    tmp = out / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# ---------------------------------------------------------------- the recipe


def train(spec: JobSpec, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          progress: bool = True, strategy: Strategy | None = None) -> dict:
    """Run a fine-tuning job and return its summary (also written to `<output_dir>/summary.json`).

    `stop_after=N` stops after N optimizer steps of this session, leaving a checkpoint, as if the
    process had been pre-empted; `resume=True` continues from the newest complete checkpoint.
    """
    started = time.time()
    t = spec.training
    out = Path(spec.output_dir)
    resume_from = check_output_dir(spec, out, resume, overwrite)
    device = resolve_device(spec.device)
    strategy = strategy or SingleDevice(device)
    autocast_dtype = resolve_precision(t.precision, device)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress and strategy.is_main else log.info

    # ---- model, tokenizer, data
    model_path = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_path, spec.trust_remote_code)
    if spec.data.chat_template:  # saved with the tokenizer, so the trained model keeps using it
        tokenizer.chat_template = spec.data.chat_template
    train_data, valid_data, warnings = prepare_data(spec, tokenizer)
    for w in warnings[:20]:
        say(f"warning: {w}")
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    base_dtype = resolve_base_dtype(t.base_dtype, spec.method, autocast_dtype)
    model = build_model(spec, model_path, device, base_dtype)
    model = strategy.wrap(model)
    model.train()
    trainable, total = count_parameters(model)
    weight_bytes = base_weight_bytes(model)

    # ---- optimizer and schedule
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = loss_fn_for(model)
    optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    lengths = [len(e.input_ids) for e in train_data.examples]
    steps_per_epoch = len(step_groups(lengths, t.batch_size, t.grad_accum, t.seed, 0, t.group_by_length))
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=round(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    # ---- resume
    step, epoch, step_in_epoch, tokens_seen = 0, 0, 0, 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        step, epoch, step_in_epoch, tokens_seen = state["step"], state["epoch"], state["step_in_epoch"], state["tokens_seen"]
        say(f"resuming from {resume_from} (step {step}/{total_steps})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(spec.to_yaml())
    metrics = MetricsLogger(out, resume_step=step) if strategy.is_main else None

    say(
        f"tuneforge: {spec.method} on {spec.model} ({model.config.model_type}), {trainable:,} trainable / "
        f"{total:,} params ({100 * trainable / max(total, 1):.2f}%), {len(train_data.examples)} train examples, "
        f"{total_steps} steps, device {device}, precision {autocast_dtype or torch.float32}"
    )
    bar = None
    if progress and strategy.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    # ---- train
    pad_id = tokenizer.pad_token_id
    train_seconds, session_tokens, session_steps = 0.0, 0, 0
    last_loss = last_eval = None
    last_eval_step = -1
    while step < total_steps:
        steps = step_groups(lengths, t.batch_size, t.grad_accum, t.seed, epoch, t.group_by_length)
        for micro_batches in steps[step_in_epoch:]:
            tick = time.perf_counter()
            micro_batches = [part for mb in micro_batches
                             for part in split_by_tokens(mb, lengths, t.micro_batch_tokens, t.packing)]
            batches = [collate_packed([train_data.examples[i] for i in mb]) if t.packing
                       else collate([train_data.examples[i] for i in mb], pad_id) for mb in micro_batches]
            # Normalise by the targets of the whole accumulated batch (across processes too).
            n_targets = strategy.all_reduce_sum(sum(count_targets(b["labels"]) for b in batches))
            loss_sum = 0.0
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(device, autocast_dtype):
                    loss, _ = loss_fn(batch)
                (loss / n_targets).backward()
                loss_sum += loss.item()
                session_tokens += real_tokens(batch)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item() if t.max_grad_norm else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            session_steps += 1
            train_seconds += time.perf_counter() - tick
            last_loss = strategy.all_reduce_sum(loss_sum) / n_targets
            tokens_seen += sum(real_tokens(b) for b in batches)

            is_last = step >= total_steps
            record = {}
            if step % t.log_every == 0 or is_last:
                record.update(train_loss=last_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              epoch=epoch + step_in_epoch / len(steps), tokens_per_second=session_tokens / train_seconds)
            if valid_data is not None and (step % t.eval_every == 0 or is_last):
                last_eval = evaluate(model, valid_data, t.batch_size, pad_id, device, autocast_dtype)
                last_eval_step = step
                record.update(last_eval)
            if record and metrics is not None:
                metrics.log(step, **record)
            if bar is not None:
                post = {"loss": f"{last_loss:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                        "tok/s": f"{session_tokens / train_seconds:.0f}"}
                if last_eval:
                    post["eval"] = f"{last_eval['eval_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            stopping = stop_after is not None and session_steps >= stop_after and not is_last
            if strategy.is_main and (step % t.save_every == 0 or stopping or is_last):
                ckpt.save_checkpoint(
                    out, step, model, optimizer, scheduler,
                    {"epoch": epoch, "step_in_epoch": step_in_epoch, "tokens_seen": tokens_seen},
                    keep=t.keep_checkpoints,
                )
            if is_last or stopping:
                break
        else:  # epoch finished
            epoch += 1
            step_in_epoch = 0
            continue
        break
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()

    # ---- save
    finished = step >= total_steps
    summary = {
        "status": "succeeded" if finished else "stopped",
        "method": spec.method,
        "task": spec.task,
        "model": spec.model,
        "model_path": str(model_path),
        "model_type": model.config.model_type,
        "trainable_params": trainable,
        "total_params": total,
        "base_weight_bytes": weight_bytes,
        "train_examples": len(train_data.examples),
        "validation_examples": len(valid_data.examples) if valid_data else 0,
        "train_tokens": train_data.total_tokens,
        "steps": step,
        "total_steps": total_steps,
        "tokens_seen": tokens_seen,
        "tokens_per_second": session_tokens / train_seconds if train_seconds else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": last_loss,
        "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
        "final_eval_token_accuracy": last_eval["eval_token_accuracy"] if last_eval else None,
        "eval_step": last_eval_step if last_eval else None,
        "precision": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "base_dtype": str(base_dtype).removeprefix("torch."),
        "device": str(device),
        "wall_seconds": time.time() - started,
    }
    if strategy.is_main:
        if finished:
            summary["output"] = str(save_final(model, tokenizer, spec.method, out))
            plot_loss_curve(out)
            import json

            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"{'done' if finished else 'stopped'}: step {step}/{total_steps}, loss {last_loss:.4f}, "
            f"{summary['tokens_per_second']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB -> {out}")
    strategy.barrier()
    return summary
