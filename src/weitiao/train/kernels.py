"""Fused GPU kernels from maintained libraries (Liger): fused linear + cross-entropy, so the vocabulary-sized
logits are never materialised, plus fused RMSNorm, SwiGLU and RoPE. CUDA only; the CPU path is unchanged."""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch


# Model types whose Liger forward (liger-kernel 0.8.5) takes `logits_to_keep` as positions and `shift_labels`: a
# packed row can then send only the positions whose next token has a label through the output layer and the loss
# (train.scored_positions), where TRL's completion-only loss computes their logits and discards them.
SCORED_POSITIONS_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "glm4",
                                "smollm3")
SCORED_POSITIONS_LIGER = (0, 8, 5)


def liger_scores_positions(model_type: str | None) -> bool:
    """Whether the installed Liger's fused loss for this model type takes scored positions (see above)."""
    from importlib.metadata import version

    installed = tuple(int(part) for part in version("liger-kernel").split(".")[:3] if part.isdigit())
    return model_type in SCORED_POSITIONS_MODEL_TYPES and installed >= SCORED_POSITIONS_LIGER

# Liger replaces functions and classes of transformers' modeling modules (RoPE, RMSNorm, the MLP) for the whole
# process, not only in the model it patches: what it replaced, per module, so that each run can start from
# transformers' own code (a compiled run after a Liger one must not trace Liger's Triton kernels).
_unpatched: dict[str, dict[str, Any]] = {}


def undo_liger_patches() -> None:
    """Put back what Liger replaced in transformers' modules; models built afterwards are transformers' own."""
    for module_name, namespace in _unpatched.items():
        module = sys.modules[module_name]
        for name, value in namespace.items():
            setattr(module, name, value)


def apply_liger(model: torch.nn.Module, fused_cross_entropy: bool, layer_kernels: bool) -> None:
    """Patch `model` in place with Liger kernels (weitiao.train.settings decides whether they run here).

    fused_cross_entropy False keeps the model's own output layer and loss: the fused kernel reads the output weight
    outside that layer's forward, where DeepSpeed ZeRO-3 has not gathered it. layer_kernels False leaves the
    decoder layers alone (RMSNorm, SwiGLU, RoPE) for torch.compile, which fuses those itself and which Liger's
    Triton kernels inside a compiled graph have crashed (illegal memory access)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    modeling = sys.modules[type(model).__module__]
    _unpatched.setdefault(modeling.__name__, {name: value for name, value in vars(modeling).items() if callable(value)})
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_cross_entropy,
                                    rms_norm=layer_kernels, swiglu=layer_kernels, rope=layer_kernels)
    if layer_kernels:
        use_row_parallel_norm_backward(model)


# Liger's RMSNorm backward runs one program per SM, each walking its share of the rows one after another, so that
# it can sum the weight's gradient per program. A frozen norm weight (LoRA and the other adapter methods) needs no
# such sum, and the same kernel launched with one program per row, as Liger's forward is, reads and writes at memory
# speed: 8,192 x 2,048 bf16 rows on an H100, 68 us a call in Liger's launch and 32 us in this one (run54's profiles).
# The kernel's arguments as liger-kernel 0.8.5 names them: any other list leaves Liger's own backward in place.
_NORM_BACKWARD_ARGUMENTS = ("dY_ptr", "dY_row_stride", "dX_ptr", "dX_row_stride", "X_ptr", "X_row_stride", "X_dtype",
                            "W_ptr", "W_row_stride", "RSTD_ptr", "RSTD_row_stride", "dW_ptr", "dW_row_stride",
                            "n_rows", "n_cols", "offset", "rows_per_program", "casting_mode", "elementwise_affine",
                            "BLOCK_SIZE", "COMPUTE_DW")


def use_row_parallel_norm_backward(model: torch.nn.Module) -> int:
    """Give the model's Liger RMSNorm layers the row-parallel backward for frozen weights (above); returns how many."""
    from liger_kernel.ops import rms_norm
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    if tuple(getattr(rms_norm._rms_norm_backward_kernel, "arg_names", ())) != _NORM_BACKWARD_ARGUMENTS:
        return 0
    patched = 0
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is LigerRMSNorm.forward:
            module.forward = _row_parallel_norm_forward.__get__(module)
            patched += 1
    return patched


def _row_parallel_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _row_parallel_norm_class().apply(hidden_states, self.weight, self.variance_epsilon, self.offset,
                                          self.casting_mode, self.in_place, self.row_mode)


@functools.cache
def _row_parallel_norm_class() -> type:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction, _rms_norm_backward_kernel
    from liger_kernel.ops.utils import torch_to_triton_dtype

    class RowParallelNormBackward(LigerRMSNormFunction):
        """Liger's RMSNorm; where the weight takes no gradient, its backward kernel runs one program per row."""

        @staticmethod
        def backward(ctx, grad_output):
            if not ctx.elementwise_affine or ctx.needs_input_grad[1] or ctx.row_mode:
                return LigerRMSNormFunction.backward(ctx, grad_output)
            inputs, weight, inverse_rms = ctx.saved_tensors
            shape = grad_output.shape
            grad_output = grad_output.contiguous().view(-1, shape[-1])
            grad_input = grad_output if ctx.in_place else torch.empty_like(grad_output)
            rows, columns = grad_output.shape
            _rms_norm_backward_kernel[(rows,)](
                grad_output, grad_output.stride(0), grad_input, grad_input.stride(0), inputs, inputs.stride(0),
                torch_to_triton_dtype[inputs.dtype], weight, weight.stride(0), inverse_rms, inverse_rms.stride(0),
                None, 0, rows, columns, ctx.offset, 1, ctx.casting_mode, elementwise_affine=True,
                BLOCK_SIZE=ctx.BLOCK_SIZE, COMPUTE_DW=False, num_warps=ctx.num_warps)
            return grad_input.view(shape), None, None, None, None, None, None

    return RowParallelNormBackward

