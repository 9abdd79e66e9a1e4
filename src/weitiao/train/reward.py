"""Stage rm: a reward model, transformers' sequence classification with one output, trained on preference pairs
with the pairwise (Bradley-Terry) loss -log sigmoid(r(chosen) - r(rejected)), as TRL's RewardTrainer.

It saves a full model folder (an adapter is merged first), which plain `AutoModelForSequenceClassification` loads
and `weitiao data select --method quality --scorer classifier --scorer-model RUN` scores data with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from weitiao.eval.pairs import rewards
from weitiao.runs import RunFolder
from weitiao.train.core import TrainResult
from weitiao.train.preference import HeldOutSums, PreferenceRecipe
from weitiao.train.settings import Settings


class PairwiseLoss(HeldOutSums):
    """The mean pairwise loss over the pairs of a step."""

    def __call__(self, model, batch: dict[str, Any], window_size: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = rewards(model, batch)
        margin = scores[0::2] - scores[1::2]
        share = 1 / window_size
        return -F.logsigmoid(margin).sum() * share, {"rewards/margin": margin.detach().sum() * share,
                                                     "rewards/accuracy": (margin > 0).sum() * share}

    def batch_sums(self, model, batch: dict[str, Any]) -> list[torch.Tensor | int]:
        scores = rewards(model, batch)
        margin = scores[0::2] - scores[1::2]
        return [-F.logsigmoid(margin).sum(), (margin > 0).sum(), margin.sum(), len(margin)]

    def metrics(self, sums: list[float]) -> dict[str, float]:
        loss, correct, margin, pairs = sums
        return {"loss": loss / pairs, "reward_accuracy": 100 * correct / pairs, "reward_margin": margin / pairs}


class RewardRecipe(PreferenceRecipe):
    """The dpo recipe's data and batches (padded pairs), a sequence-classification model and the pairwise loss."""

    def prepare(self, model, tokenizer, settings: Settings, accelerator, train_set, eval_set):
        return PairwiseLoss(), train_set, eval_set

    def run(self) -> TrainResult:
        result = super().run()
        if self.is_main and self.config.method_spec.saves_adapter:
            # A full model folder: plain transformers (and every reward-model consumer) loads it without PEFT.
            run = RunFolder(result.output_dir)
            result.model = result.model.merge_and_unload()
            result.model.save_pretrained(run.path, safe_serialization=True)
            run.remove_adapter_files()
            print(f"Reward model merged into a full model at {run.path}")
        return result
