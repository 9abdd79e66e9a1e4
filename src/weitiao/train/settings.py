"""Every automatic choice of a training run, made once, up front, into one frozen record.

The config may leave a choice to weitiao (`packing: null`, `bf16: null`, `attn_implementation: null`, `liger:
null`, ...); what it resolves to depends on the machine. `resolve_settings` makes all of those choices from the
config, the machine and the model's config, before any weight is loaded. The training code reads only the record,
which is printed when the run starts and saved in the run folder as settings.json, so the folder says what ran.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from weitiao.config import Config
from weitiao.cpu import pick_cpu_threads
from weitiao.errors import ConfigError
from weitiao.train import kernels
from weitiao.train.attention import (FLASH_ATTN_4, PACKED_VARLEN, TORCH_FLASH, VARLEN, has_flash_attn_4,
                                     has_varlen_flash_attention, keeps_attention_output, packed_row_attention)
from weitiao.train.cuda_graphs import GRAPHED_MODEL_TYPES

# The attention that padded batches (evaluation, the returned model) get instead of the one for packed training rows.
# Inductor's flex kernels found no configuration for some padded shapes (8 rows of 96 tokens, 64-dimension heads,
# H200); PACKED_VARLEN has no mask for padding at all.
PADDED_BATCH_ATTENTION = {"flex_attention": "sdpa", PACKED_VARLEN: VARLEN}
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class Machine:
    """What this process runs on, as far as the choices depend on it (tests pass their own)."""
    cuda: bool
    device_name: str
    bf16: bool
    """A CUDA GPU with bfloat16 (Ampere and newer)."""
    varlen_flash: bool
    """PyTorch's variable-length FlashAttention runs here (torch >= 2.10, compute capability >= 8.0)."""
    liger_installed: bool
    processes: int
    """Processes of this run (torchrun / accelerate launch set WORLD_SIZE)."""
    cpu_threads: tuple[int, str] | None = None
    """On a CPU: the fastest torch thread count here and why (weitiao.cpu.pick_cpu_threads); None on a GPU."""
    triton_installed: bool = False
    """Triton importable (weitiao.train.master_adamw's kernel)."""
    flash_attn_4: bool = False
    """flash-attn-4 installed and its kernels run here (attention.has_flash_attn_4)."""
    varlen_backward_alone: bool = False
    """torch's FlashAttention varlen returns its log-sum-exp and runs its backward alone (torch >= 2.11,
    attention.keeps_attention_output)."""

    @classmethod
    def detect(cls, cpu_threads: int | None = None) -> Machine:
        """This machine; the CPU thread count is measured unless `cpu_threads` (train.cpu_threads) is given."""
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        threads = None if cuda else (cpu_threads, "train.cpu_threads") if cpu_threads else pick_cpu_threads(
            processes=processes)
        return cls(cuda=cuda, device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
                   bf16=cuda and torch.cuda.is_bf16_supported(), varlen_flash=has_varlen_flash_attention(device),
                   liger_installed=importlib.util.find_spec("liger_kernel") is not None, processes=processes,
                   cpu_threads=threads, triton_installed=importlib.util.find_spec("triton") is not None,
                   flash_attn_4=cuda and has_flash_attn_4(device),
                   varlen_backward_alone=cuda and keeps_attention_output())


