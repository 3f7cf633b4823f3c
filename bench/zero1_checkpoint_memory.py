"""Question: how much memory does a torch zero1 (DDP + ZeroRedundancyOptimizer) checkpoint cost each rank:
tuneforge's per-rank optimizer shards vs torch's consolidate_state_dict (what tuneforge did before, the
8.1 GB spike of docs/benchmarks.md "Scale-out memory")?

2 CPU ranks (gloo), full fine-tuning of a random Llama (default ~58M parameters, 223 MB fp32; AdamW state
2x that, half per rank), one step, then in the same ranks: (a) `ZeroOneStrategy.save_model_and_optimizer`,
(b) the peer, `consolidate_state_dict(to=0)` + rank 0 saving the gathered state. Peak RSS = VmHWM, reset
(/proc/self/clear_refs) before each; reported as the rise over the RSS before the save. Run alone:

    flock .cache/bench.lock .venv/bin/python bench/zero1_checkpoint_memory.py > bench/results/zero1_checkpoint_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _rank(rank: int, world: int, model_dir: str, port: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from transformers import AutoModelForCausalLM

    from tuneforge.distributed.strategy import ForwardLoss

    from tuneforge.distributed.torch_strategies import ZeroOneStrategy
    from tuneforge.training.loss import loss_fn_for
    from tuneforge.training.run_dir import CheckpointDir

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    strategy = ZeroOneStrategy(torch.device("cpu"), 300)
    forward = strategy.wrap(ForwardLoss(model, loss_fn_for(model, chunked=False)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = strategy.build_optimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-3), 1e-3, 0.0)
    ids = torch.arange(64).reshape(2, 32) % 200 + 3  # (B, T) = (2, 32)
    loss, _ = forward({"input_ids": ids, "labels": ids})
    loss.backward()
    optimizer.step()
    result = {"rank": rank, "trainable_mb": round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1)}
    for name in ("per_rank_shards", "consolidate_state_dict"):
        folder = Path(out, name)
        folder.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        _reset_peak()
        before = _rss_mb()[0]
        if name == "per_rank_shards":
            strategy.save_model_and_optimizer(CheckpointDir(folder), model, optimizer)
        else:
            optimizer.consolidate_state_dict(to=0)  # collective: every rank sends its shard
            if rank == 0:
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        strategy.barrier()
        result[name] = {"rss_before_mb": before, "peak_rise_mb": _rss_mb()[1] - before,
                        "files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(folder.iterdir())}}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    strategy.close()


def main() -> None:
    import torch.multiprocessing as mp

    from tuneforge.models.tiny import make_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' notices (DeepSpeed's accelerator line, here and in the ranks) go to stderr
    with tempfile.TemporaryDirectory(prefix="tuneforge-zero1-ckpt-") as tmp:
        model = make_tiny_model("llama", Path(tmp) / "model", hidden_size=args.hidden,
                                intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab)
        mp.spawn(_rank, args=(2, str(model), free_port(), tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    print(json.dumps({"question": "per-rank peak RSS rise of a zero1 checkpoint: per-rank shards vs consolidate_state_dict",
                      "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
                      "machine": f"{os.cpu_count()} cores", "ranks": ranks}, indent=1), file=results)
    results.close()


if __name__ == "__main__":
    sys.exit(main())
