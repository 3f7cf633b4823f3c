"""Build a peft config from the spec's method + adapter section, and apply it to a model.

Everything here goes through Hugging Face peft; tuneforge only picks sensible targets per
architecture (e.g. Phi-3's fused qkv_proj / gate_up_proj).
"""
from __future__ import annotations

import torch

from tuneforge.errors import SpecError

# IA3 scales keys/values and the MLP input of the down projection. peft ships defaults for most
# families; these fill its gaps (fused-projection models).
IA3_TARGETS = {"phi3": (["qkv_proj", "down_proj"], ["down_proj"])}
FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "c_proj")


def build_peft_config(method: str, model_type: str, *, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                      target_modules: str | list[str] = "all-linear", num_virtual_tokens: int = 20,
                      prompt_init_text: str | None = None, tokenizer_path: str | None = None):
    """Return the peft config for a method (None for full fine-tuning)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if method in ("lora", "qlora", "dora"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=target_modules, use_dora=(method == "dora"), bias="none",
        )
    if method == "ia3":
        if target_modules == "all-linear":
            targets, feedforward = IA3_TARGETS.get(model_type, (None, None))
        else:
            targets = list(target_modules)
            feedforward = [t for t in targets if t in FEEDFORWARD_NAMES]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    if method == "prompt_tuning":
        if prompt_init_text:
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=prompt_init_text,
                tokenizer_name_or_path=tokenizer_path,
            )
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    if method == "full":
        return None
    raise SpecError(f"unknown method {method!r}")


def apply_method(model, method: str, adapter, *, tokenizer_path: str | None = None,
                 gradient_checkpointing: bool = False, checkpoint_every: int = 1):
    """Wrap `model` for `method` and return it with exactly the trainable parameters requiring grad."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24 (ours)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=checkpoint_every)
        else:  # older transformers 5 releases (e.g. 5.17 on the GPU machines) name it gradient_checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=checkpoint_every)
        model.config.use_cache = False
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "qlora" and model.dtype != torch.bfloat16:
        # peft's recipe upcasts the layers left unquantised (embeddings, norms, lm_head) to fp32. With a bf16
        # base they stay bf16 like a LoRA run's frozen base: the adapter and optimizer are fp32 either way.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # enabled above
    config = build_peft_config(
        method, model.config.model_type, r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout,
        target_modules=adapter.target_modules, num_virtual_tokens=adapter.num_virtual_tokens,
        prompt_init_text=adapter.prompt_init_text, tokenizer_path=tokenizer_path,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found
        raise SpecError(f"adapter: {e}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit packed weights count as their logical element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = n * 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def base_weight_bytes(model) -> dict[str, int]:
    """Measured storage of the frozen base's linear weights, by dtype ('nf4' for 4-bit)."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or "lora_" in name:
            continue
        kind = "nf4" if p.__class__.__name__ == "Params4bit" else str(p.dtype).removeprefix("torch.")
        out[kind] = out.get(kind, 0) + p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None and isinstance(getattr(state, "absmax", None), torch.Tensor):
            out["nf4_absmax"] = out.get("nf4_absmax", 0) + state.absmax.numel() * state.absmax.element_size()
    return out
