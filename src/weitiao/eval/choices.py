"""Constrained choice for classification: score every allowed answer after the prompt, predict the most likely.

A candidate is scored as the reply the model was trained to give: the prompt conversation plus the candidate as
the assistant turn is rendered with the chat template, and the reply tokens are located exactly as training
labels them (weitiao.data.encode), so "pos<|im_end|>" competes with "neg<|im_end|>" (answer and end of turn), not a
bare first token. The score is the summed log-probability of those tokens; the argmax is the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weitiao.data.encode import IGNORE_INDEX, encode_conversation


def candidate_tokens(tokenizer, prompt: list[dict[str, str]], choice: str, max_length: int | None = None
                     ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the prompt answered with `choice`; only the reply is labelled. Longer than
    max_length: the start of the prompt is cut, the reply is kept."""
    encoded = encode_conversation(tokenizer, list(prompt) + [{"role": "assistant", "content": choice}],
                                  last_reply_only=True)
    ids, labels = encoded.input_ids, encoded.labels
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return ids, labels


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, prompts: Sequence[list[dict[str, str]]], choices: Sequence[str],
                          batch_size: int = 16, max_length: int | None = None, desc: str = "scoring choices"
                          ) -> list[list[float]]:
    """For each prompt, the log-likelihood of each choice as its reply: a len(prompts) x len(choices) table.
    Every (prompt, choice) pair is one row; rows are batched longest first with right padding."""
    from tqdm.auto import tqdm

    rows = [(i, j, *candidate_tokens(tokenizer, prompt, choice, max_length))
            for i, prompt in enumerate(prompts) for j, choice in enumerate(choices)]
    rows.sort(key=lambda row: len(row[2]), reverse=True)
    scores = [[0.0] * len(choices) for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
            batch = rows[start:start + batch_size]
            length = len(batch[0][2])
            input_ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for k, (_, _, ids, row_labels) in enumerate(batch):
                input_ids[k, :len(ids)] = torch.as_tensor(ids)
                labels[k, :len(ids)] = torch.as_tensor(row_labels)
                attention_mask[k, :len(ids)] = 1
            input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, -length:-1]  # prompt-learning methods prepend virtual tokens
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX  # the softmax is taken only where a reply token is predicted
            picked = torch.log_softmax(logits[scored].float(), dim=-1).gather(-1, targets[scored].unsqueeze(-1))
            totals = torch.zeros(len(batch), dtype=torch.float64, device=device)
            totals.index_add_(0, scored.nonzero()[:, 0], picked.squeeze(-1).double())
            for (i, j, _, _), total in zip(batch, totals.tolist()):
                scores[i][j] = total
    finally:
        model.train(was_training)
    return scores


def choose(scores: Sequence[Sequence[float]], choices: Sequence[str]) -> list[str]:
    """The most likely choice of each row (the first one on a tie)."""
    return [choices[max(range(len(choices)), key=lambda j: row[j])] for row in scores]


def confusion_matrix(references: Sequence[str], predictions: Sequence[str], choices: Sequence[str]
                     ) -> list[list[int]]:
    """matrix[r][p]: examples whose reference is choices[r] and prediction choices[p]."""
    index = {choice: k for k, choice in enumerate(choices)}
    matrix = [[0] * len(choices) for _ in choices]
    for reference, prediction in zip(references, predictions, strict=True):
        matrix[index[reference]][index[prediction]] += 1
    return matrix


def choice_metrics(matrix: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (percent) from a confusion matrix."""
    total = sum(map(sum, matrix))
    correct = sum(matrix[k][k] for k in range(len(matrix)))
    f1s = []
    for k in range(len(matrix)):
        predicted = sum(row[k] for row in matrix)
        actual = sum(matrix[k])
        f1s.append(2 * matrix[k][k] / (predicted + actual) if predicted + actual else 0.0)
    return {"choice_accuracy": 100.0 * correct / max(1, total), "choice_macro_f1": 100.0 * sum(f1s) / len(f1s)}
