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

Layers that their module calls on one input, one after another (q/k/v, gate/up: `SharedInput`), are computed
together on the first call: one rank-r product over the input for all of them, and the input's gradient written
once, where each layer's own gradient would be written and autograd would add them.

PEFT's `LoraVariant` hook (the one DoRA uses) was tried first: it receives the base output as a 3-D tensor after
PEFT's per-call bookkeeping; updating it in place cost 25% of eager 1B LoRA's speed (a copy of every output in the
backward pass), and out of place it ran 50.4k-73.7k tokens/s (median 57.6k) where this form ran 67.8k-69.7k and
the code before it 55.6k-78.3k (median 60.8k), on one sandboxed H200 (docs/performance.md, "The training core").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class _LoraProducts(torch.autograd.Function):
    """x W_i^T + bias_i + scaling_i (x' A_i^T) B_i^T for the LoRA layers i that read one input x, where x' is x
    itself (lora_input None) or, for a single layer, its dropped-out copy. The A_i and B_i arrive as parameters (their
    gradients are returned in the parameters' dtype) and are read from `copies` (AdapterCopies), in the compute
    dtype with the A_i stacked; x, the base weights and biases already in that dtype, the base frozen. With
    `output_unused` the outputs are left unwritten (see `outputs_unused`): the backward pass needs none of them."""

    @staticmethod
    def forward(ctx, x, lora_input, copies, scalings, weights, biases, output_unused, *lora_weights):
        source = x if lora_input is None else lora_input
        lora_a, lora_bs = copies.lora_a, copies.lora_bs
        with _autocast_off(x.device.type):  # operands are cast by the caller
            low = F.linear(source, lora_a)  # every layer's rank-r product in one pass over the input
            outs = []
            for low_i, lora_b, scaling, weight, bias in zip(_columns(low, copies.ranks), lora_bs, scalings,
                                                            weights, biases):
                if output_unused:
                    outs.append(low.new_empty(low.shape[0], lora_b.shape[0]))
                    continue
                # The rank-r product is written first and the base product adds itself to it in its epilogue
                # (beta=1), where the large product's arithmetic hides that read; adding the update afterwards
                # took another read and write of the whole output. beta=0 ignores the empty tensor's contents.
                if bias is None:
                    out = low.new_empty(low.shape[0], lora_b.shape[0]).addmm_(low_i, lora_b.t(), beta=0,
                                                                              alpha=scaling)
                else:
                    out = torch.addmm(bias, low_i, lora_b.t(), alpha=scaling)
                outs.append(out.addmm_(x, weight.t()))
        ctx.scalings, ctx.ranks, ctx.separate_input = scalings, copies.ranks, lora_input is not None
        ctx.weight_dtype = lora_weights[0].dtype
        ctx.save_for_backward(source, lora_a, low, *weights, *lora_bs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        source, lora_a, low, *rest = ctx.saved_tensors
        weights, lora_bs = rest[:len(grad_outs)], rest[len(grad_outs):]
        with _autocast_off(source.device.type):
            # Each layer's scaled gradient of its rank-r product written into its columns of one buffer, and the
            # gradients of B scaled in the product (alpha): no separate scaling or concatenation kernels.
            grad_low = low.new_empty(low.shape)
            grad_bs = []
            for grad_out, lora_b, low_i, grad_low_i, scaling in zip(
                    grad_outs, lora_bs, _columns(low, ctx.ranks), _columns(grad_low, ctx.ranks), ctx.scalings):
                grad_low_i.addmm_(grad_out, lora_b, beta=0, alpha=scaling)
                grad_bs.append(lora_b.new_empty(lora_b.shape).addmm_(grad_out.t(), low_i, beta=0, alpha=scaling)
                               .to(ctx.weight_dtype))
            grad_as = _rows(torch.mm(grad_low.t(), source).to(ctx.weight_dtype), ctx.ranks)  # one cast for all A
            grad_x = grad_input = None
            if ctx.needs_input_grad[0]:
                # Every path's input gradient in one buffer, the large products last (as in the forward): no
                # separate writes for autograd to add.
                for grad_out, weight in zip(grad_outs, weights):
                    if grad_x is None:
                        grad_x = (torch.mm(grad_out, weight) if ctx.separate_input
                                  else torch.mm(grad_low, lora_a).addmm_(grad_out, weight))
                    else:
                        grad_x.addmm_(grad_out, weight)
            if ctx.separate_input and ctx.needs_input_grad[1]:
                grad_input = torch.mm(grad_low, lora_a)
        return grad_x, grad_input, None, None, None, None, None, *grad_as, *grad_bs


# Host time matters here: these run for every LoRA layer, and on a host-bound machine the step waits for them.
_NO_CONTEXT = nullcontext()


def _autocast_off(device_type: str) -> AbstractContextManager:
    """Autocast switched off where it is on (entering and leaving a disabled autocast costs host time too)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT


def _columns(matrix: torch.Tensor, widths: list[int]) -> tuple[torch.Tensor, ...]:
    return (matrix,) if len(widths) == 1 else matrix.split_with_sizes(widths, dim=1)


def _rows(matrix: torch.Tensor, heights: list[int]) -> tuple[torch.Tensor, ...]:
    return (matrix,) if len(heights) == 1 else matrix.split_with_sizes(heights)


class _Copies:
    """One group's A weights stacked and its B weights, in the compute dtype, and the versions they were written at."""

    def __init__(self, lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], dtype: torch.dtype) -> None:
        self.weights = [*lora_as, *lora_bs]
        self.ranks = [a.shape[0] for a in lora_as]
        self.lora_a = lora_as[0].new_empty(sum(self.ranks), lora_as[0].shape[1], dtype=dtype)
        self.lora_bs = [b.new_empty(b.shape, dtype=dtype) for b in lora_bs]
        self.targets = [*self.lora_a.split(self.ranks), *self.lora_bs]
        self.written_at: list | None = None

    def versions(self) -> list:
        # The data pointer too: `param.data = ...` swaps the storage and keeps the counter.
        return [(weight._version, weight.data_ptr()) for weight in self.weights]


