"""The LoRA update added inside the base layer's matrix products: one subclass of PEFT's LoRA `Linear`.

PEFT computes a LoRA layer as base(x) + B(A(x)) * scaling: forward, the update is written, scaled and added in three
passes over an output-sized tensor; backward, the input's gradient is written twice (through the base product and
through A) and autograd adds the two. `FusedLoraLinear` does each in the epilogue of the big product instead:
forward out = scaling (x A^T) B^T, then out.addmm_(x, W^T); backward dx = (dy B scaling) A, then
dx.addmm_(dy, W): the large product adds itself to the rank-r one's output in its epilogue (eager 1B LoRA on an
H200, forward fusion alone: 61.6k instead of 57.4k tokens/s; the large product last rather than first: 93.7 instead
of 97.5 ms of H100 kernels a step; docs/performance.md). It is PEFT's class with one method overridden, so
parameters, gradients, adapter switches and saved files are PEFT's, and whatever the fast path does not cover (DoRA
and other variants, several or disabled adapters, merged weights, a bias on B, a trainable or transposed base
weight, per-call arguments) runs PEFT's own forward. With LoRA dropout the update reads the dropped-out input,
whose gradient autograd adds as PEFT's does.

PEFT's `LoraVariant` hook (the one DoRA uses) was tried first: it receives the base output as a 3-D tensor after
PEFT's per-call bookkeeping; updating it in place cost 25% of eager 1B LoRA's speed (a copy of every output in the
backward pass), and out of place it ran 50.4k-73.7k tokens/s (median 57.6k) where this form ran 67.8k-69.7k and
the code before it 55.6k-78.3k (median 60.8k), on one sandboxed H200 (docs/performance.md, "The training core").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class _LoraProduct(torch.autograd.Function):
    """x W^T + bias + scaling (x' A^T) B^T, where x' is x itself (lora_input None) or its dropped-out copy; all
    operands already in the compute dtype, the base weight and bias frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, lora_input):
        source = x if lora_input is None else lora_input
        with torch.autocast(x.device.type, enabled=False):  # operands are cast by the caller
            low = F.linear(source, lora_a)
            # The rank-r product is written first and the base product adds itself to it in its epilogue
            # (beta=1), where the large product's arithmetic hides that read; adding the update afterwards took
            # another read and write of the whole output. beta=0 ignores the empty tensor's contents.
            if bias is None:
                out = low.new_empty(low.shape[0], lora_b.shape[0]).addmm_(low, lora_b.t(), beta=0, alpha=scaling)
            else:
                out = torch.addmm(bias, low, lora_b.t(), alpha=scaling)
            out.addmm_(x, weight.t())
        ctx.scaling, ctx.separate_input = scaling, lora_input is not None
        ctx.save_for_backward(source, weight, lora_a, lora_b, low)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        source, weight, lora_a, lora_b, low = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_low = torch.mm(grad_out, lora_b).mul_(ctx.scaling)
            grad_b = torch.mm(grad_out.t(), low).mul_(ctx.scaling)
            grad_a = torch.mm(grad_low.t(), source)
            grad_x = grad_input = None
            if ctx.needs_input_grad[0]:
                if ctx.separate_input:
                    grad_x = torch.mm(grad_out, weight)
                else:  # both paths' input gradient in one buffer, the large product last (as in the forward)
                    grad_x = torch.mm(grad_low, lora_a).addmm_(grad_out, weight)
            if ctx.separate_input and ctx.needs_input_grad[6]:
                grad_input = torch.mm(grad_low, lora_a)
        return grad_x, None, None, grad_a, grad_b, None, grad_input


class FusedLoraLinear(LoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        base = self.base_layer
        if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                or name in self.lora_variant or self.lora_B[name].bias is not None or self.fan_in_fan_out
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
            return super().forward(x, *args, **kwargs)
        # The compute dtype: autocast's where it is on (bf16 on a GPU), else the input's. A and B are rank-r and
        # cast per call as autocast would; the base weight is normally in that dtype already.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        dropout = self.lora_dropout[name]
        lora_input = None if isinstance(dropout, torch.nn.Identity) else dropout(flat)
        bias = None if base.bias is None else base.bias.to(dtype)
        out = _LoraProduct.apply(flat, base.weight.to(dtype), bias, self.lora_A[name].weight.to(dtype),
                                 self.lora_B[name].weight.to(dtype), self.scaling[name], lora_input)
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
