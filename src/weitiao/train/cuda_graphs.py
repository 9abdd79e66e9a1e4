"""Decoder layers replayed from CUDA graphs (`train.cuda_graphs`): each layer's kernels launched by two graph
replays instead of one Python call per kernel.

An eager LoRA step launches thousands of small kernels (norms, RoPE, the rank-r products, their casts). Where the
host launches slowly, the GPU waits for it: on one H200 the eager 1B LoRA step ran 66.4k and 87.3k tokens/s in two
processes of one call, and 90.1k / 90.7k with its layers replayed from graphs (docs/performance.md, run76).

Each layer runs in two pieces, captured once by torch's `make_graphed_callables` (a forward and a backward graph
each, all in one memory pool): before attention (input norm, q/k/v with their LoRA updates, Qwen3's q/k norms, RoPE)
and after it (o, residual, norm, MLP, residual). Attention runs eagerly between them: varlen FlashAttention's example
boundaries and longest example change from row to row, which a graph would freeze.

A graph replays its capture's kernels on its capture's tensors. So it needs rows of one shape (a GPU run's packed
rows all have one length), no random draws (no dropout), weights that stay where they are (optimizers step them in
place), and the fused LoRA layers' bf16 adapter copies, which the captured kernels read, rewritten before each
replay (AdapterCopies.refresh). Anything else (evaluation, another shape, no gradients) runs the layer's own forward.
The capture happens at the first training forward; where it fails the run goes on with eager layers and says why.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from weitiao.train.fused_lora import AdapterCopies, FusedLoraLinear

ACCUMULATOR_STREAM_WARNING = "The AccumulateGrad node's stream does not match"
GRAPHED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
"""Models whose decoder layer the two pieces below reproduce (tests/train/test_cuda_graphs.py checks each)."""


class BeforeAttention(torch.nn.Module):
    """A decoder layer up to attention: (hidden states, cos, sin) -> query, key and value, each (batch, heads,
    length, head dim), as transformers' attention computes them."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        attention = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.q_norm = getattr(attention, "q_norm", None)  # Qwen3 normalises each head's query and key
        self.k_norm = getattr(attention, "k_norm", None)
        self.head_dim = attention.head_dim
        # Read from the model's module now, after Liger has put its RoPE kernel there.
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = self.input_layernorm(hidden_states)
        shape = (*normed.shape[:-1], -1, self.head_dim)
        # q first: fused LoRA computes q, k and v together at q's call (fused_lora.SharedInput).
        query = self.q_proj(normed).view(shape)
        key = self.k_proj(normed).view(shape)
        value = self.v_proj(normed).view(shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query, key, value.transpose(1, 2)


class AfterAttention(torch.nn.Module):
    """A decoder layer from attention's output (batch, length, heads x head dim) and the layer's input on."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.o_proj = layer.self_attn.o_proj
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp

    def forward(self, attention_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = residual + self.o_proj(attention_output)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def attend(attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: Any, **kwargs) -> torch.Tensor:
    """The model's attention function (its configured implementation) on the pieces' query, key and value; returns
    (batch, length, heads x head dim) for AfterAttention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attention).__module__].eager_attention_forward
    function = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    output, _ = function(attention, query, key, value, attention_mask,
                         dropout=attention.attention_dropout if attention.training else 0.0,
                         scaling=attention.scaling, **kwargs)
    return output.reshape(*query.shape[:1], query.shape[2], -1).contiguous()


