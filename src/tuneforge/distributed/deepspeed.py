"""DeepSpeed ZeRO as a strategy (distributed.backend: deepspeed; `pip install 'tuneforge[deepspeed]'`).

strategy ddp / zero1 / zero2 / zero3 = ZeRO stage 0 / 1 / 2 / 3; offload: optimizer (stages 1-3) keeps
the optimizer state and step in CPU memory, offload: parameters (stage 3) the parameters too. The
config is generated from the spec (`deepspeed_config`), or read from the user's JSON and completed:
batch sizes, clipping and the optimizer always come from the spec, and a JSON that contradicts
them is refused. The optimizer is torch's AdamW (the same as every other strategy, so trajectories
compare like with like); DeepSpeed drives it (`zero_allow_untested_optimizer`).

The loop's order (forward, backward per micro-batch, clip, step, schedule) maps onto the engine:
`accumulate` marks the last micro-batch as the accumulation boundary, the engine reduces gradients
there, clips and steps inside `engine.step()`; the learning-rate schedule stays the loop's own
(it sets the wrapped AdamW's param_groups), so it is the same schedule as with the torch backend.
On CPU (DS_ACCELERATOR=cpu, gloo) DeepSpeed compiles a small communication op on first use.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from tuneforge.distributed.strategy import ForwardLoss
from tuneforge.distributed.torch_strategies import TorchProcessGroup
from tuneforge.errors import CheckpointError, SpecError
from tuneforge.spec import DistributedSpec

STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
# Keys tuneforge sets from the spec; a user's JSON may repeat them only with the same value.
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16")


def deepspeed_config(d: DistributedSpec, *, batch_size: int, max_grad_norm: float | None,
                     autocast_dtype: torch.dtype | None, user: dict | None = None) -> dict:
    """The DeepSpeed config for this spec: the user's JSON (if any) completed with what the spec fixes."""
    cfg = json.loads(json.dumps(user or {}))
    for k in ("fp16", "bf16"):  # a Hugging Face template's "auto": precision comes from training.precision
        if isinstance(cfg.get(k), dict) and cfg[k].get("enabled") == "auto":
            cfg.pop(k)
    if user:
        clashes = [k for k in ("optimizer", "scheduler", "fp16") if k in cfg and cfg[k] not in (None, {})
                   and cfg[k].get("enabled", True) is not False]
        if clashes:
            raise SpecError(f"distributed.deepspeed_config: {', '.join(clashes)} must not be set there: tuneforge "
                            "drives torch's AdamW and its own schedule (training.optimizer, training.scheduler) and "
                            "mixed precision through training.precision")
    stage = STAGES[d.strategy]
    zero = cfg.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != stage:
        raise SpecError(f"distributed.deepspeed_config: zero_optimization.stage is {zero['stage']} but "
                        f"distributed.strategy {d.strategy} means stage {stage}; make them agree")
    zero["stage"] = stage
    if d.offload in ("optimizer", "parameters"):
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    if d.offload == "parameters":
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": False})
    # Micro-batches are counted by the loop (accumulate() sets the boundary), so one per "accumulation".
    # Stage 0 leaves the all-reduced gradients in the parameters: the loop clips them with torch.
    wanted = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": (max_grad_norm or 0.0) if stage else 0.0}
    for key, value in wanted.items():
        if key in cfg and cfg[key] not in (value, "auto") and user:
            raise SpecError(f"distributed.deepspeed_config: {key} is {cfg[key]} but the spec gives {value} "
                            "(training.batch_size / training.max_grad_norm); leave it out of the JSON")
        cfg[key] = value
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    cfg["zero_allow_untested_optimizer"] = True  # torch's AdamW, as with every other strategy
    cfg["zero_force_ds_cpu_optimizer"] = False  # offload steps torch's AdamW on the CPU (not DeepSpeedCPUAdam)
    if autocast_dtype is not None:
        cfg["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch.")}
    cfg.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed stays quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def size_buckets(cfg: dict, hidden_size: int) -> dict:
    """Communication buckets sized to the model, where the config leaves them out or says "auto" (Hugging Face's
    convention, transformers.integrations.deepspeed): reduce (and, tuneforge's addition, all-gather) buckets of
    hidden_size**2 elements, a ZeRO-3 prefetch bucket of 0.9 x that and a persistence threshold of
    10 x hidden_size. DeepSpeed's own defaults (5e8 elements, 2 GB in fp32, per bucket) are sized for large
    models on GPUs; on SmolLM2 at 2 CPU ranks they put ZeRO-3's per-rank peak at 3.6 GB, above one process's."""
    zero = cfg.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size, "allgather_bucket_size": hidden_size * hidden_size}
    if zero.get("stage") == 3:
        sizes.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                     stage3_param_persistence_threshold=10 * hidden_size)
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    return cfg


