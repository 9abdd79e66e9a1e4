"""The fine-tuning methods, one entry each: what a method trains, what it needs, what its result can do, and how it
is applied. Config validation (`weitiao.config`) and training (`weitiao.train.methods`) both ask this table, so a
new method (VeRA, PiSSA as a LoRA initialisation...) is one entry here, plus a config section if it has settings
of its own.

Adapters come from PEFT and quantization from bitsandbytes, never home-made layers. This module imports neither
(they load when a method is applied), nor any part of weitiao but its errors, so the config can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from weitiao.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from weitiao.config import Config


@dataclass(frozen=True)
class Method:
    name: str
    trains: Literal["base", "adapter", "virtual_tokens"]
    """What the optimizer updates: weights of the base model, adapter weights beside a frozen base, or learned
    virtual tokens (which every sequence gets in front, so a packed row of several examples cannot share them)."""
    summary: str
    """One line for the docs and `--help`."""
    section: str | None = None
    """The config section holding its settings (lora, freeze, prompt_learning, ia3)."""
    peft_config: Callable[[torch.nn.Module, Config], Any] | None = None
    """The PEFT config that applies an adapter method (None: the base model trains, see train.methods)."""
    quantized_base: bool = False
    """Trains next to a 4-/8-bit base through bitsandbytes (a CUDA GPU): the base cannot be sharded by zero3/fsdp."""
    mergeable: bool = False
    """Its adapter folds into the base weights (`weitiao merge`)."""
    continues_adapter: bool = False
    """model.adapter: it can continue training an existing adapter of its kind (LoRA)."""
    fused_lora: bool = False
    """Its layers can take weitiao's fused LoRA update (train.fused_lora)."""

    @property
    def saves_adapter(self) -> bool:
        return self.trains != "base"

    @property
    def packable(self) -> bool:
        return self.trains != "virtual_tokens"


# ---------------------------------------------------------------------------------------------
# PEFT configs of the adapter methods.


def _lora(model: torch.nn.Module, config: Config):
    from peft import LoraConfig

    settings = config.lora
    check_targets(model, settings.target_modules, "lora")
    return LoraConfig(task_type=_task_type(config), r=settings.r, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=settings.target_modules,
                      use_rslora=settings.use_rslora, use_dora=settings.use_dora,
                      modules_to_save=settings.modules_to_save or None,
                      ensure_weight_tying=_saves_tied_embeddings(model, settings.modules_to_save))


def _task_type(config: Config) -> str:
    """A reward model's adapter trains its new score head too (PEFT keeps it in modules_to_save)."""
    return "SEQ_CLS" if config.stage == "rm" else "CAUSAL_LM"


def _ia3(model: torch.nn.Module, config: Config):
    from peft import IA3Config

    check_targets(model, config.ia3.target_modules, "ia3")
    return IA3Config(task_type=_task_type(config), target_modules=config.ia3.target_modules,
                     feedforward_modules=config.ia3.feedforward_modules)


def _prefix(model: torch.nn.Module, config: Config):
    from peft import PrefixTuningConfig

    prompt = config.prompt_learning
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens,
                              prefix_projection=prompt.prefix_projection,
                              encoder_hidden_size=prompt.encoder_hidden_size)


def _ptuning(model: torch.nn.Module, config: Config):
    from peft import PromptEncoderConfig

    prompt = config.prompt_learning
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens,
                               encoder_hidden_size=prompt.encoder_hidden_size)


def _prompt(model: torch.nn.Module, config: Config):
    from peft import PromptTuningConfig

    prompt = config.prompt_learning
    init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": prompt.init_text,
            "tokenizer_name_or_path": model.config._name_or_path} if prompt.init_text else {}
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens, **init)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("full", "base", "every weight"),
    Method("freeze", "base", "the last N decoder layers (+ extra modules)", section="freeze"),
    Method("lora", "adapter", "low-rank updates (rsLoRA, DoRA switches)", section="lora", peft_config=_lora,
           mergeable=True, continues_adapter=True, fused_lora=True),
    Method("qlora", "adapter", "LoRA on a 4-/8-bit quantized base (bitsandbytes, CUDA)", section="lora",
           peft_config=_lora, quantized_base=True, mergeable=True, continues_adapter=True),
    Method("ia3", "adapter", "learned per-channel activation scales", section="ia3", peft_config=_ia3,
           mergeable=True),
    Method("prefix", "virtual_tokens", "per-layer key/value prefixes (P-Tuning v2)", section="prompt_learning",
           peft_config=_prefix),
    Method("ptuning", "virtual_tokens", "virtual tokens from a prompt encoder", section="prompt_learning",
           peft_config=_ptuning),
    Method("prompt", "virtual_tokens", "virtual token embeddings (prompt tuning)", section="prompt_learning",
           peft_config=_prompt),
)}


def method_table() -> str:
    """The registry as a markdown table (docs and the config's docstring of `method`)."""
    rows = ["| method | trains | settings | mergeable |", "|---|---|---|---|"]
    for method in METHODS.values():
        rows.append(f"| {method.name} | {method.summary} | {method.section or '-'} | "
                    f"{'yes' if method.mergeable else '-'} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Helpers of the PEFT configs.


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers adapters can target (what 'all-linear' chooses from)."""
    import importlib.util

    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, linear_types)})


def check_targets(model: torch.nn.Module, targets: list[str] | str | None, section: str) -> None:
    if not isinstance(targets, list):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        raise ConfigError(f"{section}.target_modules {missing} match no module of this model; its linear layers "
                          f"are: {', '.join(linear_module_names(model))} (or use 'all-linear')")


def _saves_tied_embeddings(model: torch.nn.Module, modules_to_save: list[str]) -> bool:
    """Whether modules_to_save trains an embedding matrix that the output head shares (SmolLM2, Llama 3.2 1B...).
    PEFT then must keep the two trained copies one tensor (ensure_weight_tying), or they drift apart in training
    and the merged model no longer matches the adapter."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    names = {name for name, module in model.named_modules()
             if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    return any(name.rsplit(".", 1)[-1] in modules_to_save for name in names)
