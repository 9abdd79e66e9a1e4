"""Read records from json / jsonl / csv / tsv / parquet / arrow / txt files, keeping each record's number for error
messages. A file compressed with gzip, bzip2 or xz (data.jsonl.gz, corpus.txt.xz) reads as the type its inner
suffix names.

Records are read lazily (one line, paragraph or parquet batch at a time), so a corpus larger than memory can be
streamed; a .json array is the exception: it is parsed whole.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import datetime
import decimal
import glob
import gzip
import io
import json
import lzma
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from weitiao.errors import DataError

# Files whose records have columns; .txt is the one plain-text type. Columnar files are binary (no text encoding);
# .arrow is what `datasets` writes (save_to_disk, its cache).
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
STRUCTURED_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", *COLUMNAR_SUFFIXES)
SUPPORTED_SUFFIXES = (*STRUCTURED_SUFFIXES, ".txt")
WRITABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
# The metadata files of a `datasets` save_to_disk folder, beside its .arrow shards: not records.
_DATASETS_METADATA = ("dataset_info.json", "state.json")
# Delimited text: comma-separated, or tab-separated as spreadsheet exports and many research dumps are.
_DELIMITERS = {".csv": ",", ".tsv": "\t"}
# Compression of downloaded dumps, read on the fly (the suffix before it names the file type).
# suffix: (opener, the command that decompresses it in a shell)
_DECOMPRESSORS = {".gz": (gzip.open, "gzip"), ".bz2": (bz2.open, "bzip2"), ".xz": (lzma.open, "xz")}
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
    """A file, a directory (every supported file inside, recursively; of a `datasets` save_to_disk folder its
    .arrow shards) or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    registry = path / "dataset_info.json" if path.is_dir() else path
    if registry.name == "dataset_info.json" and registry.is_file() and not any(registry.parent.glob("*.arrow")):
        _refuse_llamafactory_registry(registry, spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise DataError(f"a `datasets` DatasetDict folder with the splits {', '.join(splits)}: give the folder of "
                            f"one split (e.g. {path / (splits[0] if splits else 'train')})", path=spec)
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_type(p) in SUPPORTED_SUFFIXES
                       and not (p.name in _DATASETS_METADATA and any(p.parent.glob("*.arrow"))))
        if not files:
            raise DataError(f"directory has no {', '.join(SUPPORTED_SUFFIXES)} files (or those compressed: "
                            f"{', '.join(_DECOMPRESSORS)})", path=spec)
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        return matches
    raise DataError("no such file or directory", path=spec)


