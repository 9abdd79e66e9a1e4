"""Loss and perplexity of a model on a tokenized dataset: on the trained (response) tokens, which is what
SFT optimises, and on all tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weitiao.data.encode import IGNORE_INDEX


@torch.no_grad()
def evaluate_loss(model, loader, accelerator=None) -> dict[str, float]:
    """Token-weighted mean losses over `loader`, summed over all processes."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    # [response loss sum, response tokens, all-token loss sum, all tokens]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in loader:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, -input_ids.shape[1]:-1].float()  # prompt-learning methods prepend virtual tokens
        response_targets = batch["labels"].to(device)[:, 1:]
        all_targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        nll = F.cross_entropy(logits.transpose(1, 2), all_targets, ignore_index=IGNORE_INDEX, reduction="none")
        response = response_targets != IGNORE_INDEX
        every = all_targets != IGNORE_INDEX
        totals += torch.stack([nll[response].sum().double(), response.sum().double(),
                               nll[every].sum().double(), every.sum().double()])
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    values = totals.tolist()
    loss = values[0] / values[1] if values[1] else float("nan")
    loss_all = values[2] / values[3] if values[3] else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(values[1]),
            "loss_all_tokens": loss_all, "perplexity_all_tokens": math.exp(min(loss_all, 50.0))}
