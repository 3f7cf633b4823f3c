"""`tuneforge plan`: for each method x strategy, the parameters, bytes, predicted peak memory and step time
of a run, which ones fit this machine, and the cheapest that does.

Peak memory = (CPU) the process baseline (planning/calibrate.py) + the live-tensor peak of a steady-state
step measured on a 1- and 2-layer cut of the model and extrapolated (planning/probe.py); (GPU) the live
peak plus the CUDA context. Step time = the probe's measured time scaled by FLOPs (estimate.step_flops).
Parameter and byte columns are exact arithmetic on the meta-device model (planning/estimate.py).
Task preference: a micro-batch of B pairs is B rows (the prompt once, both replies; `shared_prompt`) or 2B
rows (one per reply), and DPO with an adapter adds a no-grad
reference forward of those rows per micro-batch (the adapter switched off); a precomputed reference (full
fine-tuning) costs one forward over the data before the first step instead, not in the step time.
Data-parallel strategies (ddp, zero1/2/3) are per-rank arithmetic on top of the single-process figures:
DDP keeps a second copy of the gradients in its buckets; ZeRO-1 shards the optimizer state, ZeRO-2 also the
gradients, ZeRO-3 also the weights (each rank then gathers one layer's weights at a time).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch

from tuneforge.errors import SpecError, TuneforgeError
from tuneforge.planning.estimate import METHODS, count_params, load_config, static_bytes, step_flops
from tuneforge.planning.probe import RunShape, probe

STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3")
CUDA_CONTEXT_MB = 500  # CUDA context + cuBLAS workspace, outside torch's allocator
HEADROOM = 0.9  # a run "fits" when its predicted peak is at most this share of the memory


@dataclass
class PlanRow:
    method: str
    strategy: str
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int | None  # saved for backward at the largest micro-batch
    predicted_peak_mb: float | None  # per rank
    predicted_step_seconds: float | None  # one optimizer step
    predicted_run_seconds: float | None
    step_flops: float
    fits: bool | None
    gradient_checkpointing: bool
    base_dtype: str
    note: str = ""

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_share": self.trainable_share}


@dataclass
class Plan:
    model: str
    device: str
    memory_mb: float
    nproc: int
    rows: int
    seq_len: int
    grad_accum: int
    total_steps: int | None
    baseline_mb: float
    rows_: list[PlanRow] = field(default_factory=list)

    @property
    def cheapest_fit(self) -> PlanRow | None:
        """The fitting combination with the shortest predicted step (ties: the smallest peak)."""
        fitting = [r for r in self.rows_ if r.fits]
        return min(fitting, key=lambda r: (r.predicted_step_seconds or math.inf, r.predicted_peak_mb or 0), default=None)

    def as_dict(self) -> dict:
        best = self.cheapest_fit
        return {"model": self.model, "device": self.device, "memory_mb": self.memory_mb, "nproc": self.nproc,
                "micro_batch": {"rows": self.rows, "seq_len": self.seq_len}, "grad_accum": self.grad_accum,
                "total_steps": self.total_steps, "baseline_mb": self.baseline_mb,
                "combinations": [r.as_dict() for r in self.rows_],
                "cheapest_fit": {"method": best.method, "strategy": best.strategy} if best else None}


def machine_memory_mb(device: str) -> float:
    """Total memory of the device the run would use: host RAM (MemTotal) or the GPU's."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("--device cuda: no CUDA device is visible here; pass --memory-gb for the target GPU")
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def run_shape(spec, method: str, device: torch.device, rows: int, seq_len: int) -> RunShape:
    """The RunShape of `spec` trained with `method` (the engine's own defaults resolved as the recipe does)."""
    from tuneforge.hardware import resolve_base_dtype, resolve_precision
    from tuneforge.training.kernels import resolve_kernels
    from tuneforge.training.recipe import model_settings

    spec = spec.model_copy(update={"method": method})
    t = spec.training
    autocast = resolve_precision(t.precision, device)
    base = resolve_base_dtype(t.base_dtype, method, autocast)
    settings = model_settings(spec)  # what the recipe's prepare_model is given
    kernels = resolve_kernels(t.kernels.model_dump(), device, method, spec.adapter.dropout)
    tm = spec.adapter.target_modules
    return RunShape(method=method, r=spec.adapter.r, alpha=spec.adapter.alpha, dropout=spec.adapter.dropout,
                    target_modules=tm if isinstance(tm, str) else tuple(tm),
                    num_virtual_tokens=spec.adapter.num_virtual_tokens, kernels=tuple(sorted(kernels.as_dict().items())),
                    autocast=str(autocast or torch.float32).removeprefix("torch."),
                    base_dtype=str(base).removeprefix("torch."),
                    gradient_checkpointing=settings["gradient_checkpointing"],
                    checkpoint_every=settings["checkpoint_every"], packing=settings["packing"],
                    document_len=min(t.max_seq_len, seq_len) if t.packing else 0, rows=rows, seq_len=seq_len,
                    optimizer=t.optimizer, device="cpu")


