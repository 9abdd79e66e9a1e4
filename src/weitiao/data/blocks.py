"""Continued pre-training data (stage pt): documents concatenated, EOS between them, cut into fixed-length blocks.

Every document ends in EOS (encode.encode_document), so a block reads `...end of A <EOS> start of B...`: the model
learns where documents end, and no token is padding. A document longer than the space left in a block continues at
the start of the next block; the last block of the data is the only one that may be shorter. Each block records
the lengths of the document pieces it holds (`segment_lengths`), which is what per-document attention needs:

- data.packing off (the CPU default): a block is one row with plain causal attention, so a token may attend to
  the end of the previous document in its block (GPT-2 style; the EOS between them marks the change).
- data.packing on (the GPU default): the blocks of a micro-batch go in one row with position ids that restart at
  every document piece, so attention stays within each document; as in SFT packing, the first token of every
  piece is not a label, so no token is trained to predict the start of another document.

Either way a block's first token has no label: nothing before it in the row predicts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from weitiao.data.packing import PackedCollator

# Blocks are shuffled in a buffer this many blocks deep when streaming (a file's order is often by topic).
SHUFFLE_BUFFER_BLOCKS = 1000


def pack_blocks(documents: Iterable[list[int]], block_length: int) -> Iterator[dict[str, list[int]]]:
    """Cut the concatenation of `documents` into blocks of `block_length` tokens (the last may be shorter).
    Every token appears in exactly one block, in order."""
    ids: list[int] = []
    segments: list[int] = []
    for document in documents:
        start = 0
        while start < len(document):
            take = min(block_length - len(ids), len(document) - start)
            ids += document[start:start + take]
            segments.append(take)
            start += take
            if len(ids) == block_length:
                yield {"input_ids": ids, "labels": list(ids), "segment_lengths": segments}
                ids, segments = [], []
    if ids:
        yield {"input_ids": ids, "labels": list(ids), "segment_lengths": segments}


def block_features():
    """The datasets schema of a block (int32 ids keep a large corpus at half the size of int64)."""
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "segment_lengths": Sequence(Value("int32"))})


def streamed_blocks(documents: Callable[[], Iterator[list[int]]], block_length: int, seed: int):
    """A `datasets.IterableDataset` of blocks read lazily from `documents()` (called again at every epoch), shuffled
    in a buffer of SHUFFLE_BUFFER_BLOCKS blocks whose order depends on (seed, epoch)."""
    from datasets import IterableDataset

    def generate() -> Iterator[dict[str, list[int]]]:
        yield from pack_blocks(documents(), block_length)

    stream = IterableDataset.from_generator(generate, features=block_features())
    return stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_BLOCKS)


def document_segments(block: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The pieces of documents a block holds, in order."""
    pieces, start = [], 0
    for length in block["segment_lengths"]:
        pieces.append({"input_ids": block["input_ids"][start:start + length],
                       "labels": block["labels"][start:start + length]})
        start += length
    return pieces


class DocumentBlockCollator:
    """data.packing in stage pt: a micro-batch of blocks becomes one row whose position ids restart at every
    document piece, so transformers keeps attention within each document (see weitiao.data.packing)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, boundaries: bool = False,
                 longest: int | None = None):
        self.packed = PackedCollator(pad_token_id, pad_to_multiple_of, boundaries, longest)

    def __call__(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        return self.packed([piece for block in blocks for piece in document_segments(block)])
