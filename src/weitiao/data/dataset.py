"""From the config's data sources to tokenized train/eval datasets, with every record accounted for.

read files -> detect format -> normalise (errors raise, or are skipped and counted) -> hold out a
validation split -> apply source weights -> tokenize + mask + truncate (datasets.map, cached) -> stats.
Stage pt tokenizes whole documents and cuts them into blocks instead (weitiao.data.blocks); with data.streaming
its training documents are read lazily, never all in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weitiao.config import DataConfig, DataSource
from weitiao.data.blocks import block_features, pack_blocks, streamed_blocks
from weitiao.data.encode import (IGNORE_INDEX, TemplateMismatch, encode_conversation, encode_document, encode_example,
                                 truncate)
from weitiao.data.formats import Normalizer, check_columns, detect_format, field_map, required_columns
from weitiao.data.preference import NORMALIZERS, encode_pair, is_pair_record, record_kind
from weitiao.data.readers import (COLUMNAR_SUFFIXES, STRUCTURED_SUFFIXES, Record, content_size, expand_paths,
                                  file_type, guess_encoding, read_records)
from weitiao.errors import DataError
from weitiao.paths import cache_dir


@dataclass
class SourceStats:
    path: str
    format: str = ""
    files: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    weight: float = 1.0
    used: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "files": self.files, "records": self.records,
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                "skipped_examples": self.skipped_examples, "notes": dict(self.notes), "weight": self.weight,
                "examples_used": self.used}


@dataclass(frozen=True)
class Example:
    """One normalised record as it leaves the readers: a conversation (`messages`) or a document (`text`), and
    where it came from, for error messages and for writing the original record back (clean, select)."""
    messages: list[dict[str, str]] | None
    text: str | None
    source: str
    """The file it was read from."""
    record: int
    """Its 1-based record number in that file."""
    references: list[str] | None = None
    """Every reference of the last reply, when the source maps several columns to it (DataSource.columns)."""
    rejected: str | None = None
    """A preference pair's rejected reply (the chosen one ends `messages`)."""
    label: bool | None = None
    """Binary feedback: whether the last reply of `messages` is desirable."""
    tools: list[dict[str, Any]] | None = None
    """The function schemas the conversation's assistant may call (weitiao.data.tools)."""

    def content(self) -> dict[str, Any]:
        """What the encoders read: {'messages': ..., 'tools': ...} or {'text': ...}."""
        if self.messages is None:
            return {"text": self.text}
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}

    def row(self) -> dict[str, Any]:
        """A row of a datasets.Dataset (ROW_COLUMNS). Schemas differ from record to record, so `tools` is JSON text
        there (`row_tools` reads it back)."""
        return {"messages": self.messages, "text": self.text, "source": self.source, "record": self.record,
                "references": self.references, "rejected": self.rejected, "label": self.label,
                "tools": json.dumps(self.tools, ensure_ascii=False) if self.tools else None}


ROW_COLUMNS = ["messages", "text", "source", "record", "references", "rejected", "label", "tools"]


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The function schemas of a datasets row (see Example.row)."""
    return json.loads(row["tools"]) if row.get("tools") else None


def file_label(path: Path) -> str:
    """The label a classification file's name carries: reviews.pos -> pos, neg.txt -> neg."""
    return path.suffix[1:] if path.suffix and path.suffix.lower() != ".txt" else path.stem


def source_records(source: DataSource, path: Path) -> Iterator[Record]:
    """One file's records as the source reads them: in its encoding and text unit, with its label."""
    if source.label is not None and file_type(path) in STRUCTURED_SUFFIXES:
        raise DataError("`label` is for plain-text files (one text per line, the label in the file's name); this "
                        "file has columns: map them instead, e.g. columns: {prompt: text, response: label}",
                        path=str(path))
    label = (source.label.replace("{file}", file_label(path)).replace("{folder}", path.parent.name)
             if source.label is not None else None)
    for record in read_records(path, sample_by=source.sample_by, encoding=source.encoding,
                               as_text=label is not None):
        if label is not None:
            record.data["label"] = label
        yield record