def micro_batch(spec, longest: int | None = None, longest_shared: int | None = None) -> tuple[int, int]:
    """(rows, row length) of the largest micro-batch the run will see: batch_size rows of the longest
    example (max_seq_len unless the data are known to be shorter), split by micro_batch_tokens; packed
    batches are one row; preference pairs are two rows each, or with `shared_prompt` one row each: the
    prompt once and both replies (`longest_shared` when the data are known, at most twice a reply's row)."""
    t = spec.training
    seq = min(longest or t.max_seq_len, t.max_seq_len)
    rows = t.batch_size
    if t.micro_batch_tokens:
        per_row = 2 * seq if spec.task == "preference" else seq
        rows = max(1, min(rows, t.micro_batch_tokens // per_row)) if not t.packing else rows
    if spec.task == "preference":
        if spec.preference_settings.shared_prompt:
            return rows, min(longest_shared or 2 * seq, 2 * seq)
        return 2 * rows, seq
    if t.packing:
        total = rows * seq
        if t.micro_batch_tokens:
            total = min(total, max(t.micro_batch_tokens, seq))
        return 1, total
    return rows, seq


def data_lengths(spec) -> tuple[list[int], list[int]] | None:
    """The encoded lengths of the training examples (a preference pair: its longer reply's row), and their
    row lengths in a batch (a preference pair with `shared_prompt`: prompt once + both replies; else the
    same), when the spec's data and tokenizer are readable."""
    try:
        from tuneforge.models import load_tokenizer, resolve_model
        from tuneforge.training.recipe import check_data_files, prepare_data

        reports = check_data_files(spec)
        tokenizer = load_tokenizer(resolve_model(spec.model), spec.trust_remote_code)
        train, _, _ = prepare_data(spec, tokenizer, reports)
    except (TuneforgeError, OSError, ValueError):
        return None
    if not train.examples:
        return None
    lengths = [e.length for e in train.examples]
    if spec.task == "preference" and spec.preference_settings.shared_prompt:
        return lengths, [e.shared_length for e in train.examples]
    return lengths, lengths


def row_lengths(lengths: list[int] | None, seq: int, packing: bool) -> tuple[int, ...]:
    """Shorter row lengths the run's micro-batches take besides `seq` (variable-length data, not packed): the
    examples' length quartiles, capped at `seq`; () for fixed-length or unknown data."""
    if not lengths or packing:
        return ()
    ordered = sorted(min(n, seq) for n in lengths)
    quartiles = {ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75)}
    return tuple(sorted((n for n in quartiles if n < seq), reverse=True))


def reference_pass(spec, method: str) -> bool:
    """Whether each micro-batch of `spec` trained with `method` has DPO's reference forward (adapter off)."""
    if spec.task != "preference":
        return False
    p = spec.preference_settings
    return p.loss == "dpo" and p.reference == "auto" and method != "full"


def weight_file_bytes(model_path, config) -> int:
    """Bytes of the checkpoint a run loads: its safetensors files, or (a config-only folder) the parameter
    count in the config's dtype."""
    from pathlib import Path

    found = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    if found:
        return found
    from tuneforge.planning.estimate import meta_model

    dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    size = 2 if ("16" in dtype) else 4
    return size * sum(p.numel() for p in meta_model(config).parameters())


def per_rank(static, strategy: str, nproc: int, layers: int) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer, extra) bytes one rank holds under `strategy`."""
    w, g, o = static.weights, static.gradients, static.optimizer
    n = max(nproc, 1)
    if strategy == "ddp":
        return w, g, o, g  # DDP's gradient buckets: a second copy of the gradients
    if strategy == "zero1":  # DDP + ZeroRedundancyOptimizer: DDP's buckets too (2-rank SmolLM2: -17 % without them)
        return w, g, o // n, g
    if strategy == "zero2":
        return w, g // n, o // n, 0
    if strategy == "zero3":
        return w // n, g // n, o // n, 2 * (w // max(layers, 1))  # one layer gathered (+ prefetch of the next)
    return w, g, o, 0


def plan(spec, *, methods: tuple[str, ...] = METHODS, strategies: tuple[str, ...] = ("none",), device: str | None = None,
         memory_gb: float | None = None, nproc: int = 1, use_cache: bool = True, progress=None) -> Plan:
    """Plan `spec` (a JobSpec) for every method x strategy; see the module docstring."""
    from tuneforge.models import resolve_model
    from tuneforge.planning.calibrate import process_baseline_mb

    unknown = [m for m in methods if m not in METHODS]
    bad_strategies = [s for s in strategies if s not in STRATEGIES]
    if unknown or bad_strategies:
        raise SpecError("; ".join(
            ([f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})"] if unknown else []) +
            ([f"--strategies: unknown {', '.join(bad_strategies)} (choose from {', '.join(STRATEGIES)})"]
             if bad_strategies else [])))
    if nproc > 1 and strategies == ("none",):
        strategies = ("ddp", "zero1", "zero2", "zero3")
    device = device or ("cuda" if spec.device == "cuda" else "cpu")
    target = torch.device(device)
    memory_mb = memory_gb * 1024 if memory_gb else machine_memory_mb(device)
    config = load_config(spec.model, spec.trust_remote_code)
    lengths, row_lens = data_lengths(spec) or (None, None)
    longest, n_examples = (max(lengths), len(lengths)) if lengths else (None, None)
    rows, seq = micro_batch(spec, longest, max(row_lens) if row_lens else None)
    t = spec.training
    total_steps = t.max_steps
    if total_steps is None and n_examples:
        total_steps = math.ceil(t.epochs * math.ceil(n_examples / (t.batch_size * t.grad_accum * nproc)))
    model_path = resolve_model(spec.model)
    checkpoint_bytes = weight_file_bytes(model_path, config)
    baseline = process_baseline_mb(model_path, use_cache=use_cache) if device == "cpu" else CUDA_CONTEXT_MB
    result = Plan(spec.model, device, memory_mb, nproc, rows, seq, t.grad_accum, total_steps, baseline)
    for method in methods:
        if method == "prompt_tuning" and (t.packing or spec.task == "preference"):
            continue  # the spec refuses these combinations
        shape = replace(run_shape(spec, method, target, rows, seq), lengths=row_lengths(row_lens, seq, t.packing))
        counts = count_params(config, method, spec.adapter)
        static = static_bytes(counts, method, getattr(torch, shape.base_dtype), t.optimizer)
        # loading: the checkpoint's pages and the converted weights are resident together for a moment (QLoRA
        # loads its pre-quantised copy, whose tensors are used as read)
        load_extra = static.weights + (0 if method == "qlora" else checkpoint_bytes)
        chunked = dict(shape.kernels)["loss"] == "chunked" and method != "prompt_tuning"
        context = min(seq, t.max_seq_len) if t.packing else seq  # packed: attention within each document
        flops_micro = step_flops(counts, config, method, rows * seq, context,
                                 gradient_checkpointing=shape.gradient_checkpointing, chunked_loss=chunked,
                                 reference_pass=reference_pass(spec, method))
        # no probe when the static bytes alone cannot fit (e.g. full fine-tuning of 3.8B in 24 GB) or a cut is too big
        note = ""
        measured = None
        static_total = static.weights + static.gradients + static.optimizer
        shards = nproc if device == "cuda" and any(s.startswith("zero") for s in strategies) else 1
        if (static_total / shards) / 2**20 + baseline > HEADROOM * memory_mb:
            note = "not probed: weights, gradients and optimizer state alone exceed the memory"
        elif static_total / 2**20 * 2 / max(counts.layers, 1) > 0.25 * memory_mb:
            note = "not probed: a 2-layer cut alone would take over a quarter of the memory"
        else:
            if progress:
                progress(f"probing {method} ({rows} x {seq} tokens)")
            measured = probe(config, shape, use_cache=use_cache, track_live=device != "cpu")
        for strategy in strategies:
            w, g, o, extra = per_rank(static, strategy, nproc, counts.layers)
            sharded = (static.weights - w) + (static.gradients - g) + (static.optimizer - o) - extra
            if measured is not None:
                if device == "cpu":  # resident set: weights + how far the steps grow it (heap slack included)
                    live = max(w + measured.rss_growth_bytes - (static.gradients - g) - (static.optimizer - o) + extra,
                               load_extra)
                else:
                    live = measured.peak_live_bytes - sharded
                activations = measured.saved_bytes
                probe_context = (min(measured.probe_seq_len, shape.document_len) if shape.document_len
                                 else measured.probe_seq_len)
                probe_flops = step_flops(counts, config, method, measured.probe_rows * measured.probe_seq_len,
                                         probe_context, gradient_checkpointing=shape.gradient_checkpointing,
                                         chunked_loss=chunked)
                fb = measured.forward_backward_seconds * flops_micro / probe_flops
                step = t.grad_accum * fb + measured.optimizer_seconds  # ranks: communication not modelled
                if device != "cpu":  # the probe runs on this CPU: its time says nothing about a GPU's
                    step = None
            else:
                live, activations, step = w + g + o + extra, None, None
            peak_mb = live / 2**20 + baseline
            fits = (peak_mb * (nproc if device == "cpu" and strategy != "none" else 1) <= HEADROOM * memory_mb)
            if measured is None and fits:
                fits = None  # a lower bound that fits says nothing
            row_note = note or ("" if strategy == "none" else "per rank; arithmetic over the measured single-process peak, "
                                "communication time not modelled")
            result.rows_.append(PlanRow(
                method=method, strategy=strategy, total_params=counts.total, trainable_params=counts.trainable,
                weights_bytes=w, gradient_bytes=g, optimizer_bytes=o, activation_bytes=activations,
                predicted_peak_mb=round(peak_mb, 1), predicted_step_seconds=step,
                predicted_run_seconds=step * total_steps if step is not None and total_steps else None,
                step_flops=flops_micro * t.grad_accum, fits=fits, gradient_checkpointing=shape.gradient_checkpointing,
                base_dtype=shape.base_dtype, note=row_note))
    return result


def format_plan(p: Plan) -> str:
    """The plan as a text table."""
    gib = p.memory_mb / 1024
    lines = [f"plan for {p.model} on {p.device} ({gib:.1f} GiB; fits = predicted peak <= {HEADROOM:.0%} of it), "
             f"micro-batch {p.rows} x {p.seq_len} tokens, grad_accum {p.grad_accum}"
             + (f", {p.total_steps} steps" if p.total_steps else "") + (f", {p.nproc} processes" if p.nproc > 1 else ""),
             f"process baseline {p.baseline_mb:.0f} MB (included in every peak)", ""]
    head = f"{'method':<14}{'strategy':<9}{'params':>9}{'trainable':>11}{'share':>8}{'weights':>9}{'grads':>8}{'optim':>8}" \
           f"{'activ.':>8}{'peak':>9}{'s/step':>8}{'run':>9}  fits"
    lines.append(head)
    lines.append("-" * len(head))

    def mb(b):
        return "-" if b is None else f"{b / 2**20:.0f}M" if b < 2**30 * 10 else f"{b / 2**30:.1f}G"

    for r in p.rows_:
        peak = "-" if r.predicted_peak_mb is None else (f"{r.predicted_peak_mb:.0f}M" if r.predicted_peak_mb < 10240
                                                       else f"{r.predicted_peak_mb / 1024:.1f}G")
        step = "-" if r.predicted_step_seconds is None else f"{r.predicted_step_seconds:.2f}"
        run = "-" if r.predicted_run_seconds is None else f"{r.predicted_run_seconds / 60:.1f}min"
        fits = {True: "yes", False: "NO", None: "?"}[r.fits]
        lines.append(f"{r.method:<14}{r.strategy:<9}{r.total_params / 1e6:>8.1f}M{r.trainable_params / 1e6:>10.2f}M"
                     f"{100 * r.trainable_share:>7.2f}%{mb(r.weights_bytes):>9}{mb(r.gradient_bytes):>8}"
                     f"{mb(r.optimizer_bytes):>8}{mb(r.activation_bytes):>8}{peak:>9}{step:>8}{run:>9}  {fits}"
                     + (f"  ({r.note})" if r.note and r.strategy == "none" else ""))
    best = p.cheapest_fit
    lines.append("")
    lines.append(f"cheapest that fits: {best.method}" + (f" + {best.strategy}" if best.strategy != "none" else "")
                 + (f" ({best.predicted_peak_mb:.0f} MB, {best.predicted_step_seconds:.2f} s/step)"
                    if best.predicted_step_seconds is not None else "")
                 if best else "cheapest that fits: none of these fits")
    return "\n".join(lines)


def predict_for_run(spec, method: str | None = None, use_cache: bool = True) -> PlanRow:
    """The single-process prediction for `spec` as written (used by `tuneforge train` before it starts)."""
    p = plan(spec, methods=(method or spec.method,), use_cache=use_cache)
    return replace(p.rows_[0])
