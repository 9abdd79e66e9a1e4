"""Applying a fine-tuning method (weitiao.methods.METHODS says which weights each one trains): freeze what stays
fixed, wrap adapters with PEFT, quantize the base with bitsandbytes, switch on training-time options."""

from __future__ import annotations

import torch

from weitiao.config import Config
from weitiao.errors import ConfigError
from weitiao.runs import RunFolder
from weitiao.train.fused_lora import recompute_without_last_products
from weitiao.train.offload import offload_checkpointed_layers


def quantization_config(config: Config):
    """The transformers BitsAndBytesConfig for method qlora (None otherwise)."""
    if not config.method_spec.quantized_base:
        return None
    from transformers import BitsAndBytesConfig

    settings = config.quantization
    if settings.bits == 8:  # None (the default) means 4
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, settings.compute_dtype))


def apply_method(model: torch.nn.Module, config: Config, offload_checkpoints: bool) -> torch.nn.Module:
    """Wrap or freeze `model` for the configured method and switch on training-time options
    (`offload_checkpoints`: the run's resolved train.offload_checkpoints)."""
    model.config.use_cache = False  # the KV cache is useless in training and disables packed-sequence detection
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.train.checkpoint_every > 1:  # granularity: keep the activations of the other layers
            for index, layer in enumerate(decoder_layers(model)[1]):
                layer.gradient_checkpointing = index % config.train.checkpoint_every == 0
        if offload_checkpoints:
            offload_checkpointed_layers(decoder_layers(model)[1], compile_layers=config.train.torch_compile)
        if not config.train.torch_compile:  # a compiled layer would compile again for the recomputation's flag
            recompute_without_last_products(decoder_layers(model)[1], model.config.model_type)
        if config.method != "full":
            # With frozen embeddings no input needs a gradient, so checkpointed blocks would get none either.
            model.enable_input_require_grads()
    # qlora deliberately skips peft.prepare_model_for_kbit_training: it casts every non-quantized weight
    # (embeddings, output head) to fp32, about 4 GiB more for an 8B model, for no gain under bf16 autocast.
    method = config.method_spec
    if method.peft_config is None:  # the base model trains: all of it, or the chosen layers
        if method.name == "freeze":
            return _freeze(model, config)
        model.requires_grad_(True)
        return model
    if config.model.adapter is not None:
        return continue_adapter(model, config.model.adapter)
    from peft import get_peft_model

    return get_peft_model(model, method.peft_config(model, config))


def continue_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Load a LoRA adapter trained on this base, trainable, so a new stage (SFT after continued pre-training)
    goes on from it; the result is one adapter holding both stages, on the unchanged base."""
    from peft import PeftConfig, PeftModel, PeftType

    run = RunFolder.adapter(adapter)
    if PeftConfig.from_pretrained(str(run.path)).peft_type != PeftType.LORA:
        raise ConfigError(f"model.adapter {adapter} is not a LoRA adapter; only LoRA adapters can be trained further")
    run.check_base(model.name_or_path)
    return PeftModel.from_pretrained(model, str(run.path), is_trainable=True)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ModuleList of the model: its stack of transformer blocks."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError("method freeze: this model has no list of layers to choose from")
    return max(lists, key=lambda item: len(item[1]))


def _freeze(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    settings = config.freeze
    prefix, layers = decoder_layers(model)
    count = settings.trainable_layers
    if count == 0 or abs(count) > len(layers):
        raise ConfigError(f"freeze.trainable_layers must be between -{len(layers)} and {len(layers)} (not 0) for "
                          f"this model of {len(layers)} layers")
    chosen = range(len(layers) - count, len(layers)) if count > 0 else range(-count)
    layer_prefixes = [f"{prefix}.{index}." for index in chosen]
    modules = settings.trainable_modules
    model.requires_grad_(False)
    matched_extra = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):  # a tied lm_head has its own name
        in_layer = any(name.startswith(p) for p in layer_prefixes)
        if in_layer and ("all" in modules or any(f".{m}." in name for m in modules)):
            parameter.requires_grad_(True)
        for extra in settings.extra_modules:
            if f"{extra}." in name or name.startswith(f"{extra}."):
                parameter.requires_grad_(True)
                matched_extra.add(extra)
    unmatched = set(settings.extra_modules) - matched_extra
    if unmatched:
        raise ConfigError(f"freeze.extra_modules {sorted(unmatched)} match no module of this model")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"freeze.trainable_modules {modules} match nothing in the chosen layers; use all, or "
                          "names such as mlp, self_attn")
    return model


def set_adapter_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """Whether PEFT layers cast their input to the adapter weights' dtype (peft.helpers.disable_input_dtype_casting
    as a setting rather than a context)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts packed 4-bit weights correctly
        return model.get_nb_trainable_parameters()
    # A model built partitioned by DeepSpeed ZeRO-3 holds empty local tensors; ds_numel is the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
