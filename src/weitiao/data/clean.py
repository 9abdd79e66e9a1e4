"""`weitiao data clean`: remove broken, empty, cut-off, off-language and duplicate records, and account for each.

The rules run in this order, and the first that applies names the reason a record is removed:

  invalid, empty_response   the record cannot be read as a conversation (the reader's own checks)
  empty_response            a reply that is empty once zero-width characters and outer whitespace are removed
  short_response, short_prompt, too_long   length limits in characters
  language                  replies not in the wanted language (share of CJK characters / Latin-script words)
  truncated                 a last reply that looks cut off
  exact_duplicate           same normalised text as an earlier kept record
  near_duplicate            MinHash-estimated Jaccard similarity of character n-grams >= threshold with an
                            earlier kept record (datasketch's LSH finds the candidates)

Kept records are written as they are in the input (every column, the file's own field names); every removed one
goes to OUT.removed.jsonl with its rule, a detail (e.g. which record it duplicates) and the original record.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weitiao.config import CleanConfig, DataSource
from weitiao.data.dataset import Example, load_source, source_records
from weitiao.data.readers import SUPPORTED_SUFFIXES, Record, expand_paths, write_records
from weitiao.data.tools import message_text
from weitiao.errors import ConfigError, DataError

RULES = ("invalid", "empty_response", "short_response", "short_prompt", "too_long", "language", "truncated",
         "exact_duplicate", "near_duplicate")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A CJK character is one unit; a run of other letters is one word (digits and underscores are not letters).
_UNITS = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
# Characters a finished text does not end with: a separator or an opening bracket / quote.
_UNFINISHED_ENDINGS = set(",;:、，；：([{（【《「『“‘")


@dataclass
class Removed:
    rule: str
    detail: str
    source: str
    record: int
    original: dict[str, Any]


@dataclass
class CleanResult:
    records: int
    kept: list[Example]
    originals: list[dict[str, Any]]
    """The kept records exactly as their files hold them, in the order of `kept`."""
    removed: list[Removed]
    counts: Counter = field(default_factory=Counter)


def side_file(output: Path, name: str) -> Path:
    """OUT.jsonl -> OUT.<name> next to it."""
    return output.with_name(output.name.removesuffix(output.suffix) + "." + name)


def check_output(output: Path, source: str) -> Path:
    """Refuse, before any work, an output file type that cannot be written or an output that is the input."""
    if output.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported output file type '{output.suffix}' (use {', '.join(SUPPORTED_SUFFIXES)})",
                        path=str(output))
    if output.exists() and any(output.resolve() == path.resolve() for path in expand_paths(source)):
        raise DataError("the output would overwrite the input; choose another output file", path=str(output))
    return output


def original_records(examples: list[Example], source: DataSource) -> list[dict[str, Any]]:
    """The records behind these examples (read from `source`) exactly as their files hold them (every column, the
    file's own field names), in the examples' order: what `clean` and `select` write, so nothing is lost."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for example in examples:
        wanted[example.source].add(example.record)
    found = {}
    for path, numbers in wanted.items():
        for record in source_records(source, Path(path)):
            if record.number in numbers:
                found[(path, record.number)] = record.data
    return [found[(example.source, example.record)] for example in examples]


def visible(text: str) -> str:
    return _ZERO_WIDTH.sub("", text).strip()


def normalise(text: str) -> str:
    """What duplicates are compared on: NFKC (full-width and half-width forms agree), no zero-width characters,
    case-folded, whitespace runs as one space."""
    return " ".join(_ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text)).casefold().split())


def language_share(text: str, language: str) -> float | None:
    """Share of `language` among the text's units (CJK characters and words), code blocks left out; None when the
    text has no letters."""
    units = _UNITS.findall(_CODE_BLOCK.sub(" ", text))
    if not units:
        return None
    if language == "zh":
        hits = sum(1 for unit in units if len(unit) == 1 and re.match(f"[{_CJK}]", unit))
    else:
        hits = sum(1 for unit in units if _LATIN_WORD.fullmatch(unit))
    return hits / len(units)


def looks_truncated(reply: str) -> str | None:
    """Why the reply looks cut off, or None."""
    text = reply.rstrip()
    if text.count("```") % 2:
        return "unclosed ``` code block"
    if text and text[-1] in _UNFINISHED_ENDINGS:
        return f"ends with '{text[-1]}'"
    return None