class AdapterCopies:
    """The fused layers' LoRA weights in the compute dtype (bf16 under autocast), kept between calls: A stacked for
    each group of layers that read one input, B per layer. A call that finds its copies out of date rewrites every
    out-of-date copy of the model in one multi-tensor copy, where a cast per weight per call took 13 kernel launches
    in each decoder layer's forward. Out of date: written before the last optimizer step (`watch`: some optimizers
    write weights without moving their version counters: bitsandbytes' and DeepSpeed's), or a weight's version counter
    has moved since (any other in-place write: a resumed run's loaded state)."""

    def __init__(self) -> None:
        self._groups: dict[tuple, _Copies] = {}

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: self.invalidate())

    def invalidate(self) -> None:
        for copies in self._groups.values():
            copies.written_at = None

    def current(self, owner: object, lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
                dtype: torch.dtype) -> _Copies:
        """The copies of `owner`'s (a layer's or a SharedInput's) weights, up to date."""
        copies = self._groups.get((owner, dtype))
        if copies is None or any(mine is not weight for mine, weight in zip(copies.weights, [*lora_as, *lora_bs])):
            copies = self._groups[owner, dtype] = _Copies(lora_as, lora_bs, dtype)  # new, or another adapter's
        if copies.written_at != copies.versions():
            self.refresh()
        return copies

    def refresh(self) -> None:
        """Rewrite every out-of-date copy. A layer replayed from a CUDA graph (weitiao.train.cuda_graphs) reads the
        copies its capture saw and never calls `current`: its caller refreshes them before each replay."""
        stale = [group for group in self._groups.values() if group.written_at != group.versions()]
        by_kind: dict[tuple, tuple[list, list]] = {}  # one multi-tensor copy per device and pair of dtypes
        for group in stale:
            for target, weight in zip(group.targets, group.weights):
                targets, weights = by_kind.setdefault((weight.device, weight.dtype, target.dtype), ([], []))
                targets.append(target)
                weights.append(weight)
        with torch.no_grad():  # not recorded, without a detached view per weight (host time, every step)
            for targets, weights in by_kind.values():
                torch._foreach_copy_(targets, weights)
        for group in stale:
            group.written_at = group.versions()


