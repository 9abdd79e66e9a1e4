"""AdamW on fp32 master weights in one Triton kernel per parameter group, writing the bf16 model weights itself.

With torch's fused AdamW on the fp32 copies (weitiao.train.master_weights) the optimizer's memory traffic was four
passes over every trained weight: the bf16 gradient added to an fp32 gradient buffer, the clipping norm over that
buffer, AdamW (read the fp32 gradient, weight and moments, write the weight and moments), and the bf16 write-back
(1B full fine-tuning on an H100: about 4 + 1.8 + 13 + 2.7 ms of a 128 ms step). Here one kernel reads the gradient
as the backward pass left it (bf16 on the model when each step is one backward pass; the fp32 sums of the copies
under gradient accumulation), the fp32 weight and moments, and writes the weight, the moments and the bf16 model
weight: the fp32 gradient buffer (4 bytes a weight) and the write-back pass are gone, and the clipping norm reads
bf16. The arithmetic is torch's fused AdamW's (decoupled weight decay, bias corrections, the gradient divided by
`grad_scale` where gradient clipping sets it: weitiao.train.core.clipping_in_the_step).

The kernel walks every tensor of a group in one launch: a table of their addresses (rebuilt each step, since the
gradients are new tensors) and, per block of BLOCK elements, which tensor and where in it.

Measured (H100, 1B, docs/performance.md run68-run71, run92): its step 11.7 ms against the four passes' 24.0 (18.0 ms
with 16 elements a thread, 23.3 ms while every block was masked), and 2.1 GiB less peak memory with gradient
checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from weitiao.train.master_weights import MasterWeights

# Eight elements a thread: 2.95 TB/s on an H100, where 16 or more ran at 2.05 or less and a plain fp32 copy at 3.05
# (run92; `python bench/master_adamw_step.py --blocks`).
BLOCK = 1024  # elements a program steps
NUM_WARPS = 4


@triton.jit
def _adamw_step(addresses, tensors, block_tensor, block_start, numels, grad_scale, lr, beta1, beta2, eps,
                weight_decay, bias_correction1, bias_correction2_sqrt, GRAD_FP32: tl.constexpr,
                SCALED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    index = tl.load(block_tensor + block)
    start = tl.multiple_of(tl.load(block_start + block), BLOCK)
    numel = tl.load(numels + index)
    # Every block but a tensor's last is full: without a mask (whose bound the compiler cannot know) and with
    # 16-byte-aligned addresses, loads and stores are vectorised (the masked form ran at about half the bandwidth).
    if start + BLOCK <= numel:
        _adamw_block(addresses, tensors, index, start, numel, grad_scale, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2_sqrt, GRAD_FP32, SCALED, ALIGNED, False, BLOCK)
    else:
        _adamw_block(addresses, tensors, index, start, numel, grad_scale, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2_sqrt, GRAD_FP32, SCALED, ALIGNED, True, BLOCK)


@triton.jit
def _address(addresses, at, ALIGNED: tl.constexpr):
    address = tl.load(addresses + at)
    if ALIGNED:
        address = tl.multiple_of(address, 16)
    return address


@triton.jit
def _adamw_block(addresses, tensors, index, start, numel, grad_scale, lr, beta1, beta2, eps, weight_decay,
                 bias_correction1, bias_correction2_sqrt, GRAD_FP32: tl.constexpr, SCALED: tl.constexpr,
                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel if MASKED else None
    # addresses holds, for each tensor: the bf16 model weight, the gradient, the fp32 weight, the two moments.
    weight_at = _address(addresses, index, ALIGNED).to(tl.pointer_type(tl.bfloat16))
    if GRAD_FP32:
        grad_at = _address(addresses, tensors + index, ALIGNED).to(tl.pointer_type(tl.float32))
    else:
        grad_at = _address(addresses, tensors + index, ALIGNED).to(tl.pointer_type(tl.bfloat16))
    master_at = _address(addresses, 2 * tensors + index, ALIGNED).to(tl.pointer_type(tl.float32))
    exp_avg_at = _address(addresses, 3 * tensors + index, ALIGNED).to(tl.pointer_type(tl.float32))
    exp_avg_sq_at = _address(addresses, 4 * tensors + index, ALIGNED).to(tl.pointer_type(tl.float32))

    grad = tl.load(grad_at + offsets, mask=mask).to(tl.float32)
    if SCALED:
        grad = grad / tl.load(grad_scale)
    master = tl.load(master_at + offsets, mask=mask)
    exp_avg = tl.load(exp_avg_at + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_at + offsets, mask=mask)
    master = master - lr * weight_decay * master
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    master = master - (lr / bias_correction1) * exp_avg / denom
    tl.store(master_at + offsets, master, mask=mask)
    tl.store(exp_avg_at + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_at + offsets, exp_avg_sq, mask=mask)
    tl.store(weight_at + offsets, master.to(tl.bfloat16), mask=mask)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW over the fp32 copies of `masters` (MasterWeights), whose step also writes the model's bf16 weights. Its
    state is torch AdamW's (step, exp_avg, exp_avg_sq per weight), so checkpoints save and restore it alike.
    `grad_scale`, when set, is a device scalar the gradients are divided by (gradient clipping's factor)."""

    divides_by_grad_scale = True  # weitiao.train.core.clipping_in_the_step

    def __init__(self, groups: list[dict[str, Any]], masters: MasterWeights, lr: float,
                 betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.weight_of = {id(master): weight for master, weight in zip(masters.masters, masters.weights)}
        for weight in masters.weights:
            if not weight.is_contiguous():  # the kernel writes it as one run of elements
                weight.data = weight.data.contiguous()
        self.grad_scale: torch.Tensor | None = None
        self._blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            by_grad_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
            for master in group["params"]:
                weight = self.weight_of[id(master)]
                grad = master.grad if master.grad is not None else weight.grad
                if grad is not None:  # read as one run of elements (autograd's gradients normally are)
                    by_grad_dtype.setdefault(grad.dtype, []).append((master, weight, grad.contiguous()))
            for grad_dtype, entries in by_grad_dtype.items():
                by_step: dict[float, list] = {}  # a weight that had no gradient in some step counts fewer steps
                for entry in entries:
                    state = self.state[entry[0]]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(entry[0], memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(entry[0], memory_format=torch.preserve_format)
                    state["step"] += 1  # a CPU tensor, as in torch's AdamW: no wait for the GPU
                    by_step.setdefault(state["step"].item(), []).append(entry)
                for step, same_step in by_step.items():
                    self._step_group(group, same_step, step, grad_dtype == torch.float32)
        return loss

    def _step_group(self, group: dict[str, Any], entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    step: float, grad_fp32: bool) -> None:
        states = [self.state[master] for master, _, _ in entries]
        beta1, beta2 = group["betas"]
        device = entries[0][0].device
        addresses = torch.tensor(
            [weight.data_ptr() for _, weight, _ in entries] + [grad.data_ptr() for _, _, grad in entries]
            + [master.data_ptr() for master, _, _ in entries] + [state["exp_avg"].data_ptr() for state in states]
            + [state["exp_avg_sq"].data_ptr() for state in states], dtype=torch.int64)
        aligned = bool((addresses % 16 == 0).all())  # torch's allocations are; views into a buffer may not be
        if device.type == "cuda":
            addresses = addresses.pin_memory()  # copied without waiting; the caching host allocator keeps it till then
        block_tensor, block_start, numels = self._block_tables([master.numel() for master, _, _ in entries], device)
        scale = self.grad_scale
        _adamw_step[(block_tensor.numel(),)](
            addresses.to(device, non_blocking=True), len(entries), block_tensor, block_start, numels,
            scale if scale is not None else numels, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            1 - beta1 ** step, (1 - beta2 ** step) ** 0.5, GRAD_FP32=grad_fp32, SCALED=scale is not None,
            ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)

    def _block_tables(self, numels: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
        """For each block of BLOCK elements, its tensor's index and its first element there; the tensors' sizes."""
        key = (tuple(numels), device)
        if key not in self._blocks:
            counts = [-(-numel // BLOCK) for numel in numels]
            block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                                   torch.tensor(counts))
            block_start = torch.cat([torch.arange(count, dtype=torch.int64) * BLOCK for count in counts])
            self._blocks[key] = (block_tensor.to(device), block_start.to(device),
                                 torch.tensor(numels, dtype=torch.int64, device=device))
        return self._blocks[key]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The gradients of the copies and, where the backward pass left them there, of the model's weights."""
        super().zero_grad(set_to_none)
        for weight in self.weight_of.values():
            weight.grad = None
