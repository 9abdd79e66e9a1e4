"""The model side of continuous batching: a KV cache with one row per running sequence, a packed prefill of new
prompts, and one decode step for all running sequences, replayed from a CUDA graph on a GPU.

transformers' own models run the layers (any architecture whose attention goes through `Cache.update`: Llama,
Qwen, Mistral, Phi, Gemma...). What they lack for continuous batching is a cache where every row is at its own
position: `SlotCache` is that, written and read in place, and the causal masks are passed ready-made (4-D), which
transformers uses as given. Decode shapes are bucketed (batch rows, attended length) so each bucket is one CUDA
graph: one launch per step instead of hundreds of small kernels, which is what a decode step of a small model is
made of.
"""

from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_LENGTH_BUCKET = 256
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _Decode:
    rows: int
    length: int  # positions attended (a bucket >= every row's position + 1)
    positions: torch.Tensor  # (rows,) where each row's new token goes


@dataclass
class _Prefill:
    slots: torch.Tensor  # (tokens,) the row each packed prompt token belongs to
    positions: torch.Tensor  # (tokens,)


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except for one-token queries of grouped-query models: there each group of
    query heads that shares a key/value head is folded into that head's query positions, so the cached keys and
    values are read in place. transformers repeats them per query head when there is a mask (every decode step:
    for 8 rows of the default model at position 500 that is 550 MB of copies per step, 60% of the step's time on
    the CPU)."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads == kv_heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                              scale=scaling)
    return output.reshape(rows, 1, heads, dim), None  # (batch, query length, heads, dim), as sdpa returns


GROUPED_SDPA = "weitiao_grouped_sdpa"
AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)


