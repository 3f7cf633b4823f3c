"""Data parallelism on torch.distributed: DDP, ZeRO-1 (DDP + ZeroRedundancyOptimizer), ZeRO-2/3 (FSDP2).

| strategy | weights | gradients | optimizer state | engine |
|---|---|---|---|---|
| ddp   | replicated | all-reduced, replicated | replicated | DistributedDataParallel |
| zero1 | replicated | all-reduced, replicated | sharded | + ZeroRedundancyOptimizer |
| zero2 | sharded between steps, gathered for forward+backward | reduce-scattered | sharded | FSDP2 `fully_shard(reshard_after_forward=False)` |
| zero3 | sharded, gathered per decoder layer | reduce-scattered | sharded | FSDP2 `fully_shard(reshard_after_forward=True)` |
FSDP2's CPUOffloadPolicy (offload: parameters) keeps the shards, their gradients and the optimizer
step in CPU memory. gloo on CPU, nccl on CUDA (one rank per GPU, LOCAL_RANK picks it).

Every rank runs the process launched by torch.distributed.run (launch.py), which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Collectives time out after
`distributed.timeout_seconds`; each rank posts what it is doing (`heartbeat`) to the launcher's
TCP store, so a rank whose collective times out can name the peer that stopped responding.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from tuneforge.distributed.strategy import (DistributedError, ForwardLoss, copy_weights, load_weights_and_optimizer,
                                           read_checkpoint_file, save_weights_and_optimizer)
from tuneforge.errors import CheckpointError, TuneforgeError

# Words in the errors gloo / nccl / the TCP store raise when a peer is gone or silent.
_PEER_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                       "connection refused", "socket", "gloo", "nccl", "peer")


class TorchProcessGroup:
    """What every torch strategy shares: the process group, reductions, heartbeats, diagnosis."""

    name = "ddp"
    sharded = False

    def __init__(self, device: torch.device, timeout_seconds: float):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout = timedelta(seconds=timeout_seconds)
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device, backend = torch.device("cuda", self.local_rank), "nccl"
        else:
            self.device, backend = torch.device("cpu"), "gloo"
        self.grad_scale = float(self.world_size)  # undo the wrappers' average (see strategy.py)
        self.activity = "joining the process group"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=self.timeout)
        self.store = self._open_store()

    def _open_store(self):
        """A client of the launcher's TCP store (torch.distributed.run hosts it at MASTER_ADDR:MASTER_PORT)."""
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=min(30.0, self.timeout.total_seconds())))
        except (KeyError, ValueError, RuntimeError):
            return None  # no heartbeats: a timeout is still reported, only without the peer's last activity
        return dist.PrefixStore(f"tuneforge/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}", store)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- reductions (float64 so token counts stay exact)
    def _reduce(self, value: float, op) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return t.item()

    def all_reduce_sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def all_reduce_max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def gather_floats(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order (each rank fills its own slot of a summed vector)."""
        t = torch.zeros(self.world_size, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        t[self.rank] = float(value)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        self.all_reduce_sum(0.0)  # gloo's barrier has no timeout of its own; an all-reduce has the group's

    # ---- liveness
    def heartbeat(self, activity: str) -> None:
        self.activity = activity
        if self.store is not None:
            try:
                self.store.set(f"hb/{self.rank}", json.dumps({"activity": activity, "time": time.time()}))
            except RuntimeError:
                pass  # the store's host (node 0's launcher) is gone: the collective will report it

    def check_peers(self) -> None:
        """Before training: every rank must arrive, and one all-reduce must give the world size."""
        self.heartbeat("waiting for the other ranks before training")
        if self.store is not None:
            self.store.set(f"ready/{self.rank}", "1")
            keys = [f"ready/{r}" for r in range(self.world_size)]
            try:
                self.store.wait(keys, self.timeout)
            except RuntimeError:
                missing = [r for r in range(self.world_size) if not self.store.check([f"ready/{r}"])]
                raise DistributedError(
                    f"rank {self.rank}: rank(s) {', '.join(map(str, missing))} did not reach the start of training "
                    f"within {self.timeout.total_seconds():.0f} s ({self._peer_report(missing)}); check their "
                    "output above, or raise distributed.timeout_seconds if loading is just slow") from None
        total = self.all_reduce_sum(1.0)
        if total != self.world_size:
            raise DistributedError(f"rank {self.rank}: the collective check summed {total:.0f} ranks, expected "
                                   f"{self.world_size}")

    def _peer_report(self, ranks: list[int] | None = None) -> str:
        if self.store is None:
            return "no heartbeats available"
        now, parts = time.time(), []
        for r in ranks if ranks is not None else range(self.world_size):
            if r == self.rank:
                continue
            try:
                if not self.store.check([f"hb/{r}"]):
                    parts.append(f"rank {r} never reported")
                    continue
                beat = json.loads(self.store.get(f"hb/{r}"))
            except (RuntimeError, ValueError):
                return "the launcher's store on node 0 is unreachable"
            parts.append(f"rank {r} last reported '{beat['activity']}' {now - beat['time']:.0f} s ago")
        return "; ".join(parts) or "no other ranks"

    def diagnose(self, error: BaseException) -> TuneforgeError | None:
        """A failed or timed-out collective, as one message naming the silent peer; None for other errors."""
        text = str(error).lower()
        if not isinstance(error, (RuntimeError, dist.DistError)) or not any(w in text for w in _PEER_FAILURE_WORDS):
            return None
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return DistributedError(
            f"rank {self.rank}: a collective failed while '{self.activity}' (timeout "
            f"{self.timeout.total_seconds():.0f} s): {first}. Peers: {self._peer_report()}. The run stops; continue "
            "from the newest checkpoint with `tuneforge train RUN_DIR --resume`")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- defaults the strategies override
    def accumulate(self, wrapped: torch.nn.Module, is_last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def build_optimizer(self, params: list, make: Callable, lr: float, weight_decay: float):
        return make(params)

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def step_grad_norm(self) -> float | None:
        return None  # clip_grad_norm returned it

    def full_state_dict(self, model) -> dict | None:
        return None  # replicated: the main rank's model holds the full weights

    # ---- checkpoints of replicated weights: the main rank writes the files one process writes. `checkpoint` is a
    # training.run_dir.CheckpointDir (the folder's file names are known there, not here).
    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        if self.is_main:
            save_weights_and_optimizer(checkpoint, model, optimizer)

    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        load_weights_and_optimizer(checkpoint, model, optimizer)


class DDPStrategy(TorchProcessGroup):
    """Replicated weights; gradients all-reduced (averaged) in buckets during backward."""

    name = "ddp"

    def wrap(self, module: ForwardLoss) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        module.to(self.device)
        return DistributedDataParallel(module, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def accumulate(self, wrapped: torch.nn.Module, is_last: bool):
        return nullcontext() if is_last else wrapped.no_sync()  # all-reduce once, after the last micro-batch


class ZeroOneStrategy(DDPStrategy):
    """DDP plus torch's ZeroRedundancyOptimizer: each rank keeps and steps the optimizer state of its
    share of the parameters, then broadcasts the updated values."""

    name = "zero1"
    sharded = True  # every rank writes its optimizer shard into a checkpoint

    def build_optimizer(self, params: list, make: Callable, lr: float, weight_decay: float):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # make(params) builds the same optimizer as one process would, for this rank's partition
        return ZeroRedundancyOptimizer(params, optimizer_class=lambda ps, **_: make(ps), lr=lr,
                                       weight_decay=weight_decay)

    # Checkpoints: every rank writes its own shard of the optimizer state (`optimizer-rank00001.pt`), the
    # main rank the (replicated) weights. Nothing is gathered: torch's consolidate_state_dict would broadcast
    # every shard to every rank (8.1 GB on one rank for SmolLM2 full fine-tuning; docs/benchmarks.md).
    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        from safetensors.torch import save_file

        local = optimizer.optim  # this rank's optimizer over its partition of the parameters
        # The schedule sets the learning rate in the outer param_groups after the step; ZeRO copies it into
        # the local optimizer only at the next step, so copy it now or a resumed step would use a stale one.
        _copy_hyperparameters(optimizer.param_groups, local.param_groups)
        names = {p: n for n, p in model.named_parameters()}
        shard = {"state": local.state_dict(), "world_size": self.world_size,
                 "params": [names[p] for g in local.param_groups for p in g["params"]]}
        torch.save(shard, checkpoint.optimizer_shard(self.rank))
        if self.is_main:
            save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                      checkpoint.weights)

    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        from safetensors.torch import load_file

        path = checkpoint.optimizer_shard(self.rank)
        if not path.exists() and checkpoint.optimizer.exists():  # written gathered, before per-rank shards
            return super().load_model_and_optimizer(checkpoint, model, optimizer)
        weights = read_checkpoint_file(checkpoint.weights, load_file)
        shard = read_checkpoint_file(path, lambda p: torch.load(p, weights_only=True))
        local = optimizer.optim
        names = {p: n for n, p in model.named_parameters()}
        mine = [names[p] for g in local.param_groups for p in g["params"]]
        if shard.get("params") != mine:
            raise CheckpointError(f"{path}: its optimizer shard covers other parameters than rank {self.rank} "
                                  "holds now; resume with the same spec and number of processes")
        copy_weights(checkpoint.path, model, weights)
        local.load_state_dict(shard["state"])
        _copy_hyperparameters(local.param_groups, optimizer.param_groups)  # the saved lr, as one process restores it


def _copy_hyperparameters(source: list[dict], target: list[dict]) -> None:
    """Copy learning rate and the other per-group settings (not the parameters) between param_groups."""
    for src, dst in zip(source, target, strict=True):
        dst.update({k: v for k, v in src.items() if k != "params"})


class FSDPStrategy(TorchProcessGroup):
    """FSDP2 (`fully_shard`) per decoder layer and at the root: zero2 keeps the gathered weights from
    forward to backward, zero3 frees them after each layer's forward and gathers them again."""

    sharded = True

    def __init__(self, device: torch.device, timeout_seconds: float, reshard_after_forward: bool, offload: bool):
        super().__init__(device, timeout_seconds)
        self.reshard_after_forward = reshard_after_forward
        self.offload = offload
        self.name = "zero3" if reshard_after_forward else "zero2"

    def wrap(self, module: ForwardLoss) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kw = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward,
              "offload_policy": CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.offload else OffloadPolicy()}
        layer_types = decoder_layer_types(module.model)
        for sub in list(module.model.modules()):
            if type(sub).__name__ in layer_types:
                fully_shard(sub, **kw)
        # The root group (embeddings, final norm, head) stays gathered from forward to backward.
        fully_shard(module, **{**kw, "reshard_after_forward": False})
        return module

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm over all shards (a DTensor)
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()

    def full_state_dict(self, model) -> dict | None:
        """Gather the trainable weights (all of them for full fine-tuning) onto the main rank, in CPU memory."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))

    # ---- sharded checkpoints: torch.distributed.checkpoint, one file per rank + metadata
    def _state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))

    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = self._state(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=checkpoint.sharded)

    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        folder = checkpoint.path
        if not (checkpoint.sharded / ".metadata").is_file():
            raise CheckpointError(f"{checkpoint.sharded} is missing or incomplete (no .metadata)")
        model_state, optim_state = self._state(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        try:
            dcp.load(state, checkpoint_id=checkpoint.sharded)
        except Exception as e:  # CheckpointException carries every rank's failure
            raise CheckpointError(f"{checkpoint.sharded} is damaged ({type(e).__name__}: {str(e)[:200]})") from None
        # strict=False: the frozen base weights are not in the checkpoint (they come from the model folder)
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]
        if missing:
            raise CheckpointError(f"checkpoint {folder} lacks trainable weights of this model (e.g. {missing[:3]}); "
                                  "resume with the same spec")


def decoder_layer_types(model: torch.nn.Module) -> set[str]:
    """Class names of the repeated blocks (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    for sub in model.modules():
        names = getattr(sub, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def local_state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (its shards for DTensors)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's optimizer in .optim
    state = sum(local(v).numel() * v.element_size() for s in inner.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"parameter_bytes": params, "optimizer_bytes": state}
