"""Generation metrics: exact match with answer extractors, ROUGE-1/2/L (rouge-score) and BLEU-4 (sacrebleu).

Chinese: rouge-score's tokenizer drops every non-ASCII character, so text with CJK characters is segmented
with jieba before ROUGE; BLEU uses sacrebleu's own `zh` tokenizer. All scores are percentages (0-100).

An example may have several references (a list of strings instead of one string). Then exact match counts a hit
on any of them, ROUGE takes the best F1 over them (rouge-score's `score_multi`, per ROUGE variant) and BLEU is
sacrebleu's multi-reference corpus BLEU (n-gram counts clipped by the most frequent reference, brevity against the
closest reference length), the conventions of the ROUGE and BLEU papers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from weitiao.errors import ConfigError

EXTRACTORS = ("none", "last_number", "gsm8k", "json", "label", "regex", "sql")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def _normalise_number(text: str) -> str:
    value = text.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return _normalise_number(found[-1]) if found else None


def _gsm8k(text: str) -> str | None:
    """GSM8K's '#### 72' convention; falls back to the last number in the text."""
    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    return _normalise_number(match.group(1)) if match else _last_number(text)


def _first_json(text: str) -> Any | None:
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c in "{["):
        try:
            value, _ = decoder.raw_decode(text[start:])
            return value
        except json.JSONDecodeError:
            continue
    return None


def _json(text: str) -> str | None:
    value = _first_json(text)
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if value is not None else None


def make_extractor(name: str, pattern: str | None = None, labels: Sequence[str] | None = None
                   ) -> Callable[[str], str | None]:
    """A function from model output (or reference) to the answer compared by exact match."""
    if name == "none":
        return lambda text: " ".join(text.strip().split())
    if name == "last_number":
        return _last_number
    if name == "gsm8k":
        return _gsm8k
    if name == "json":
        return _json
    if name == "label":
        if not labels:
            raise ConfigError("extractor 'label' needs eval.labels, e.g. [neg, pos]")
        # A label counts as a whole word against ASCII letters and digits ("pos" is not in "purpose"); CJK labels
        # have no word boundaries, so they match anywhere.
        patterns = [(label, re.compile(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])", re.IGNORECASE))
                    for label in labels]

        def first_label(text: str) -> str | None:
            hits = [(match.start(), -len(label), label) for label, pattern in patterns
                    if (match := pattern.search(text))]
            return min(hits)[2] if hits else None

        return first_label
    if name == "regex":
        if not pattern:
            raise ConfigError("extractor 'regex' needs eval.regex, a pattern with one group")
        compiled = re.compile(pattern, re.DOTALL)

        def search(text: str) -> str | None:
            match = compiled.search(text)
            return (match.group(1) if compiled.groups else match.group(0)).strip() if match else None

        return search
    if name == "sql":
        from weitiao.eval.sql import normalise_sql

        return normalise_sql
    raise ConfigError(f"unknown extractor '{name}'; choose one of {', '.join(EXTRACTORS)}")


References = Sequence[str | Sequence[str]]
"""One reference per example, or a list of them."""


def reference_lists(references: References) -> list[list[str]]:
    return [[reference] if isinstance(reference, str) else list(reference) for reference in references]


def exact_match(predictions: Sequence[str], references: References, extractor: Callable[[str], str | None]
                ) -> float:
    hits = 0
    for prediction, options in zip(predictions, reference_lists(references), strict=True):
        answer = extractor(prediction)
        hits += answer is not None and any(answer == extractor(reference) for reference in options)
    return 100.0 * hits / max(1, len(references))


def json_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Valid-JSON rate and the share of the reference's top-level fields the prediction got right."""
    valid, fields_right, fields_total = 0, 0, 0
    for prediction, reference in zip(predictions, references, strict=True):
        got, want = _first_json(prediction), _first_json(reference)
        valid += got is not None
        if isinstance(want, dict):
            fields_total += len(want)
            if isinstance(got, dict):
                fields_right += sum(1 for key, value in want.items() if got.get(key) == value)
    n = max(1, len(references))
    return {"json_valid": 100.0 * valid / n, "json_field_accuracy": 100.0 * fields_right / max(1, fields_total)}


class _RougeTokenizer:
    """rouge-score's own tokenization for other text; jieba words for text with CJK characters."""

    def __init__(self, use_stemmer: bool):
        from rouge_score import tokenizers

        self.default = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)

    def tokenize(self, text: str) -> list[str]:
        if not has_cjk(text):
            return self.default.tokenize(text)
        import jieba

        return [w.lower() for w in jieba.lcut(text) if w.strip() and not re.fullmatch(r"[^\w]+", w)]


def rouge(predictions: Sequence[str], references: References, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over examples (with several references, the best F1 of each example)."""
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("jieba").setLevel(logging.WARNING)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_RougeTokenizer(use_stemmer))
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, options in zip(predictions, reference_lists(references), strict=True):
        scores = scorer.score_multi(options, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(1, len(references))
    return {f"rouge-{key[5:].lower()}": 100.0 * value / n for key, value in totals.items()}


def bleu4(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU-4 (multi-reference where examples have several); sacrebleu's zh tokenizer when the references
    are Chinese."""
    import sacrebleu

    options = reference_lists(references)
    tokenize = "zh" if any(has_cjk(r) for refs in options for r in refs) else "13a"
    # sacrebleu takes one stream per reference position; None where an example has fewer references.
    streams = [[refs[k] if k < len(refs) else None for refs in options] for k in range(max(map(len, options),
                                                                                           default=1))]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)


def generation_metrics(predictions: Sequence[str], references: References, extractor: str = "none",
                       pattern: str | None = None, labels: Sequence[str] | None = None) -> dict[str, float]:
    metrics = {"exact_match": exact_match(predictions, references, make_extractor(extractor, pattern, labels))}
    if extractor == "json":
        metrics.update(json_scores(predictions, [refs[0] for refs in reference_lists(references)]))
    metrics.update(rouge(predictions, references))
    metrics["bleu-4"] = bleu4(predictions, references)
    return metrics