def iter_source(source: DataSource, on_error: str, stats: SourceStats,
                skipped: list[tuple[Record, DataError]] | None = None, kind: str | None = None) -> Iterator[Example]:
    """Read and normalise one source lazily, counting into `stats`. With on_error "skip", `skipped` (when given)
    receives each skipped record with its error. `kind` reads preference records: pairs or feedback
    (weitiao.data.preference)."""
    # A column list names the references of the reply: the first one is the reply (DataSource.columns).
    columns = {field: column[0] if isinstance(column, list) else column for field, column in source.columns.items()}
    references = next((column for column in source.columns.values() if isinstance(column, list)), None)
    if source.label is not None:  # text + label: a question/answer pair
        columns = {"prompt": "text", "response": "label", **columns}
    for path in expand_paths(source.path):
        stats.files += 1
        if source.encoding == "auto" and file_type(path) not in COLUMNAR_SUFFIXES:
            stats.notes[f"files read as {guess_encoding(path)[0]}"] += 1
        normalizer = None
        for record in source_records(source, path):
            stats.records += 1
            if normalizer is None and (kind is not None or is_pair_record(record.data, columns)):
                # Preference pairs read by a stage that trains on conversations (sft): the chosen reply is the reply.
                normalizer = NORMALIZERS[kind or "pairs"](record, source.format, columns, source.prompt_template,
                                                          source.system)
                stats.format = f"{normalizer.fmt} {kind or 'pairs (chosen replies)'}"
            if normalizer is None:
                check_columns(record.data, [("response", column) for column in references or []], str(path),
                              record.line)
                if source.format == "auto":
                    fmt, fields = detect_format(record.data, columns, str(path), record.line)
                else:
                    try:
                        fmt, fields = source.format, field_map(source.format, columns)
                    except DataError as error:
                        raise DataError(error.reason, path=str(path)) from None
                    check_columns(record.data, required_columns(columns), str(path), record.line)
                stats.format = fmt if stats.format in ("", fmt) else "mixed"
                normalizer = Normalizer(fmt, fields, source.prompt_template, source.system, references)
            try:
                example = normalizer(record)
            except DataError as error:
                if on_error == "raise":
                    raise
                stats.skipped[error.reason] += 1
                if skipped is not None:
                    skipped.append((record, error))
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(str(error))
                continue
            yield Example(example.get("messages"), example.get("text"), str(path), record.number,
                          example.get("references"), example.get("rejected"), example.get("label"),
                          example.get("tools"))
        if normalizer is not None:
            stats.notes.update(normalizer.notes)


def load_source(source: DataSource, on_error: str = "raise", skipped: list[tuple[Record, DataError]] | None = None,
                kind: str | None = None) -> tuple[list[Example], SourceStats]:
    """Read and normalise one source (see iter_source)."""
    stats = SourceStats(path=source.path, weight=source.weight)
    return list(iter_source(source, on_error, stats, skipped, kind)), stats


def load_eval_source(source: DataSource, on_error: str, seed: int, kind: str | None = None
                     ) -> tuple[list[Example], SourceStats]:
    """An eval source, or the seeded random share of it that its weight (<= 1) keeps, in file order."""
    examples, stats = load_source(source, on_error, kind=kind)
    if source.weight < 1:
        kept = sorted(random.Random(seed).sample(range(len(examples)), max(1, round(len(examples) * source.weight))))
        examples = [examples[index] for index in kept]
    stats.used = len(examples)
    return examples, stats


def apply_weight(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """weight 2.5 -> every example twice plus a random half of them once more."""
    whole, fraction = int(weight), weight - int(weight)
    extra = rng.sample(examples, round(len(examples) * fraction)) if fraction else []
    return examples * whole + extra


def _length_summary(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {}
    values = np.asarray(lengths)
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1),
            **{f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 95, 99)}, "max": int(values.max())}


