"""Fused GPU kernels from maintained libraries (Liger): fused linear + cross-entropy, so the vocabulary-sized
logits are never materialised, plus fused RMSNorm, SwiGLU and RoPE. CUDA only; the CPU path is unchanged."""

from __future__ import annotations

import sys
from typing import Any

import torch


# Liger's fused linear + cross-entropy computes the logits chunk by chunk of tokens, the chunk size following from
# a budget of transient logits of chunk_mem_const x tokens x hidden elements. Its default, 1, cuts an 8k-token row
# of a 128k-vocabulary model into 256-token chunks, and under full fine-tuning each chunk reads and writes the whole
# fp32 gradient of the output weight (2 GB for a 128k x 2k head). 32 means 4k-8k-token chunks, at most 32 times the
# memory of the hidden states (1 GB of bf16 logits for an 8k-token row of a 2k-hidden model). Measured on the 1B
# shape (H200): 32 vs 8, compiled LoRA 76.6k vs 73.7k tokens/s, eager full fine-tuning 56.1k vs 55.1k, +0.4-0.7 GiB.
LOGITS_CHUNK_BUDGET = 32

# Model types whose Liger forward (liger-kernel 0.8.5) takes `logits_to_keep` as positions and `shift_labels`: a
# packed row can then send only the positions whose next token has a label through the output layer and the loss
# (train.scored_positions), where TRL's completion-only loss computes their logits and discards them.
SCORED_POSITIONS_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "glm4",
                                "smollm3")
SCORED_POSITIONS_LIGER = (0, 8, 5)


def liger_scores_positions(model_type: str | None) -> bool:
    """Whether the installed Liger's fused loss for this model type takes scored positions (see above)."""
    from importlib.metadata import version

    installed = tuple(int(part) for part in version("liger-kernel").split(".")[:3] if part.isdigit())
    return model_type in SCORED_POSITIONS_MODEL_TYPES and installed >= SCORED_POSITIONS_LIGER

# Liger replaces functions and classes of transformers' modeling modules (RoPE, RMSNorm, the MLP) for the whole
# process, not only in the model it patches: what it replaced, per module, so that each run can start from
# transformers' own code (a compiled run after a Liger one must not trace Liger's Triton kernels).
_unpatched: dict[str, dict[str, Any]] = {}


def undo_liger_patches() -> None:
    """Put back what Liger replaced in transformers' modules; models built afterwards are transformers' own."""
    for module_name, namespace in _unpatched.items():
        module = sys.modules[module_name]
        for name, value in namespace.items():
            setattr(module, name, value)


def apply_liger(model: torch.nn.Module, fused_cross_entropy: bool, layer_kernels: bool) -> None:
    """Patch `model` in place with Liger kernels (weitiao.train.settings decides whether they run here).

    fused_cross_entropy False keeps the model's own output layer and loss: the fused kernel reads the output weight
    outside that layer's forward, where DeepSpeed ZeRO-3 has not gathered it. layer_kernels False leaves the
    decoder layers alone (RMSNorm, SwiGLU, RoPE) for torch.compile, which fuses those itself and which Liger's
    Triton kernels inside a compiled graph have crashed (illegal memory access)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    modeling = sys.modules[type(model).__module__]
    _unpatched.setdefault(modeling.__name__, {name: value for name, value in vars(modeling).items() if callable(value)})
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_cross_entropy,
                                    rms_norm=layer_kernels, swiglu=layer_kernels, rope=layer_kernels)
