"""Checkpointed decoder layers replayed from CUDA graphs (`train.cuda_graphs` with `train.gradient_checkpointing`).

With gradient checkpointing each layer runs its forward twice, once keeping nothing and again in the backward pass,
just before its backward. Eager, the host launches every small kernel of a layer three times a step, and where it
launches slowly the GPU waits for it. Here each checkpointed layer's pieces replay from CUDA graphs: the two pieces
of weitiao.train.cuda_graphs, with attention eager between them.

Without checkpointing, every layer's graphs keep that layer's activations until its backward pass, each layer in
memory of its own. With checkpointing, a layer's recomputed forward is followed at once by its backward. So all
layers' graphs can share one layer's worth of memory:
- Each layer is captured as one unit, in one memory pool: forward before attention, forward after it, after it
  again for the backward pass, backward after it, backward before it. The backward pass's forward after attention
  skips the last product (down_proj), whose output only the layer's output reads, and the layer's output is not
  needed there (fused_lora.outputs_unused): a quarter of the recomputed products.
- After a unit's capture, all it keeps allocated is its weights' gradients. The next unit's capture reuses the rest.
- The tensors that pass between the pieces and attention are copied in and out of buffers that all layers share:
  the layer's input, query/key/value, attention's output, the layer's output, and the gradients coming back.
- Replays of different layers never overlap. The forward pass replays each layer's two forward pieces in turn (the
  activations they save go unused). The backward pass replays one layer's whole unit at a time.

The layer's input is the only thing kept for the backward pass, unless `keep_attention`: then attention's output and
log-sum-exp are kept too, and the backward pass runs FlashAttention's backward kernel from them instead of attention's
forward again (weitiao.train.attention.varlen_backward_from_kept). With train.offload_checkpoints what is kept is in
CPU memory, by the saved-tensor hooks of weitiao.train.offload. After each layer's backward replay its weights'
gradients are added to their .grad. Calls that cannot replay run the layer's own checkpoint function: evaluation,
another row shape, no example boundaries. So do all calls after a failed capture.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from weitiao.train.attention import varlen_backward_from_kept, varlen_forward_keeping
from weitiao.train.cuda_graphs import AfterAttention, BeforeAttention, LayerReplays, attend
from weitiao.train.fused_lora import outputs_unused

Replay = Callable[[], None]
LAYER_ARGUMENTS = ("attention_mask", "position_embeddings", "past_key_values", "use_cache")
"""The decoder layer's own keyword arguments; the others go to attention."""