class SharedInput:
    """LoRA layers that their module calls one after another on the same input (q, k and v; gate and up): the
    first call computes them all in one _LoraProducts, reading the input once and writing its gradient once; the
    others take their outputs, while the input is the same tensor, unchanged. Any other call computes its own."""

    def __init__(self, layers: list[FusedLoraLinear]) -> None:
        self.layers = layers
        self._input: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[FusedLoraLinear, torch.Tensor] = {}

    def take(self, layer: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        if x is not self._input or x._version != self._version or layer not in self._pending:
            return None
        out = self._pending.pop(layer)
        if not self._pending:
            self._input = None
        return out

    def compute(self, layer: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output, the others' kept for their calls; None where one of them cannot be fused or uses
        dropout (each layer then computes its own)."""
        members = [member.fused_operands() for member in self.layers]
        if any(operands is None or operands.dropout is not None for operands in members):
            return None
        flat, dtype = _compute_input(x)
        lora_as = [operands.lora_a for operands in members]
        lora_bs = [operands.lora_b for operands in members]
        outs = _LoraProducts.apply(
            flat, None, layer.adapter_copies.current(self, lora_as, lora_bs, dtype),
            tuple(operands.scaling for operands in members), *_base_operands(members, dtype), False, *lora_as, *lora_bs)
        outs = {member: out.view(*x.shape[:-1], out.shape[-1]) for member, out in zip(self.layers, outs)}
        own = outs.pop(layer)
        self._input, self._version, self._pending = x, x._version, outs
        return own


def _compute_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """The input as a matrix in the compute dtype: autocast's where it is on (bf16 on a GPU), else the input's. A and
    B are read from copies in that dtype (AdapterCopies); the base weights are normally in that dtype already."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.reshape(-1, x.shape[-1]).to(dtype), dtype


def _base_operands(members: list[_Operands], dtype: torch.dtype) -> tuple[tuple, tuple]:
    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)

    return tuple(cast(operands.weight) for operands in members), tuple(cast(operands.bias) for operands in members)


class _Operands(NamedTuple):
    """What a layer's fused call reads: its adapter's A and B weights and scaling, the dropout on the update's input
    (None: none), the frozen base weight and bias."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout: torch.nn.Module | None
    weight: torch.Tensor
    bias: torch.Tensor | None


class FusedLoraLinear(LoraLinear):
    shared_input: SharedInput | None = None
    adapter_copies: AdapterCopies  # the model's, set by fuse_lora_updates
    output_unused = False
    """Calls leave the output unwritten (`outputs_unused`)."""

    def fused_operands(self) -> _Operands | None:
        """What this layer's call reads on the fused path, or None where the call must take PEFT's."""
        # Submodules and parameters are read from _modules and _parameters, and PEFT's state from the attributes
        # behind its properties: through nn.Module's __getattr__ this check, made on every call, took about a tenth
        # of the fused forward's host time (docs/performance.md).
        adapters = self._active_adapter
        name = adapters if isinstance(adapters, str) else adapters[0] if len(adapters) == 1 else None
        modules = self._modules
        lora_a = modules["lora_A"]._modules.get(name)
        if (lora_a is None or self._disable_adapters or self.merged_adapters or name in self.lora_variant
                or self.fan_in_fan_out):
            return None
        lora_b = modules["lora_B"]._modules[name]._parameters
        base = modules["base_layer"]._parameters
        weight, bias = base["weight"], base.get("bias")
        if lora_b.get("bias") is not None or weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        dropout = modules["lora_dropout"]._modules[name]
        return _Operands(lora_a._parameters["weight"], lora_b["weight"], self.scaling[name],
                         None if isinstance(dropout, torch.nn.Identity) else dropout, weight, bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # per-call arguments (PEFT's adapter_names, ...)
            return super().forward(x, *args, **kwargs)
        group = self.shared_input
        if group is not None:
            # Computed by the group's first call, which checked this layer; or computed now for the group.
            out = group.take(self, x)
            if out is None:
                out = group.compute(self, x)
            if out is not None:
                return out
        operands = self.fused_operands()
        if operands is None:
            return super().forward(x)
        flat, dtype = _compute_input(x)
        lora_input = None if operands.dropout is None else operands.dropout(flat)
        lora_a, lora_b = operands.lora_a, operands.lora_b
        out, = _LoraProducts.apply(flat, lora_input, self.adapter_copies.current(self, [lora_a], [lora_b], dtype),
                                   (operands.scaling,), *_base_operands([operands], dtype), self.output_unused,
                                   lora_a, lora_b)
        return out.view(*x.shape[:-1], out.shape[-1])


@contextmanager
def outputs_unused(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Calls of the fused `layers` (others are ignored) that leave their output unwritten: only the rank-r product
    is computed, and what their backward pass reads is saved. For a forward pass run again only for its backward
    (a checkpointed layer's recomputation), where nothing reads the layer's output: a decoder layer's last product
    (down_proj) feeds only the residual sum that is the layer's output, whose gradient comes from the layer above.
    A third of the MLP's products, a quarter of the layer's, are skipped."""
    fused = [layer for layer in layers if isinstance(layer, FusedLoraLinear) and layer.shared_input is None]
    for layer in fused:
        layer.output_unused = True
    try:
        yield
    finally:
        for layer in fused:
            layer.output_unused = False


LAST_PRODUCT_FEEDS_THE_OUTPUT = ("llama", "qwen2", "qwen3")
"""Models whose decoder layer ends in output = residual + mlp.down_proj(...): nothing but the layer's output reads
down_proj's (tests/train/test_fused_lora.py checks each)."""


class RecomputeWithoutLastProduct:
    """A checkpointed decoder layer's `_gradient_checkpointing_func` around its own (`checkpoint`): the layer's first
    call runs as it is; every later call is the backward pass's recomputation, whose output nobody reads (the
    output's gradient comes from the layer above), so it runs under outputs_unused for the layer's down_proj: a
    quarter of the recomputed products."""

    def __init__(self, checkpoint: Callable, layer: torch.nn.Module) -> None:
        self.checkpoint, self.layer = checkpoint, layer
        if hasattr(checkpoint, "hooks"):  # weitiao.train.offload's, which checkpoint_graphs looks up
            self.hooks = checkpoint.hooks

    def __call__(self, function: Callable, *inputs: Any) -> Any:
        calls = 0

        def run(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return function(*args)
            with outputs_unused([self.layer.mlp.down_proj]):  # read now: PEFT replaces it after the wrapping
                return function(*args)

        return self.checkpoint(run, *inputs)


def recompute_without_last_products(layers: Iterable[torch.nn.Module], model_type: str | None) -> None:
    """The checkpointed `layers` of a LAST_PRODUCT_FEEDS_THE_OUTPUT model recompute without down_proj's product
    (RecomputeWithoutLastProduct); fused LoRA layers skip it, other layers (full fine-tuning, QLoRA) compute it."""
    if model_type not in LAST_PRODUCT_FEEDS_THE_OUTPUT:
        return
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = RecomputeWithoutLastProduct(layer._gradient_checkpointing_func, layer)


# Layers that transformers' attention and MLP modules (Llama, Mistral, Qwen, Gemma, ...; Mixtral's experts) call on
# one input, one after another.
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fuse_lora_updates(model: torch.nn.Module, enabled: bool) -> int:
    """Turn each plain LoRA `Linear` (quantized and other LoRA layers keep their own class) into a FusedLoraLinear
    (enabled), grouping those that read one input (SHARED_INPUT_NAMES), or back; returns how many layers changed.
    A training loop hands its optimizer to `watch_optimizer`."""
    source, target = (LoraLinear, FusedLoraLinear) if enabled else (FusedLoraLinear, LoraLinear)
    copies = AdapterCopies()
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            module.__dict__.pop("shared_input", None)
            module.__dict__.pop("adapter_copies", None)
            if enabled:
                module.adapter_copies = copies
            switched += 1
    if enabled:
        for module in model.modules():
            for names in SHARED_INPUT_NAMES:
                layers = [getattr(module, name, None) for name in names]
                if all(type(layer) is FusedLoraLinear for layer in layers) and \
                        len({layer.in_features for layer in layers}) == 1:
                    group = SharedInput(layers)
                    for layer in layers:
                        layer.shared_input = group
    return switched


def watch_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Rewrite the fused layers' adapter copies after each step of `optimizer` (AdapterCopies)."""
    for module in model.modules():
        if isinstance(module, FusedLoraLinear):
            module.adapter_copies.watch(optimizer)
            return