@dataclass(frozen=True)
class Settings:
    """What a run does where its config says auto (None), and the facts those choices rest on."""
    device: str
    processes: int
    distributed: str
    """The engine that runs: the configured one, or ddp where a sharded engine cannot run (a CPU)."""
    precision: str
    """Mixed precision: bf16, fp16 or fp32 (none)."""
    weights_dtype: str
    """dtype the model is loaded in: bfloat16 with master_weights optimizer, float32 when the base trains with its
    master weights in the model, else model.dtype resolved."""
    master_weights: str | None
    """Where the fp32 weights of a method that trains base weights live under bf16: optimizer (fp32 copies beside
    bf16 model weights, weitiao.train.master_weights) or model; None for adapter methods and without bf16."""
    fused_master_step: bool
    """With master_weights optimizer and optim adamw_torch on a CUDA GPU with Triton: AdamW on the fp32 copies in one
    kernel that writes the bf16 weights too, reading the bf16 gradients with one backward pass per step
    (weitiao.train.master_adamw)."""
    packing: bool
    attention: str
    """Attention of the training forward (varlen_packed_rows: varlen on the collator's example boundaries)."""
    varlen_kernel: str | None
    """Kernels of varlen attention on packed rows on a GPU: torch or flash_attn_4; None without them."""
    eval_attention: str
    """Attention of padded batches: evaluation and the returned model."""
    liger: bool
    """Liger kernels patched into the model."""
    liger_layer_kernels: bool
    """Liger's RMSNorm, SwiGLU and RoPE too (off in compiled layers, which fuse those themselves)."""
    fused_cross_entropy: bool
    """Liger's fused linear + cross-entropy (the logits never materialised; off under ZeRO-3)."""
    logits_chunk_budget: int | None
    """train.logits_chunk_budget where the fused loss runs; None without it."""
    scored_positions: bool
    """train.scored_positions where it applies: packed SFT rows send only the positions whose next token has a label
    through the output layer and the fused loss (weitiao.train.kernels.SCORED_POSITIONS_MODEL_TYPES)."""
    fused_lora: bool
    """The LoRA update inside the base layer's product (weitiao.train.fused_lora)."""
    cuda_graphs: bool
    """Decoder layers replayed from CUDA graphs (weitiao.train.cuda_graphs)."""
    torch_compile: bool
    offload_checkpoints: bool
    """Checkpointed layer inputs kept in pinned CPU memory (weitiao.train.offload)."""
    checkpoint_keeps_attention: bool
    """Checkpointed layers on CUDA graphs with offloaded inputs keep attention's output and log-sum-exp beside their
    input, and their backward pass runs FlashAttention's backward from them without attention's forward again
    (torch's varlen kernels; weitiao.train.checkpoint_graphs): 1B LoRA at 8k on an H100 62.5k against 61.5k tokens/s
    at the same peak, with twice the pinned host memory and host-link traffic (docs/performance.md, run91)."""
    loader_workers: int
    tf32: bool
    row_length: int | None
    """Fixed length of every training row on a GPU (compiled kernels then see one shape); None: as long as the
    longest row of the batch."""
    pad_to_multiple_of: int | None
    cpu_threads: int | None = None
    """torch threads on a CPU (None on a GPU: PyTorch's default)."""
    cpu_threads_chosen_by: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line per setting, as printed when the run starts."""
        width = max(len(name) for name in self.to_dict())
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in self.to_dict().items())


def resolve_settings(config: Config, machine: Machine, model_config: Any) -> Settings:
    """The record of every automatic choice of this run; `model_config` is the model's transformers config."""
    args, method = config.train, config.method_spec
    _check_machine(config, machine)
    precision = _precision(config, machine)
    packing = config.data.packing if config.data.packing is not None else machine.cuda and method.packable
    _check_reply_scoring(config, model_config)
    row_holds = {"sft": 1, "dpo": 2}.get(config.stage)  # sequences of max_length in one example (a pair: two)
    if packing and row_holds and row_holds * config.data.max_length > config.data.packing_length:
        raise ConfigError(f"data.max_length ({config.data.max_length}) is longer than data.packing_length "
                          f"({config.data.packing_length})" + (" / 2" if row_holds == 2 else "") +
                          ": an example (a pair: both sequences) must fit in a packed row")
    attention = _attention(config, machine, model_config, packing, precision)
    distributed = args.distributed if machine.cuda else "ddp"  # accelerate shards on GPUs only
    # Preference and reward stages score replies their own way (weitiao.eval.pairs) and never call the model's loss.
    fused_cross_entropy = distributed not in ("zero3", "zero3_offload") and config.stage in ("sft", "pt")
    liger = (_liger(args.liger, machine, getattr(model_config, "model_type", None))
             and (fused_cross_entropy or not args.torch_compile))  # else nothing of Liger's would be used
    master_weights = _master_weights(config, machine, precision, distributed)
    # Eager layers only: inductor already fuses PEFT's scale and add into the neighbouring kernels (compiled 1B
    # LoRA: 75.8k tokens/s with PEFT's forward, 73.7k with this one); zero3 and fsdp gather B only in its own forward.
    fused_lora = (args.fused_lora and method.fused_lora and not config.lora.use_dora and not args.torch_compile
                  and distributed in ("ddp", "zero2"))
    weights = ("bfloat16" if master_weights == "optimizer"
               else "float32" if method.trains == "base" and config.model.dtype == "auto" else config.model.dtype)
    if weights == "auto":
        weights = "bfloat16" if machine.bf16 else "float32"
    cuda_graphs = _cuda_graphs(config, machine, model_config, attention, fused_lora, master_weights)
    varlen_kernel = _varlen_kernel(config, machine, attention)
    offload_checkpoints = (args.offload_checkpoints if args.offload_checkpoints is not None else
                           args.gradient_checkpointing and machine.cuda and machine.processes == 1
                           and not args.torch_compile)  # see the config's docs for the measurements
    return Settings(
        device=machine.device_name, processes=machine.processes, distributed=distributed, precision=precision,
        weights_dtype=weights, master_weights=master_weights,
        fused_master_step=(master_weights == "optimizer" and machine.cuda and machine.triton_installed
                           and args.optim == "adamw_torch"),
        packing=packing, attention=attention, varlen_kernel=varlen_kernel,
        eval_attention=PADDED_BATCH_ATTENTION.get(attention, attention),
        liger=liger, liger_layer_kernels=liger and not args.torch_compile,
        fused_cross_entropy=liger and fused_cross_entropy,
        logits_chunk_budget=(args.logits_chunk_budget or (8 if args.gradient_checkpointing else 32)
                             if liger and fused_cross_entropy else None),  # see the config's docs for why 8 and 32
        # Compiled layers only when asked: the scored labels, a tensor of varying length, reach the compiled layers
        # as an argument (Liger's forward passes its keyword arguments down), which would recompile them.
        scored_positions=((args.scored_positions if args.scored_positions is not None else not args.torch_compile)
                          and liger and fused_cross_entropy and packing
                          and config.stage == "sft"
                          and kernels.liger_scores_positions(getattr(model_config, "model_type", None))),
        fused_lora=fused_lora,
        cuda_graphs=cuda_graphs,
        torch_compile=args.torch_compile,
        offload_checkpoints=offload_checkpoints,
        # Offloaded only: kept on the GPU it would double the checkpoints' memory; on the host link it rides beside
        # the inputs' copies, which the step hides.
        checkpoint_keeps_attention=(cuda_graphs and args.gradient_checkpointing and offload_checkpoints
                                    and varlen_kernel == TORCH_FLASH and machine.varlen_backward_alone),
        loader_workers=(args.dataloader_num_workers if args.dataloader_num_workers is not None
                        else 2 if machine.cuda and not config.data.streaming else 0),  # see the config's docs
        tf32=args.tf32 and machine.cuda,
        row_length=(config.data.max_length if config.stage == "pt" else config.data.packing_length)
        if machine.cuda and packing else None,
        pad_to_multiple_of=8 if machine.cuda else None,
        cpu_threads=machine.cpu_threads[0] if machine.cpu_threads else None,
        cpu_threads_chosen_by=machine.cpu_threads[1] if machine.cpu_threads else "")