def encode_examples(examples: list[Example], tokenizer, data: DataConfig, stage: str,
                    keep_source: bool = False):
    """Tokenize with datasets.map; return the kept rows and a summary of lengths, truncations and drops.
    With keep_source the rows keep their messages/text (references for generation metrics)."""
    import datasets

    kind = record_kind(stage)

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        example = {"text": row["text"]} if stage == "pt" and row["text"] is not None else \
            {"messages": row["messages"], "text": row["text"], "tools": row_tools(row)}
        if stage == "pt" and row["messages"] is not None:  # chat data mixed into pre-training: all tokens
            example = {"messages": row["messages"], "tools": row_tools(row)}
        try:
            if kind == "pairs":
                pair, event, length = encode_pair(tokenizer, row["messages"], row["rejected"], data.max_length,
                                                  data.truncation)
                empty = {"input_ids": [], "labels": [], "rejected_input_ids": [], "rejected_labels": []}
                return {**(pair or empty), "full_length": length, "event": event or ""}
            # Feedback (kto) scores the last reply only, as a pair does.
            encoded = (encode_conversation(tokenizer, row["messages"], last_reply_only=True) if kind == "feedback"
                       else encode_example(tokenizer, example, "all" if stage == "pt" else data.train_on))
        except TemplateMismatch as error:
            raise DataError(str(error), path=row["source"], record=row["record"]) from None
        kept, event = truncate(encoded, data.max_length, data.truncation)
        return {"input_ids": kept.input_ids if kept else [], "labels": kept.labels if kept else [],
                "full_length": len(encoded.input_ids), "event": event or ""}

    dataset = datasets.Dataset.from_list([example.row() for example in examples])
    kept_columns = ["label"] if kind == "feedback" else []  # kto trains on it
    dataset = dataset.map(encode, num_proc=data.num_proc if len(examples) > 1000 else None,
                          remove_columns=[] if keep_source else [c for c in ROW_COLUMNS if c not in kept_columns],
                          desc="tokenizing")
    events = Counter(e for e in dataset["event"] if e)
    full_lengths = dataset["full_length"]
    dataset = dataset.filter(lambda row: len(row["input_ids"]) > 0, desc="dropping")
    label_tokens = sum(sum(1 for x in labels if x != IGNORE_INDEX) for labels in dataset["labels"])
    summary = {
        "examples_in": len(examples), "examples": len(dataset),
        "truncated": events.pop("truncated", 0), "dropped": dict(events),
        "tokens": int(sum(len(ids) for ids in dataset["input_ids"])), "label_tokens": int(label_tokens),
        "length_before_truncation": _length_summary(full_lengths), "max_length": data.max_length,
    }
    return dataset.remove_columns(["full_length", "event"]), summary


def encode_documents(examples: list[Example], tokenizer, data: DataConfig):
    """Stage pt: tokenize documents (datasets.map) and cut their concatenation into blocks of data.max_length
    (weitiao.data.blocks); return the blocks and a summary."""
    import datasets

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        document = encode_document(tokenizer, {"text": row["text"], "messages": row["messages"],
                                               "tools": row_tools(row)})
        return {"input_ids": document.input_ids, "characters": document.characters}

    documents = datasets.Dataset.from_list([example.row() for example in examples]).map(
        encode, num_proc=data.num_proc if len(examples) > 1000 else None, remove_columns=ROW_COLUMNS,
        desc="tokenizing")
    blocks = list(pack_blocks(documents["input_ids"], data.max_length))
    dataset = datasets.Dataset.from_dict({name: [block[name] for block in blocks] for name in block_features()},
                                         features=block_features())
    tokens = sum(len(block["input_ids"]) for block in blocks)
    summary = {"documents": len(documents), "blocks": len(blocks), "block_length": data.max_length,
               "tokens": tokens, "characters": int(sum(documents["characters"]))}
    return dataset, summary


def stream_documents(data: DataConfig, tokenizer, seed: int) -> Iterator[list[int]]:
    """Stage pt with data.streaming: the token ids of every training document, read lazily.

    Sources are interleaved at random in proportion to their size (decompressed) times their weight, so they run
    out at about the same time. A weight applies per record: 2.5 reads a source twice, then a third time keeping each
    record with probability 0.5 (copies are a whole pass apart, never side by side in a block)."""
    rng = random.Random(seed)
    streams, shares = [], []
    for source in data.train:
        streams.append(_source_documents(source, data.on_error, tokenizer, rng))
        shares.append(sum(content_size(path) for path in expand_paths(source.path)) * source.weight)
    while streams:
        index = rng.choices(range(len(streams)), weights=shares)[0]
        try:
            yield next(streams[index])
        except StopIteration:
            del streams[index], shares[index]


