"""Export a fine-tuned run for deployment, each export gated on equivalence with the trained model.

- `export_onnx`: ONNX Runtime GenAI, fp32 / int8 / int4, merged (`export/onnx.py`) or as one base with
  hot-swappable LoRA adapter files (`export/adapters.py`);
- `export_gguf`: a GGUF file for llama.cpp and Ollama, f16 or q8_0 (`export/gguf.py`);
- `gates`: the equivalence gates, their tolerances and the `ExportError` / `GateFailed` (exit 3) errors.
"""
from __future__ import annotations

from tuneforge.export.gates import ExportError, GateFailed

__all__ = ["export_onnx", "export_onnx_adapter", "export_gguf", "ExportError", "GateFailed"]


def export_onnx(*args, **kwargs) -> dict:
    from tuneforge.export.onnx import export_onnx as run

    return run(*args, **kwargs)


def export_onnx_adapter(*args, **kwargs) -> dict:
    from tuneforge.export.adapters import export_onnx_adapter as run

    return run(*args, **kwargs)


def export_gguf(*args, **kwargs) -> dict:
    from tuneforge.export.gguf import export_gguf as run

    return run(*args, **kwargs)
