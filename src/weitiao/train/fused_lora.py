"""The LoRA update added inside one matrix product, as a PEFT LoRA variant.

PEFT computes a LoRA layer as base(x) + B(A(x)) * scaling: the update is written, scaled and added in three passes
over an output-sized tensor forward (and one more backward). `FusedLoraUpdate` computes it as one product whose
epilogue adds the base output, addmm(base, A(x), B^T, alpha=scaling) (eager 1B LoRA on an H200: 61.6k instead of
57.4k tokens/s for the in-place form of the same product, docs/performance.md). It plugs into PEFT's own
`LoraVariant` hook (the one DoRA uses), so PEFT's forward, its adapter switches, parameters, gradients and saved
files are unchanged; only plain LoRA layers (no DoRA or other variant, no bias on B, an unquantized base) take it,
and `fuse_lora_updates(model, False)` takes it out again.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant


class FusedLoraUpdate(LoraVariant):
    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs) -> None:
        """Nothing to create: the variant uses the layer's own lora_A and lora_B."""

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        low = lora_a(module.lora_dropout[active_adapter](x.reshape(-1, x.shape[-1])))
        flat = result.view(-1, result.shape[-1])
        # One product whose epilogue adds the base output. Not in place: PEFT hands the base output over as a 3-D
        # tensor, and an in-place update of its 2-D view costs a copy of the whole output in the backward pass.
        # The casts (a rank-r matrix each) are explicit because addmm takes one dtype.
        return torch.addmm(flat, low.to(flat.dtype), lora_b.weight.t().to(flat.dtype),
                           alpha=module.scaling[active_adapter]).view_as(result)

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def fuse_lora_updates(model: torch.nn.Module, enabled: bool) -> int:
    """Give each plain LoRA layer's adapters the fused update (enabled) or PEFT's own again; returns how many
    (layer, adapter) pairs were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is not LoraLinear:  # quantized (bitsandbytes) and other LoRA layers keep their own code
            continue
        for name in module.lora_A:
            current = module.lora_variant.get(name)
            if enabled and current is None and module.lora_B[name].bias is None:
                module.lora_variant[name] = FusedLoraUpdate()
                switched += 1
            elif not enabled and isinstance(current, FusedLoraUpdate):
                del module.lora_variant[name]
                switched += 1
    return switched