def _source_documents(source: DataSource, on_error: str, tokenizer, rng: random.Random) -> Iterator[list[int]]:
    for index in range(math.ceil(source.weight)):
        keep = min(1.0, source.weight - index)
        for example in iter_source(source, on_error, SourceStats(path=source.path)):
            if keep == 1.0 or rng.random() < keep:
                yield encode_document(tokenizer, example.content()).input_ids


def _build_streaming(data: DataConfig, tokenizer, seed: int):
    """Training blocks streamed from the files; evaluation blocks (data.eval) built in memory."""
    eval_examples, source_stats = [], []
    for source in data.eval:
        examples, stats = load_eval_source(source, data.on_error, seed)
        eval_examples += examples
        source_stats.append(stats)
    evaluation, eval_summary = encode_documents(eval_examples, tokenizer, data) if eval_examples else (None, None)
    train = streamed_blocks(lambda: stream_documents(data, tokenizer, seed), data.max_length, seed)
    stats = {"sources": [s.to_dict() for s in source_stats], "streamed": [source.path for source in data.train],
             "held_out_for_eval": 0, "train": None, "eval": eval_summary}
    return train, evaluation, stats


def _cache_key(data: DataConfig, tokenizer, stage: str, seed: int) -> str:
    files = []
    for source in data.train + data.eval:
        for path in expand_paths(source.path):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps({"data": data.model_dump(mode="json", exclude={"num_proc", "cache"}), "files": files,
                          "stage": stage, "seed": seed, "tokenizer": tokenizer.name_or_path,
                          "vocab": len(tokenizer), "template": tokenizer.chat_template,
                          "eos": tokenizer.eos_token, "version": 4}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def build_datasets(data: DataConfig, tokenizer, stage: str = "sft", seed: int = 42):
    """Tokenized (train, eval or None, stats). Cached on disk when data.cache is set."""
    import datasets

    if not data.train:
        raise DataError("no training data: set data.train to a file, a directory or a list of sources")
    if data.streaming:
        return _build_streaming(data, tokenizer, seed)
    folder = cache_dir("data") / _cache_key(data, tokenizer, stage, seed)
    if data.cache and (folder / "stats.json").is_file():
        stats = json.loads((folder / "stats.json").read_text())
        train = datasets.load_from_disk(str(folder / "train"))
        evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
        stats["cached"] = str(folder)
        return train, evaluation, stats

    rng = random.Random(seed)
    train_examples, eval_examples, source_stats, held_out = _read_sources(data, stage, seed, rng)
    if stage == "pt":
        rng.shuffle(train_examples)  # sources (and the copies a weight makes) mix across blocks
        train, train_summary = encode_documents(train_examples, tokenizer, data)
        evaluation, eval_summary = (encode_documents(eval_examples, tokenizer, data) if eval_examples
                                    else (None, None))
    else:
        train, train_summary = encode_examples(train_examples, tokenizer, data, stage)
        evaluation, eval_summary = (encode_examples(eval_examples, tokenizer, data, stage, keep_source=True)
                                    if eval_examples else (None, None))
    if len(train) == 0:  # pre-training documents are never dropped
        raise DataError(f"every training example was dropped ({train_summary['dropped']}); "
                        f"raise data.max_length (now {data.max_length}) or use truncation: right/left")
    stats = {"sources": [s.to_dict() for s in source_stats], "held_out_for_eval": held_out,
             "train": train_summary, "eval": eval_summary}
    if data.cache:
        folder.mkdir(parents=True, exist_ok=True)
        train.save_to_disk(str(folder / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(folder / "eval"))
        (folder / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return train, evaluation, stats


def _read_sources(data: DataConfig, stage: str, seed: int, rng: random.Random
                  ) -> tuple[list[Example], list[Example], list[SourceStats], int]:
    """(training examples with source weights applied, eval examples, per-source stats, how many training examples
    were held out for evaluation)."""
    train_parts, eval_examples, source_stats = [], [], []
    for source in data.train:
        examples, stats = load_source(source, data.on_error, kind=record_kind(stage))
        _check_stage(examples, source, stage)
        train_parts.append((examples, stats))
        source_stats.append(stats)
    for source in data.eval:
        examples, stats = load_eval_source(source, data.on_error, seed, record_kind(stage))
        _check_stage(examples, source, stage)
        eval_examples += examples
        source_stats.append(stats)

    held_out = 0
    if not data.eval and data.val_size > 0:
        train_parts, eval_examples = _hold_out(train_parts, data.val_size, rng)
        held_out = len(eval_examples)

    train_examples = []
    for examples, stats in train_parts:
        weighted = apply_weight(examples, stats.weight, rng)
        stats.used = len(weighted)
        train_examples += weighted
    if not train_examples:
        raise DataError("no training examples left after reading and skipping bad records")
    return train_examples, eval_examples, source_stats, held_out


def _hold_out(parts: list[tuple[list[Example], SourceStats]], val_size: float, rng: random.Random
              ) -> tuple[list[tuple[list[Example], SourceStats]], list[Example]]:
    """A random val_size (a fraction, or a count >= 1) of all training examples, taken out of their sources."""
    total = sum(len(examples) for examples, _ in parts)
    count = int(val_size) if val_size >= 1 else max(1, round(total * val_size))
    if count >= total:
        raise DataError(f"val_size {val_size} leaves no training data ({total} examples)")
    order = list(range(total))
    rng.shuffle(order)
    chosen = set(order[:count])
    position, kept_parts, held_out = 0, [], []
    for examples, stats in parts:
        keep = []
        for example in examples:
            (held_out if position in chosen else keep).append(example)
            position += 1
        kept_parts.append((keep, stats))
    return kept_parts, held_out


def _check_stage(examples: list[Example], source: DataSource, stage: str) -> None:
    if stage != "pt" and any(example.text is not None for example in examples):
        raise DataError("this source is plain text; plain text trains with stage: pt (continued pre-training)",
                        path=source.path)


def format_stats(stats: dict[str, Any]) -> str:
    """Human summary of what was read, skipped, truncated and dropped."""
    lines = []
    for source in stats["sources"]:
        line = f"  {source['path']}: {source['records']} records ({source['format']})"
        if source["skipped"]:
            line += f", {source['skipped']} skipped: " + ", ".join(
                f"{n} {reason}" for reason, n in source["skipped_by_reason"].items())
        if source["notes"]:
            line += "; " + ", ".join(f"{n} {note}" for note, n in source["notes"].items())
        lines.append(line)
    if stats.get("held_out_for_eval"):
        lines.append(f"  held out for evaluation: {stats['held_out_for_eval']} examples")
    if stats.get("streamed"):
        lines.append(f"  train: streamed from {', '.join(stats['streamed'])}")
    for split in ("train", "eval"):
        summary = stats.get(split)
        if not summary:
            continue
        if "blocks" in summary:
            lines.append(f"  {split}: {summary['documents']} documents, {summary['tokens']} tokens "
                         f"({summary['characters']} characters) in {summary['blocks']} blocks of "
                         f"{summary['block_length']}")
            continue
        dropped = sum(summary["dropped"].values())
        lengths = summary["length_before_truncation"]
        lines.append(f"  {split}: {summary['examples']} examples, {summary['tokens']} tokens "
                     f"({summary['label_tokens']} trained), length p50 {lengths.get('p50')} / p95 {lengths.get('p95')}"
                     f" / max {lengths.get('max')}; truncated to {summary['max_length']}: {summary['truncated']}; "
                     f"dropped: {dropped}" + (f" ({', '.join(f'{n} {r}' for r, n in summary['dropped'].items())})"
                                              if dropped else ""))
    return "\n".join(lines)


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
