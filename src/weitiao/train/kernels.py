"""Fused GPU kernels from maintained libraries (Liger): fused linear + cross-entropy, so the vocabulary-sized
logits are never materialised, plus fused RMSNorm, SwiGLU and RoPE. CUDA only; the CPU path is unchanged."""

from __future__ import annotations

import importlib.util

import torch

from weitiao.errors import ConfigError


def apply_liger(model: torch.nn.Module, wanted: bool | None, device: torch.device,
                fused_cross_entropy: bool = True) -> bool:
    """Patch `model` in place with Liger kernels; return whether it was patched.

    wanted None means: on a CUDA device when liger-kernel is installed and supports the architecture.
    fused_cross_entropy False keeps the model's own output layer and loss: the fused kernel reads the output weight
    outside that layer's forward, where DeepSpeed ZeRO-3 has not gathered it."""
    if wanted is False:
        return False
    available = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if not available:
        if wanted:
            raise ConfigError("train.liger needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)")
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if wanted:
            raise ConfigError(f"liger-kernel has no kernels for model type '{model_type}'; set train.liger: false")
        return False
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_cross_entropy)
    return True
