"""Log-probabilities of whole replies, and how a model ranks the two replies of held-out preference pairs.

The model runs without its output head: its last hidden states are kept, and the head is applied only at the
label positions (the replies), a chunk of tokens at a time, each chunk recomputed in the backward pass. So a
preference step never materialises the logits of a whole batch, prompts included (a 1B Llama's vocabulary of 128k
would otherwise take 4 GiB per 8k tokens in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from weitiao.data.encode import IGNORE_INDEX

LOGITS_CHUNK_BYTES = 512 * 2**20  # fp32 logits of one chunk of reply tokens
BATCH_KEYS = ("sequence_index", "pairs", "examples", "reference_logps", "desirable")
"""What the preference collators add to a batch besides the model's inputs."""


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside accelerate's, DDP's and PEFT's wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def output_head_removed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the model's `logits` are its last hidden states; yields the output head."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    # The attribute itself (lm_head for most models): regional compilation may have wrapped the head in a compiled
    # module, which transformers' set_output_embeddings cannot test for truth; the chunks run its plain module.
    name = next(name for name, child in lm.named_children() if child is head)
    setattr(lm, name, torch.nn.Identity())
    try:
        yield getattr(head, "_orig_mod", head)
    finally:
        setattr(lm, name, head)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_logps(model, batch: dict[str, Any], autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's label tokens, their count), one entry per sequence of the
    batch (its `sequence_index`)."""
    inputs = {key: value for key, value in batch.items() if key not in (*BATCH_KEYS, "labels")}
    with output_head_removed(model) as head:
        hidden = model(**inputs, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][scored], targets[scored]
    sequences = batch["sequence_index"][:, 1:].to(scored.device)[scored]
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * head.weight.shape[0]))
    with autocast():
        pieces = [checkpoint(_chunk_logps, head, hidden[start:start + chunk], targets[start:start + chunk],
                             use_reentrant=False) if torch.is_grad_enabled()
                  else _chunk_logps(head, hidden[start:start + chunk], targets[start:start + chunk])
                  for start in range(0, len(targets), chunk)]
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    count = 2 * batch["pairs"] if "pairs" in batch else 2 * batch["examples"]
    logps = token_logps.new_zeros(count).index_add(0, sequences, token_logps)
    lengths = torch.bincount(sequences, minlength=count)[:count].to(logps.dtype)
    return logps, lengths


@torch.no_grad()
def pair_logps(model, loader, autocast=nullcontext, desc: str = "scoring pairs") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, reply lengths) of every pair of `loader` (PairCollator batches), shape (pairs, 2):
    column 0 the chosen reply, column 1 the rejected one."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, lengths = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        batch.pop("num_tokens", None)
        with autocast():
            values, counts = sequence_logps(model, batch, autocast)
        logps.append(values.view(-1, 2))
        lengths.append(counts.view(-1, 2))
    model.train(was_training)
    return torch.cat(logps).double().cpu(), torch.cat(lengths).double().cpu()


def ranking_metrics(logps: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """How a model ranks the replies of each pair by its own likelihood: the share of pairs whose chosen reply is
    more likely (summed log-probs, what DPO compares; and per token, which does not favour the shorter reply), the
    mean margin, and the mean log-probs of each."""
    margin = logps[:, 0] - logps[:, 1]
    per_token = logps / lengths.clamp(min=1)
    return {"pair_accuracy": 100 * (margin > 0).double().mean().item(),
            "pair_accuracy_per_token": 100 * (per_token[:, 0] > per_token[:, 1]).double().mean().item(),
            "pair_margin": margin.mean().item(), "chosen_logps": logps[:, 0].mean().item(),
            "rejected_logps": logps[:, 1].mean().item()}


def implicit_rewards(base_logps: torch.Tensor, tuned_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """DPO's view of a tuned policy with the base as reference: reward = beta * (log p_tuned - log p_base); the share
    of held-out pairs whose chosen reply gets the larger reward, and the mean margin."""
    reward = beta * (tuned_logps - base_logps)
    margin = reward[:, 0] - reward[:, 1]
    return {"reward_accuracy": 100 * (margin > 0).double().mean().item(), "reward_margin": margin.mean().item()}


def rewards(model, batch: dict[str, Any]) -> torch.Tensor:
    """A reward model's score of each sequence of a PairCollator batch (the token labels are not its labels)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                 ).logits.squeeze(-1).float()


@torch.no_grad()
def reward_model_metrics(model, loader) -> dict[str, float]:
    """A reward model on held-out pairs: the share it ranks right (pairwise accuracy) and the mean margin."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    for batch in loader:
        scores = rewards(model, {key: batch[key].to(device) for key in ("input_ids", "attention_mask")})
        margins.append(scores[0::2] - scores[1::2])
    model.train(was_training)
    margin = torch.cat(margins).double()
    return {"pair_accuracy": 100 * (margin > 0).double().mean().item(), "pair_margin": margin.mean().item()}
