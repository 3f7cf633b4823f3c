"""Fine-tuning methods: peft configs per method, applying them to a model, merging."""
from tuneforge.methods.peft_builders import apply_method, build_peft_config, count_parameters

__all__ = ["apply_method", "build_peft_config", "count_parameters"]
