"""Checkpointed layer inputs kept in CPU memory (train.offload_checkpoints), as unsloth's
`use_gradient_checkpointing="unsloth"` does.

With gradient checkpointing each decoder layer keeps only its input for the backward pass: 2 bytes x hidden size
per token per layer (16 layers x 8k tokens x 2048 = 512 MiB for a 1B model, 32 layers x 8k x 4096 = 2 GiB for 8B).
Here those inputs go to pinned CPU memory during the forward pass and come back for the layer's backward: each
checkpointed layer runs torch's reentrant checkpoint, which keeps its input as a saved tensor, inside saved-tensor
hooks that move it. Nothing else moves: the hooks are active only while a checkpointed layer is called, and that
layer's own computation runs without saving anything (it is recomputed in the backward pass).

The copies out run on a side stream, so the GPU does not wait for them; a copy back waits for its copy out and
runs on the compute stream, in order with the layer that needs it.

With compiled layers (train.torch_compile) each layer's own forward is compiled in place and the checkpoint call
around it stays eager: saved-tensor hooks do not run inside compiled code, and accelerate's regional compilation
compiles the layer's call together with its checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are


class OffloadedSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, every saved CUDA tensor of at least MIN_BYTES is copied to pinned CPU memory."""

    def __init__(self) -> None:
        self.copy_stream: torch.cuda.Stream | None = None  # made at the first CUDA tensor
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_BYTES:
            return tensor
        self.copy_stream = self.copy_stream or torch.cuda.Stream()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream())  # the tensor is written by now
        with torch.cuda.stream(self.copy_stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        tensor.record_stream(self.copy_stream)  # its memory is not reused before the copy has read it
        return tensor.device, host, copied

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream().wait_event(copied)
        return host.to(device, non_blocking=True)


def offload_checkpointed_layers(layers: Iterable[torch.nn.Module], compile_layers: bool = False
                                ) -> OffloadedSavedTensors:
    """Make each layer whose gradient checkpointing is on keep its input in CPU memory (transformers calls
    `layer._gradient_checkpointing_func(layer_call, *positional_inputs)`; the other arguments are bound in
    `layer_call`, so only the hidden states are saved); with `compile_layers`, compile every layer's forward (one
    compiled graph serves all layers of a model)."""
    hooks = OffloadedSavedTensors()

    def offloaded_checkpoint(function, *inputs):
        with hooks:
            return checkpoint(function, *inputs, use_reentrant=True)

    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = offloaded_checkpoint
        if compile_layers:
            layer.forward = torch.compile(layer.forward, backend="inductor")
    return hooks


def uncompile_layers(layers: Iterable[torch.nn.Module]) -> None:
    """Put back the forward of layers compiled by offload_checkpointed_layers (generation after training would
    compile a graph per shape)."""
    for layer in layers:
        vars(layer).pop("forward", None)
