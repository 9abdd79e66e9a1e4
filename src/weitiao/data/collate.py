"""Batching tokenized examples."""

from __future__ import annotations

from typing import Any

import torch

from weitiao.data.encode import IGNORE_INDEX


class PadCollator:
    """Pad a list of {input_ids, labels} to the longest row (right padding); pads are masked out of attention
    and loss. `num_tokens` (real tokens, for throughput) is not a model input: the training loop pops it."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "num_tokens": int(attention_mask.sum())}


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the loss is computed on: labels are shifted by one inside the model's loss."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()