class LayerReplays:
    """What both kinds of replayed layers share (LayerGraphs here, CheckpointGraphs in
    weitiao.train.checkpoint_graphs): each layer's two pieces, the adapter copies their graphs read, and the decision,
    once per forward, whether it replays, capturing at the first forward that can."""

    what = "the layers"
    """Named where a capture fails."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.pieces = [(BeforeAttention(layer), AfterAttention(layer)) for layer in self.layers]
        self.captured_input: tuple | None = None
        """(shape, dtype, requires_grad) of the first layer's input at the capture."""
        self.failed = False
        self.replaying = False
        """Whether the model's current forward replays: decided at its first layer, for all of them."""
        self.copies: AdapterCopies | None = next((module.adapter_copies for layer in self.layers
                                                  for module in layer.modules() if isinstance(module, FusedLoraLinear)),
                                                 None)

    def _capture(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        raise NotImplementedError

    def _decide(self, can_replay: bool, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """Whether a forward that `can_replay` (a training forward on packed rows) replays: captured at the first
        one, then for inputs of the captured shape; rewrites the adapter copies the graphs read. A failed capture
        leaves eager layers for the rest of the run, and says why."""
        if self.failed or not can_replay:
            return False
        shape = (hidden_states.shape, hidden_states.dtype, hidden_states.requires_grad)
        if self.captured_input is None:
            device = hidden_states.device
            rng_state = torch.cuda.get_rng_state(device)
            try:
                self._capture(hidden_states, position_embeddings)
            except (RuntimeError, AssertionError) as error:
                self.failed = True
                _restore_generator(device, rng_state)
                first = _first_error(error)
                print(f"train.cuda_graphs: capturing {self.what} failed ({type(first).__name__}: "
                      f"{str(first).strip().splitlines()[0] if str(first).strip() else ''}); "
                      "training goes on with eager layers", flush=True)
                return False
            self.captured_input = shape
        elif shape != self.captured_input:
            return False
        if self.copies is not None:
            self.copies.refresh()
        return True


class LayerGraphs(LayerReplays):
    """The model's decoder layers, replayed from CUDA graphs while they train on rows of the captured shape (see the
    module's docstring); every other call runs the layer's own forward. `remove` gives the layers back their own."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        super().__init__(list(layers))
        self.graphed: list[tuple[Any, Any]] | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = partial(self._forward, index)  # an instance attribute: nn.Module.__call__ finds it

    def remove(self) -> None:
        """The layers' own forward back, and the graphs and their memory freed."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.graphed = None
        self.pieces = []

    def _forward(self, index: int, hidden_states: torch.Tensor, attention_mask: Any = None,
                 position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        layer = self.layers[index]
        if index == 0:
            self.replaying = self._replays(layer, hidden_states, position_embeddings, past_key_values, kwargs)
        if not self.replaying:
            return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
        before, after = self.graphed[index]
        query, key, value = before(hidden_states, *position_embeddings)
        output = attend(layer.self_attn, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
        return after(output, hidden_states)

    def _replays(self, layer: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: Any,
                 past_key_values: Any, kwargs: dict[str, Any]) -> bool:
        return self._decide(layer.training and torch.is_grad_enabled() and hidden_states.is_cuda
                            and past_key_values is None and position_embeddings is not None
                            and "cu_seq_lens_q" in kwargs,  # packed rows with their example boundaries
                            hidden_states, position_embeddings)

    def _capture(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        samples = self._sample_arguments(hidden_states, position_embeddings)
        # The capture makes the trained weights' gradient accumulators on its own stream, and autograd warns, once a
        # process, that they differ from the default stream's (a wait between the streams, in the speeds measured):
        # during the capture's own backward passes or at the first training one (run84, H100). torch's switch for
        # it (set_warn_on_accumulate_grad_stream_mismatch) left it printed on an H100 (run81); the Python warning
        # it becomes is filtered by its message instead, before the capture.
        warnings.filterwarnings("ignore", message=ACCUMULATOR_STREAM_WARNING)
        # make_graphed_callables refuses autocast's weight cache; the capture keeps the run's autocast otherwise.
        with _thread_local_capture(), torch.autocast(
                "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(tuple(piece for pair in self.pieces for piece in pair), samples)
        self.graphed = list(zip(graphed[0::2], graphed[1::2]))

    def _sample_arguments(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                          ) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Each piece's capture arguments: of this forward's shapes and dtypes, requiring gradients where the real
        ones will (make_graphed_callables captures a gradient for exactly those). A piece's arguments become the
        graph's input buffers, which each replay copies its inputs into."""
        # One eager call of the first piece: the shapes and dtype of attention's input. (The fused layers make their
        # adapter copies in make_graphed_callables' warm-up calls, before its capture.)
        with torch.no_grad():
            query, _, value = self.pieces[0][0](hidden_states, *position_embeddings)
        batch, heads, length, head_dim = query.shape
        cos, sin = position_embeddings
        needs_gradient = hidden_states.requires_grad
        samples: list[tuple[torch.Tensor, ...]] = []
        for before, after in self.pieces:
            layer_input = torch.randn_like(hidden_states).requires_grad_(needs_gradient)
            samples.append((layer_input, cos, sin))
            needs_gradient = needs_gradient or _trains(before)
            attention_output = torch.randn(batch, length, heads * head_dim, dtype=value.dtype,
                                           device=value.device, requires_grad=needs_gradient)
            samples.append((attention_output, layer_input))  # the residual is the layer's input, one buffer for both
            needs_gradient = needs_gradient or _trains(after)
        return tuple(samples)


def _trains(piece: torch.nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in piece.parameters())


@contextmanager
def _thread_local_capture() -> Iterator[None]:
    """make_graphed_callables captures in CUDA's global mode, where a CUDA call of any other thread (the data
    loader's pin-memory thread allocating pinned memory) breaks the capture; thread_local refuses only this thread's
    unsafe calls. It calls torch.cuda.graph, replaced for the capture's duration."""
    original = torch.cuda.graph

    class ThreadLocalGraph(original):  # type: ignore[valid-type, misc]
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("capture_error_mode", "thread_local")
            super().__init__(*args, **kwargs)

    torch.cuda.graph = ThreadLocalGraph
    try:
        yield
    finally:
        torch.cuda.graph = original


def _restore_generator(device: torch.device, state: torch.Tensor) -> None:
    """A capture that fails before its end leaves the device's default generator in capture mode, and every later
    random draw of the process raises ("Offset increment outside graph capture"): it gets a new state, at the seed
    and offset it had."""
    fresh = torch.Generator(device=device)
    fresh.set_state(state)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.default_generators[index].graphsafe_set_state(fresh)


def _first_error(error: BaseException) -> BaseException:
    """The error that started a chain: a capture whose body raised then fails to end, and the `with` statement
    raises that second error, with the first as its context."""
    while error.__context__ is not None:
        error = error.__context__
    return error
