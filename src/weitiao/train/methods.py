"""Fine-tuning methods: which weights train. Adapters come from PEFT and quantization from bitsandbytes,
never home-made layers.

| method   | trains                                   | saved as          | mergeable |
|----------|------------------------------------------|-------------------|-----------|
| full     | every weight                             | model             | -         |
| freeze   | the last N decoder layers (+ extras)     | model             | -         |
| lora     | low-rank updates (rsLoRA, DoRA switches) | PEFT adapter      | yes       |
| qlora    | LoRA on a 4-/8-bit quantized base        | PEFT adapter      | yes       |
| ia3      | per-channel activation scales            | PEFT adapter      | yes       |
| prefix   | per-layer key/value prefixes (P-Tuning v2)| PEFT adapter     | no        |
| ptuning  | virtual tokens from a prompt encoder     | PEFT adapter      | no        |
| prompt   | virtual token embeddings                 | PEFT adapter      | no        |
"""

from __future__ import annotations

import importlib.util
import types

import torch

from weitiao.config import Config
from weitiao.errors import ConfigError

ADAPTER_METHODS = ("lora", "qlora", "ia3", "prefix", "ptuning", "prompt")
PROMPT_LEARNING_METHODS = ("prefix", "ptuning", "prompt")
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


def check_device(config: Config, device: torch.device) -> None:
    """Reject, before any loading, what this machine cannot run, saying what to do instead."""
    needs_bnb = config.method == "qlora" or config.train.optim in CUDA_ONLY_OPTIMIZERS
    what = f"method {config.method}" if config.method == "qlora" else f"optim {config.train.optim}"
    if needs_bnb and device.type != "cuda":
        raise ConfigError(f"{what} needs a CUDA GPU (bitsandbytes kernels) and this machine has none; on a CPU use "
                          "method: lora and optim: adamw_torch")
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install bitsandbytes")
    if config.train.fp16 and device.type != "cuda":
        raise ConfigError("fp16 training needs a GPU; on the CPU use bf16 or neither")


def quantization_config(config: Config):
    """The transformers BitsAndBytesConfig for method qlora (None otherwise)."""
    if config.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    settings = config.quantization
    if settings.bits == 8:  # None (the default) means 4
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, settings.compute_dtype))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers adapters can target (what 'all-linear' chooses from)."""
    linear_types = (torch.nn.Linear,)
    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, linear_types)})


def _check_targets(model: torch.nn.Module, targets, section: str) -> None:
    if not isinstance(targets, list):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        raise ConfigError(f"{section}.target_modules {missing} match no module of this model; its linear layers "
                          f"are: {', '.join(linear_module_names(model))} (or use 'all-linear')")


def apply_method(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Wrap or freeze `model` for the configured method and switch on training-time options."""
    model.config.use_cache = False  # the KV cache is useless in training and disables packed-sequence detection
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.train.checkpoint_every > 1:  # granularity: keep the activations of the other layers
            for index, layer in enumerate(decoder_layers(model)[1]):
                layer.gradient_checkpointing = index % config.train.checkpoint_every == 0
        if config.method != "full":
            # With frozen embeddings no input needs a gradient, so checkpointed blocks would get none either.
            model.enable_input_require_grads()
    # qlora deliberately skips peft.prepare_model_for_kbit_training: it casts every non-quantized weight
    # (embeddings, output head) to fp32, about 4 GiB more for an 8B model, for no gain under bf16 autocast.
    if config.method == "full":
        model.requires_grad_(True)
        return model
    if config.method == "freeze":
        return _freeze(model, config)
    if config.model.adapter is not None:
        return continue_adapter(model, config.model.adapter)
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, config))