def _refuse_llamafactory_registry(registry: Path, spec: str) -> None:
    """A LLaMA-Factory data folder mixes unrelated datasets: reading all of it is never meant; name one."""
    try:
        entries = json.loads(registry.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not LLaMA-Factory's registry; read as any other json file
    if isinstance(entries, dict) and entries and all(isinstance(entry, dict) for entry in entries.values()):
        names = list(entries)
        raise DataError(f"a LLaMA-Factory data folder: name one dataset of its dataset_info.json with `dataset:` "
                        f"(--dataset), e.g. {names[0]}; it has {len(names)}: {', '.join(names[:10])}"
                        + (", ..." if len(names) > 10 else ""), path=spec)


def file_type(path: Path) -> str:
    """The suffix that says how the records are laid out: '.jsonl' for data.jsonl and for data.jsonl.gz."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _DECOMPRESSORS:
        return suffixes[-2] if len(suffixes) > 1 else ""
    return suffixes[-1] if suffixes else ""


def open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its suffix says it is compressed."""
    compression = _DECOMPRESSORS.get(path.suffix.lower())
    return compression[0](path, "rb") if compression else path.open("rb")


def content_size(path: Path) -> int:
    """About the file's size once decompressed, for mixing streams: gzip stores it (modulo 4 GiB) in its last 4
    bytes; for bzip2 and xz, which do not, 4 times the compressed size (a usual ratio for text)."""
    size = path.stat().st_size
    compression = path.suffix.lower()
    if compression == ".gz" and size >= 18:  # 10-byte header, 8-byte trailer
        with path.open("rb") as handle:
            handle.seek(-4, 2)
            return int.from_bytes(handle.read(4), "little")
    return size * 4 if compression in _DECOMPRESSORS else size


def _open_text(path: Path, encoding: str, newline: str | None = None) -> IO[str]:
    return io.TextIOWrapper(open_bytes(path), encoding=encoding, newline=newline)


def _compression_error(path: Path, error: Exception) -> DataError:
    return DataError(f"cannot decompress the file ({path.suffix[1:]}): {error}; check that it is complete "
                     f"(download it again) and really {path.suffix[1:]}-compressed", path=str(path))


def read_records(path: Path, csv_columns: Sequence[str] | None = None, sample_by: str = "paragraph",
                 encoding: str | None = None, as_text: bool = False) -> Iterator[Record]:
    """The file's records in order. `csv_columns` names the columns of a CSV file that has no header row;
    `sample_by` (one of TEXT_UNITS) says how a .txt file is cut into {"text": ...} records; `encoding` is the
    text files' encoding (None: UTF-8, 'auto': detected); `as_text` reads a file of any suffix as plain text
    (e.g. the reviews.pos / reviews.neg files of sentiment sets)."""
    suffix = file_type(path)
    if as_text and suffix not in STRUCTURED_SUFFIXES:
        suffix = ".txt"
    if suffix in (".xlsx", ".xls"):
        raise DataError("an Excel workbook: save the sheet as CSV in Excel (File > Save As > CSV UTF-8) and give "
                        "that file", path=str(path))
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported file type '{suffix or path.suffix}' (use {', '.join(SUPPORTED_SUFFIXES)}, "
                        f"compressed or not ({', '.join(_DECOMPRESSORS)}), or give the source "
                        "a `label` to read it as one text per line)", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=str(path))
    if suffix in COLUMNAR_SUFFIXES:
        records = _read_columnar(path, suffix)
    else:
        text_encoding = resolve_encoding(path, encoding)
        if suffix in _DELIMITERS:
            records = _read_csv(path, text_encoding, csv_columns, _DELIMITERS[suffix])
        elif suffix == ".txt":
            records = _read_text(path, text_encoding, sample_by)
        else:
            records = {".json": _read_json, ".jsonl": _read_jsonl}[suffix](path, text_encoding)
        records = _decoded(records, path, text_encoding)
    count = 0
    try:
        for record in records:
            count += 1
            yield record
    except (OSError, EOFError, lzma.LZMAError) as error:  # gzip.BadGzipFile is an OSError
        raise _compression_error(path, error) from None
    if count == 0:
        raise DataError("file has no records", path=str(path))


# -- encodings ---------------------------------------------------------------------------------------------

# Byte-order marks of the encodings that are not UTF-8 (UTF-32 first: its little-endian mark starts with UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32 (little-endian)"),
         (codecs.BOM_UTF32_BE, "utf-32", "UTF-32 (big-endian)"),
         (codecs.BOM_UTF16_LE, "utf-16", "UTF-16 (little-endian)"),
         (codecs.BOM_UTF16_BE, "utf-16", "UTF-16 (big-endian)"))
# charset-normalizer's names of the East Asian encodings users have, as the codec that reads them (GB18030 is a
# superset of GBK and GB2312) and a name for messages.
_EAST_ASIAN = {"gb18030": ("gb18030", "GB18030/GBK (Chinese)"), "gbk": ("gb18030", "GB18030/GBK (Chinese)"),
               "gb2312": ("gb18030", "GB18030/GBK (Chinese)"), "big5": ("big5", "Big5 (traditional Chinese)"),
               "cp932": ("cp932", "Shift-JIS (Japanese)"), "shift_jis": ("cp932", "Shift-JIS (Japanese)"),
               "euc_jp": ("euc_jp", "EUC-JP (Japanese)"), "cp949": ("cp949", "EUC-KR (Korean)"),
               "euc_kr": ("cp949", "EUC-KR (Korean)")}
_GUESS_BYTES = 1 << 20


