"""tuneforge: fine-tune small language models with LoRA, DoRA, QLoRA, IA3, prompt tuning or full training.

The public API is imported lazily, so `tuneforge --help` and data validation don't pay for torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "train": "tuneforge.api", "generate": "tuneforge.api", "load": "tuneforge.api", "merge": "tuneforge.api",
    "summary": "tuneforge.api", "evaluate": "tuneforge.api", "report": "tuneforge.api", "RunSummary": "tuneforge.api",
    "RunEvent": "tuneforge.api", "StopRequest": "tuneforge.api", "TuneforgeError": "tuneforge.errors", "JobSpec": "tuneforge.spec",
    "build_spec": "tuneforge.spec", "load_spec": "tuneforge.spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")