def continue_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Load a LoRA adapter trained on this base, trainable, so a new stage (SFT after continued pre-training)
    goes on from it; the result is one adapter holding both stages, on the unchanged base."""
    from peft import PeftConfig, PeftModel, PeftType

    from weitiao.serve.engine import check_adapter_base, check_adapter_folder

    folder = check_adapter_folder(adapter)
    if PeftConfig.from_pretrained(str(folder)).peft_type != PeftType.LORA:
        raise ConfigError(f"model.adapter {adapter} is not a LoRA adapter; only LoRA adapters can be trained further")
    check_adapter_base(folder, model.name_or_path)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def peft_config(model: torch.nn.Module, config: Config):
    """The PEFT config of an adapter method."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    method = config.method
    if method in ("lora", "qlora"):
        settings = config.lora
        _check_targets(model, settings.target_modules, "lora")
        return LoraConfig(task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha,
                          lora_dropout=settings.dropout, target_modules=settings.target_modules,
                          use_rslora=settings.use_rslora, use_dora=settings.use_dora,
                          modules_to_save=settings.modules_to_save or None,
                          ensure_weight_tying=_saves_tied_embeddings(model, settings.modules_to_save))
    if method == "ia3":
        _check_targets(model, config.ia3.target_modules, "ia3")
        return IA3Config(task_type="CAUSAL_LM", target_modules=config.ia3.target_modules,
                         feedforward_modules=config.ia3.feedforward_modules)
    prompt = config.prompt_learning
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens,
                                  prefix_projection=prompt.prefix_projection,
                                  encoder_hidden_size=prompt.encoder_hidden_size)
    if method == "ptuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens,
                                   encoder_hidden_size=prompt.encoder_hidden_size)
    if method == "prompt":
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": prompt.init_text,
                "tokenizer_name_or_path": model.config._name_or_path} if prompt.init_text else {}
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens, **init)
    raise ConfigError(f"unknown method '{method}'")


def _saves_tied_embeddings(model: torch.nn.Module, modules_to_save: list[str]) -> bool:
    """Whether modules_to_save trains an embedding matrix that the output head shares (SmolLM2, Llama 3.2 1B...).
    PEFT then must keep the two trained copies one tensor (ensure_weight_tying), or they drift apart in training
    and the merged model no longer matches the adapter."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    names = {name for name, module in model.named_modules()
             if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    return any(name.rsplit(".", 1)[-1] in modules_to_save for name in names)


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


def fuse_lora_updates(model: torch.nn.Module, enabled: bool) -> int:
    """Add each plain LoRA layer's update to the base layer's output inside one matrix product,
    out.addmm_(A(x), B^T, alpha=scaling), where PEFT computes B(A(x)), scales it and adds it: that is three passes
    over the output-sized tensor forward and one backward which the product's epilogue makes unnecessary (eager 1B
    LoRA on an H200: 61.6k instead of 57.4k tokens/s, docs/performance.md). The parameters, their gradients and
    the saved adapter are PEFT's. Layers with DoRA, several active adapters, merged or disabled adapters, or
    per-call arguments keep PEFT's forward. enabled False puts PEFT's forward back. Returns how many layers were
    switched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if type(module) is not LoraLinear:  # quantized (bitsandbytes) and other LoRA layers keep their own forward
            continue
        installed = getattr(vars(module).get("forward"), "__func__", None) is _lora_forward_fused
        if enabled and "forward" not in vars(module):  # an instance forward is someone's hook: leave it
            module.forward = types.MethodType(_lora_forward_fused, module)
            switched += 1
        elif not enabled and installed:
            del module.forward
            switched += 1
    return switched


def _lora_forward_fused(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = self.base_layer(flat)
    low = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(flat, self.lora_A[name].weight.dtype)))
    # In place on the base product (whose backward does not need it); autocast leaves in-place ops alone, hence the
    # explicit casts (a rank-r matrix each).
    out.addmm_(low.to(out.dtype), self.lora_B[name].weight.t().to(out.dtype), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts packed 4-bit weights correctly
        return model.get_nb_trainable_parameters()
    # A model built partitioned by DeepSpeed ZeRO-3 holds empty local tensors; ds_numel is the full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
