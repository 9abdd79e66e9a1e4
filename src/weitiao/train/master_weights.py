"""bf16 mixed precision with the fp32 master weights in the optimizer, for methods that train base weights.

Under autocast with fp32 weights in the model (transformers' Trainer's mixed precision, `train.master_weights:
model`), every use of a weight casts it to bf16, every weight gradient is cast back to fp32, and what runs between
the matrix products (the residual stream, the norms) stays in fp32, cast again at each product's input. Here the
model holds bf16 weights, so its forward and backward passes run in bf16 throughout (as FSDP's and DeepSpeed's bf16
training do), and fp32 copies of the trained weights sit beside it for the optimizer:

- each weight's gradient is added, in fp32, to its copy's gradient as soon as the backward pass has produced it,
  and the bf16 gradient is freed at once (gradient accumulation sums in fp32; no bf16 gradient is kept);
- gradient clipping and the optimizer work on the fp32 copies (an update too small for bf16 to hold is not lost:
  it stays in the copy until the updates add up to one bf16 can);
- after each optimizer step one multi-tensor copy writes the fp32 weights back into the model's bf16 ones.

On a CUDA GPU the optimizer is weitiao.train.master_adamw's one-kernel AdamW instead, which writes the bf16 weights
itself and, when each step is one backward pass, reads the bf16 gradients where the backward pass left them.

1B full fine-tuning, eager, 8k-token rows (docs/performance.md): 61.0k instead of 55.8k tokens/s at 27.0 instead of
30.1 GiB on an H100; with fp32 weights in the model 12.8 ms of a step's 132 ms of H200 kernels were dtype casts.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch


class MasterWeights:
    """The fp32 copies of a model's trained bf16 weights; the optimizer is built on `named_parameters()`, and `watch`
    connects it. Registered for checkpointing, so that a resumed run continues from the fp32 values.

    `fp32_gradients`: each gradient goes to its copy in fp32 as soon as it is complete (needed to sum micro-batches
    in fp32, and by an optimizer that reads the copies' gradients); otherwise it stays on the model in bf16, for an
    optimizer that reads it there (weitiao.train.master_adamw, with one backward pass per step)."""

    def __init__(self, model: torch.nn.Module, fp32_gradients: bool = True):
        trained = [(name, weight) for name, weight in model.named_parameters() if weight.requires_grad]
        self.names = [name for name, _ in trained]
        self.weights = [weight for _, weight in trained]
        self.masters = [torch.nn.Parameter(weight.detach().to(torch.float32, copy=True)) for weight in self.weights]
        if fp32_gradients:
            for weight, master in zip(self.weights, self.masters):
                weight.register_post_accumulate_grad_hook(partial(_add_gradient_to, master))
        # Where the gradients are: what gradient clipping measures and scales.
        self.gradient_holders = self.masters if fp32_gradients else self.weights

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return zip(self.names, self.masters)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the fp32 weights into the model after each step of `optimizer`."""
        optimizer.register_step_post_hook(lambda *_: self.write_back())

    @torch.no_grad()
    def write_back(self) -> None:
        torch._foreach_copy_(self.weights, self.masters)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": dict(zip(self.names, self.masters))}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["masters"]
        missing = set(self.names) - set(saved)
        if missing:
            raise ValueError(f"the checkpoint has no fp32 master weights for {len(missing)} trained weights, e.g. "
                             f"{sorted(missing)[0]}")
        for name, master in zip(self.names, self.masters):
            master.copy_(saved[name])
        self.write_back()


@torch.no_grad()
def _add_gradient_to(master: torch.nn.Parameter, weight: torch.Tensor) -> None:
    """Called by autograd once `weight`'s gradient of this backward pass is complete."""
    if master.grad is None:
        master.grad = weight.grad.to(torch.float32)
    else:
        master.grad.add_(weight.grad)
    weight.grad = None
