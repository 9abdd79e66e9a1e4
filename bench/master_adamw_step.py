"""One optimizer step of full fine-tuning on Llama-3.2-1B-shaped weights (1.24B, bf16 in the model, fp32 masters;
CUDA): MasterAdamW's one kernel, reading the bf16 gradients on the model, against the passes it replaces (bf16
gradients copied into fp32 buffers as the per-weight hook does, the clipping norm, torch's fused AdamW on the fp32
copies, the bf16 write-back). Times: bench/common.timed (CUDA events, 30 steps after 5 warm-up ones).

`--blocks` times MasterAdamW's step at other block sizes and warp counts instead (elements a thread: BLOCK /
(32 x warps); run92 on an H100: 18.0 ms at 4,096 / 8 warps, 11.7 ms at 1,024 / 4, the default since).

  python bench/master_adamw_step.py [--blocks]
"""

import argparse

import torch

import weitiao.train.master_adamw as master_adamw
from common import timed
from weitiao.train.core import set_clipping_factor
from weitiao.train.master_weights import MasterWeights

LAYER = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192), (2048,),
         (2048,)]
SHAPES = [(128256, 2048)] + LAYER * 16 + [(2048,)]
ADAM = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8)


def masters_of(fp32_gradients: bool) -> tuple[torch.nn.ParameterList, MasterWeights]:
    weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02)
                                     for shape in SHAPES)
    return weights, MasterWeights(weights, fp32_gradients=fp32_gradients)


BLOCKS = [(4096, 8), (4096, 4), (2048, 8), (2048, 4), (1024, 4), (1024, 2), (8192, 8)]


def copy_rate() -> float:
    """TB/s of a plain fp32 copy on this GPU (read and write counted): what a memory-bound step can approach."""
    source = torch.empty(1 << 28, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / timed(lambda: target.copy_(source)) / 1e9


def blocks() -> None:
    """MasterAdamW's step at each (BLOCK, NUM_WARPS), with the bandwidth its 28 bytes a weight imply."""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; an fp32 copy of 1 GiB: {copy_rate():.2f} TB/s")
    weights, masters = masters_of(fp32_gradients=False)
    numel = sum(weight.numel() for weight in weights)
    print("| BLOCK | warps | step ms | TB/s |\n|---:|---:|---:|---:|")
    for block, warps in BLOCKS:
        master_adamw.BLOCK, master_adamw.NUM_WARPS = block, warps
        optimizer = master_adamw.MasterAdamW([{"params": masters.masters, "weight_decay": 0.0}], masters, **ADAM)
        for weight in weights:
            weight.grad = torch.randn_like(weight) * 1e-3
        ms = timed(optimizer.step)
        print(f"| {block} | {warps} | {ms:.2f} | {28 * numel / ms / 1e9:.2f} |", flush=True)
        del optimizer


def main() -> None:
    factor = torch.ones((), device="cuda")
    rows = []
    weights, masters = masters_of(fp32_gradients=False)
    optimizer = master_adamw.MasterAdamW([{"params": masters.masters, "weight_decay": 0.0}], masters, **ADAM)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", action="store_true", help="time the step at other block sizes and warp counts")
    blocks() if parser.parse_args().blocks else main()
