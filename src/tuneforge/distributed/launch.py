"""Starting the ranks (torch.distributed.run's elastic agent) and picking each rank's strategy.

A run with `distributed.nproc` N > 1 is trained by the training entry (training/entry.py), which calls
`launch_ranks`: torch's elastic agent starts this node's N ranks, each calling the entry's rank function with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, and watches them. The ranks are forked from
multiprocessing's fork server, into which the entry preloads the training stack (torch, transformers, peft):
it is imported once per launch, not once per rank. Multi-node: every node runs the same command with
its own `--node-rank`; node 0's agent hosts the rendezvous store at master_addr:master_port (the
"static" rendezvous, as `torchrun --nnodes N --node-rank R --master-addr A --master-port P`).
A rank that dies makes the agent stop the others; the error names the rank and how it ended.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.distributed.strategy import DistributedError, SingleDevice, Strategy
from tuneforge.errors import SpecError
from tuneforge.spec import DistributedSpec


def in_launched_rank() -> bool:
    """Whether this process is one rank of a torch.distributed.run launch (or another launcher's)."""
    # LOCAL_RANK too: a Kubernetes training operator sets RANK / WORLD_SIZE / MASTER_ADDR per *pod*, whose
    # `tuneforge train` must still launch that node's ranks (k8s.py)
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def needs_launch(d: DistributedSpec | None) -> bool:
    """The spec asks for ranks and we are not one yet: they must be started (tuneforge.train does it)."""
    return d is not None and d.strategy != "none" and d.world_size > 1 and not in_launched_rank()


def build_strategy(d: DistributedSpec | None, device: torch.device, *, batch_size: int = 1,
                   max_grad_norm: float | None = None, autocast_dtype: torch.dtype | None = None) -> Strategy:
    """The strategy for this process: SingleDevice outside a launch, else the spec's strategy
    (DeepSpeed's config also takes the micro-batch size, clipping and autocast dtype)."""
    if not in_launched_rank():
        if d is not None and d.strategy != "none" and d.world_size > 1:
            raise SpecError(f"distributed: nproc x nnodes = {d.world_size} processes are needed; start them with "
                            "`tuneforge train SPEC` or tuneforge.train(spec), which launches them, or torchrun, "
                            "not from inside one process")
        return SingleDevice(device)
    world = int(os.environ["WORLD_SIZE"])
    if d is None or d.strategy == "none":
        if world > 1:
            raise SpecError(f"the launcher started {world} ranks but the spec has no `distributed` section; add "
                            "distributed: {strategy: ddp, nproc: N}")
        return SingleDevice(device)
    if world != d.world_size:
        raise SpecError(f"distributed: nproc x nnodes = {d.nproc} x {d.nnodes} = {d.world_size}, but the launcher "
                        f"started {world} ranks; make them agree")
    if d.backend == "deepspeed":
        from tuneforge.distributed.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(device, d, batch_size=batch_size, max_grad_norm=max_grad_norm,
                                 autocast_dtype=autocast_dtype)
    from tuneforge.distributed.torch_strategies import DDPStrategy, FSDPStrategy, ZeroOneStrategy

    if d.strategy == "ddp":
        return DDPStrategy(device, d.timeout_seconds)
    if d.strategy == "zero1":
        return ZeroOneStrategy(device, d.timeout_seconds)
    return FSDPStrategy(device, d.timeout_seconds, reshard_after_forward=d.strategy == "zero3",
                        offload=d.offload == "parameters")


def rank_label() -> str:
    """'[rank 1] ' inside a multi-rank launch, '' otherwise (prefixes a rank's error message)."""
    if in_launched_rank() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def launch_ranks(d: DistributedSpec, entrypoint: Callable[..., None], args: tuple, *, log_dir: Path,
                 threads_per_rank: int | None = None) -> None:
    """Run `entrypoint(*args)` as this node's `d.nproc` ranks and wait for them. Each rank is a process forked
    from multiprocessing's fork server (what `multiprocessing.set_forkserver_preload` names is imported there once);
    `entrypoint` must be importable by name and ends the rank with `sys.exit(code)` when it fails. Call it from a
    process of its own (the training entry): torch's agent takes over the process's SIGTERM and SIGINT handlers
    while it runs. `log_dir`: where the agent keeps its per-rank error files (the caller removes it).

    Raises DistributedError naming the first rank that failed (its own message is printed above
    by the rank); its exit code is that rank's when it exited with one."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=d.nnodes, max_nodes=d.nnodes, nproc_per_node=d.nproc,
        run_id=f"tuneforge-{d.master_port}", rdzv_backend="static",
        rdzv_endpoint=f"{d.master_addr}:{d.master_port}",
        rdzv_configs={"rank": d.node_rank, "timeout": int(d.timeout_seconds)},
        # shutdown_timeout: after SIGTERM, how long the ranks have to reach a step boundary and checkpoint
        max_restarts=0, monitor_interval=0.2, start_method="forkserver", shutdown_timeout=60,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)),  # not a torchelastic_* folder left in /tmp per launch
    )
    # Ranks on one node share its cores: one OpenMP team per rank, not one per core each.
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // d.nproc)
    env_before = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    said_here = _SaidHere()
    torch_loggers = [logging.getLogger(name) for name in _TORCH_RANK_LOGGERS]
    for logger in torch_loggers:
        logger.addFilter(said_here)
    # the ranks inherit this process's environment (the fork server starts with it, and its OpenMP reads it then)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        if d.node_rank > 0:
            check_rendezvous_reachable(d)  # one clear line instead of c10d's C++ log and stack frames
        elastic_launch(config, entrypoint=entrypoint)(*args)
    except ChildFailedError as e:
        raise _failure_error(e, d) from None
    except SignalException as e:  # Ctrl-C / SIGTERM: the agent passed it on; ranks stop at a step boundary
        from tuneforge.errors import Stopped

        raise Stopped(f"{e.sigval.name}: the ranks were asked to stop (each finishes its step and writes a "
                      "checkpoint when it can); continue with `tuneforge train RUN_DIR --resume`",
                      exit_code=128 + int(e.sigval)) from None
    except (RendezvousError, RuntimeError, ValueError) as e:  # node 0 unreachable, the port taken, a timeout
        raise rendezvous_error(d, str(e) or type(e).__name__) from None
    finally:
        for logger in torch_loggers:
            logger.removeFilter(said_here)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# torch's own lines about a rank that ended: the agent's (with a traceback of its process join) and
# multiprocessing's SIGTERM to the others
_TORCH_RANK_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")


class _SaidHere(logging.Filter):
    """Drops torch's account of a rank that ended: the DistributedError raised here names the rank, its pid and how
    it ended, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("failed (exitcode") or message.startswith("Terminating process"))


