"""Serving fine-tuned models: continuous batching over one base with many LoRA adapters (engine.py,
adapters.py), and which loaded model answers which model name (registry.py)."""
