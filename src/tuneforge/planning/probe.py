"""The calibration micro-benchmark: real training steps of a 1-layer and a deeper cut of the model.

Activation memory depends on everything the engine does in forward and backward (bf16 autocast, the
chunked loss, the fused RMSNorm and LoRA nodes, byte-mask dropout, DoRA's weight norm, QLoRA's 4-bit
layers, gradient checkpointing, packing), and hand-written formulas drift from it with every change. So the
planner runs the engine itself: the model's config cut to 1 and to `timing_layers` decoder layers at full
width, random weights, built with the recipe's own `prepare_model`, training steps of the run's micro-batch shape made of the
recipe's own `forward_backward` and `optimizer_step`, with the run's optimizer, in a child process of its own. Per cut it records
- the live-tensor peak of a steady-state step (optimizer state already allocated): `LiveBytes`, the same
  bookkeeping as torch's MemTracker (every storage an op creates, until it is freed);
- the bytes autograd saves for backward (saved-tensor hooks): the activations;
- how far the process's resident set grows over the steps (Linux VmHWM, reset before them, after the heap's
  free pages went back to the OS): live tensors plus the allocator's slack, which is what a CPU run's peak
  RSS is made of;
- the wall time of forward + backward and of the optimizer step (one timed step after a warm-up step).
Per-layer figures are the difference of the two cuts, so the whole model's are linear extrapolations in the
layer count. A model small enough that a step of the whole of it is cheap (`WHOLE_MODEL_FLOPS`, e.g. SmolLM2-135M)
is probed whole instead: the resident set's growth is the allocator's, and does not scale with the layer count
(SmolLM2 QLoRA at 2 x 97 tokens: both cuts grew ~120 MB, the whole model 274 MB). Micro-batches over `probe_token_cap` tokens are probed at the cap and at half of it and
extrapolated linearly in tokens (the planner scales time by FLOPs, keeping attention's quadratic part).
Results are cached under $TUNEFORGE_CACHE/plan/ keyed by config, run shape, machine and library versions.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from tuneforge.planning.estimate import config_fingerprint, with_layers
from tuneforge.training.allocator import release_free_memory

PROBE_TOKENS = 2048  # largest micro-batch probed directly (tokens); larger ones are extrapolated
PROBE_FLOPS = 1e12  # and at most this many FLOPs per probe step (about a second on 2 cores)
WHOLE_MODEL_FLOPS = 4e12  # probe the whole model, not cuts, when its probe step costs at most this
SETTLE_STEPS = 6  # at most this many steady-state steps until the resident set stops growing
WHOLE_MODEL_PARAMS = 1e9  # and it has at most this many parameters (building it is the run's own load)
CACHE_VERSION = 16  # 16: later points settle after one step without growth


@dataclass(frozen=True)
class RunShape:
    """Everything about a run that moves its memory or its step time."""

    method: str
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple = "all-linear"
    num_virtual_tokens: int = 20
    kernels: tuple = ()  # resolved Kernels as sorted (part, choice) pairs
    autocast: str = "bfloat16"  # "float32" for none
    base_dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1
    packing: bool = False
    document_len: int = 0  # packing: the documents' length in the packed row (max_seq_len); 0: the whole row
    lengths: tuple = ()  # variable-length data: shorter row lengths the run's micro-batches also take
    rows: int = 4  # micro-batch rows (batch_size, or the split micro_batch_tokens gives)
    seq_len: int = 512
    optimizer: str = "adamw"
    device: str = "cpu"

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


@dataclass
class ProbePoint:
    layers: int
    rows: int
    seq_len: int
    peak_live_bytes: int
    saved_bytes: int
    forward_backward_seconds: float
    optimizer_seconds: float
    categories: dict = field(default_factory=dict)
    rss_growth_bytes: int = 0  # resident-set high-water mark over the steps minus the RSS before them


def _machine() -> dict:
    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    from tuneforge.planning.calibrate import library_versions

    return {"cpu": cpu or platform.processor(), "threads": torch.get_num_threads(), "libraries": library_versions(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _quantize_linears(model, head, compute_dtype: torch.dtype) -> None:
    """Replace every nn.Linear but the output head by bitsandbytes' NF4 Linear4bit (double-quantised), as
    loading a QLoRA run's pre-quantised checkpoint produces."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to("cpu"))
    model.is_loaded_in_4bit = True


