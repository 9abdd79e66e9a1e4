"""One optimizer step of full fine-tuning on Llama-3.2-1B-shaped weights (1.24B, bf16 in the model, fp32 masters;
CUDA): MasterAdamW's one kernel, reading the bf16 gradients on the model, against the passes it replaces (bf16
gradients copied into fp32 buffers as the per-weight hook does, the clipping norm, torch's fused AdamW on the fp32
copies, the bf16 write-back). Times: bench/common.timed (CUDA events, 30 steps after 5 warm-up ones).

  python bench/master_adamw_step.py
"""

import torch

from common import timed
from weitiao.train.core import set_clipping_factor
from weitiao.train.master_adamw import MasterAdamW
from weitiao.train.master_weights import MasterWeights

LAYER = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192), (2048,),
         (2048,)]
SHAPES = [(128256, 2048)] + LAYER * 16 + [(2048,)]
ADAM = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8)


def masters_of(fp32_gradients: bool) -> tuple[torch.nn.ParameterList, MasterWeights]:
    weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02)
                                     for shape in SHAPES)
    return weights, MasterWeights(weights, fp32_gradients=fp32_gradients)


def main() -> None:
    factor = torch.ones((), device="cuda")
    rows = []
    weights, masters = masters_of(fp32_gradients=False)
    optimizer = MasterAdamW([{"params": masters.masters, "weight_decay": 0.0}], masters, **ADAM)
    optimizer.grad_scale = factor
    for weight in weights:
        weight.grad = torch.randn_like(weight) * 1e-3
    rows.append(("MasterAdamW: norm + step", timed(
        lambda: (set_clipping_factor(factor, masters.gradient_holders, 1.0), optimizer.step()))))
    rows.append(("MasterAdamW: step", timed(optimizer.step)))
    del weights, masters, optimizer
    torch.cuda.empty_cache()

    weights, masters = masters_of(fp32_gradients=True)
    gradients = [torch.randn_like(weight) * 1e-3 for weight in weights]
    optimizer = torch.optim.AdamW([{"params": masters.masters, "weight_decay": 0.0}], fused=True, **ADAM)
    optimizer.grad_scale = factor
    for master in masters.masters:
        master.grad = torch.zeros_like(master)

    def copy_gradients() -> None:  # what the per-weight hook does once the backward pass completes a gradient
        for master, gradient in zip(masters.masters, gradients):
            master.grad.copy_(gradient)

    def norm() -> None:
        set_clipping_factor(factor, masters.gradient_holders, 1.0)

    rows.append(("fp32 path: all four", timed(
        lambda: (copy_gradients(), norm(), optimizer.step(), masters.write_back()))))
    for name, step in (("gradient copies", copy_gradients), ("clipping norm", norm),
                       ("torch fused AdamW", optimizer.step), ("bf16 write-back", masters.write_back)):
        rows.append((f"fp32 path: {name}", timed(step)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"| {'what':<32} | ms |\n|{'-' * 34}|---:|")
    for name, ms in rows:
        print(f"| {name:<32} | {ms:.2f} |")


if __name__ == "__main__":
    main()