def resolve_encoding(path: Path, encoding: str | None) -> str:
    """The codec a text file is read with. None: UTF-8 (with or without its byte-order mark); a UTF-16/32
    byte-order mark is an error that names the fix. 'auto': the guessed encoding (guess_encoding)."""
    if encoding == "auto":
        return guess_encoding(path)[0]
    if encoding is not None:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise DataError(f"unknown encoding '{encoding}' (e.g. utf-8, gb18030, cp1252, utf-16, latin-1, auto)",
                            path=str(path)) from None
        return "utf-8-sig" if name == "utf-8" else name  # a UTF-8 byte-order mark is not text
    try:
        with open_bytes(path) as handle:
            head = handle.read(4)
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise _compression_error(path, error) from None
    for bom, codec, name in _BOMS:
        if head.startswith(bom):
            raise DataError(f"the file starts with a {name} byte-order mark ({bom.hex(' ').upper()}), so it is not "
                            f"UTF-8; {_fix(codec, path)}", path=str(path), line=1)
    return "utf-8-sig"


def guess_encoding(path: Path) -> tuple[str, str]:
    """(codec, description) of a text file's likely encoding, from its byte-order mark or its first megabyte."""
    with open_bytes(path) as handle:
        sample = handle.read(_GUESS_BYTES)
    for bom, codec, name in _BOMS:
        if sample.startswith(bom):
            return codec, f"a {name} byte-order mark ({bom.hex(' ').upper()})"
    if sample.count(0) > len(sample) // 4:  # ASCII text in UTF-16 has every other byte 0
        codec = "utf-16-le" if sample[1::2].count(0) > sample[0::2].count(0) else "utf-16-be"
        return codec, f"{codec.upper()} without a byte-order mark (many 0 bytes)"
    try:
        sample.decode("utf-8")
        return "utf-8-sig", "UTF-8"
    except UnicodeDecodeError as error:
        if len(sample) == _GUESS_BYTES and error.start >= len(sample) - 3:  # a character cut by the sample's end
            return "utf-8-sig", "UTF-8"
    from charset_normalizer import from_bytes

    best = from_bytes(sample).best()
    if best is not None and best.encoding in _EAST_ASIAN:
        return _EAST_ASIAN[best.encoding]
    # Western single-byte text: charset-normalizer cannot tell the Windows code pages apart (it says cp1250 for
    # French or English cp1252 text); cp1252 is by far the most common, and maps the 0x80-0x9F punctuation.
    try:
        sample.decode("cp1252")
        return "cp1252", "cp1252 (Windows Western European)"
    except UnicodeDecodeError:
        return "latin-1", "latin-1 (ISO 8859-1)"


def _fix(codec: str, path: Path) -> str:
    convert = f"iconv -f {codec} -t utf-8"
    if path.suffix.lower() in _DECOMPRESSORS:
        convert = f"{_DECOMPRESSORS[path.suffix.lower()][1]} -dc {path.name} | {convert}"
    return (f"read it with `encoding: {codec}` on its data source (--encoding {codec} on the command line), or "
            f"convert it to UTF-8 ({convert})")


def _decoded(records: Iterator[Record], path: Path, encoding: str) -> Iterator[Record]:
    """The records, with a decoding failure turned into one line that locates the bytes and names the fix."""
    try:
        yield from records
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None