def _check_machine(config: Config, machine: Machine) -> None:
    """Reject, before any loading, what this machine cannot run, saying what to do instead."""
    needs_bnb = config.method_spec.quantized_base or config.train.optim in CUDA_ONLY_OPTIMIZERS
    what = f"method {config.method}" if config.method_spec.quantized_base else f"optim {config.train.optim}"
    if needs_bnb and not machine.cuda:
        raise ConfigError(f"{what} needs a CUDA GPU (bitsandbytes kernels) and this machine has none; on a CPU use "
                          "method: lora and optim: adamw_torch")
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install bitsandbytes")
    if config.train.offload_checkpoints and machine.processes > 1:
        # Its reentrant checkpointing is measured on one GPU only.
        raise ConfigError("train.offload_checkpoints runs on one GPU; set it to false (gradient_checkpointing alone "
                          "works on several)")


def _check_reply_scoring(config: Config, model_config: Any) -> None:
    """Preference stages score replies through the output head alone (weitiao.eval.pairs): a model that transforms
    its logits after the head (Gemma-2's soft-capping, Cohere's logit scale) would be scored wrongly."""
    if config.stage not in ("dpo", "kto"):
        return
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(model_config, name, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"stage {config.stage} cannot score replies of this model yet: its config applies "
                              f"{name}={value} to the logits after the output head, which weitiao's chunked reply "
                              "scoring leaves out; use a model without it, or stage sft / rm")


def _master_weights(config: Config, machine: Machine, precision: str, distributed: str) -> str | None:
    asked = config.train.master_weights
    if config.method_spec.trains != "base" or precision != "bf16":
        if asked == "optimizer":
            raise ConfigError(f"train.master_weights: optimizer is for bf16 mixed precision, and this run's "
                              f"precision is {precision}: set train.bf16: true (a GPU from Ampere on, or a CPU) or "
                              "master_weights: model")
        return None
    # Gradients go to the fp32 copies as the backward pass produces them: DDP would have nothing left to reduce, and
    # DeepSpeed and FSDP keep fp32 master weights their own way.
    fits = distributed == "ddp" and machine.processes == 1
    if asked == "optimizer" and not fits:
        raise ConfigError("train.master_weights: optimizer runs on one process without DeepSpeed or FSDP (those keep "
                          "their own fp32 master weights); set master_weights: model")
    if asked is not None:
        return asked
    return "optimizer" if fits and machine.cuda and config.model.dtype in ("auto", "bfloat16") else "model"


