"""Requests for different LoRA adapters of one base in one batch: PEFT's LoRA `Linear`, with each row's adapter
taken from an index tensor.

PEFT's own mixed batches (`adapter_names=`) pick rows with Python lists, which a CUDA graph would freeze at
capture time. Here every attached adapter is applied to the whole batch and `torch.where` keeps its result on
the rows that asked for it (index == the adapter's row id; 0 is the base model), so one captured graph serves
any mix. A row gets exactly PEFT's value for its adapter, base(x) + B(A(x)) * scaling (or its DoRA variant);
the price is one small rank-r product per adapter on every row, which a few adapters barely show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


@dataclass
class AdapterRows:
    """Which adapter each token of the batch uses: `index[:n]` for the n tokens of the next forward pass."""
    index: torch.Tensor
    ids: dict[str, int] = field(default_factory=dict)  # adapter name -> its value in `index`


class RowLoraLinear(LoraLinear):
    rows: AdapterRows

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = getattr(self, "rows", None)
        if rows is None or args or kwargs or self.merged or self.disable_adapters:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        dtype = result.dtype
        index = rows.index[:x.shape[:-1].numel()].view(*x.shape[:-1], 1)
        for name, row_id in rows.ids.items():
            if name not in self.lora_A:  # this adapter does not adapt this layer
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            low = self._cast_input_dtype(x, lora_a.weight.dtype)
            if name in self.lora_variant:
                adapted = self.lora_variant[name].forward(self, active_adapter=name, x=low, result=result)
            else:
                adapted = result + lora_b(lora_a(self.lora_dropout[name](low))) * self.scaling[name]
            result = torch.where(index == row_id, adapted, result)
        return result.to(dtype)


def route_lora_rows(model: torch.nn.Module, rows: AdapterRows) -> int:
    """Make every plain LoRA layer of `model` a RowLoraLinear reading `rows`; returns how many layers it covers."""
    covered = 0
    for module in model.modules():
        if type(module) in (LoraLinear, RowLoraLinear):
            module.__class__ = RowLoraLinear
            module.rows = rows
            covered += 1
    return covered
