"""The training loop, its loss, checkpoints and metrics."""
