"""`weitiao data select`: keep the part of a dataset worth training on, at a budget (a ratio or a count).

Every example is a conversation; what is scored is its last assistant reply R, and its prompt P is every message
before R (system prompt, earlier turns, the last user turn). Both are rendered with the chat template the model
trains with (SelectConfig.template), through the same `encode_conversation` as training:

- loss with the prompt: P + R rendered as in training; the mean cross-entropy over R's tokens (its end-of-turn
  token included; earlier replies are not counted).
- loss alone: the conversation [user: "", assistant: R] in the same template, the mean over the same R tokens.
  The template's own default system prompt stays where the template adds one (it is part of the format the model
  is trained in); the example's system prompt does not (it is part of the instruction).
- IFD (Instruction-Following Difficulty, Li et al. 2024, "From Quantity to Quality", the Cherry LLM paper) =
  loss with the prompt / loss alone. Below 1 the instruction helps the model predict the response, and the
  higher the harder it is to follow; at 1 or above the instruction does not help at all, so the pair is
  discarded (SelectConfig.ifd_max).
- perplexity: exp(loss with the prompt).
- embedding: the mean last hidden state over P's tokens, from the same forward pass as the loss with the prompt
  (causal attention: those states do not see R); or an encoder's mean-pooled states of P's text.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weitiao.config import DataSource, ModelConfig, SelectConfig
from weitiao.data.dataset import Example, original_records
from weitiao.data.encode import (IGNORE_INDEX, Encoded, TemplateMismatch, encode_conversation, prompt_messages,
                                 render, truncate)
from weitiao.data.readers import side_file, write_records
from weitiao.data.scoring import (ScoreCache, cached_scores, classifier_scores, encoder_embeddings, expected_ratings,
                                  model_fingerprint, response_losses, row_key)
from weitiao.errors import ConfigError, DataError, ModelLoadError

# Scores that are one number per example (written to OUT.scores.jsonl and plotted), in that order.
SCORE_NAMES = ("ifd", "loss_with_prompt", "loss_alone", "perplexity", "quality")


@dataclass
class Selection:
    method: str
    budget: int
    selected: list[int]
    """Indices into the examples, in input order."""
    scores: dict[str, np.ndarray]
    """Per example (NaN where a score could not be computed); `embedding` is one row per example."""
    excluded: dict[int, str]
    """Examples that could not be selected, and why."""
    clusters: np.ndarray | None = None
    timing: dict[str, Any] = field(default_factory=dict)


def selection_budget(config: SelectConfig, total: int) -> int:
    if config.count is not None:
        return min(config.count, total)
    return min(total, max(1, round(config.ratio * total)))


# ---------------------------------------------------------------------------------------------
# What the model sees


def _only_last_reply(labels: list[int]) -> list[int]:
    """Keep the labels of the last reply only: the last run of label tokens (replies are separated by the next user
    turn, whose tokens are never labels)."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


def _first_label_tokens(encoded: Encoded, count: int) -> Encoded:
    """`encoded` cut right after its first `count` label tokens; with none, its first token without a label (a row
    the model can run that scores NaN)."""
    if count == 0:
        return Encoded(encoded.input_ids[:1], [IGNORE_INDEX])
    seen = 0
    for position, label in enumerate(encoded.labels):
        if seen == count:
            return Encoded(encoded.input_ids[:position], encoded.labels[:position])
        seen += label != IGNORE_INDEX
    return encoded


def _where(example: Example) -> dict[str, Any]:
    return {"path": example.source, "record": example.record}