class _Buffers:
    """The tensors that the pieces' graphs read and write, one set for all layers. A gradient is written over the
    tensor it belongs to once nothing reads that tensor any more (the memory of a row's activations counts here:
    32 MiB each for a 1B model at 8k tokens)."""

    def __init__(self, before: BeforeAttention, hidden_states: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():  # one eager call of the first piece: attention's input, in the layout it has
            query, key, value = before(hidden_states, *position_embeddings)
        self.input = torch.zeros_like(hidden_states).requires_grad_()
        self.cos, self.sin = (torch.zeros_like(tensor) for tensor in position_embeddings)
        self.query_key_value = tuple(torch.zeros_like(tensor) for tensor in (query, key, value))
        batch, heads, length, head_dim = query.shape
        self.attention_output = query.new_zeros(batch, length, heads * head_dim).requires_grad_()
        self.output = torch.zeros_like(hidden_states)
        self.grad_output = torch.zeros_like(hidden_states)
        # Written by the backward after attention, once it has read attention's output.
        self.grad_attention_output = self.attention_output
        # Written after attention's backward, which reads query, key and value.
        self.grad_query_key_value = self.query_key_value
        # The residual's gradient written after the backward after attention has read the output's gradient; the
        # backward before attention adds its own.
        self.grad_input = self.grad_output

    def load(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            self.input.copy_(hidden_states)
            self.cos.copy_(position_embeddings[0])
            self.sin.copy_(position_embeddings[1])


class _Unit:
    """One layer's pieces as replays: forward before and after attention; after attention again for the backward
    pass, without the last product's output (fused_lora.outputs_unused); backward after and before attention. And
    the weights' gradients that its backward replays write."""

    def __init__(self, before: BeforeAttention, after: AfterAttention, buffers: _Buffers,
                 record: Callable[[Callable[[], None]], Replay]) -> None:
        self.trained_before = [p for p in before.parameters() if p.requires_grad]
        self.trained_after = [p for p in after.parameters() if p.requires_grad]
        self.gradients: dict[str, tuple[torch.Tensor | None, ...]] = {}
        carried: dict[str, Any] = {}  # a piece's outputs, with their autograd graph, until its backward
        b = buffers

        def forward_before() -> None:
            with torch.enable_grad():
                carried["query_key_value"] = before(b.input, b.cos, b.sin)
            with torch.no_grad():
                for buffer, tensor in zip(b.query_key_value, carried["query_key_value"]):
                    buffer.copy_(tensor)

        def forward_after() -> None:
            with torch.enable_grad():
                carried["output"] = after(b.attention_output, b.input)  # the input is the residual too
            with torch.no_grad():
                b.output.copy_(carried["output"])

        def recompute_after() -> None:  # for the backward pass only: the output's value is not read
            carried.pop("output", None)  # the forward pass's, freed first: this capture reuses its memory
            with torch.enable_grad(), outputs_unused([after.mlp.down_proj]):
                carried["output"] = after(b.attention_output, b.input)

        def backward_after() -> None:
            grads = torch.autograd.grad(carried.pop("output"), (b.attention_output, b.input, *self.trained_after),
                                        b.grad_output, allow_unused=True)
            with torch.no_grad():
                b.grad_attention_output.copy_(grads[0])
                b.grad_input.copy_(grads[1])
            self.gradients["after"] = grads[2:]

        def backward_before() -> None:
            grads = torch.autograd.grad(carried.pop("query_key_value"), (b.input, *self.trained_before),
                                        b.grad_query_key_value, allow_unused=True)
            with torch.no_grad():
                b.grad_input.add_(grads[0])
            self.gradients["before"] = grads[1:]

        # In the order they replay: what a piece keeps for a later one stays allocated until that one's capture.
        self.forward_before, self.forward_after, self.recompute_after, self.backward_after, self.backward_before = (
            record(piece) for piece in (forward_before, forward_after, recompute_after, backward_after,
                                        backward_before))

    def add_gradients(self) -> None:
        """The weights' gradients from the last backward replays, added to their .grad."""
        pairs = [(parameter, gradient) for parameter, gradient in zip(
            (*self.trained_before, *self.trained_after), (*self.gradients["before"], *self.gradients["after"]))
                 if gradient is not None]
        existing = [(parameter.grad, gradient) for parameter, gradient in pairs if parameter.grad is not None]
        if existing:
            torch._foreach_add_([grad for grad, _ in existing], [gradient for _, gradient in existing])
        for parameter, gradient in pairs:
            if parameter.grad is None:  # a copy: the replays rewrite their buffers
                parameter.grad = gradient.clone()


class _CheckpointedLayer(torch.autograd.Function):
    """A checkpointed layer on the graphs: its input saved (and attention's output, where kept), its forward
    replayed again in the backward pass."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, graphs: CheckpointGraphs, index: int, call: dict[str, Any]
                ) -> torch.Tensor:
        ctx.graphs, ctx.index, ctx.call = graphs, index, call
        output, kept_attention = graphs.forward_layer(index, hidden_states, call)
        ctx.save_for_backward(hidden_states, *kept_attention)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        hidden_states, *kept_attention = ctx.saved_tensors
        return (ctx.graphs.backward_layer(ctx.index, hidden_states, kept_attention, ctx.call, grad_output),
                None, None, None)


class CheckpointGraphs(LayerReplays):
    """The model's checkpointed decoder layers replayed from CUDA graphs while they train on rows of the captured
    shape (see the module's docstring); every other call runs the layer's own checkpoint function. `remove` gives
    the layers back their own. `keep_attention`: the layers attend with torch's FlashAttention varlen (packed rows),
    and attention's output and log-sum-exp are kept for the backward pass (Settings.checkpoint_keeps_attention)."""

    what = "the checkpointed layers"

    def __init__(self, layers: torch.nn.ModuleList, keep_attention: bool = False) -> None:
        super().__init__([layer for layer in layers if getattr(layer, "gradient_checkpointing", False)])
        self.keep_attention = keep_attention
        self.checkpoint_functions = [layer._gradient_checkpointing_func for layer in self.layers]
        # The offloaded checkpoint's hooks (weitiao.train.offload) keep the saved inputs in CPU memory here too.
        self.saved_tensor_hooks = next((function.hooks for function in self.checkpoint_functions
                                        if hasattr(function, "hooks")), None) or nullcontext()
        self.buffers: _Buffers | None = None
        self.units: list[_Unit] | None = None
        for index, layer in enumerate(self.layers):
            layer._gradient_checkpointing_func = partial(self._checkpoint, index)

    def remove(self) -> None:
        """The layers' own checkpoint function back, and the graphs and their memory freed."""
        for layer, function in zip(self.layers, self.checkpoint_functions):
            layer._gradient_checkpointing_func = function
        self.units = self.buffers = None
        self.pieces = []

    def _checkpoint(self, index: int, function: partial, *args: Any) -> torch.Tensor:
        """A checkpointed layer's call: `function` is the layer's call with its keyword arguments bound
        (transformers' GradientCheckpointingLayer), `args` its hidden states."""
        if index == 0:
            self.replaying = self._replays(args, function.keywords)
        if not self.replaying:
            return self.checkpoint_functions[index](function, *args)
        with self.saved_tensor_hooks:
            return _CheckpointedLayer.apply(args[0], self, index, function.keywords)

    def forward_layer(self, index: int, hidden_states: torch.Tensor, call: dict[str, Any]
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The layer's output, and what its backward keeps of attention: its output and log-sum-exp with
        keep_attention, else nothing."""
        buffers, unit = self.buffers, self.units[index]
        buffers.load(hidden_states, call["position_embeddings"])
        unit.forward_before()
        with torch.no_grad():
            if self.keep_attention:
                kept = varlen_forward_keeping(*buffers.query_key_value, self._scaling(index),
                                              **self._attention_arguments(call))
                attention_output = kept[0]
            else:
                kept, attention_output = (), self._attend(index, *buffers.query_key_value, call)
            buffers.attention_output.copy_(attention_output.view_as(buffers.attention_output))
        unit.forward_after()
        return buffers.output.clone(), kept  # the buffer is the next layer's to write

    def backward_layer(self, index: int, hidden_states: torch.Tensor, kept_attention: list[torch.Tensor],
                       call: dict[str, Any], grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of the layer's input; its weights' gradients added to their .grad."""
        buffers, unit = self.buffers, self.units[index]
        buffers.load(hidden_states, call["position_embeddings"])
        unit.forward_before()
        if kept_attention:
            attention_output = kept_attention[0]
        else:
            query_key_value = tuple(tensor.detach().requires_grad_() for tensor in buffers.query_key_value)
            with torch.enable_grad():
                attention_output = self._attend(index, *query_key_value, call)
        with torch.no_grad():
            buffers.attention_output.copy_(attention_output.view_as(buffers.attention_output))
            buffers.grad_output.copy_(grad_output)
        unit.recompute_after()
        unit.backward_after()
        if kept_attention:
            grads = varlen_backward_from_kept(buffers.grad_attention_output, *buffers.query_key_value, *kept_attention,
                                              self._scaling(index), **self._attention_arguments(call))
        else:
            grads = torch.autograd.grad(attention_output, query_key_value, buffers.grad_attention_output)
        with torch.no_grad():
            for buffer, grad in zip(buffers.grad_query_key_value, grads):
                buffer.copy_(grad)
        unit.backward_before()
        unit.add_gradients()
        return buffers.grad_input.clone()  # the buffer is the layer before's to write

    def _attend(self, index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                call: dict[str, Any]) -> torch.Tensor:
        return attend(self.layers[index].self_attn, query, key, value, call.get("attention_mask"),
                      **self._attention_arguments(call))

    def _scaling(self, index: int) -> float:
        return self.layers[index].self_attn.scaling

    @staticmethod
    def _attention_arguments(call: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in call.items() if name not in LAYER_ARGUMENTS}

    def _replays(self, args: tuple, call: dict[str, Any]) -> bool:
        hidden_states = args[0] if len(args) == 1 else None
        return self._decide(hidden_states is not None and hidden_states.is_cuda and hidden_states.requires_grad
                            and torch.is_grad_enabled() and call.get("past_key_values") is None
                            and call.get("position_embeddings") is not None
                            and "cu_seq_lens_q" in call,  # packed rows with their example boundaries
                            hidden_states, call.get("position_embeddings"))

    def _capture(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        device = hidden_states.device
        try:
            # Autocast as the run has it, without its weight cache: a cast cached by one capture would be read by
            # the next one from memory that the first one's replays rewrite.
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
                self.buffers = _Buffers(self.pieces[0][0], hidden_states, position_embeddings)
                # Warm-up on a side stream, as make_graphed_callables does: the fused layers' adapter copies, the
                # kernels' compilation and autotuning, before anything is captured.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._units(record=_run_once)
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                pool = torch.cuda.graph_pool_handle()
                self.units = self._units(record=partial(_captured, pool))
        except BaseException:
            self.units = self.buffers = None  # their memory back before the run goes on eagerly
            raise

    def _units(self, record: Callable[[Callable[[], None]], Replay]) -> list[_Unit]:
        """Every layer's unit, recorded one after the other: each one's capture reuses the memory the one before
        it freed."""
        return [_Unit(before, after, self.buffers, record) for before, after in self.pieces]


def _run_once(piece: Callable[[], None]) -> Replay:
    piece()
    return piece


def _captured(pool: Any, piece: Callable[[], None]) -> Replay:
    graph = torch.cuda.CUDAGraph()
    # thread_local: a CUDA call of another thread (the data loader's pin-memory thread) does not break the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        piece()
    return graph.replay

