"""`weitiao data inspect` and `weitiao data convert`."""

from __future__ import annotations

import sys
from pathlib import Path

from weitiao.config import DataConfig, DataSource
from weitiao.data.dataset import encode_examples, load_source, source_records
from weitiao.data.encode import IGNORE_INDEX, encode_example
from weitiao.data.formats import to_format
from weitiao.data.preference import preference_to_format
from weitiao.data.readers import expand_paths, write_records
from weitiao.data.templates import install_template
from weitiao.errors import DataError


def highlight_labels(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example as text, trained tokens marked: green on a terminal, [[...]] elsewhere."""
    start, end = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    pieces, trained, run = [], None, []

    def flush() -> None:
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"{start}{text}{end}" if trained else text)

    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(token)
    flush()
    return "".join(pieces)


def inspect(source: DataSource, tokenizer, data: DataConfig, example_index: int = 0, color: bool | None = None
            ) -> str:
    """A readable report: format, counts, problems, token lengths, truncation and one rendered example."""
    install_template(tokenizer, data)
    examples, stats = load_source(source, on_error="skip")
    lines = [f"file:     {source.path}", f"format:   {stats.format or 'unknown'} "
             f"({'detected' if source.format == 'auto' else 'given'})",
             f"records:  {stats.records} in {stats.files} file(s); usable: {len(examples)}"]
    if stats.skipped:
        lines.append(f"problems: {sum(stats.skipped.values())} records would stop a run (or be skipped with "
                     "data.on_error: skip):")
        lines += [f"  {n} x {reason}" for reason, n in stats.skipped.most_common()]
        lines += [f"  e.g. {example}" for example in stats.skipped_examples[:3]]
    if stats.notes:
        lines.append("repairs:  " + ", ".join(f"{n} {note}" for note, n in stats.notes.items()))
    if not examples:
        return "\n".join(lines)
    stage = "pt" if examples[0].text is not None else "sft"
    _, summary = encode_examples(examples, tokenizer, data, stage)
    lengths = summary["length_before_truncation"]
    lines.append(f"tokens:   per example min {lengths['min']}, mean {lengths['mean']}, p50 {lengths['p50']}, "
                 f"p90 {lengths['p90']}, p95 {lengths['p95']}, p99 {lengths['p99']}, max {lengths['max']} "
                 f"({tokenizer.name_or_path})")
    dropped = sum(summary["dropped"].values())
    lines.append(f"at max_length {data.max_length} (truncation: {data.truncation}): {summary['truncated']} truncated, "
                 f"{dropped} dropped" + (f" ({', '.join(f'{n} {r}' for r, n in summary['dropped'].items())})"
                                         if dropped else "") + f"; {summary['label_tokens']} of {summary['tokens']} "
                 f"tokens trained ({data.train_on})")
    example = examples[min(example_index, len(examples) - 1)]
    encoded = encode_example(tokenizer, example.content(), "all" if stage == "pt" else data.train_on)
    color = sys.stdout.isatty() if color is None else color
    lines.append(f"\nexample {example.record} of {example.source} (trained tokens "
                 f"{'in green' if color else 'inside [[ ]]'}):")
    lines.append(highlight_labels(tokenizer, encoded.input_ids, encoded.labels, color))
    return "\n".join(lines)


def convert(source: DataSource, target_format: str, output: Path, on_error: str = "raise") -> dict[str, int]:
    """Every record in `target_format`; preference pairs stay pairs and binary feedback (a boolean `label`) keeps it."""
    first = next((record for path in expand_paths(source.path) for record in source_records(source, path)), None)
    feedback = first is not None and isinstance(first.data.get(source.columns.get("label", "label")), bool)
    examples, stats = load_source(source, on_error, kind="feedback" if feedback else None)
    records, failed = [], 0
    for example in examples:
        try:
            records.append(to_format(example.content(), target_format) if example.messages is None else
                           preference_to_format(example.messages, target_format, example.rejected, example.label,
                                                example.tools))
        except DataError as error:
            if on_error == "raise":
                raise DataError(error.reason, path=example.source, record=example.record) from None
            failed += 1
    if not records:
        raise DataError("nothing to write: every record was skipped", path=source.path)
    write_records(records, output)
    return {"read": stats.records, "written": len(records), "skipped": sum(stats.skipped.values()) + failed}