class _EngineOptimizer(torch.optim.Optimizer):
    """What the loop (and its LR schedule) sees: torch's AdamW's param_groups, stepped by the engine."""

    def __init__(self, engine, inner: torch.optim.Optimizer):  # no super().__init__: it would copy the groups
        self.engine, self.inner = engine, inner
        self.defaults = inner.defaults

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self, closure=None):
        self.engine.step()  # at the boundary: reduce, clip (gradient_clipping), step, zero the gradients

    def zero_grad(self, set_to_none: bool = True):
        return None  # the engine zeroes its gradients in step()

    def state_dict(self):
        raise NotImplementedError("DeepSpeed checkpoints go through engine.save_checkpoint (DeepSpeedStrategy)")


class _EngineForward(torch.nn.Module):
    """The loop's forward before the engine exists (wrap comes before build_optimizer), then the engine's."""

    def __init__(self, module: ForwardLoss):
        super().__init__()
        self.module = module
        self.engine = None

    def forward(self, batch):
        return (self.engine or self.module)(batch)


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU communication backend from compiling its shared-memory all-reduce when it starts.

    On CPU, `deepspeed.initialize` creates the backend, which JIT-builds the `deepspeed_shm_comm` C++ op into
    TORCH_EXTENSIONS_DIR (~40 s of two compiler processes on the first run, and a compiler on the machine).
    Only DeepSpeed inference's `inference_all_reduce` uses that op; training's collectives go through
    torch.distributed (gloo), with or without it. Marking the op unavailable (the dict DeepSpeed itself reads
    for "can this machine build it") skips the build. Called in a rank, just before the backend exists."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


class DeepSpeedStrategy(TorchProcessGroup):
    def __init__(self, device: torch.device, d: DistributedSpec, *, batch_size: int, max_grad_norm: float | None,
                 autocast_dtype: torch.dtype | None):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise SpecError("distributed.backend: deepspeed is not installed; pip install 'tuneforge[deepspeed]' "
                            "(or use backend: torch)") from None
        super().__init__(device, d.timeout_seconds)
        user = None
        if d.deepspeed_config:
            path = Path(d.deepspeed_config).expanduser()
            try:
                user = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise SpecError(f"distributed.deepspeed_config: {path}: cannot read it as JSON ({e})") from None
            if not isinstance(user, dict):
                raise SpecError(f"distributed.deepspeed_config: {path}: expected a JSON object")
        self.config = deepspeed_config(d, batch_size=batch_size, max_grad_norm=max_grad_norm,
                                       autocast_dtype=autocast_dtype, user=user)
        self.stage = self.config["zero_optimization"]["stage"]
        self.sharded = self.stage > 0
        self.name = f"deepspeed-zero{self.stage}" + ("+offload" if d.offload != "none" else "")
        self.engine = None

    def wrap(self, module: ForwardLoss) -> torch.nn.Module:
        module.to(self.device)
        hidden = getattr(getattr(module.model, "config", None), "hidden_size", None)
        if hidden:
            size_buckets(self.config, int(hidden))
        self.wrapper = _EngineForward(module)
        return self.wrapper

    def build_optimizer(self, params: list, make: Callable, lr: float, weight_decay: float):
        import deepspeed

        inner = make(params)
        if self.device.type == "cpu":
            skip_inference_comm_op()
        self.engine, optimizer, _, _ = deepspeed.initialize(model=self.wrapper.module, optimizer=inner,
                                                             config=self.config, dist_init_required=False)
        self.wrapper.engine = self.engine
        return _EngineOptimizer(self.engine, inner)

    def accumulate(self, wrapped: torch.nn.Module, is_last: bool):
        self.engine.set_gradient_accumulation_boundary(is_last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, params: list, max_norm: float) -> float | None:
        if self.stage == 0:
            return super().clip_grad_norm(params, max_norm)
        return None  # ZeRO: clipped over the partitions inside engine.step(); read step_grad_norm() after it

    def step_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_state_dict(self, model) -> dict | None:
        if self.stage < 3:
            return None  # ZeRO-1/2 keep full weights in the module
        state = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)  # all ranks
        if state is None:
            return {}
        # keys are the engine module's (ForwardLoss: "model." + the model's own names)
        return {k.removeprefix("model."): v for k, v in state.items()}

    def close(self) -> None:
        """Destroy the process group and DeepSpeed's cached groups over it, so a later run in this
        process (a test, a notebook) starts from nothing."""
        import re

        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups

        super().close()
        for name, value in list(vars(groups).items()):
            if re.fullmatch(r"_[A-Z_]*GROUP[A-Z_]*", name):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        ds_comm.cdb = None
        self.engine = None

    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        if self.stage == 0:
            return super().save_model_and_optimizer(checkpoint, model, optimizer.inner)
        self.engine.save_checkpoint(str(checkpoint.deepspeed), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        if self.stage == 0:
            return super().load_model_and_optimizer(checkpoint, model, optimizer.inner)
        folder = checkpoint.deepspeed
        if not (folder / "state").is_dir():
            raise CheckpointError(f"{folder} is missing")
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag="state", load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:  # a truncated shard
            raise CheckpointError(f"{folder} is damaged ({type(e).__name__}: {str(e)[:200]})") from None
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint there")
