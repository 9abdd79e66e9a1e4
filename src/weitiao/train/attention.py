"""Attention for packed rows on PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen`).

A packed row holds several examples; each must attend only to itself. Flex attention does that with a block mask
and compiles its kernels on first use (about 50 s on an H200). Variable-length FlashAttention gets the example
boundaries (`cu_seq_lens_q`, made by `PackedCollator`, or found from position ids that restart at 0) and computes
each example's causal triangle with no mask to build and nothing to compile; once running, the two measured level
(docs/performance.md). Packed training rows may run on FlashAttention 4's varlen kernels instead (package
flash-attn-4, Hopper and Blackwell; `model.varlen_kernel`): +4.1% tokens/s for 1B LoRA on an H100 (run82).

Registered with transformers as `model.attn_implementation: varlen`. A padded batch (an attention mask: evaluation,
generation with a cache) runs on sdpa with transformers' own mask. On a CPU each example runs through sdpa in
turn: the same result, for tests and CPU users.

The training loop runs packed rows under a second name, `PACKED_VARLEN`, with no mask function: transformers then
builds no mask and does not search the position ids for example boundaries, which costs a host-GPU sync per forward
(the rows carry their boundaries). For flex attention the loop builds the rows' block mask itself, for the same
reason (`packed_rows_block_mask`)."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "varlen"
PACKED_VARLEN = "varlen_packed_rows"  # packed training rows only: never a padded batch (see the module docstring)
# Kernels of varlen attention on a GPU: PyTorch's FlashAttention 2, or FlashAttention 4's CuTe kernels (package
# flash-attn-4; their backward runs on Hopper and Blackwell).
TORCH_FLASH, FLASH_ATTN_4 = "torch", "flash_attn_4"
# Keyword arguments that make torch's varlen_attn causal and grouped-query, found once: torch 2.10 took
# is_causal=True, later versions take window_size=(-1, 0) and need enable_gqa=True for fewer key/value heads.
_flash_options: dict[str, Any] = {}


def has_varlen_flash_attention(device: torch.device | None = None) -> bool:
    """Whether this torch has variable-length FlashAttention (torch >= 2.10) and, given a device, whether it runs
    there (FlashAttention 2 needs a CUDA GPU of compute capability 8.0 or later: A100, H100, RTX 30xx and newer)."""
    import importlib.util

    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    return device is None or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8)


def has_flash_attn_4(device: torch.device | None = None) -> bool:
    """Whether flash-attn-4 is installed and, given a device, whether its forward and backward run there (compute
    capability 9.0 or later: H100, H200, B200)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn package, or FlashAttention 2's that does not load here
        found = False
    return found and (device is None or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9))


def packed_row_attention(config: Any, varlen_runs: bool, compiled: bool) -> str:
    """The attention for packed training rows when the config names none: varlen where it runs (`varlen_runs`: a
    recent GPU, bf16/fp16) and the model uses plain causal attention; flex attention in compiled layers, whose code
    would specialise on varlen's longest-example integer, and for sliding windows or logit soft-capping (Mistral,
    Gemma), which transformers implements for flex."""
    plain_causal = not (getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None))
    if plain_causal and varlen_runs and not compiled:
        register_varlen_attention()
        return VARLEN
    return "flex_attention"


