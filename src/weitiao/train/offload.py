"""Checkpointed layer inputs kept in CPU memory (train.offload_checkpoints), as unsloth's
`use_gradient_checkpointing="unsloth"` does.

With gradient checkpointing each decoder layer keeps only its input for the backward pass: 2 bytes x hidden size
per token per layer (16 layers x 8k tokens x 2048 = 512 MiB for a 1B model, 32 layers x 8k x 4096 = 2 GiB for 8B).
Here those inputs go to pinned CPU memory during the forward pass and come back for the layer's backward: each
checkpointed layer runs torch's reentrant checkpoint, which keeps its input as a saved tensor, inside saved-tensor
hooks that move it. Nothing else moves: the hooks are active only while a checkpointed layer is called, and that
layer's own computation runs without saving anything (it is recomputed in the backward pass).

The copies out run on a side stream, so the GPU does not wait for them. The copies back run on that stream too, one
layer ahead: taking back a layer's input starts copying back what the layer before it saved (its input, and with
weitiao.train.checkpoint_graphs' kept attention its attention output), which the backward pass needs next, so the
copy overlaps a layer's recomputation and backward (copied back on the compute stream when the layer needed it, each
input, 32 MiB at 8k tokens of a 1B model, held the GPU until it had arrived).

With compiled layers (train.torch_compile) each layer's own forward is compiled in place and the checkpoint call
around it stays eager: saved-tensor hooks do not run inside compiled code, and accelerate's regional compilation
compiles the layer's call together with its checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import weakref
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are


class HostCopy:
    """A saved tensor's copy in pinned CPU memory, the number of the hooks' entry that saved it (one entry per
    checkpointed layer's call), and a link to the one saved before it (backward needs those of the entry before
    next)."""

    def __init__(self, tensor: torch.Tensor, copy_stream: torch.cuda.Stream,
                 saved_before: weakref.ref[HostCopy] | None, entry: int) -> None:
        self.entry = entry
        self.device = tensor.device
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        copy_stream.wait_stream(torch.cuda.current_stream())  # the tensor is written by now
        with torch.cuda.stream(copy_stream):
            self.host.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(copy_stream)
        tensor.record_stream(copy_stream)  # its memory is not reused before the copy has read it
        # Weak links: the autograd graph owns the copies, and one that is gone (its backward pass done) has nothing
        # to fetch.
        self.saved_before = saved_before
        self.fetched: tuple[torch.Tensor, torch.cuda.Event] | None = None  # copied back ahead of its use

    def fetch_ahead(self, copy_stream: torch.cuda.Stream) -> None:
        """Start the copy back on the side stream, while the GPU computes the layer after this one."""
        if self.fetched is not None or self.host is None:
            return
        copy_stream.wait_event(self.copied)
        with torch.cuda.stream(copy_stream):
            tensor = self.host.to(self.device, non_blocking=True)
            fetched = torch.cuda.Event()
            fetched.record(copy_stream)
        self.fetched = tensor, fetched

    def take(self) -> torch.Tensor:
        """The tensor on its device, for the compute stream."""
        stream = torch.cuda.current_stream()
        if self.fetched is None:  # not fetched ahead (the last layer's input): copy it back now, in order
            stream.wait_event(self.copied)
            tensor = self.host.to(self.device, non_blocking=True)
        else:
            tensor, fetched = self.fetched
            stream.wait_event(fetched)
            tensor.record_stream(stream)  # made on the side stream, used on this one
        self.host = self.fetched = None
        return tensor


class OffloadedSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, every saved CUDA tensor of at least MIN_BYTES is copied to pinned CPU memory on a side
    stream. The backward pass needs them in the reverse order of the entries into the context (one per checkpointed
    layer): taking one back starts copying back all that the entry before saved, so that copy overlaps the layer's
    recomputation and backward instead of stalling the GPU."""

    def __init__(self) -> None:
        self.copy_stream: torch.cuda.Stream | None = None  # made at the first CUDA tensor
        self.last_saved: weakref.ref[HostCopy] | None = None
        self.entries = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> None:
        self.entries += 1
        super().__enter__()

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_BYTES:
            return tensor
        self.copy_stream = self.copy_stream or torch.cuda.Stream()
        saved = HostCopy(tensor, self.copy_stream, self.last_saved, self.entries)
        self.last_saved = weakref.ref(saved)
        return saved

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = packed.take()
        for saved_before in _saved_before(packed):  # the same entry's (taken or taken next), then the entry before's
            if saved_before.entry < packed.entry - 1:
                break
            if saved_before.entry == packed.entry - 1:
                saved_before.fetch_ahead(self.copy_stream)
        return tensor


def _saved_before(saved: HostCopy) -> Iterator[HostCopy]:
    """The copies saved before `saved` that still exist, latest first."""
    link = saved.saved_before
    while link is not None and (before := link()) is not None:
        yield before
        link = before.saved_before


class OffloadedCheckpoint:
    """A checkpointed layer's `_gradient_checkpointing_func`: torch's reentrant checkpoint inside the hooks (shared
    by all layers, and by weitiao.train.checkpoint_graphs, whose layers save their input the same way)."""

    def __init__(self) -> None:
        self.hooks = OffloadedSavedTensors()

    def __call__(self, function: Any, *inputs: Any) -> Any:
        with self.hooks:
            return checkpoint(function, *inputs, use_reentrant=True)


def offload_checkpointed_layers(layers: Iterable[torch.nn.Module], compile_layers: bool = False
                                ) -> OffloadedSavedTensors:
    """Make each layer whose gradient checkpointing is on keep its input in CPU memory (transformers calls
    `layer._gradient_checkpointing_func(layer_call, *positional_inputs)`; the other arguments are bound in
    `layer_call`, so only the hidden states are saved); with `compile_layers`, compile every layer's forward (one
    compiled graph serves all layers of a model)."""
    offloaded_checkpoint = OffloadedCheckpoint()
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = offloaded_checkpoint
        if compile_layers:
            layer.forward = torch.compile(layer.forward, backend="inductor")
    return offloaded_checkpoint.hooks


def uncompile_layers(layers: Iterable[torch.nn.Module]) -> None:
    """Put back the forward of layers compiled by offload_checkpointed_layers (generation after training would
    compile a graph per shape)."""
    for layer in layers:
        vars(layer).pop("forward", None)
