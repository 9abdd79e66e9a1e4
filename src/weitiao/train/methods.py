"""Fine-tuning methods: decide which weights train. Adapters come from PEFT, never home-made layers."""

from __future__ import annotations

import torch

from weitiao.config import Config
from weitiao.errors import ConfigError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (what 'all-linear' expands to, plus the head)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def apply_method(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Wrap or freeze `model` for the configured method and switch on training-time options."""
    model.config.use_cache = False  # the KV cache is useless in training and disables packed-sequence detection
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if config.method == "lora":
        return _apply_lora(model, config)
    raise ConfigError(f"unknown method '{config.method}'")


def _apply_lora(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    settings = config.lora
    targets = settings.target_modules
    if isinstance(targets, list):
        available = linear_module_names(model)
        missing = [t for t in targets if t not in available and not any(t in n for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(f"lora.target_modules {missing} match no module of this model; its linear layers are: "
                              f"{', '.join(available)} (or use 'all-linear')")
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, use_rslora=settings.use_rslora, use_dora=settings.use_dora,
        modules_to_save=settings.modules_to_save or None)
    if config.train.gradient_checkpointing:
        # With frozen embeddings no input needs a gradient, and checkpointed blocks would get none either.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