def encode_for_scoring(tokenizer, examples: list[Example], max_length: int
                       ) -> tuple[list[Encoded], list[Encoded], list[Encoded | None]]:
    """Per example: (prompt + last reply, labels on that reply), cut at max_length as training cuts it; the reply
    alone after an empty user turn, labels on the same number of reply tokens; and None where the whole reply, its
    end-of-turn token included, is within max_length, else the conversation's last max_length tokens (where the
    reply ends: what data clean's end check reads)."""
    with_prompt, alone, tails = [], [], []
    for example in examples:
        if example.messages is None:
            raise DataError("selection scores conversations, and this record is plain text", **_where(example))
        _, reply = prompt_messages(example.messages)
        try:
            full = encode_conversation(tokenizer, example.messages, tools=example.tools)
            bare = encode_conversation(tokenizer, [{"role": "user", "content": ""},
                                                   {"role": "assistant", "content": reply}])
        except TemplateMismatch as error:
            raise DataError(str(error), **_where(example)) from None
        full = Encoded(full.input_ids, _only_last_reply(full.labels))
        kept, _ = truncate(full, max_length, "right")
        # No reply token within max_length: scored without labels, i.e. NaN, and excluded.
        kept = kept or Encoded(full.input_ids[:max_length], [IGNORE_INDEX] * min(max_length, len(full.labels)))
        with_prompt.append(kept)
        reply_tokens = sum(label != IGNORE_INDEX for label in kept.labels)
        alone.append(_first_label_tokens(bare, reply_tokens))
        whole = reply_tokens == sum(label != IGNORE_INDEX for label in full.labels)
        tails.append(None if whole else Encoded(full.input_ids[-max_length:], full.labels[-max_length:]))
    return with_prompt, alone, tails