def _parts(messages: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """The prompts (user turns) and replies of a conversation."""
    return ([m["content"] for m in messages if m["role"] == "user"],
            [message_text(m) for m in messages if m["role"] == "assistant"])


def _rule_violation(messages: list[dict[str, str]], config: CleanConfig) -> tuple[str, str] | None:
    """The first per-record rule the conversation breaks, as (rule, detail)."""
    prompts, replies = _parts(messages)
    shortest = min(len(visible(reply)) for reply in replies)
    if shortest == 0:
        return "empty_response", "a reply is empty (or only invisible characters)"
    if shortest < config.min_response_chars:
        return "short_response", f"a reply of {shortest} characters (minimum {config.min_response_chars})"
    if prompts and len(visible(prompts[-1])) < config.min_prompt_chars:
        return "short_prompt", f"prompt of {len(visible(prompts[-1]))} characters (minimum {config.min_prompt_chars})"
    total = sum(len(m["content"]) for m in messages)
    if config.max_chars is not None and total > config.max_chars:
        return "too_long", f"{total} characters (maximum {config.max_chars})"
    if config.language != "any":
        share = language_share("\n".join(replies), config.language)
        if share is not None and share < config.language_share:
            return "language", f"{config.language} share {share:.2f} (minimum {config.language_share})"
    if config.truncated and (why := looks_truncated(replies[-1])):
        return "truncated", why
    return None


def dedup_text(messages: list[dict[str, str]], on: str) -> str:
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    chosen = {"conversation": messages, "prompt": messages[:last_reply],
              "response": messages[last_reply:last_reply + 1]}[on]
    return "\n".join(f"{m['role']}: {normalise(message_text(m))}" for m in chosen)


class NearDuplicateIndex:
    """Kept texts in a MinHash LSH index; `find` returns the most similar kept text at or above the threshold.
    LSH only proposes candidates, so each is checked against the threshold with its MinHash estimate."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError:  # LSH needs at least 2 bands of rows; a threshold near 1 leaves one
            raise ConfigError(f"near_dup_threshold {threshold} is too close to 1 for num_perm {num_perm}; lower it "
                              "or raise num_perm (identical records are exact_dedup's job)") from None
        self.signatures: dict[int, Any] = {}

    def signature(self, text: str):
        from datasketch import MinHash

        size = self.shingle_size
        shingles = {text[i:i + size] for i in range(max(1, len(text) - size + 1))}
        minhash = MinHash(num_perm=self.num_perm, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def find(self, signature) -> tuple[int, float] | None:
        scored = [(signature.jaccard(self.signatures[key]), key) for key in self.lsh.query(signature)]
        scored = [(similarity, key) for similarity, key in scored if similarity >= self.threshold]
        if not scored:
            return None
        similarity, key = max(scored, key=lambda item: (item[0], -item[1]))
        return key, similarity

    def add(self, key: int, signature) -> None:
        self.lsh.insert(key, signature)
        self.signatures[key] = signature


def clean_examples(source: DataSource, config: CleanConfig) -> CleanResult:
    """Apply the rules to every record of `source`; keep or remove each, counting removals per rule."""
    rejected: list[tuple[Record, DataError]] = []
    examples, stats = load_source(source, on_error="skip", skipped=rejected)
    if examples and examples[0].messages is None:
        raise DataError("clean works on conversations, and this source is plain text", path=source.path)
    # The reader's own "empty response" check is this command's empty_response rule; its other checks are invalid.
    removed = [Removed("empty_response" if error.reason == "empty response" else "invalid", str(error),
                       record.path, record.number, record.data) for record, error in rejected]
    originals = original_records(examples, source)
    kept, kept_originals = [], []
    seen_exact: dict[str, Example] = {}
    near = (NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_size)
            if config.near_dedup else None)
    for example, original in zip(examples, originals, strict=True):
        verdict = _rule_violation(example.messages, config)
        text = dedup_text(example.messages, config.dedup_on)
        if verdict is None and config.exact_dedup and text in seen_exact:
            first = seen_exact[text]
            verdict = "exact_duplicate", f"same as record {first.record} of {first.source}"
        signature = near.signature(text) if near is not None and verdict is None else None
        if signature is not None and (match := near.find(signature)):
            first, similarity = kept[match[0]], match[1]
            verdict = "near_duplicate", (f"similarity {similarity:.2f} with record {first.record} of "
                                         f"{first.source}")
        if verdict is not None:
            removed.append(Removed(verdict[0], verdict[1], example.source, example.record, original))
            continue
        seen_exact.setdefault(text, example)
        if signature is not None:
            near.add(len(kept), signature)
        kept.append(example)
        kept_originals.append(original)
    return CleanResult(stats.records, kept, kept_originals, removed, Counter(r.rule for r in removed))


def write_clean(result: CleanResult, output: Path, source: str) -> dict[str, Any]:
    """OUT (kept records as in the input), OUT.removed.jsonl and OUT.summary.json; returns the summary."""
    if not result.kept:
        counts = ", ".join(f"{count} {rule}" for rule, count in result.counts.most_common())
        raise DataError(f"every record was removed ({counts}); nothing to write", path=source)
    write_records(result.originals, output)
    removed_path = side_file(output, "removed.jsonl")
    with removed_path.open("w", encoding="utf-8") as handle:
        for item in sorted(result.removed, key=lambda item: (item.source, item.record)):
            handle.write(json.dumps({"rule": item.rule, "detail": item.detail, "source": item.source,
                                     "record": item.record, "original": item.original}, ensure_ascii=False) + "\n")
    summary = {"input": source, "output": str(output), "records": result.records, "kept": len(result.kept),
               "removed": len(result.removed), "removed_by_rule": {rule: result.counts[rule] for rule in RULES
                                                                   if result.counts[rule]},
               "files": {"removed": str(removed_path)}}
    side_file(output, "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return summary


def format_clean_summary(summary: dict[str, Any]) -> str:
    lines = [f"read {summary['records']} records, kept {summary['kept']} -> {summary['output']}"]
    if summary["removed"]:
        lines.append(f"removed {summary['removed']} -> {summary['files']['removed']}")
        lines += [f"  {count:>6}  {rule}" for rule, count in summary["removed_by_rule"].items()]
    return "\n".join(lines)