def register_varlen_attention(packed_row_kernel: str = TORCH_FLASH) -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent); packed training rows
    (`PACKED_VARLEN`) run on `packed_row_kernel` (TORCH_FLASH or FLASH_ATTN_4)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not _flash_options and has_varlen_flash_attention():
        from torch.nn.attention.varlen import varlen_attn

        parameters = inspect.signature(varlen_attn).parameters
        _flash_options.update({"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True})
        if "enable_gqa" in parameters:
            _flash_options["enable_gqa"] = True
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(PACKED_VARLEN, partial(varlen_attention_forward, kernel=packed_row_kernel))
    AttentionMaskInterface.register(VARLEN, _padding_mask_only)


def packed_rows_block_mask(position_ids: torch.Tensor) -> Any:
    """Flex attention's block mask for packed rows: causal within each example, an example being a run of
    consecutive position ids (transformers' rule), built without the host-GPU sync of transformers' own search."""
    from transformers.masking_utils import (and_masks, causal_mask_function, flex_attention_mask,
                                            packed_sequence_mask_function)

    restarts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    batch, length = position_ids.shape
    examples = and_masks(causal_mask_function, packed_sequence_mask_function(restarts.cumsum(-1)))
    return flex_attention_mask(batch, length, length, mask_function=examples, device=position_ids.device)


def _padding_mask_only(**kwargs) -> torch.Tensor | None:
    """transformers' sdpa mask where there is padding; none for packed or unpadded rows (boundaries serve them)."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, kernel: str = TORCH_FLASH,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, T, D), key/value (B, Hkv, T, D); returns the
    output as (B, T, Hq, D). `cu_seq_lens_q` holds the example boundaries over the B*T tokens of the batch; on a GPU
    `kernel` computes it (TORCH_FLASH or FLASH_ATTN_4)."""
    batch, heads, length, dim = query.shape
    boundaries = kwargs.get("cu_seq_lens_q")
    positions = kwargs.get("position_ids")
    if boundaries is None and getattr(getattr(module, "config", None), "_attn_implementation", None) == PACKED_VARLEN:
        raise ValueError(f"{PACKED_VARLEN} attention serves packed rows with example boundaries (cu_seq_lens_q), "
                         "not padded batches; use varlen or sdpa for those")
    if boundaries is None and attention_mask is None and positions is not None and key.shape[2] == length:
        # An example starts where its positions restart at 0, and every row starts one: an unpadded batch (rows cut
        # at max_length) comes with no mask and one row of position ids for all rows.
        restarts = positions.expand(batch, length) == 0
        restarts[:, 0] = True
        starts = restarts.reshape(-1).nonzero().flatten()
        boundaries = torch.cat([starts, starts.new_tensor([batch * length])]).to(torch.int32)
    if boundaries is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _plain_causal_only(dropout, kwargs)
    flat = _flat(query, key, value)
    if query.is_cuda:
        q, k, v = flat
        longest = _longest(boundaries, kwargs)
        if kernel == FLASH_ATTN_4:
            from flash_attn.cute import flash_attn_varlen_func

            output = flash_attn_varlen_func(q, k, v, cu_seqlens_q=boundaries, cu_seqlens_k=boundaries,
                                            max_seqlen_q=longest, max_seqlen_k=longest, softmax_scale=scaling,
                                            causal=True)[0]
        else:
            from torch.nn.attention.varlen import varlen_attn

            output = varlen_attn(q, k, v, boundaries, boundaries, longest, longest, scale=scaling, **_flash_options)
    else:
        output = _per_example_sdpa(*flat, boundaries.tolist(), scaling)
    return output.view(batch, length, heads, dim), None


def keeps_attention_output() -> bool:
    """Whether this torch's FlashAttention varlen can return its log-sum-exp and run its backward pass alone, from a
    kept output (varlen_forward_keeping, varlen_backward_from_kept): torch 2.11 and later."""
    if not has_varlen_flash_attention():
        return False
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    return ("return_aux" in parameters and "window_size" in parameters
            and hasattr(torch.ops.torch_attn, "_varlen_attn_backward"))


def varlen_forward_keeping(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows' causal attention on torch's FlashAttention varlen, without autograd: query (B, Hq, T, D), key and
    value (B, Hkv, T, D), `kwargs` the call's (cu_seq_lens_q, max_length_q). Returns the output (B*T, Hq, D) and the
    log-sum-exp, which varlen_backward_from_kept takes in place of a second forward pass."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    _plain_causal_only(0.0, kwargs)
    boundaries = kwargs["cu_seq_lens_q"]
    longest = _longest(boundaries, kwargs)
    return varlen_attn(*_flat(query, key, value), boundaries, boundaries, longest, longest, scale=scaling,
                       return_aux=AuxRequest(lse=True), **_flash_options)


def varlen_backward_from_kept(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              output: torch.Tensor, lse: torch.Tensor, scaling: float | None, **kwargs
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of query, key and value (their (B, H, T, D) layout) from varlen_forward_keeping's output and
    log-sum-exp: the kernel autograd would run, without the forward pass it would need first. `grad_output` has
    the output's elements."""
    boundaries = kwargs["cu_seq_lens_q"]
    longest = _longest(boundaries, kwargs)
    batch, _, length, _ = query.shape
    no_dropout_rng = torch.zeros(2, dtype=torch.uint64, device=query.device)  # what the forward op returns
    grads = torch.ops.torch_attn._varlen_attn_backward(
        grad_output.view_as(output), *_flat(query, key, value), output, lse, boundaries, boundaries, longest, longest,
        True, no_dropout_rng, scaling, [-1, 0])  # causal: the window register_varlen_attention gives the forward
    return tuple(grad.view(batch, length, *grad.shape[1:]).transpose(1, 2) for grad in grads)


def _plain_causal_only(dropout: float, kwargs: dict[str, Any]) -> None:
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError("varlen attention implements plain causal attention: no attention dropout, sliding window "
                         "or logit soft-capping; set model.attn_implementation: flex_attention for this model")


def _flat(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, T, D) to varlen's (B*T, H, D); on a GPU in value's dtype: under autocast with fp32 weights (full
    fine-tuning), RoPE leaves q and k in fp32 while v comes out of a bf16 matmul, and FlashAttention takes one 16-bit
    dtype."""
    batch, _, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    return [t.to(value.dtype) for t in flat] if query.is_cuda else flat


def _longest(boundaries: torch.Tensor, kwargs: dict[str, Any]) -> int:
    return kwargs.get("max_length_q") or int(boundaries.diff().max())


def _per_example_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, boundaries: list[int],
                      scaling: float | None) -> torch.Tensor:
    pieces = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        if end > start:
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                         enable_gqa=True).transpose(0, 1))
    return torch.cat(pieces)