def pack_linears_for_cpu(model: torch.nn.Module) -> int:
    """Give every float32 nn.Linear on the CPU a copy of its weight in oneDNN's blocked layout and compute with it
    (the weight itself stays, for adapters and for anything else that reads it). A decode step multiplies a few
    rows by every weight of the model: MKL's GEMM packs each weight again on every call (for 2-8 rows the linear
    layers of the default model took 72-101 ms a step, one row 51 ms), oneDNN reads the prepacked copy once
    (30-39 ms for 1-8 rows, measured on the 2-core CPU). Results equal F.linear's up to float32 rounding (the
    products are summed in another order). Returns how many layers were packed (0 without oneDNN)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return 0
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu":
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            module.forward = functools.partial(_blocked_linear, blocked, module.bias)
            packed += 1
    return packed


def _blocked_linear(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


class SlotCache:
    """Keys and values of `slots` sequences of up to `length` tokens, one row each, every layer in one tensor
    (so moving a sequence to another row is one copy)."""

    def __init__(self, config, slots: int, length: int, dtype: torch.dtype, device: torch.device):
        config = config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (config.num_hidden_layers, slots, kv_heads, length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.length = slots, length
        self._rows = torch.arange(slots, device=device)
        self.step: _Decode | _Prefill | None = None

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        config = config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    # What transformers' attention layers call: store the new keys and values, return what to attend to.
    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        step = self.step
        if isinstance(step, _Decode):  # keys: (rows, heads, 1, dim), each row at its own position
            rows = self._rows[:step.rows]
            self.keys[layer_idx, rows, :, step.positions] = keys[:, :, 0]
            self.values[layer_idx, rows, :, step.positions] = values[:, :, 0]
            return (self.keys[layer_idx, :step.rows, :, :step.length],
                    self.values[layer_idx, :step.rows, :, :step.length])
        # Packed fresh prompts (1, heads, tokens, dim): each attends to its own tokens only, so the new keys and
        # values are all it needs; they are stored for the decode steps to come.
        self.keys[layer_idx, step.slots, :, step.positions] = keys[0].transpose(0, 1)
        self.values[layer_idx, step.slots, :, step.positions] = values[0].transpose(0, 1)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the sequence in row `source` (its first `length` positions) to row `target`."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


class BatchModel:
    """A causal LM with a SlotCache: `prefill` new prompts into free rows, `decode` one token for rows 0..n-1.

    Both return next-token logits (float32); choosing the tokens is the caller's. Rows must stay packed at the
    front (the engine moves the last row into a finished one's place), so a decode step is rows 0..n-1."""

    def __init__(self, model: torch.nn.Module, slots: int, length: int, index: torch.Tensor | None = None,
                 cuda_graphs: bool | None = None):
        self.model = model
        parameter = next(model.parameters())
        self.device = parameter.device
        self.cache = SlotCache(model.config, slots, length, parameter.dtype, self.device)
        self.slots, self.length = slots, length
        self.index = index  # the adapter-per-token index of AdapterRows, when adapters are routed by row
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Decode inputs, in place for the graphs: next token, its position, the row's adapter.
        self._inputs = torch.zeros(3, slots, dtype=torch.long, device=self.device)
        self._host_inputs = torch.zeros(3, slots, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # what the graphs return, (slots, vocab) float32
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._batch_buckets = [b for b in BATCH_BUCKETS if b < slots] + [slots]
        self._length_buckets = []
        bucket = MIN_LENGTH_BUCKET
        while bucket < length:
            self._length_buckets.append(bucket)
            bucket *= 2
        self._length_buckets.append(length)

    @property
    def captured(self) -> int:
        """How many decode steps are captured as graphs (0: none yet, or the model changed since)."""
        return len(self._graphs)

    def reset_graphs(self) -> None:
        """Forget captured graphs (the model changed: an adapter was attached)."""
        self._graphs.clear()

    @torch.inference_mode()  # no autograd: the cache writes would chain every warm-up's activations to the cache
    def capture_graphs(self) -> float:
        """Capture the decode step of every bucket now, largest first (later ones reuse its memory), so no request
        waits for a capture (tens of milliseconds each). Safe while sequences run: the captured steps write only
        the cache's last position, which no running sequence feeds a token to. Returns the seconds it took."""
        self._graphs.clear()
        if not self.cuda_graphs:
            return 0.0
        started = time.perf_counter()
        # A fresh memory pool (the old graphs' went with them); one side stream serves every warm-up.
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = self._stream or torch.cuda.Stream(self.device)
        self._inputs.zero_()
        self._inputs[1] = self.length - 1
        for length in reversed(self._length_buckets):
            for rows in reversed(self._batch_buckets):
                self._capture(rows, length)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _forward(self, **inputs) -> torch.Tensor:
        config = self.model.config
        attention = config._attn_implementation
        # The decode steps attend with grouped_sdpa_attention (same numbers, no copies of the key/value heads).
        config._attn_implementation = GROUPED_SDPA if attention == "sdpa" else attention
        try:
            return self.model(**inputs, past_key_values=self.cache, use_cache=True).logits
        finally:
            config._attn_implementation = attention

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], adapters: list[int]) -> torch.Tensor:
        """Run fresh prompts packed into one sequence (block-diagonal causal mask), store their keys and values
        in rows `slots`; returns each prompt's next-token logits (prompts, vocab)."""
        lengths = [len(p) for p in prompts]
        device = self.device
        tokens = torch.tensor([t for p in prompts for t in p], device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        owner = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                        torch.tensor(lengths, device=device))
        mask = (owner[:, None] == owner[None, :]) & (positions[:, None] >= positions[None, :])
        if self.index is not None:
            self.index[:len(tokens)] = torch.tensor(adapters, device=device).repeat_interleave(
                torch.tensor(lengths, device=device))
        self.cache.step = _Prefill(torch.tensor(slots, device=device).repeat_interleave(
            torch.tensor(lengths, device=device)), positions)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        # Not cuDNN's attention: it builds a plan for every new prompt length, 0.7 s each on an H200 (the first
        # requests of each new batch shape waited that long for their first token).
        with sdpa_kernel(PREFILL_ATTENTION):
            logits = self._forward(input_ids=tokens[None], position_ids=positions[None],
                                   attention_mask=mask[None, None], logits_to_keep=last)
        return logits[0].float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], adapters: list[int]) -> torch.Tensor:
        """One step for rows 0..n-1: row i's `tokens[i]` goes at `positions[i]`; returns logits (n, vocab)."""
        n = len(tokens)
        host = self._host_inputs
        host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(positions)
        host[2, :n] = torch.tensor(adapters)
        longest = max(positions) + 1
        if not self.cuda_graphs:  # exact shapes: eager kernels do not care
            self._inputs[:, :n].copy_(host[:, :n])
            return self._decode_step(n, longest)
        rows = self._batch_buckets[bisect.bisect_left(self._batch_buckets, n)]
        length = self._length_buckets[bisect.bisect_left(self._length_buckets, longest)]
        host[:, n:rows] = 0  # padding rows: token 0 at position 0 of their free row, on the base model
        self._inputs[:, :rows].copy_(host[:, :rows], non_blocking=True)
        self._graphs[rows, length].replay()
        return self._logits[:n]

    def _decode_step(self, rows: int, length: int) -> torch.Tensor:
        tokens, positions, adapters = self._inputs[:, :rows]
        if self.index is not None:
            self.index[:rows].copy_(adapters)
        mask = torch.arange(length, device=self.device)[None, :] <= positions[:, None]
        self.cache.step = _Decode(rows, length, positions)
        logits = self._forward(input_ids=tokens[:, None], position_ids=positions[:, None],
                               attention_mask=mask[:, None, None, :], logits_to_keep=1)
        return logits[:, -1].float()

    def _capture(self, rows: int, length: int) -> None:
        # Warm up on a side stream (as torch.cuda.graphs asks), then capture. Every graph writes its logits into
        # one buffer, so what a graph allocates lives only while it runs and the graphs share that memory.
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            logits = self._decode_step(rows, length)
        torch.cuda.current_stream().wait_stream(self._stream)
        if self._logits is None:
            self._logits = torch.empty(self.slots, logits.shape[-1], dtype=logits.dtype, device=self.device)
        del logits
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[:rows].copy_(self._decode_step(rows, length))
        self._graphs[rows, length] = graph
