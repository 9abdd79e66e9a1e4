"""Stages dpo and kto: the policy learns from preferences, on the sft recipe's set-up and the core's loop.

dpo reads pairs and minimises pref.loss: sigmoid (DPO), ipo, orpo or simpo; kto reads binary feedback. The formulas
are TRL's (DPOTrainer, CPOTrainer for SimPO, ORPOTrainer, KTOTrainer) on summed reply log-probs, length-averaged
where the method says so. The reference model, where the loss needs one, is in this order of preference: the base
with the adapter switched off (a fresh LoRA-family adapter: no second copy in memory), log-probs computed once
before training (pref.precompute_reference, or an adapter continued from an earlier stage, whose model is the
reference), a frozen copy (full and freeze).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from weitiao.config import PAIR_STAGES, Config, PreferenceConfig
from weitiao.data.collate import PadCollator
from weitiao.data.packing import PackedBatchSampler, PackedCollator
from weitiao.data.preference import PAIR_COLUMNS, FeedbackCollator, PairCollator
from weitiao.eval.pairs import causal_lm, pair_logps, sequence_logps
from weitiao.runs import RunFolder
from weitiao.train.core import Loaders
from weitiao.train.methods import quantization_config
from weitiao.train.settings import Settings
from weitiao.train.sft import SFTRecipe, loader_options, padded, row_boundaries

# ---------------------------------------------------------------------------------------------
# The losses, on log-probs: one value per pair (or example), and the implicit rewards logged beside them.


def pair_losses(pref: PreferenceConfig, chosen: torch.Tensor, rejected: torch.Tensor, lengths: torch.Tensor,
                reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen rewards, rejected rewards) per pair. `chosen`/`rejected`: summed reply log-probs of the
    policy; `lengths`: (pairs, 2) reply tokens; `reference`: (pairs, 2) summed log-probs of the reference."""
    beta = pref.beta
    if pref.loss == "sigmoid":
        ref_chosen, ref_rejected = reference.unbind(1)
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        losses = (-(1 - pref.label_smoothing) * F.logsigmoid(beta * logits)
                  - pref.label_smoothing * F.logsigmoid(-beta * logits))
        return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    # The other losses compare log-probs per reply token.
    chosen, rejected = chosen / lengths[:, 0], rejected / lengths[:, 1]
    if pref.loss == "ipo":
        ref_chosen, ref_rejected = (reference / lengths).unbind(1)
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        losses = (logits - 1 / (2 * beta)) ** 2
        return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    if pref.loss == "orpo":
        # log odds(chosen) - log odds(rejected), odds = p / (1 - p) of the per-token mean probability
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp().clamp(max=1 - 1e-6))
                                          - torch.log1p(-rejected.exp().clamp(max=1 - 1e-6)))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    else:  # simpo
        losses = -F.logsigmoid(beta * (chosen - rejected) - pref.simpo_gamma_beta_ratio * beta)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_losses(pref: PreferenceConfig, logratios: torch.Tensor, kl_logratios: torch.Tensor,
               desirable: torch.Tensor, kl_total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, rewards) per example: desirable replies pushed above the KL estimate, undesirable ones below it.
    `kl_total` is the (detached) mean over all processes when given, else over this batch."""
    kl = (kl_total if kl_total is not None else kl_logratios.mean()).detach().clamp(min=0)
    beta = pref.beta
    losses = torch.where(desirable, pref.desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         pref.undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    return losses, beta * logratios.detach()


# ---------------------------------------------------------------------------------------------
# The reference model.


class Reference:
    """Log-probs of the reference model for a batch: the policy with its adapter off, or a frozen copy."""

    def __init__(self, copy_of_model: torch.nn.Module | None, unwrap):
        self.copy, self.unwrap = copy_of_model, unwrap

    @torch.no_grad()
    def logps(self, model, batch: dict[str, Any], autocast) -> torch.Tensor:
        if self.copy is not None:
            with autocast():
                return sequence_logps(self.copy, batch, autocast)[0]
        with self.unwrap(model).disable_adapter():
            return sequence_logps(model, batch, autocast)[0]


def make_reference(config: Config, model, settings: Settings, accelerator) -> Reference | None:
    """None where the loss needs no reference or its log-probs are precomputed."""
    if config.stage == "dpo" and (not config.pref.needs_reference or precomputes_reference(config)):
        return None
    if config.method_spec.saves_adapter:
        return Reference(None, accelerator.unwrap_model)
    frozen = copy.deepcopy(causal_lm(model)).requires_grad_(False).eval()
    if settings.precision in ("bf16", "fp16"):  # a reference needs no fp32 master weights
        frozen.to(torch.bfloat16 if settings.precision == "bf16" else torch.float16)
    return Reference(frozen.to(accelerator.device), accelerator.unwrap_model)


def precomputes_reference(config: Config) -> bool:
    return config.stage == "dpo" and config.pref.needs_reference and (
        config.pref.precompute_reference or config.model.adapter is not None)


# ---------------------------------------------------------------------------------------------
# The objectives the core's loop minimises.


class HeldOutSums:
    """Objectives whose steps average over a count per batch (`count_key`: pairs, examples) and whose evaluation
    sums a vector per held-out batch over the loader and all processes (`batch_sums`, then `metrics`)."""
    count_key = "pairs"

    def window_size(self, window: list[dict[str, Any]]) -> torch.Tensor:
        return torch.tensor(sum(batch[self.count_key] for batch in window), device=window[0]["input_ids"].device)

    def batch_sums(self, model, batch: dict[str, Any]) -> list[torch.Tensor | int]:
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, loader: DataLoader, accelerator) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals = None
        for batch in loader:
            sums = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(())
                                for value in self.batch_sums(model, batch)])
            totals = sums if totals is None else totals + sums
        model.train(was_training)
        return self.metrics(accelerator.reduce(totals, "sum").tolist())


class PairLoss(HeldOutSums):
    """Stage dpo: the mean of pref.loss over the pairs of a step."""

    def __init__(self, pref: PreferenceConfig, reference: Reference | None, autocast):
        self.pref, self.reference, self.autocast = pref, reference, autocast

    def scores(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards) of a batch of pairs."""
        logps, lengths = sequence_logps(model, batch, self.autocast)
        reference = None
        if self.pref.needs_reference:
            reference = (batch["reference_logps"] if "reference_logps" in batch
                         else self.reference.logps(model, batch, self.autocast)).view(-1, 2)
        return pair_losses(self.pref, logps[0::2], logps[1::2], lengths.view(-1, 2), reference)

    def __call__(self, model, batch: dict[str, Any], window_size: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, chosen, rejected = self.scores(model, batch)
        share = 1 / window_size
        return losses.sum() * share, {
            "rewards/chosen": chosen.sum() * share, "rewards/rejected": rejected.sum() * share,
            "rewards/margin": (chosen - rejected).sum() * share,
            "rewards/accuracy": (chosen > rejected).sum() * share}

    def batch_sums(self, model, batch: dict[str, Any]) -> list[torch.Tensor | int]:
        losses, chosen, rejected = self.scores(model, batch)
        return [losses.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(), chosen.sum(),
                len(losses)]

    def metrics(self, sums: list[float]) -> dict[str, float]:
        loss, correct, margin, chosen, pairs = sums
        return {"loss": loss / pairs, "reward_accuracy": 100 * correct / pairs, "reward_margin": margin / pairs,
                "reward_chosen": chosen / pairs}


class FeedbackLoss(PairLoss):
    """Stage kto: the mean KTO loss over the examples of a step."""
    count_key = "examples"

    def scores(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, rewards, whether each example is desirable)."""
        logps, _ = sequence_logps(model, batch, self.autocast)
        logratios = logps - self.reference.logps(model, batch, self.autocast)
        count = batch["examples"]
        desirable = batch["desirable"]
        losses, rewards = kto_losses(self.pref, logratios[:count], logratios[count:], desirable)
        return losses, rewards, desirable

    def __call__(self, model, batch: dict[str, Any], window_size: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, rewards, desirable = self.scores(model, batch)
        share = 1 / window_size
        return losses.sum() * share, {"rewards/desirable": (rewards * desirable).sum() * share,
                                      "rewards/undesirable": (rewards * ~desirable).sum() * share}

    def batch_sums(self, model, batch: dict[str, Any]) -> list[torch.Tensor | int]:
        losses, rewards, desirable = self.scores(model, batch)
        return [losses.sum(), (rewards * desirable).sum(), desirable.sum(), (rewards * ~desirable).sum(),
                (~desirable).sum()]

    def metrics(self, sums: list[float]) -> dict[str, float]:
        loss, good, goods, bad, bads = sums
        # The mean reward of each kind of reply: desirable ones should rise above zero, undesirable ones fall below.
        return {"loss": loss / max(1, goods + bads), "reward_desirable": good / max(1, goods),
                "reward_undesirable": bad / max(1, bads)}


# ---------------------------------------------------------------------------------------------
# The recipes: the sft recipe with other batches, a reference model and the objective.


class PreferenceRecipe(SFTRecipe):
    """Stages dpo (pairs) and kto (feedback)."""

    def collator(self, settings: Settings, pad_id: int, packed: bool):
        inner = (PackedCollator(pad_id, settings.row_length, **row_boundaries(self.config, settings))
                 if packed else padded(pad_id, settings))
        return PairCollator(inner) if self.config.stage in PAIR_STAGES else FeedbackCollator(inner)

    def loaders(self, train_set, eval_set, pad_id: int, settings: Settings) -> Loaders:
        """Packed rows hold whole pairs (chosen then rejected, each attending to itself only); kto's batches are
        padded, so each holds the examples its KL estimate pairs anew."""
        args, data = self.config.train, self.config.data
        common = loader_options(args.seed, settings)
        sampler = None
        if settings.packing:
            lengths = [len(c) + len(r) for c, r in zip(train_set["input_ids"], train_set["rejected_input_ids"])]
            sampler = PackedBatchSampler(lengths, data.packing_length, args.seed)
            train = DataLoader(train_set, batch_sampler=sampler, collate_fn=self.collator(settings, pad_id, True),
                               **common)
            if self.is_main:
                print(f"Packing: {len(train_set)} pairs in {len(sampler)} rows of up to {data.packing_length} "
                      f"tokens ({100 * sampler.fill:.1f}% filled)")
        else:
            train = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
                               collate_fn=self.collator(settings, pad_id, False), **common)
        evaluation = None
        if eval_set is not None and len(eval_set):
            evaluation = DataLoader(eval_set, batch_size=args.per_device_eval_batch_size,
                                    collate_fn=self.collator(settings, pad_id, False))
        return Loaders(train, evaluation, len(train_set), len(eval_set) if evaluation else 0, sampler)

    def prepare(self, model, tokenizer, settings: Settings, accelerator, train_set, eval_set):
        config = self.config
        autocast = accelerator.autocast if settings.precision != "fp32" else nullcontext
        if quantization_config(config) is None:  # quantized weights were placed at load
            model.to(accelerator.device)
        if precomputes_reference(config):
            train_set, eval_set = (self._with_reference_logps(model, dataset, tokenizer.pad_token_id, autocast)
                                   if dataset is not None else None for dataset in (train_set, eval_set))
        reference = make_reference(config, model, settings, accelerator)
        objective = (PairLoss if config.stage == "dpo" else FeedbackLoss)(config.pref, reference, autocast)
        return objective, train_set, eval_set

    def _with_reference_logps(self, model, dataset, pad_id: int, autocast):
        """The starting model's log-probs of every pair (each process computes all of them), a column the collator
        hands to the loss."""
        loader = DataLoader(dataset.select_columns(list(PAIR_COLUMNS)),
                            batch_size=self.config.train.per_device_eval_batch_size,
                            collate_fn=PairCollator(PadCollator(pad_id)))
        logps, _ = pair_logps(model, loader, autocast, desc="reference log-probs")
        if self.is_main:
            print(f"Reference log-probs of {len(dataset)} pairs computed")
        return dataset.add_column("reference_logps", logps.tolist())

    def summarize(self, result, data_stats: dict) -> None:
        records = [record for record in RunFolder(result.output_dir).metrics() if "eval_reward_accuracy" in record]
        if len(records) >= 2:
            first, last = records[0], records[-1]
            print(f"Held-out pairs: reward accuracy {first['eval_reward_accuracy']:.1f}% -> "
                  f"{last['eval_reward_accuracy']:.1f}%, margin {first['eval_reward_margin']:.3f} -> "
                  f"{last['eval_reward_margin']:.3f}")
