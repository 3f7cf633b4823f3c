"""Resolving, converting and loading models and tokenizers."""
from tuneforge.models.load import load_model, load_tokenizer, resolve_model

__all__ = ["load_model", "load_tokenizer", "resolve_model"]