def line_break_ids(tokenizer) -> list[int]:
    """The ids of the tokens whose text starts a new line."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if text.startswith(("\n", "\r"))]


def _prompt_text(messages: list[dict[str, str]]) -> str:
    prompt, _ = prompt_messages(messages)
    return "\n\n".join(message["content"] for message in prompt)


def _fit(ids: list[int], max_length: int) -> list[int]:
    """At most max_length tokens, cut in the middle: a judge prompt's instructions are at its start and the reply's
    end and the answer cue at its end, and a classifier reads the last token."""
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


def _judge_rows(tokenizer, examples: list[Example], judge_prompt: str, max_length: int) -> list[list[int]]:
    rows = []
    for example in examples:
        prompt, reply = prompt_messages(example.messages)
        question = judge_prompt.replace("{prompt}", prompt[-1]["content"]).replace("{response}", reply)
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        rows.append(_fit(tokenizer(text, add_special_tokens=False)["input_ids"], max_length))
    return rows


def _classifier_rows(tokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    """The conversation in the classifier's own chat template (reward models are trained on it), else as plain
    'prompt\\n\\nreply' text."""
    rows = []
    for example in examples:
        if getattr(tokenizer, "chat_template", None):
            text = render(tokenizer, example.messages, tools=example.tools)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt, reply = prompt_messages(example.messages)
            ids = tokenizer(prompt[-1]["content"] + "\n\n" + reply)["input_ids"]
        rows.append(_fit(ids, max_length))
    return rows


# ---------------------------------------------------------------------------------------------
# Scoring


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _Scorer:
    """A scoring model and its passes over the examples: each pass is cached per row and timed, and the model is
    loaded only when some row is missing from the cache (a rerun loads nothing but the tokenizer)."""

    def __init__(self, config: SelectConfig, model_name: str, kind: str, timing: dict[str, Any]):
        from weitiao.models import load_tokenizer, resolve_model

        self.config, self.model_name, self.kind, self.timing = config, model_name, kind, timing
        self.resolved = resolve_model(model_name)
        self.tokenizer = load_tokenizer(self.resolved)
        self.model = None

    def _load(self):
        if self.model is None:
            started = time.time()
            self.model = _load_scoring_model(self.resolved, self.model_name, self.kind, self.config.dtype)
            self.timing["model_load_s"] = self.timing.get("model_load_s", 0.0) + time.time() - started
        return self.model

    def run(self, name: str, keys: list[str], compute: Callable[[Any, list[int]], list[np.ndarray]],
            usable: Callable[[np.ndarray], bool] | None = None) -> list[np.ndarray]:
        """Scores of one pass, one per key; `compute(model, indices)` scores the rows missing from the cache (or
        whose cached value is not `usable`)."""
        cache = None
        if self.config.cache:
            cache = ScoreCache({**model_fingerprint(self.model_name, self.resolved), "pass": name,
                                "dtype": self.config.dtype, "device": _device()})
        started, loading_before = time.time(), self.timing.get("model_load_s", 0.0)
        values, computed = cached_scores(cache, keys, lambda missing: compute(self._load(), missing), usable)
        seconds = time.time() - started - (self.timing.get("model_load_s", 0.0) - loading_before)
        self.timing["passes"][name] = {"model": self.model_name, "computed": computed, "cached": len(keys) - computed,
                                       "seconds": round(seconds, 2),
                                       "rows_per_s": round(computed / seconds, 2) if computed else None}
        return values


def _load_scoring_model(resolved: str, name: str, kind: str, dtype: str):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from weitiao.models import load_model, pick_dtype

    if kind == "causal":
        model, _, _ = load_model(ModelConfig(name_or_path=name, dtype=dtype))
    else:
        loader = AutoModelForSequenceClassification if kind == "classifier" else AutoModel
        try:
            model = loader.from_pretrained(resolved, dtype=pick_dtype(dtype))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load '{name}' as a {kind} model: {error}") from None
    return model.to(_device()).eval()


def _loss_scores(examples: list[Example], config: SelectConfig, timing: dict[str, Any], embed: bool,
                 alone: bool, cut_ends: bool = False) -> dict[str, np.ndarray]:
    """loss_with_prompt, perplexity and end_loss (-log of the probability that the reply ends, or breaks its line,
    where it ends; where max_length cut its end off NaN, or with `cut_ends` read from one more pass over the
    conversation's last max_length tokens); with `embed` the prompt embeddings of the same pass; with `alone` the
    reply-alone losses and IFD."""
    from weitiao.config import DataConfig
    from weitiao.data.templates import install_template

    scorer = _Scorer(config, config.model, "causal", timing)
    tokenizer = scorer.tokenizer
    install_template(tokenizer, DataConfig(template=config.template))
    with_prompt_rows, alone_rows, tails = encode_for_scoring(tokenizer, examples, config.max_length)

    def losses(rows: list[Encoded], with_embedding: bool, desc: str):
        return lambda model, missing: response_losses(model, [rows[i] for i in missing], config.batch_size,
                                                      tokenizer.pad_token_id, with_embedding, desc,
                                                      line_break_ids(tokenizer))

    keys = [row_key(row.input_ids, row.labels) for row in with_prompt_rows]
    # A cached [loss, end loss] lacks the embedding k-center needs; a cached [loss, end loss, embedding...] serves
    # every method.
    values = scorer.run("with_prompt", keys, losses(with_prompt_rows, embed, "scoring with prompt"),
                        usable=(lambda value: len(value) > 2) if embed else None)
    scores = {"loss_with_prompt": np.array([value[0] for value in values])}
    scores["perplexity"] = np.exp(np.minimum(scores["loss_with_prompt"], 50.0))
    scores["end_loss"] = np.array([value[1] if tail is None else np.nan for value, tail in zip(values, tails)])
    cut = [index for index, tail in enumerate(tails) if tail is not None]
    if cut_ends and cut:
        rows = [tails[index] for index in cut]
        ends = scorer.run("reply end", [row_key(row.input_ids, row.labels) for row in rows],
                          losses(rows, False, "scoring the ends of long replies"))
        scores["end_loss"][cut] = [value[1] for value in ends]
    if embed:
        scores["embedding"] = np.stack([value[2:] for value in values])
    if alone:
        keys = [row_key(row.input_ids, row.labels) for row in alone_rows]
        values = scorer.run("alone", keys, losses(alone_rows, False, "scoring response alone"))
        scores["loss_alone"] = np.array([value[0] for value in values])
        with np.errstate(divide="ignore", invalid="ignore"):
            scores["ifd"] = scores["loss_with_prompt"] / scores["loss_alone"]
    return scores


def ifd_scores(examples: list[Example], config: SelectConfig, embed: bool = False
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """loss_with_prompt, loss_alone, perplexity, IFD and end_loss (every reply's end read) of every example, with
    `embed` the prompt embeddings of the same pass, and how long the passes took."""
    timing: dict[str, Any] = {"passes": {}}
    return _loss_scores(examples, config, timing, embed=embed, alone=True, cut_ends=True), timing


def _encoder_embeddings(examples: list[Example], config: SelectConfig, timing: dict[str, Any]
                        ) -> np.ndarray:
    encoder = _Scorer(config, config.embedding_model, "encoder", timing)
    tokenizer = encoder.tokenizer
    rows = [tokenizer(_prompt_text(example.messages), truncation=True, max_length=config.max_length)["input_ids"]
            for example in examples]
    values = encoder.run("embedding", [row_key(row) for row in rows], lambda model, missing: encoder_embeddings(
        model, [rows[i] for i in missing], config.batch_size, tokenizer.pad_token_id or 0))
    return np.stack(values)


def _quality_scores(examples: list[Example], config: SelectConfig, timing: dict[str, Any]) -> np.ndarray:
    from weitiao.config import DataConfig
    from weitiao.data.templates import install_template

    scorer = _Scorer(config, config.scorer_model or config.model,
                     "causal" if config.scorer == "judge" else "classifier", timing)
    tokenizer = scorer.tokenizer
    if config.scorer == "judge":
        install_template(tokenizer, DataConfig(template=config.template))
        ratings = _rating_token_ids(tokenizer)
        rows = _judge_rows(tokenizer, examples, config.judge_prompt, config.max_length)
        values = scorer.run("judge", [row_key(row, ratings) for row in rows],
                            lambda model, missing: expected_ratings(model, [rows[i] for i in missing], ratings,
                                                                    config.batch_size, tokenizer.pad_token_id))
    else:
        rows = _classifier_rows(tokenizer, examples, config.max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def classify(model, missing):
            if model.config.pad_token_id is None:  # needed to find each row's last token
                model.config.pad_token_id = pad_id
            return classifier_scores(model, [rows[i] for i in missing], config.classifier_label, config.batch_size,
                                     pad_id)

        values = scorer.run("classifier", [row_key(row, config.classifier_label) for row in rows], classify)
    return np.array([value[0] for value in values])


def score_examples(examples: list[Example], config: SelectConfig) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, Any]]:
    """The scores config.method needs (see the module docstring), and how long they took."""
    timing: dict[str, Any] = {"passes": {}}
    scores: dict[str, np.ndarray] = {}
    uses_ifd = config.method in ("ifd", "ifd+kcenter")
    uses_embedding = config.method in ("kcenter", "ifd+kcenter")
    embed_with_scoring_model = uses_embedding and config.embedding_model is None
    if uses_ifd or config.method == "perplexity" or config.max_perplexity is not None or embed_with_scoring_model:
        scores.update(_loss_scores(examples, config, timing, embed_with_scoring_model, uses_ifd))
    if uses_embedding and config.embedding_model is not None:
        scores["embedding"] = _encoder_embeddings(examples, config, timing)
    if config.method == "quality":
        scores["quality"] = _quality_scores(examples, config, timing)

    if "model_load_s" in timing:
        timing["model_load_s"] = round(timing["model_load_s"], 2)
    timing["scoring_s"] = round(sum(p["seconds"] for p in timing["passes"].values()), 2)
    fresh = timing["passes"] and all(p["computed"] == len(examples) for p in timing["passes"].values())
    timing["examples_per_s"] = round(len(examples) / timing["scoring_s"], 2) if fresh and timing["scoring_s"] \
        else None
    return scores, timing


def _rating_token_ids(tokenizer) -> list[int]:
    ids = []
    for rating in "12345":
        encoded = tokenizer(rating, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ConfigError(f"the judge's tokenizer splits the rating '{rating}' into {len(encoded)} tokens; "
                              "use another scorer_model")
        ids.append(encoded[0])
    return ids


# ---------------------------------------------------------------------------------------------
# Choosing


def k_center_greedy(points: np.ndarray, k: int, first: int = 0) -> list[int]:
    """k points of `points`, each the farthest (Euclidean) from those already chosen, starting at `first`
    (Sener & Savarese 2018). Their balls of the final covering radius cover every point: the most diverse subset a
    greedy pass finds, at k passes over the data."""
    points = np.asarray(points, dtype=np.float64)
    chosen = [first]
    nearest = np.linalg.norm(points - points[first], axis=1)
    nearest[first] = -1.0  # never chosen twice, even among duplicates
    for _ in range(min(k, len(points)) - 1):
        index = int(np.argmax(nearest))
        chosen.append(index)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[index], axis=1))
        nearest[index] = -1.0
    return chosen


def proportional_quotas(sizes: list[int], budget: int) -> list[int]:
    """Split `budget` over groups: one each while the budget lasts, the rest in proportion to what each group has
    left (largest remainders), never more than a group holds."""
    quotas = [1 if budget >= len(sizes) else 0 for _ in sizes]
    remaining = min(budget, sum(sizes)) - sum(quotas)
    room = [size - quota for size, quota in zip(sizes, quotas, strict=True)]
    if remaining > 0:
        shares = [remaining * r / sum(room) for r in room]
        extra = [int(share) for share in shares]
        leftover = remaining - sum(extra)
        by_remainder = sorted(range(len(sizes)), key=lambda i: (extra[i] - shares[i], i))
        for i in by_remainder[:leftover]:
            extra[i] += 1
        quotas = [quota + e for quota, e in zip(quotas, extra, strict=True)]
    return quotas


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    """Unit length: Euclidean distance then orders like cosine distance, which mean-pooled states call for (their
    norms vary with length more than with meaning)."""
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(embeddings: np.ndarray, count: int, block: int = 1024) -> np.ndarray:
    """For each row, the indices of the `count` other rows most similar to it by cosine similarity (most similar
    first), computed a block of rows at a time so memory stays block x rows."""
    points = _normalised(embeddings.astype(np.float32))
    neighbours = np.empty((len(points), count), dtype=np.int64)
    for start in range(0, len(points), block):
        similarity = points[start:start + block] @ points.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
        order = np.argsort(-similarity[rows[:, None], top], axis=1, kind="stable")
        neighbours[start:start + block] = top[rows[:, None], order]
    return neighbours


def choose(scores: dict[str, np.ndarray], config: SelectConfig, total: int
           ) -> tuple[list[int], dict[int, str], np.ndarray | None]:
    """The selected indices (input order), the excluded ones with a reason, and cluster ids (ifd+kcenter)."""
    budget = selection_budget(config, total)
    excluded: dict[int, str] = {}

    def exclude(mask: np.ndarray, reason: str) -> None:
        for index in np.flatnonzero(mask):
            excluded.setdefault(int(index), reason)

    if "loss_with_prompt" in scores:
        exclude(np.isnan(scores["loss_with_prompt"]), "no reply token within max_length")
    if config.max_perplexity is not None:
        exclude(scores["perplexity"] > config.max_perplexity, f"perplexity above {config.max_perplexity}")
    if "ifd" in scores:
        exclude(~(scores["ifd"] < config.ifd_max), f"IFD at or above {config.ifd_max}")
    if "quality" in scores:
        exclude(np.isnan(scores["quality"]), "no quality score")
    eligible = np.array([i for i in range(total) if i not in excluded], dtype=int)
    rng = random.Random(config.seed)
    clusters = None

    def top(values: np.ndarray, count: int, candidates: np.ndarray = eligible) -> list[int]:
        order = np.argsort(-values[candidates], kind="stable")  # ties: input order
        return [int(i) for i in candidates[order[:count]]]

    if config.method == "random":
        picked = rng.sample(list(eligible), min(budget, len(eligible)))
    elif config.method in ("ifd", "quality"):
        picked = top(scores[config.method], budget)
    elif config.method == "perplexity":
        perplexity = scores["perplexity"]
        preference = {"low": -perplexity, "high": perplexity,
                      "middle": -np.abs(perplexity - np.median(perplexity[eligible]))}[config.perplexity_keep]
        picked = top(preference, budget)
    elif config.method == "kcenter":
        points = _normalised(scores["embedding"][eligible])
        picked = [int(eligible[i]) for i in k_center_greedy(points, budget, rng.randrange(len(eligible)))]
    else:  # ifd+kcenter: diverse first (k-center clusters), then the hardest of each cluster
        points = _normalised(scores["embedding"][eligible])
        count = min(config.clusters or max(1, budget // 10), budget, len(eligible))
        centers = points[k_center_greedy(points, count, rng.randrange(len(eligible)))]
        # Nearest center of each point; |a-b|^2 = |a|^2 + |b|^2 - 2ab with unit vectors.
        assignment = np.argmax(points @ centers.T, axis=1)
        clusters = np.full(total, -1)
        clusters[eligible] = assignment
        members = [eligible[assignment == c] for c in range(count)]
        quotas = proportional_quotas([len(m) for m in members], budget)
        picked = [index for group, quota in zip(members, quotas, strict=True)
                  for index in top(scores["ifd"], quota, group)]
    return sorted(picked), excluded, clusters


def select_examples(examples: list[Example], config: SelectConfig) -> Selection:
    if not examples:
        raise DataError("no examples to select from")
    scores, timing = score_examples(examples, config)
    selected, excluded, clusters = choose(scores, config, len(examples))
    return Selection(config.method, selection_budget(config, len(examples)), selected, scores, excluded, clusters,
                     timing)


# ---------------------------------------------------------------------------------------------
# Output


def _stats(values: np.ndarray) -> dict[str, float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    return {"mean": float(values.mean()), **{f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90)},
            "min": float(values.min()), "max": float(values.max())}


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def plot_histograms(selection: Selection, path: Path) -> bool:
    """One histogram per score: all examples and the selected ones. False when there is no score to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in SCORE_NAMES if name in selection.scores
             and not np.all(np.isnan(selection.scores[name]))]
    if not names:
        return False
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    chosen = np.zeros(len(next(iter(selection.scores.values()))), dtype=bool)
    chosen[selection.selected] = True
    for axis, name in zip(axes[0], names, strict=True):
        values = selection.scores[name]
        if name == "perplexity":  # spans orders of magnitude
            values, name = np.log10(values), "log10 perplexity"
        finite = ~np.isnan(values) & np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=40)
        axis.hist(values[finite], bins=bins, color="#bbbbbb", label=f"all ({finite.sum()})")
        axis.hist(values[finite & chosen], bins=bins, color="#d62728", alpha=0.8,
                  label=f"selected ({(finite & chosen).sum()})")
        axis.set_title(name)
        axis.legend(fontsize=8)
    figure.suptitle(f"weitiao data select --method {selection.method}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write_selection(examples: list[Example], selection: Selection, output: Path, config: SelectConfig,
                    source: DataSource, skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """OUT (the selected records as they are in the input), OUT.scores.jsonl (every example: scores, selected or
    why excluded), OUT.summary.json and OUT.scores.png. `skipped`: records the reader could not read (on_error
    skip), by reason. Returns the summary."""
    records = original_records([examples[i] for i in selection.selected], source)
    write_records(records, output)
    chosen = set(selection.selected)
    names = [name for name in SCORE_NAMES if name in selection.scores]
    scores_path = side_file(output, "scores.jsonl")
    with scores_path.open("w", encoding="utf-8") as handle:
        for index, example in enumerate(examples):
            row = {"index": index, "source": example.source, "record": example.record,
                   "selected": index in chosen, "excluded": selection.excluded.get(index)}
            row.update({name: _plain(selection.scores[name][index]) for name in names})
            if selection.clusters is not None:
                row["cluster"] = int(selection.clusters[index])
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot = side_file(output, "scores.png")
    plotted = plot_histograms(selection, plot)
    selected = np.array(selection.selected, dtype=int)
    summary = {
        "input": source.path, "output": str(output), "method": selection.method, "examples": len(examples),
        "skipped": dict(skipped or {}),
        "budget": selection.budget, "selected": len(selection.selected),
        "eligible": len(examples) - len(selection.excluded),
        "excluded": dict(Counter(selection.excluded.values())),
        "template": config.template, "max_length": config.max_length,
        "scores": {name: {"all": _stats(selection.scores[name]), "selected": _stats(selection.scores[name][selected])}
                   for name in names},
        "timing": selection.timing,
        "files": {"scores": str(scores_path), "plot": str(plot) if plotted else None},
    }
    side_file(output, "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"selected {summary['selected']} of {summary['examples']} examples ({summary['method']}, budget "
             f"{summary['budget']}) -> {summary['output']}"]
    if summary["skipped"]:
        lines.append(f"skipped {sum(summary['skipped'].values())} records that could not be read: "
                     + "; ".join(f"{n} x {reason}" for reason, n in summary["skipped"].items()))
    if summary["excluded"]:
        lines.append("excluded: " + ", ".join(f"{n} {reason}" for reason, n in summary["excluded"].items()))
    if summary["selected"] < summary["budget"]:
        lines.append(f"warning: only {summary['eligible']} examples were eligible, fewer than the budget")
    for name, stats in summary["scores"].items():
        if stats["all"] and stats["selected"]:
            lines.append(f"{name:>16}: all median {stats['all']['p50']:.4g} (p10 {stats['all']['p10']:.4g}, p90 "
                         f"{stats['all']['p90']:.4g}); selected median {stats['selected']['p50']:.4g}")
    timing = summary["timing"]
    for name, scoring in timing["passes"].items():
        speed = f", {scoring['rows_per_s']} examples/s" if scoring["rows_per_s"] else ""
        lines.append(f"pass {name}: {scoring['computed']} scored in {scoring['seconds']} s{speed}, "
                     f"{scoring['cached']} from the cache")
    files = summary["files"]
    lines.append(f"scores: {files['scores']}" + (f"; histograms: {files['plot']}" if files["plot"] else ""))
    return "\n".join(lines)

