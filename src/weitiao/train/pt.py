"""Stage pt, continued pre-training on plain text: the sft recipe with other batches and one more metric.

Documents are cut into blocks of data.max_length tokens (weitiao.data.blocks), which are full rows already, so
packing only decides whether attention may cross documents in a block. Held-out text is measured in bits per
character as well as per-token loss, which compares models whose tokenizers differ (a vocabulary extension).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.utils.data import DataLoader

from weitiao.data.blocks import DocumentBlockCollator
from weitiao.runs import RunFolder
from weitiao.train.core import Loaders, TrainResult
from weitiao.train.settings import Settings
from weitiao.train.sft import SFTRecipe, eval_loader, loader_options, padded, row_boundaries


class PretrainRecipe(SFTRecipe):
    def loaders(self, train_set, eval_set, pad_id: int, settings: Settings) -> Loaders:
        args, streaming = self.config.train, self.config.data.streaming
        collate = (DocumentBlockCollator(pad_id, settings.row_length, **row_boundaries(self.config, settings))
                   if settings.packing else padded(pad_id, settings))
        train = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=not streaming,
                           collate_fn=collate, **loader_options(args.seed, settings))
        return Loaders(train, eval_loader(eval_set, pad_id, settings, args.per_device_eval_batch_size),
                       None if streaming else len(train_set), len(eval_set) if eval_set is not None else 0)

    def eval_extras(self, data_stats: dict) -> Callable[[dict], dict] | None:
        characters = (data_stats.get("eval") or {}).get("characters") or 0
        if not characters:
            return None
        return lambda result: {"eval_bits_per_char": bits_per_char(result["loss"], result["tokens"], characters)}

    def summarize(self, result: TrainResult, data_stats: dict) -> None:
        characters = (data_stats.get("eval") or {}).get("characters") or 0
        before, after = result.eval_loss_before, result.eval_loss
        if not characters or before is None or after is None:
            return
        tokens = next(r["eval_tokens"] for r in reversed(RunFolder(result.output_dir).metrics()) if "eval_tokens" in r)
        print(f"Held-out text: perplexity {math.exp(min(before, 50)):.2f} -> {math.exp(min(after, 50)):.2f}, "
              f"bits per character {bits_per_char(before, tokens, characters):.3f} -> "
              f"{bits_per_char(after, tokens, characters):.3f}")


def bits_per_char(loss: float, tokens: int, characters: int) -> float:
    """Nats per token -> bits per character of the held-out text."""
    return loss * tokens / math.log(2) / characters