def _status_kib(field_name: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _rss_high_water_mark() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_rss_high_water_mark() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5))."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build_probe_model(config, shape: RunShape, layers: int):
    """The run's model on a `layers`-layer cut of `config`: the recipe's own `prepare_model` on a base built from
    the config (NF4 linear layers for QLoRA, as a pre-quantised checkpoint loads). Its weights are a repeated
    random pattern, not an initialisation (5.7 s for a 2-layer Phi-3-mini cut, against 1 s): the probe measures
    memory and time, which the values do not change."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from tuneforge.spec import AdapterSpec
    from tuneforge.training.kernels import Kernels
    from tuneforge.training.recipe import prepare_model

    cfg = with_layers(config, layers)
    cfg.use_cache = False
    base_dtype = getattr(torch, shape.base_dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=base_dtype)
    _fill(model.parameters())
    model.config.use_cache = False
    kernels = Kernels(**dict(shape.kernels))
    if shape.method == "qlora":
        head = model.get_output_embeddings()
        _quantize_linears(model, head, torch.bfloat16 if base_dtype == torch.bfloat16 else torch.float32)
    targets = shape.target_modules if isinstance(shape.target_modules, str) else list(shape.target_modules)
    adapter = AdapterSpec(r=shape.r, alpha=shape.alpha, dropout=shape.dropout, target_modules=targets,
                          num_virtual_tokens=shape.num_virtual_tokens)
    torch.manual_seed(0)  # the adapters' own initialisation (peft), as in a run
    model = prepare_model(model, method=shape.method, adapter=adapter, kernels=kernels, packing=shape.packing,
                          gradient_checkpointing=shape.gradient_checkpointing, checkpoint_every=shape.checkpoint_every)
    model.train()
    return model, kernels


def _fill(parameters) -> None:
    """Weights of the size and dtype of a model's, from a repeated block of uniform noise (+-0.02): every page
    written, as loaded weights are, in a fraction of the time an initialisation takes."""
    block = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.04 - 0.02  # (65536,)
    with torch.no_grad():
        for p in parameters:
            flat = p.view(-1)
            flat.copy_(block.to(p.dtype).repeat(-(-flat.numel() // block.numel()))[:flat.numel()])


class LayerView:
    """The first `n` decoder layers of a built cut as the model the steps run (`with LayerView(model, n):`): a
    1-layer probe point on the 2-layer cut, without building it again. The other layers' weights stay resident
    (they were before the point's measurements began, so they are not counted), get no gradients and no
    optimizer state, and `idle` lists their parameters for the live-tensor count."""

    def __init__(self, model, n: int):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.owner = base.get_decoder()
        self.full = self.owner.layers  # (L,) ModuleList
        self.n = n
        self.idle = [p for layer in self.full[n:] for p in layer.parameters()]

    def __enter__(self):
        if self.n < len(self.full):
            self.owner.layers = torch.nn.ModuleList(list(self.full[: self.n]))
        return self

    def __exit__(self, *exc):
        self.owner.layers = self.full


def _batch(vocab: int, rows: int, seq_len: int, packing: bool, generator: torch.Generator,
           document_len: int = 0) -> dict:
    """Random tokens; packed: one row of rows x seq_len tokens holding documents of `document_len` tokens
    (default seq_len), positions restarting in each, as data/batching.collate_packed builds it."""
    ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    if packing:
        total = rows * seq_len
        doc = min(document_len or seq_len, total)
        starts = list(range(0, total, doc))
        positions = torch.cat([torch.arange(min(doc, total - s)) for s in starts])
        return {"input_ids": ids.reshape(1, -1), "labels": ids.reshape(1, -1).clone(),
                "position_ids": positions[None], "cu_seq_lens_q": torch.tensor(starts + [total])}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes while active: every storage an op creates is counted until it is freed (a weak
    reference's callback), on top of the storages registered with `add_existing`; `peak` is the maximum.
    The same bookkeeping as torch.distributed._tools.mem_tracker.MemTracker, without its per-module hooks
    (which need every parameter to require grad)."""

    def __init__(self):
        super().__init__()
        self._refs = WeakIdKeyDictionary()
        self.start = self.current = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return
        if st in self._refs:
            return
        size = st.nbytes()
        self._refs[st] = weakref.ref(st, functools.partial(self._freed, size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _freed(self, size: int, _ref) -> None:
        self.current -= size

    def add_existing(self, tensors) -> None:
        for t in tensors:
            self._track(t)
        self.start = self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def probe_point(model, kernels, config, shape: RunShape, layers: int, rows: int, seq_len: int, repeats: int = 1,
                track_live: bool = True, settled: int = 2) -> ProbePoint:
    """On `model` (a built cut, its first `layers` decoder layers active): a warm-up step (which also records the
    bytes autograd saves for backward), then steps until the resident set settles (at least `repeats`; the best is
    the step time; `settled`: steps in a row without growth that count as settled), then, with `track_live`, one
    step whose live tensors are tracked (a GPU plan's peak; a CPU plan reads the resident set instead). A fresh
    optimizer each point, so its state is allocated in the point."""
    from tuneforge.distributed import ForwardLoss, SingleDevice
    from tuneforge.hardware import grad_scaler
    from tuneforge.models.head import output_head
    from tuneforge.training import recipe
    from tuneforge.training.loss import count_targets, loss_fn_for

    device = torch.device(shape.device)
    with LayerView(model, layers) as view:
        chunked = kernels.loss == "chunked" and output_head(model) is not None
        forward = ForwardLoss(model, loss_fn_for(model, chunked=chunked))
        idle = {id(p) for p in view.idle}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in idle]
        optimizer = recipe.build_optimizer(params, shape.optimizer, 1e-4, 0.0)
        ac = None if shape.autocast == "float32" else getattr(torch, shape.autocast)
        one, scaler = SingleDevice(device), grad_scaler(device, ac)
        generator = torch.Generator().manual_seed(0)

        def forward_backward(length: int = seq_len):  # a fresh batch each step, as in a run: the recipe's own step
            batch = _batch(config.vocab_size, rows, length, shape.packing, generator, shape.document_len)
            recipe.forward_backward(forward, [batch], count_targets(batch["labels"]), one, scaler, device, ac)

        def optimizer_step():
            recipe.optimizer_step(optimizer, params, one, scaler, None, 1.0)

        saved: dict[int, int] = {}
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st.data_ptr() not in param_storages:
                    saved[st.data_ptr()] = st.nbytes()
            return t

        release_free_memory()
        rss_before = _rss_bytes()
        _reset_rss_high_water_mark()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the activations kept for backward
            forward_backward()
        optimizer_step()  # allocates the optimizer state: later steps are the steady state
        # The resident set keeps growing for a few steps: after the first large buffers are freed, glibc raises its
        # mmap threshold and later ones come from the heap, which keeps them (DoRA on SmolLM2 grew 874 -> 1146 ->
        # 1326 MB over steps 1-3, then stayed). Step until it settles (two steps without growth), timing the best.
        # Data of varied lengths grows the heap further (every new shape allocates anew: SmolLM2 QLoRA 2 x 97 grew
        # 274 MB over ten fixed-shape steps, 415 MB cycling through lengths 33-97), so the steps cycle through the
        # run's row lengths (`shape.lengths`, those not above this point's), twice, before settling counts.
        cycle = [seq_len] + [n for n in shape.lengths if n < seq_len]
        least = max(repeats, 2 * len(cycle) if len(cycle) > 1 else 0)
        fb = opt = float("inf")
        high, still = _rss_high_water_mark(), 0
        for i in range(max(SETTLE_STEPS, least + 2)):
            length = cycle[(i + 1) % len(cycle)]
            t0 = time.perf_counter()
            forward_backward(length)
            t1 = time.perf_counter()
            optimizer_step()
            t2 = time.perf_counter()
            if length == seq_len:  # the time of the largest micro-batch, which the planner scales by FLOPs
                fb, opt = min(fb, t1 - t0), min(opt, t2 - t1)
            now = _rss_high_water_mark()
            still = still + 1 if now - high <= max(4 * 2**20, 0.02 * (now - rss_before)) else 0
            high = now
            if still >= settled and i + 1 >= least and fb < float("inf"):
                break
        # the growth of plain steps: the tracked step below runs under a dispatch mode, whose bookkeeping moves the heap
        rss_growth = max(0, _rss_high_water_mark() - rss_before) if rss_before else 0

        peak = after_backward = start = 0
        if track_live:
            tracker = LiveBytes()
            tracker.add_existing([*(p for p in model.parameters() if id(p) not in idle), *model.buffers(),
                                  *(v for state in optimizer.state.values() for v in state.values()
                                    if isinstance(v, torch.Tensor))])
            with tracker:
                forward_backward()
                after_backward = tracker.current
                optimizer_step()
            peak, start = tracker.peak, tracker.start
        categories = {"static": start, "peak": peak, "after_backward": after_backward, "rss_growth": rss_growth}
        del optimizer, params, forward
    return ProbePoint(layers, rows, seq_len, peak, sum(saved.values()), fb, opt, categories, rss_growth)


@dataclass
class ProbeResult:
    """Whole-model figures for one run shape, extrapolated from the probe points."""

    peak_live_bytes: int
    saved_bytes: int  # activations kept for backward
    forward_backward_seconds: float  # of the whole model, at the probed batch (probe_rows x probe_seq_len)
    optimizer_seconds: float
    points: list
    probe_rows: int = 0
    probe_seq_len: int = 0
    rss_growth_bytes: int = 0  # CPU: how far the process's resident set grows over training steps
    cached: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _cache_path(key: dict):
    from tuneforge.models.load import cache_dir

    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "plan" / f"probe-{digest}.json"


def probe_token_cap(config) -> int:
    """Tokens per probe step: PROBE_TOKENS, fewer for wide models (2-layer cut's FLOPs within PROBE_FLOPS)."""
    from tuneforge.planning.estimate import meta_model

    cut = meta_model(with_layers(config, 2))
    weights = sum(p.numel() for p in cut.parameters())
    return int(max(64, min(PROBE_TOKENS, PROBE_FLOPS / (8 * weights))))


def timing_layers(config) -> int:
    """Layers of the second cut: 2, or as many as make their matmul weights match the output head's
    (a SmolLM2 layer is 1/8 of its head), at most the model's own layer count."""
    from tuneforge.planning.estimate import meta_model

    one = meta_model(with_layers(config, 1))
    head = one.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    layer_params = sum(p.numel() for p in one.model.layers[0].parameters()) if hasattr(one, "model") else 1
    return int(max(2, min(config.num_hidden_layers, 1 + -(-head_params // max(layer_params, 1)))))


def probes_whole_model(config, shape: RunShape) -> bool:
    """True when the model has at most WHOLE_MODEL_PARAMS parameters and a training step of all of it at the
    probed micro-batch costs at most WHOLE_MODEL_FLOPS (6 FLOPs per weight per token)."""
    from tuneforge.planning.estimate import meta_model

    weights = sum(p.numel() for p in meta_model(config).parameters())
    return (weights <= WHOLE_MODEL_PARAMS
            and 6 * weights * min(shape.tokens, probe_token_cap(config)) <= WHOLE_MODEL_FLOPS)


def probe(config, shape: RunShape, *, use_cache: bool = True, whole: bool | None = None,
          track_live: bool = True) -> ProbeResult:
    """Probe `shape` on `config` (see the module docstring) in a child process; cached. `track_live`: also the
    live-tensor peak a GPU plan needs (one step under a dispatch mode per point); a CPU plan reads the resident
    set, and leaves it out.

    A child process because the probe measures how far a process's resident set grows, which needs a heap of
    its own, and because QLoRA runs set the allocator's mmap threshold process-wide (training/allocator.py),
    which the probe must do too but its caller must not."""
    import subprocess
    import sys

    from tuneforge.errors import TuneforgeError
    from tuneforge.files import atomic_write_text

    whole = probes_whole_model(config, shape) if whole is None else whole
    key = {"v": CACHE_VERSION, "config": config_fingerprint(config), "shape": asdict(shape), "machine": _machine(),
           "whole": whole, "track_live": track_live}
    path = _cache_path(key)
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            return ProbeResult(**{**data, "cached": True})
        except (OSError, ValueError, TypeError):
            pass
    request = json.dumps({"config": config.to_dict(), "shape": asdict(shape), "whole": whole,
                          "track_live": track_live}, default=str)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", "from tuneforge.planning.probe import _child; _child()"],
                          input=request, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise TuneforgeError(f"the planner's calibration probe failed for {shape.method}: "
                             f"{proc.stderr.strip()[-800:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    result = ProbeResult(**data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.as_dict()))
    return result


def _child() -> None:
    """The probe's child process: read {config, shape} on stdin, print the ProbeResult as JSON."""
    import sys
    import warnings

    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    request = json.loads(sys.stdin.read())
    config_dict = dict(request["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    shape_dict = request["shape"]
    shape_dict["kernels"] = tuple(tuple(kv) for kv in shape_dict["kernels"])
    shape_dict["lengths"] = tuple(shape_dict.get("lengths", ()))
    if isinstance(shape_dict["target_modules"], list):
        shape_dict["target_modules"] = tuple(shape_dict["target_modules"])
    shape = RunShape(**shape_dict)
    if shape.method == "qlora" and shape.device == "cpu":
        from tuneforge.training.allocator import return_big_buffers_to_os

        return_big_buffers_to_os()  # as `tuneforge train` does for QLoRA on CPU (cli.cmd_train)
    print(json.dumps(_probe_here(config, shape, whole=request.get("whole", False),
                                 track_live=request.get("track_live", True)).as_dict()))


def _probe_here(config, shape: RunShape, whole: bool = False, track_live: bool = True) -> ProbeResult:
    layers = config.num_hidden_layers
    tokens = shape.tokens
    rows, seq = shape.rows, shape.seq_len
    cap = probe_token_cap(config)
    if tokens > cap:  # probe a smaller batch of the same row length (or shorter rows)
        rows = max(1, cap // seq)
        seq = min(seq, cap)
    # the whole model, or a 1-layer cut and a deeper one: enough layers that their time stands out of the head's
    cuts = (layers,) if whole else (1, timing_layers(config))
    deep = cuts[-1]

    def at_model(points: list[ProbePoint], attr: str, rising: bool = False) -> float:
        """`attr` of the whole model: the deepest point when it is the model, else linear in the layer count
        through the two cuts (`rising`: the first cut also pays one-time costs, so never a negative slope)."""
        if deep == layers:
            return getattr(points[-1], attr)
        v1, v2 = getattr(points[0], attr), getattr(points[1], attr)
        v2 = max(v1, v2) if rising else v2
        return v1 + (v2 - v1) * (layers - 1) / (deep - 1)

    # One model: the deepest cut, built once; the 1-layer point runs its first layer (LayerView)
    model, kernels = build_probe_model(config, shape, deep)
    # The first point learns how this model's heap grows (two steps without growth count as settled); on the same
    # model and heap the later points settle after one (Phi-3-mini QLoRA: every later point's growth stopped after
    # its warm-up step, 4 -> 3 steps each).
    big = [probe_point(model, kernels, config, shape, n, rows, seq, repeats=2 if whole else 1, track_live=track_live,
                       settled=2 if i == 0 else 1) for i, n in enumerate(cuts)]
    points = list(big)
    peak = at_model(big, "peak_live_bytes")
    growth = at_model(big, "rss_growth_bytes", rising=True)
    saved = at_model(big, "saved_bytes")
    fb = at_model(big, "forward_backward_seconds")
    if len(big) == 2 and big[1].forward_backward_seconds <= big[0].forward_backward_seconds:
        fb = big[1].forward_backward_seconds * layers / deep  # timing noise swamped the layers: scale the deeper cut
    opt = max(0.0, at_model(big, "optimizer_seconds"))
    probed_tokens = rows * seq
    if probed_tokens < tokens:  # memory is linear in tokens: a second set at half the rows (or half the length)
        rows2, seq2 = (rows // 2, seq) if rows > 1 else (rows, seq // 2)
        small = [probe_point(model, kernels, config, shape, n, rows2, seq2, repeats=0, track_live=track_live,
                             settled=1) for n in cuts]
        points += small
        frac = (tokens - probed_tokens) / (probed_tokens - rows2 * seq2)
        peak = peak + (peak - at_model(small, "peak_live_bytes")) * frac
        growth = growth + max(0.0, growth - at_model(small, "rss_growth_bytes", rising=True)) * frac
        saved = saved + (saved - at_model(small, "saved_bytes")) * frac
    return ProbeResult(int(peak), int(saved), fb, opt, [asdict(p) for p in points], rows, seq, int(growth))


def process_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads()
