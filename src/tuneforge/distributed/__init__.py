"""How the training loop talks to its process group: one process (`SingleDevice`), or ranks started by
torch.distributed.run running DDP, ZeRO-1, FSDP2 (ZeRO-2/3) or DeepSpeed ZeRO (docs/distributed.md)."""
from tuneforge.distributed.launch import build_strategy, in_launched_rank, launch_ranks, needs_launch, rank_label
from tuneforge.distributed.strategy import DistributedError, ForwardLoss, SingleDevice, Strategy

__all__ = ["DistributedError", "ForwardLoss", "SingleDevice", "Strategy", "build_strategy", "in_launched_rank",
           "launch_ranks", "needs_launch", "rank_label"]
