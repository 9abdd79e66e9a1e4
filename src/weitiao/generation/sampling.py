"""The next token of every row of a batch, each row with its own sampling settings.

Greedy rows take the argmax. Sampled rows are grouped by (temperature, top_p) and filtered with transformers'
own logits warpers (no top-k cut: temperature and top_p alone decide, as in OpenAI's API); a seeded request
draws from its own generator, so its reply does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from weitiao.generation.requests import Generation


def next_tokens(logits: torch.Tensor, rows: list[Generation]) -> list[int]:
    """logits (len(rows), vocab), float32 -> one token id per row."""
    tokens = logits.argmax(dim=-1)
    groups: dict[tuple[float, float], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            groups[row.params.temperature, row.params.top_p].append(i)
    for (temperature, top_p), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        scores = TemperatureLogitsWarper(temperature)(None, logits[index])
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        probs = scores.softmax(dim=-1)
        seeded = [j for j, i in enumerate(members) if rows[i].generator is not None]
        unseeded = [j for j, i in enumerate(members) if rows[i].generator is None]
        if unseeded:
            tokens[index[unseeded]] = torch.multinomial(probs[unseeded], 1)[:, 0]
        for j in seeded:
            tokens[members[j]] = torch.multinomial(probs[j], 1, generator=rows[members[j]].generator)[0]
    return tokens.tolist()
