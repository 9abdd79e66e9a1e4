"""Batched forward passes that score examples one by one, and the on-disk cache of those scores.

Every model-based selection score is one reduction over the same loop, `forward_batches`: the mean loss of a
row's label tokens (IFD, perplexity) and how unlikely its reply is to end where it does (data clean's end check),
with the mean last hidden state of its prompt tokens (k-center embeddings),
the mean hidden state of an encoder (an embedding model), a judge's next-token probabilities over ratings, or a
classifier's output.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weitiao.data.encode import IGNORE_INDEX, Encoded
from weitiao.paths import cache_dir

# Part of every cache key: bump it when a change to the scoring code changes the numbers.
SCORING_VERSION = 2

Reduce = Callable[[Any, torch.Tensor, torch.Tensor, list[int]], Sequence[np.ndarray]]


def forward_batches(model, rows: Sequence[Sequence[int]], reduce: Reduce, batch_size: int, pad_token_id: int,
                    desc: str = "scoring", **forward_kwargs: Any) -> list[np.ndarray]:
    """Run `model` over token-id rows in batches and return `reduce(output, input_ids, attention_mask, indices)`'s
    values in the order of `rows`. Rows are right-padded; they are sorted by length so that a batch wastes little
    padding, longest first so that running out of memory happens at once rather than at the end."""
    from tqdm.auto import tqdm

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    device = next(model.parameters()).device
    results: list[np.ndarray] = [np.empty(0)] * len(rows)
    with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="ex", disable=not rows) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = max(len(rows[i]) for i in batch)
            input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, :len(rows[index])] = torch.as_tensor(rows[index])
                attention_mask[row, :len(rows[index])] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            output = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
            for index, value in zip(batch, reduce(output, input_ids, attention_mask, batch), strict=True):
                results[index] = value
            progress.update(len(batch))
    return results


def _padded_labels(encoded: Sequence[Encoded], batch: list[int], length: int, device) -> torch.Tensor:
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, index in enumerate(batch):
        labels[row, :len(encoded[index].labels)] = torch.as_tensor(encoded[index].labels)
    return labels.to(device)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def response_losses(model, encoded: Sequence[Encoded], batch_size: int, pad_token_id: int, embed: bool = False,
                    desc: str = "scoring", line_break_ids: Sequence[int] = ()) -> list[np.ndarray]:
    """Per row: [mean cross-entropy over its label tokens, end loss] (NaN without any), followed, with `embed`, by
    the mean last hidden state over the tokens before its first label (the prompt: with causal attention these
    states do not see the response, so one pass gives both the conditioned loss and an embedding of the
    instruction). The end loss is -log of the probability, where the last label token is predicted, of that token
    (the end-of-turn token of an uncut reply) or of any of `line_break_ids` (tokens that start a new line): how
    unlikely the model finds it that the reply ends, or at least its line, right there."""
    breaks = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    breaks[list(line_break_ids)] = True

    def reduce(output, input_ids, attention_mask, batch):
        labels = _padded_labels(encoded, batch, input_ids.shape[1], input_ids.device)
        targets = labels[:, 1:]
        counted = targets != IGNORE_INDEX
        # Cross-entropy on the label positions only, as contiguous (tokens, vocabulary) rows: the (batch, vocabulary,
        # positions) layout of a transposed call is several times slower on a CPU.
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        nll[counted] = F.cross_entropy(output.logits[:, :-1][counted].float(), targets[counted], reduction="none")
        losses = nll.sum(1) / counted.sum(1)  # NaN for a row without label tokens
        positions = torch.arange(targets.shape[1], device=targets.device)
        last = torch.where(counted, positions, -1).max(1).values.clamp(min=0)
        rows = torch.arange(len(batch), device=targets.device)
        probabilities = torch.softmax(output.logits[rows, last].float(), dim=-1)
        line_breaks = breaks[:probabilities.shape[-1]].to(probabilities.device)
        last_token = targets[rows, last].clamp(min=0)
        ending = (probabilities * line_breaks).sum(1) + torch.where(
            line_breaks[last_token], 0.0, probabilities.gather(1, last_token.unsqueeze(1)).squeeze(1))
        end_loss = torch.where(counted.any(1), -torch.log(ending), torch.nan)
        values = [losses.unsqueeze(1), end_loss.unsqueeze(1)]
        if embed:
            before_labels = (torch.cumsum(labels != IGNORE_INDEX, dim=1) == 0) & attention_mask.bool()
            values.append(_masked_mean(output.hidden_states[-1].float(), before_labels))
        return list(torch.cat(values, dim=1).cpu().numpy())

    return forward_batches(model, [e.input_ids for e in encoded], reduce, batch_size, pad_token_id, desc,
                           use_cache=False, output_hidden_states=embed)


def encoder_embeddings(model, rows: Sequence[Sequence[int]], batch_size: int, pad_token_id: int,
                       desc: str = "embedding") -> list[np.ndarray]:
    """Mean-pooled last hidden states of an encoder (sentence-transformers' mean pooling)."""

    def reduce(output, input_ids, attention_mask, batch):
        return list(_masked_mean(output.last_hidden_state.float(), attention_mask).cpu().numpy())

    return forward_batches(model, rows, reduce, batch_size, pad_token_id, desc)


def expected_ratings(model, rows: Sequence[Sequence[int]], rating_token_ids: Sequence[int], batch_size: int,
                     pad_token_id: int, desc: str = "judging") -> list[np.ndarray]:
    """Per row: the expected rating (1..len(rating_token_ids)) under the model's next-token probabilities after the
    row, renormalised over the rating tokens. Reading probabilities instead of generating never fails to parse, and
    a 3.6 says more than a sampled '4'."""
    ratings = torch.arange(1, len(rating_token_ids) + 1, dtype=torch.float64)
    token_ids = torch.as_tensor(list(rating_token_ids))

    def reduce(output, input_ids, attention_mask, batch):
        last = attention_mask.sum(1) - 1
        logits = output.logits[torch.arange(len(batch), device=last.device), last].float()
        probabilities = torch.softmax(logits[:, token_ids.to(logits.device)].double(), dim=-1).cpu()
        return list((probabilities @ ratings).unsqueeze(1).float().numpy())

    return forward_batches(model, rows, reduce, batch_size, pad_token_id, desc, use_cache=False)


def classifier_scores(model, rows: Sequence[Sequence[int]], label: int | None, batch_size: int, pad_token_id: int,
                      desc: str = "classifying") -> list[np.ndarray]:
    """Per row: a one-output model's output (a reward), else the probability of `label` (default: the last)."""

    def reduce(output, input_ids, attention_mask, batch):
        logits = output.logits.float()
        if logits.shape[-1] == 1:
            scores = logits[:, 0]
        else:
            scores = torch.softmax(logits, dim=-1)[:, logits.shape[-1] - 1 if label is None else label]
        return list(scores.unsqueeze(1).cpu().numpy())

    return forward_batches(model, rows, reduce, batch_size, pad_token_id, desc)


def model_fingerprint(name: str, resolved: str) -> dict[str, Any]:
    """What identifies a model's weights: for a folder the size and modification time of its weight and config
    files (retraining into the same folder changes them), for a hub id the id."""
    folder = Path(resolved)
    if not folder.is_dir():
        return {"model": name}
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return {"model": name, "path": str(folder.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def row_key(*parts: Any) -> str:
    """A cache key for one scored row: the hash of exactly what the model sees (token ids, label mask, ...)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


class ScoreCache:
    """Per-example scores on disk, float32 as the scoring functions return them (so a cached score equals a fresh
    one): one SQLite file per scoring setup (model fingerprint, what is scored, dtype), one row per example keyed by
    `row_key` of its tokens. So a rerun, another method that needs the same pass, or
    a cleaned or reordered version of the same data reuses every score it can."""

    def __init__(self, setup: dict[str, Any]):
        payload = json.dumps({**setup, "version": SCORING_VERSION}, sort_keys=True)
        name = hashlib.sha256(payload.encode()).hexdigest()[:20]
        folder = cache_dir("scores")
        (folder / f"{name}.json").write_text(payload, encoding="utf-8")  # says what the database holds
        self.path = folder / f"{name}.sqlite"
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value BLOB)")

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with sqlite3.connect(self.path) as db:
            for start in range(0, len(unique), 500):  # SQLite limits the parameters of one statement
                chunk = unique[start:start + 500]
                query = f"SELECT key, value FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
                for key, value in db.execute(query, chunk):
                    found[key] = np.frombuffer(value, dtype=np.float32)
        return found

    def store(self, items: dict[str, np.ndarray]) -> None:
        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)",
                           [(key, np.asarray(value, dtype=np.float32).tobytes()) for key, value in items.items()])


def cached_scores(cache: ScoreCache | None, keys: Sequence[str], compute: Callable[[list[int]], Sequence[np.ndarray]],
                  usable: Callable[[np.ndarray], bool] | None = None) -> tuple[list[np.ndarray], int]:
    """Scores for every key: from the cache where present (and `usable`), from `compute(indices of the missing
    ones)` otherwise (then stored). Returns the scores in order and how many were computed."""
    found = cache.lookup(keys) if cache is not None else {}
    if usable is not None:
        found = {key: value for key, value in found.items() if usable(value)}
    missing, seen = [], set()
    for index, key in enumerate(keys):
        if key not in found and key not in seen:  # a repeated example is scored once
            seen.add(key)
            missing.append(index)
    if missing:
        computed = dict(zip([keys[i] for i in missing], compute(missing), strict=True))
        if cache is not None:
            cache.store(computed)
        found.update(computed)
    return [found[key] for key in keys], len(missing)
