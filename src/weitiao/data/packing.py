"""Contamination-free packing: several whole examples per row, each with its own position ids.

A packed row carries no attention mask, only position ids that restart at 0 for every example; transformers
then confines attention to each example (a block-diagonal mask for sdpa, a block mask that skips empty blocks
for flex attention). The first label of every example is masked, so no token is trained to predict the start of
the next example: the per-token loss is exactly that of padded batches of the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from weitiao.data.encode import IGNORE_INDEX

OPEN_ROWS = 64  # first-fit looks at the last rows only, so planning stays linear in the number of examples


def plan_rows(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens: first fit over a seeded shuffle."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    free: list[int] = []
    first_open = 0
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than packing_length {capacity}")
        for row in range(first_open, len(rows)):
            if free[row] >= length:
                rows[row].append(index)
                free[row] -= length
                break
        else:
            rows.append([index])
            free.append(capacity - length)
            first_open = max(0, len(rows) - OPEN_ROWS)
    return rows


class PackedBatchSampler:
    """Yields one packed row (a list of example indices) per batch. Rows are planned once; their order is
    reshuffled every epoch as a function of (seed, epoch), so a resumed run sees the same order."""

    batch_size = None  # rows hold a varying number of examples (accelerate shards such batches whole)
    drop_last = False

    def __init__(self, lengths: Sequence[int], capacity: int, seed: int):
        self.rows = plan_rows(lengths, capacity, seed)
        self.seed, self.epoch = seed, 0
        self.fill = sum(lengths) / (capacity * max(1, len(self.rows)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for position in torch.randperm(len(self.rows), generator=generator).tolist():
            yield self.rows[position]

    def __len__(self) -> int:
        return len(self.rows)


class PackedCollator:
    """Concatenate a row's examples into one sequence of shape (1, T); pad to a multiple of `pad_to_multiple_of`
    (a fixed shape keeps compiled attention kernels from recompiling). Padding is a sequence of its own with no
    labels. `num_tokens` (real tokens, for throughput) is not a model input: the training loop pops it.
    With `boundaries`, the row also carries where each example starts and ends (`cu_seq_lens_q`/`_k`) and the
    longest example (`max_length_q`/`_k`; transformers' names), which variable-length attention reads. `longest`
    fixes that number (data.max_length): compiled code would otherwise specialise on each row's longest example and
    recompile until it gives up; padding is then cut into sequences no longer than it.
    With `scored_positions`, the row also lists the positions whose next token has a label (`logits_to_keep`) and
    those labels (`shift_labels`; transformers' names): only they need the output layer (weitiao.train.kernels)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, boundaries: bool = False,
                 longest: int | None = None, scored_positions: bool = False):
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of
        self.boundaries, self.longest, self.scored_positions = boundaries, longest, scored_positions

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, labels, positions = [], [], []
        lengths = [len(example["input_ids"]) for example in examples]
        for example, n in zip(examples, lengths):
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            positions += range(n)
        padding = -len(input_ids) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        if padding:
            input_ids += [self.pad_token_id] * padding
            labels += [IGNORE_INDEX] * padding
            piece = min(padding, self.longest or padding)
            positions += [i % piece for i in range(padding)]
            lengths = lengths + [piece] * (padding // piece) + ([padding % piece] if padding % piece else [])
        batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                 "position_ids": torch.tensor([positions]), "num_tokens": len(input_ids) - padding}
        if self.boundaries:
            ends = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            longest = self.longest or max(lengths)
            batch.update(cu_seq_lens_q=ends, cu_seq_lens_k=ends, max_length_q=longest, max_length_k=longest)
        if self.scored_positions:
            targets = labels[1:] + [IGNORE_INDEX]  # what each position predicts
            positions = [i for i, target in enumerate(targets) if target != IGNORE_INDEX]
            if positions:  # a row without labels goes the usual way (an empty selection would reach the kernel)
                batch.update(logits_to_keep=torch.tensor(positions),
                             shift_labels=torch.tensor([[targets[i] for i in positions]]))
        return batch
