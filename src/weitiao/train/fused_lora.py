"""The LoRA update added inside the base layer's matrix product: one subclass of PEFT's LoRA `Linear`.

PEFT computes a LoRA layer as base(x) + B(A(x)) * scaling: the update is written, scaled and added in three passes
over an output-sized tensor forward (and one more backward). `FusedLoraLinear` adds it in the epilogue of one
product on the base output, out.addmm_(A(x), B^T, alpha=scaling) (eager 1B LoRA on an H200: 61.6k instead of
57.4k tokens/s, docs/performance.md). It is PEFT's class with one method overridden, so parameters, gradients,
adapter switches and saved files are PEFT's, and whatever the fast path does not cover (DoRA and other variants,
several or disabled adapters, merged weights, a bias on B, per-call arguments) runs PEFT's own forward.

PEFT's `LoraVariant` hook (the one DoRA uses) was tried first: it receives the base output as a 3-D tensor after
PEFT's per-call bookkeeping; updating it in place cost 25% of eager 1B LoRA's speed (a copy of every output in the
backward pass), and out of place it ran 50.4k-73.7k tokens/s (median 57.6k) where this form ran 67.8k-69.7k and
the code before it 55.6k-78.3k (median 60.8k), on one sandboxed H200 (docs/performance.md, "The training core").
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                or name in self.lora_variant or self.lora_B[name].bias is not None):
            return super().forward(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        out = self.base_layer(flat)
        low = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(flat, self.lora_A[name].weight.dtype)))
        # In place on the base product (whose backward does not need it); autocast leaves in-place ops alone, hence
        # the explicit casts (a rank-r matrix each).
        out.addmm_(low.to(out.dtype), self.lora_B[name].weight.t().to(out.dtype), alpha=self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_updates(model: torch.nn.Module, enabled: bool) -> int:
    """Turn each plain LoRA `Linear` (quantized and other LoRA layers keep their own class) into a FusedLoraLinear
    (enabled), or back; returns how many layers changed."""
    source, target = (LoraLinear, FusedLoraLinear) if enabled else (FusedLoraLinear, LoraLinear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched
