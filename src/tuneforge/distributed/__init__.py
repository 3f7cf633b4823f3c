"""How the training loop talks to its process group (single process today; DDP/FSDP2/DeepSpeed plug in here)."""
from tuneforge.distributed.strategy import SingleDevice, Strategy

__all__ = ["SingleDevice", "Strategy"]
