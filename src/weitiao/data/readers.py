"""Read records from json / jsonl / csv / parquet / txt files, keeping each record's number for error messages.

Records are read lazily (one line, paragraph or parquet batch at a time), so a corpus larger than memory can be
streamed; a .json array is the exception: it is parsed whole.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weitiao.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
WRITABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# How a .txt file is cut into documents (the names of `datasets`' text loader): one per line, one per
# blank-line-separated paragraph, or the whole file.
TEXT_UNITS = ("line", "paragraph", "document")


@dataclass
class Record:
    path: str
    number: int  # 1-based position of the record in its file
    line: int | None  # line in the file where the record starts, when that differs from `number`
    data: dict[str, Any]


def expand_paths(spec: str) -> list[Path]:
    """A file, a directory (every supported file inside, recursively) or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"directory has no {', '.join(SUPPORTED_SUFFIXES)} files", path=spec)
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        return matches
    raise DataError("no such file or directory", path=spec)


def read_records(path: Path, csv_columns: Sequence[str] | None = None, sample_by: str = "paragraph"
                 ) -> Iterator[Record]:
    """The file's records in order. `csv_columns` names the columns of a CSV file that has no header row;
    `sample_by` (one of TEXT_UNITS) says how a .txt file is cut into {"text": ...} records."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported file type '{suffix}' (use {', '.join(SUPPORTED_SUFFIXES)})", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=str(path))
    if suffix == ".csv":
        records = _read_csv(path, csv_columns)
    elif suffix == ".txt":
        records = _read_text(path, sample_by)
    else:
        records = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix](path)
    count = 0
    for record in records:
        count += 1
        yield record
    if count == 0:
        raise DataError("file has no records", path=str(path))


def _check_object(value: Any, path: Path, number: int, line: int | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", path=str(path), record=number, line=line)
    return value


def _read_jsonl(path: Path) -> Iterator[Record]:
    number = 0
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            number += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"invalid JSON: {error.msg} at column {error.colno}",
                                path=str(path), record=number, line=line_number) from None
            yield Record(str(path), number, line_number, _check_object(value, path, number, line_number))


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON array of objects; many '.json' files are really JSON Lines, so fall back to that."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path)
            return
        raise DataError(f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}",
                        path=str(path)) from None
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1 and all(isinstance(v, dict) for v in value[lists[0]]):
            value = value[lists[0]]  # e.g. {"data": [...]}
        else:
            value = [value]
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of records, got {type(value).__name__}", path=str(path))
    for index, item in enumerate(value, start=1):
        yield Record(str(path), index, None, _check_object(item, path, index, None))


def _read_csv(path: Path, columns: Sequence[str] | None = None) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, fieldnames=columns)
        if not reader.fieldnames:
            raise DataError("CSV file has no header row", path=str(path))
        expected = "the header has" if columns is None else "expected"
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"row has {len(reader.fieldnames) + len(row[None])} fields, {expected} "
                                f"{len(reader.fieldnames)}", path=str(path), record=number, line=reader.line_num)
            # Every CSV value is text; an empty cell is a missing value.
            yield Record(str(path), number, reader.line_num, {k: (v if v != "" else None) for k, v in row.items()})


def _read_text(path: Path, sample_by: str) -> Iterator[Record]:
    """Plain text as {"text": ...} records. Lines keep no newline; a paragraph keeps its inner newlines; whitespace-only
    lines separate paragraphs and are never a record."""
    if sample_by not in TEXT_UNITS:
        raise DataError(f"sample_by must be one of {', '.join(TEXT_UNITS)}, not '{sample_by}'", path=str(path))
    if sample_by == "document":
        text = path.read_text(encoding="utf-8-sig")
        if text.strip():
            yield Record(str(path), 1, 1, {"text": text.rstrip("\n")})
        return
    number, lines, first_line = 0, [], 0
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip() and sample_by == "line":
                number += 1
                yield Record(str(path), number, line_number, {"text": line})
            elif line.strip():
                first_line = first_line or line_number
                lines.append(line)
            elif lines:
                number += 1
                yield Record(str(path), number, first_line, {"text": "\n".join(lines)})
                lines, first_line = [], 0
    if lines:
        yield Record(str(path), number + 1, first_line, {"text": "\n".join(lines)})


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file: {error}", path=str(path)) from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield Record(str(path), number, None, row)


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Write records in the file type named by `path`'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    elif suffix == ".csv":
        columns = list(dict.fromkeys(key for record in records for key in record))
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for record in records:
                writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                 for k, v in record.items()})
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise DataError(f"unsupported output file type '{suffix}' (use {', '.join(WRITABLE_SUFFIXES)})",
                        path=str(path))
