"""Kernel-level probes on one GPU, for choices inside the 1B LoRA step (docs/performance.md, run53):

- attention: FlashAttention 2 varlen (what training uses by default) against FlashAttention 4's varlen kernels
  (package flash-attn-4) where installed, forward and forward+backward time and the largest difference;
- wide: the gate/up (or q/k/v) LoRA layers of one input as the fused path computes them (the rank-r product written
  first, the base product adding itself in its epilogue) against one product per output over [x | x A^T] and
  [W | scaling B] (branch wide-gate-up);
- addnorm: residual add then Liger's RMSNorm against Liger's fused add + RMSNorm, forward + backward.

  python bench/kernel_probes.py --probes attention wide addnorm

Each timing is CUDA events around 30 calls after 5 warm-up calls, in milliseconds per call."""

from __future__ import annotations

import argparse
import inspect
import math

import torch
from common import timed

TOKENS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, RANK = 8192, 2048, 8192, 32, 8, 64, 16


def example_boundaries(lengths_from: str) -> tuple[torch.Tensor, int]:
    """Boundaries of examples filling one row of TOKENS: `uniform-N` draws lengths uniformly from 64..N, `data`
    as bench/common.py's synthetic SFT data (lognormal, median 300, sigma 0.8, clipped to 32..2048)."""
    generator = torch.Generator().manual_seed(1)
    lengths: list[int] = []
    while sum(lengths) < TOKENS:
        if lengths_from == "data":
            draw = float(torch.randn((1,), generator=generator)) * 0.8 + math.log(300)
            lengths.append(int(min(2048, max(32, math.exp(draw)))))
        else:
            lengths.append(int(torch.randint(64, int(lengths_from.split("-")[1]), (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - TOKENS
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32), max(lengths)


def probe_attention() -> None:
    """FlashAttention 2 varlen (torch's, what training uses by default) against FlashAttention 4's varlen kernels
    (`flash_attn.cute`, package flash-attn-4, Hopper and Blackwell) where it is installed. run53 measured cuDNN's
    ragged attention here: unusable in torch 2.11 (docs/performance.md)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True
    try:
        from flash_attn.cute import flash_attn_varlen_func
        from importlib.metadata import version
        fa4 = f"flash-attn-4 {version('flash-attn-4')}"
    except ImportError as error:
        flash_attn_varlen_func, fa4 = None, f"flash-attn-4 not importable ({error})"
    print(f"attention ({TOKENS} tokens, {HEADS} q / {KV_HEADS} kv heads of {HEAD_DIM}; {fa4})")
    print(f"{'examples':28s} {'kernel':14s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}  largest difference (out, dq, dk, dv)")
    for lengths_from in ("data", "uniform-1500", "uniform-4096"):
        _attention_case(varlen_attn, options, flash_attn_varlen_func, *example_boundaries(lengths_from))


def _attention_case(varlen_attn, options: dict, fa4_varlen, boundaries: torch.Tensor, longest_example: int) -> None:
    q = torch.randn(TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(TOKENS, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn_like(q)

    def gradients(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    def flash2(backward: bool = True):
        out = varlen_attn(q, k, v, boundaries, boundaries, longest_example, longest_example, **options)
        return gradients(out) if backward else out

    def flash4(backward: bool = True):
        out = fa4_varlen(q, k, v, cu_seqlens_q=boundaries, cu_seqlens_k=boundaries, max_seqlen_q=longest_example,
                         max_seqlen_k=longest_example, causal=True)[0]
        return gradients(out) if backward else out

    label = f"{len(boundaries) - 1} up to {longest_example} tokens"
    reference = flash2()
    print(f"{label:28s} {'FA2 varlen':14s} {timed(lambda: flash2(False)):8.3f} {timed(flash2):11.3f}")
    if fa4_varlen is None:
        return
    try:
        differences = ", ".join(f"{(a.float() - b.float()).abs().max().item():.3g}"
                                for a, b in zip(flash4(), reference))
        print(f"{'':28s} {'FA4 varlen':14s} {timed(lambda: flash4(False)):8.3f} {timed(flash4):11.3f}  "
              f"{differences}")
    except Exception as error:  # a probe reports any failure of the new kernel and goes on
        print(f"{'':28s} {'FA4 varlen':14s} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")


def probe_wide() -> None:
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    print(f"LoRA layers of one input ({TOKENS} tokens, input {HIDDEN}, rank {RANK} each, scaling 2)")
    print(f"{'layers':10s} {'base products only':>19s} {'rank-r output, base in epilogue':>32s} "
          f"{'one product over [x | xA^T]':>28s}")
    for name, widths in (("gate/up", (INTERMEDIATE, INTERMEDIATE)), ("q/k/v", (HIDDEN, 512, 512))):
        _wide_case(x, name, widths)


def _wide_case(x: torch.Tensor, name: str, widths: tuple[int, ...]) -> None:
    total_rank = RANK * len(widths)
    weights = [torch.randn(width, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for width in widths]
    lora_a = torch.randn(total_rank, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    lora_bs = [torch.randn(width, RANK, device="cuda", dtype=torch.bfloat16) * 0.02 for width in widths]
    wide = []
    for index, (weight, lora_b) in enumerate(zip(weights, lora_bs)):
        matrix = torch.zeros(weight.shape[0], HIDDEN + total_rank, device="cuda", dtype=torch.bfloat16)
        matrix[:, :HIDDEN] = weight
        matrix[:, HIDDEN + index * RANK:HIDDEN + (index + 1) * RANK] = 2.0 * lora_b
        wide.append(matrix)

    def epilogue():  # weitiao.train.fused_lora's forward on main
        low = x @ lora_a.t()
        return [low.new_empty(TOKENS, weight.shape[0]).addmm_(low[:, i * RANK:(i + 1) * RANK], lora_b.t(),
                                                               beta=0, alpha=2.0).addmm_(x, weight.t())
                for i, (weight, lora_b) in enumerate(zip(weights, lora_bs))]

    def widened():  # branch wide-gate-up
        inputs = x.new_empty(TOKENS, HIDDEN + total_rank)
        inputs[:, :HIDDEN].copy_(x)
        torch.mm(x, lora_a.t(), out=inputs[:, HIDDEN:])
        return [inputs @ matrix.t() for matrix in wide]

    difference = max((a.float() - b.float()).abs().max().item() for a, b in zip(epilogue(), widened()))
    print(f"{name:10s} {timed(lambda: [x @ weight.t() for weight in weights]):19.3f} {timed(epilogue):32.3f} "
          f"{timed(widened):28.3f}  (largest difference {difference:.3g})")


def probe_addnorm() -> None:
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    hidden, residual = (torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(2))
    weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    grad_normed, grad_sum = torch.randn_like(hidden), torch.randn_like(hidden)

    def separate():
        summed = residual + hidden
        normed = LigerRMSNormFunction.apply(summed, weight, 1e-5, 0.0, "llama", False)
        torch.autograd.backward([normed, summed], [grad_normed, grad_sum])

    def fused():
        normed, summed = LigerFusedAddRMSNormFunction.apply(hidden, residual, weight, 1e-5, 0.0, "llama", False)
        torch.autograd.backward([normed, summed], [grad_normed, grad_sum])

    print(f"residual add + RMSNorm, forward + backward ({TOKENS} x {HIDDEN}, frozen weight): "
          f"separate {timed(separate):.3f} ms, Liger's fused {timed(fused):.3f} ms")


PROBES = {"attention": probe_attention, "wide": probe_wide, "addnorm": probe_addnorm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", nargs="+", choices=sorted(PROBES), default=sorted(PROBES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for name in args.probes:
        PROBES[name]()
        print()


if __name__ == "__main__":
    main()