def _decode_error(path: Path, encoding: str) -> DataError:
    """Where the first undecodable bytes are (line, byte offset, the bytes) and what the file looks like."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line, offset = 1, 0
    with open_bytes(path) as handle:
        for raw in handle:
            pending = len(decoder.getstate()[0])
            try:
                line += decoder.decode(raw).count("\n")
            except UnicodeDecodeError as error:
                position = offset - pending + error.start
                line += error.object[:error.start].count(b"\n")
                shown = " ".join(f"0x{byte:02X}" for byte in error.object[error.start:error.end])
                codec, looks = guess_encoding(path)
                hint = (f"the file looks like {looks}; {_fix(codec, path)}" if codec != "utf-8-sig" else
                        "the rest of its first megabyte is UTF-8, so these bytes may be damaged or from another "
                        "encoding: fix or remove them, or " + _fix("cp1252", path))
                return DataError(f"byte {shown} at byte offset {position} is not valid {_codec_name(encoding)}: "
                                 f"{hint}", path=str(path), line=line)
            offset += len(raw)
    return DataError(f"the file is not valid {_codec_name(encoding)} (it ends inside a character)", path=str(path))


def _codec_name(codec: str) -> str:
    return "UTF-8" if codec == "utf-8-sig" else codec


def _check_object(value: Any, path: Path, number: int, line: int | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", path=str(path), record=number, line=line)
    return value


def _json_problem(error: json.JSONDecodeError, text: str, closing: str, what: str) -> str:
    """'invalid JSON: <json's message> at column N', and what the usual causes look like: a comma after a JSON
    Lines record, a trailing comma, Python's quotes, or a text that stops before it closes."""
    # json's messages either end in "at" ("Invalid control character at") or do not ("Expecting value").
    message = f"invalid JSON: {error.msg}{'' if error.msg.endswith(' at') else ' at'} column {error.colno}"
    rest, before = text[error.pos:].strip(), text[:error.pos].rstrip()
    if error.msg == "Extra data" and rest == ",":
        return message + "; a comma after the record: JSON Lines has one object per line, nothing between them"
    if error.msg.startswith("Expecting") and before.endswith(",") and rest[:1] in ("]", "}"):
        return message + f"; a comma before '{rest[0]}', which JSON does not allow: remove it"
    if error.msg.startswith("Expecting property name enclosed in double quotes") and rest.startswith("'"):
        return message + "; single quotes: this is a Python dict, not JSON (write the file with json.dumps)"
    if not text.rstrip().endswith(closing):
        message += f"; the {what} ends before its JSON closes with '{closing}': it looks cut off"
    return message


def _json_constant(name: str) -> float | None:
    """NaN, which Python's json.dumps writes for pandas' missing values, is a missing value; Infinity stays a number."""
    return None if name == "NaN" else float(name)


def _read_jsonl(path: Path, encoding: str) -> Iterator[Record]:
    number = 0
    # Lines end at \n (or \r\n, \r), never inside a JSON value: escaped line breaks are two characters.
    with _open_text(path, encoding) as handle:
        for line_number, line in enumerate(handle, start=1):
            # A byte-order mark inside the file is where files were joined (cat a.jsonl b.jsonl): not text.
            line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            number += 1
            try:
                value = json.loads(line, parse_constant=_json_constant)
            except json.JSONDecodeError as error:
                raise DataError(_json_problem(error, line, "}", "line"),
                                path=str(path), record=number, line=line_number) from None
            yield Record(str(path), number, line_number, _check_object(value, path, number, line_number))


def _read_json(path: Path, encoding: str) -> Iterator[Record]:
    """A JSON array of objects; many '.json' files are really JSON Lines, so fall back to that."""
    with _open_text(path, encoding) as handle:
        text = handle.read()
    try:
        value = json.loads(text, parse_constant=_json_constant)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path, encoding)
            return
        closing = "}" if text.lstrip().startswith("{") else "]"
        raise DataError(_json_problem(error, text, closing, "file"), path=str(path), line=error.lineno) from None
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


def _read_csv(path: Path, encoding: str, columns: Sequence[str] | None = None,
              delimiter: str = ",") -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path, encoding, newline="") as handle:
        reader = csv.DictReader(handle, fieldnames=columns, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{file_type(path)[1:].upper()} file has no header row", path=str(path))
        expected = "the header has" if columns is None else "expected"
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"row has {len(reader.fieldnames) + len(row[None])} fields, {expected} "
                                f"{len(reader.fieldnames)}", path=str(path), record=number, line=reader.line_num)
            # Every CSV value is text; an empty cell is a missing value.
            yield Record(str(path), number, reader.line_num, {k: (v if v != "" else None) for k, v in row.items()})


def _read_text(path: Path, encoding: str, sample_by: str) -> Iterator[Record]:
    """Plain text as {"text": ...} records. Lines keep no newline; a paragraph keeps its inner newlines; whitespace-only
    lines separate paragraphs and are never a record. A line ends at \n, \r\n or \r only: not at U+0085 or
    U+2028 as in str.splitlines (latin-1 reads the byte 0x85, an ellipsis in cp1252 text, as U+0085)."""
    if sample_by not in TEXT_UNITS:
        raise DataError(f"sample_by must be one of {', '.join(TEXT_UNITS)}, not '{sample_by}'", path=str(path))
    if sample_by == "document":
        with _open_text(path, encoding) as handle:
            text = handle.read()
        if text.strip():
            yield Record(str(path), 1, 1, {"text": text.rstrip("\n")})
        return
    number, lines, first_line = 0, [], 0
    with _open_text(path, encoding) as handle:  # universal newlines: \n, \r\n, \r
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