def _precision(config: Config, machine: Machine) -> str:
    args = config.train
    if args.fp16:
        if not machine.cuda:
            raise ConfigError("fp16 training needs a GPU; on the CPU use bf16 or neither")
        return "fp16"
    bf16 = args.bf16 if args.bf16 is not None else machine.bf16
    return "bf16" if bf16 else "fp32"


def _attention(config: Config, machine: Machine, model_config: Any, packing: bool, precision: str) -> str:
    """The configured attention; for packed rows on a GPU varlen FlashAttention, or flex attention where varlen
    cannot run (attention.packed_row_attention); otherwise sdpa, transformers' default."""
    attention = config.model.attn_implementation
    half = precision in ("bf16", "fp16")
    if attention == VARLEN and machine.cuda and not (machine.varlen_flash and half):
        raise ConfigError("model.attn_implementation: varlen (FlashAttention) needs torch >= 2.10, a GPU of compute "
                          "capability 8.0 or later and train.bf16 or train.fp16; use flex_attention otherwise")
    if attention is None:
        # Packed rows need attention confined to each example (sdpa would compute the whole row's mask).
        attention = (packed_row_attention(model_config, machine.varlen_flash and half, config.train.torch_compile)
                     if packing and machine.cuda else "sdpa")
    # The rows carry their example boundaries: no mask, no search for them (attention.py).
    return PACKED_VARLEN if packing and attention == VARLEN else attention


def _varlen_kernel(config: Config, machine: Machine, attention: str) -> str | None:
    """The kernels of varlen attention on packed rows (model.varlen_kernel): flash_attn_4 where it runs unless set to
    torch; asked for where it cannot run, an error."""
    wanted = config.model.varlen_kernel
    if wanted == FLASH_ATTN_4 and not machine.flash_attn_4:
        raise ConfigError("model.varlen_kernel: flash_attn_4 needs the flash-attn-4 package (pip install "
                          "'weitiao[flash]') and a GPU of compute capability 9.0 or later; set it to torch or leave it "
                          "unset")
    if attention != PACKED_VARLEN or not machine.cuda:
        return None
    return wanted or (FLASH_ATTN_4 if machine.flash_attn_4 else TORCH_FLASH)


def _cuda_graphs(config: Config, machine: Machine, model_config: Any, attention: str, fused_lora: bool,
                 master_weights: str | None) -> bool:
    """Layers replayed from CUDA graphs where they run (weitiao.train.cuda_graphs); asked for where they cannot, an
    error naming what is missing."""
    args = config.train
    if args.cuda_graphs is False:
        return False
    model_type = getattr(model_config, "model_type", None)
    # Base weights train on the graphs without checkpointing only: CheckpointGraphs sets each weight's .grad itself,
    # which would skip the hooks that send the gradients to their fp32 copies.
    trains_base = master_weights == "optimizer" and not args.gradient_checkpointing
    missing = [needed for needed, absent in (
        ("a CUDA GPU", not machine.cuda),
        ("one process", machine.processes > 1),
        ("packed rows on varlen attention", attention != PACKED_VARLEN),
        ("eager layers (no torch_compile)", args.torch_compile),
        ("fused LoRA layers (method lora with train.fused_lora, no DoRA), or base weights in bf16 with "
         "train.master_weights optimizer and no gradient_checkpointing (full, freeze)",
         not (fused_lora or trains_base)),
        ("lora.dropout 0 (a graph replays the same random draws)", fused_lora and config.lora.dropout > 0),
        ("no attention dropout", bool(getattr(model_config, "attention_dropout", 0.0))),
        ("stage sft or pt", config.stage not in ("sft", "pt")),
        (f"a {', '.join(GRAPHED_MODEL_TYPES)} model (this one is {model_type})",
         model_type not in GRAPHED_MODEL_TYPES),
    ) if absent]
    if missing and args.cuda_graphs:
        raise ConfigError("train.cuda_graphs needs " + "; ".join(missing) + ": set it to false, or leave it unset to "
                          "use graphs where they run")
    return not missing


def _liger(wanted: bool | None, machine: Machine, model_type: str | None) -> bool:
    """Liger kernels: as configured, or (None) on a CUDA GPU where liger-kernel is installed and knows the model."""
    if wanted is False:
        return False
    if not (machine.cuda and machine.liger_installed):
        if wanted:
            raise ConfigError("train.liger needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)")
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if wanted:
            raise ConfigError(f"liger-kernel has no kernels for model type '{model_type}'; set train.liger: false")
        return False
    return True