def check_rendezvous_reachable(d: DistributedSpec) -> None:
    """On a node other than 0: wait (up to `timeout_seconds`) until node 0's rendezvous store answers at
    master_addr:master_port, as torch's agent is about to; raise one DistributedError line if it never does.

    The probe is the same TCPStore client the agent uses. Its C++ side logs every retry with stack frames to
    file descriptor 2, so the probe runs with fd 2 pointed at a temporary file (this is the launcher process
    before any rank exists; nothing else writes there meanwhile) and only the last line is kept for the error."""
    import socket
    import tempfile
    from datetime import timedelta

    import torch.distributed as dist

    where = f"{d.master_addr}:{d.master_port}"
    try:
        socket.getaddrinfo(d.master_addr, d.master_port)
    except OSError as e:
        raise DistributedError(f"node {d.node_rank}: the rendezvous address {where} does not resolve ({e}); "
                               "give node 0's address or host name with --master-addr") from None
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            store = dist.TCPStore(d.master_addr, d.master_port, is_master=False,
                                  timeout=timedelta(seconds=d.timeout_seconds))
            del store  # reachable: the agent connects again and joins the rendezvous
            return
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError
            reason = str(e)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    raise rendezvous_error(d, reason)


def rendezvous_error(d: DistributedSpec, reason: str) -> DistributedError:
    """What failed in the rendezvous (address, port, timeout) as one line, from torch's / c10d's message."""
    where = f"{d.master_addr}:{d.master_port}"
    text = reason.lower()
    first = (reason.strip().splitlines() or [""])[0][:200]
    if "eaddrinuse" in text or "address already in use" in text:
        what = (f"port {d.master_port} is already in use on this node (another run or service holds it); choose a "
                "free one with --master-port (distributed.master_port) on every node")
    elif "waiting for clients" in text:  # node 0: the others did not arrive
        counts = re.search(r"(\d+)/(\d+) clients joined", reason)
        joined = f"{counts[1]} of {counts[2]} nodes joined" if counts else first
        what = (f"not every node joined within {d.timeout_seconds:.0f} s ({joined}); start the other "
                f"{d.nnodes - 1} node(s) with the same spec, --nnodes {d.nnodes}, their own --node-rank and "
                f"--master-addr <this node's address> --master-port {d.master_port}")
    elif "ping failed" in text or "invalid value returned" in text:
        what = ("something answered there that is not a torch.distributed rendezvous; check --master-port "
                "(node 0's distributed.master_port)")
    elif "timed out" in text or "timeout" in text or "refused" in text:
        what = (f"node 0 did not answer within {d.timeout_seconds:.0f} s; check that node 0 is running "
                "`tuneforge train` with the same spec, that --master-addr is its address as this node sees it, "
                "and that the port is open between the nodes")
    else:
        what = first or "unknown error"
    return DistributedError(f"node {d.node_rank}: the rendezvous at {where} failed: {what}")


def _failure_error(e, d: DistributedSpec) -> DistributedError:
    first_rank, first = e.get_first_failure()
    lines = []
    for rank, f in sorted(e.failures.items()):
        if f.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-f.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-f.exitcode}"
        else:
            how = f"exited with code {f.exitcode}"
        lines.append(f"rank {rank} (node {d.node_rank}, local rank {f.local_rank}, pid {f.pid}) {how}")
    err = DistributedError(
        f"{len(e.failures)} rank(s) failed, first rank {first_rank}: " + "; ".join(lines)
        + " (each rank's own message is above). Continue from the newest checkpoint with "
          "`tuneforge train RUN_DIR --resume` (same --nproc)")
    if first.exitcode > 0:
        err.exit_code = first.exitcode
    return err