def _read_columnar(path: Path, suffix: str) -> Iterator[Record]:
    """Rows of a parquet file, or of an Arrow IPC file (the stream format `datasets` writes, or the file format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = open_bytes(path) if path.suffix.lower() in _DECOMPRESSORS else path
    try:
        if suffix == ".parquet":
            batches = pq.ParquetFile(source).iter_batches(batch_size=4096)
        else:
            data = source.read() if not isinstance(source, Path) else pa.memory_map(str(source))
            try:
                batches = iter(pa.ipc.open_stream(data))
            except pa.ArrowInvalid:
                file = pa.ipc.open_file(data)
                batches = (file.get_batch(index) for index in range(file.num_record_batches))
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable {suffix[1:]} file: {error}", path=str(path)) from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            # A float NaN is how pandas marks a missing value; as text it would read "nan".
            yield Record(str(path), number, None,
                         {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


def _json_default(value: Any) -> Any:
    """Values of parquet/arrow columns that JSON has no type for: dates and times as ISO 8601 text, decimals as
    their exact text. Anything else (bytes) is a TypeError."""
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"a {type(value).__name__} value")


def to_json(value: Any, indent: int | None = None, report: bool = False) -> str:
    """JSON text of a record; `report` (side files for people to read, such as OUT.removed.jsonl) shows bytes as
    '<N bytes>' instead of failing."""
    def default(item: Any) -> Any:
        return f"<{len(item)} bytes>" if report and isinstance(item, (bytes, bytearray)) else _json_default(item)

    return json.dumps(value, ensure_ascii=False, indent=indent, default=default)


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    """Write records in the file type named by `path`'s suffix. A value JSON and CSV cannot hold (bytes) stops
    with its record and field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json") or suffix in _DELIMITERS:
        for number, record in enumerate(records, start=1):
            _check_writable(record, path, number)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(to_json(record) + "\n")
    elif suffix == ".json":
        path.write_text(to_json(records, indent=2) + "\n", encoding="utf-8")
    elif suffix in _DELIMITERS:
        columns = list(dict.fromkeys(key for record in records for key in record))
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter=_DELIMITERS[suffix])
            writer.writeheader()
            for record in records:
                writer.writerow({key: _csv_cell(value) for key, value in record.items()})
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # from_pylist takes the columns from the first record: a column only later records have would be lost
        columns = list(dict.fromkeys(key for record in records for key in record))
        pq.write_table(pa.Table.from_pylist([{column: record.get(column) for column in columns}
                                             for record in records]), path)
    else:
        raise DataError(f"unsupported output file type '{suffix}' (use {', '.join(WRITABLE_SUFFIXES)})",
                        path=str(path))


def _csv_cell(value: Any) -> Any:
    """A cell's text: scalars as they are, dates and decimals as in JSON, lists and objects as JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return to_json(value) if isinstance(value, (list, dict)) else _json_default(value)


def _check_writable(record: dict[str, Any], path: Path, number: int) -> None:
    for field, value in record.items():
        try:
            to_json(value)
        except (TypeError, ValueError) as error:
            raise DataError(f"{error} cannot be written as {path.suffix[1:]}; write this output as .parquet, which "
                            "keeps every column's type", path=str(path), record=number, field=str(field)) from None


def side_file(output: Path, name: str) -> Path:
    """OUT.jsonl -> OUT.<name> next to it."""
    return output.with_name(output.name.removesuffix(output.suffix) + "." + name)


def check_output(output: Path, source: str) -> Path:
    """Refuse, before any work, an output file type that cannot be written or an output that is the input."""
    if output.suffix.lower() not in WRITABLE_SUFFIXES:
        raise DataError(f"unsupported output file type '{output.suffix}' (use {', '.join(WRITABLE_SUFFIXES)})",
                        path=str(output))
    if output.exists() and any(output.resolve() == path.resolve() for path in expand_paths(source)):
        raise DataError("the output would overwrite the input; choose another output file", path=str(output))
    return output
