import json

import pytest

from weitiao.data.readers import expand_paths, read_records, write_records
from weitiao.errors import DataError


def test_jsonl_records_are_numbered_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    records = list(read_records(path))
    assert [(r.number, r.line, r.data["text"]) for r in records] == [(1, 1, "one"), (2, 3, "two")]


def test_malformed_jsonl_line_names_file_record_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        list(read_records(path))
    message = str(error.value)
    assert str(path) in message and "record 2 (line 3)" in message and "invalid JSON" in message


def test_json_array_and_json_lines_with_json_suffix(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    lines = tmp_path / "lines.json"  # BELLE's files are JSON Lines despite the suffix
    lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}', encoding="utf-8")
    assert [r.data["text"] for r in read_records(array)] == ["a", "b"]
    assert [r.data["text"] for r in read_records(lines)] == ["a", "b", "c"]


def test_json_array_syntax_error_is_located(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: invalid JSON: .* line 2"):
        list(read_records(path))


def test_non_object_record(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="record 2: expected a JSON object, got list"):
        list(read_records(path))


def test_empty_file_and_file_without_records(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        list(read_records(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        list(read_records(blank))


def test_csv_with_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"a, b?","line one\nline two"\nsecond,\n', encoding="utf-8")
    records = list(read_records(path))
    assert records[0].data == {"question": "a, b?", "answer": "line one\nline two"}
    assert records[1].data == {"question": "second", "answer": None}  # empty cell = missing


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match="record 1 .*3 fields, the header has 2"):
        list(read_records(path))


def test_parquet_round_trip(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    path = tmp_path / "x.parquet"
    write_records(rows, path)
    assert [r.data for r in read_records(path)] == rows


def test_unsupported_suffix_and_missing_path(tmp_path):
    path = tmp_path / "x.md"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.md'"):
        list(read_records(path))
    with pytest.raises(DataError, match="no such file or directory"):
        expand_paths(str(tmp_path / "missing.jsonl"))


def test_directory_and_glob_expand_to_sorted_supported_files(tmp_path):
    for name in ("b.jsonl", "a.json", "notes.md", "sub/c.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}", encoding="utf-8")
    assert [p.name for p in expand_paths(str(tmp_path))] == ["a.json", "b.jsonl", "c.csv"]
    assert [p.name for p in expand_paths(str(tmp_path / "*.json*"))] == ["a.json", "b.jsonl"]


def test_text_files_by_paragraph_line_or_document(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("第一段第一行\n第一段第二行\n\n  \n第二段\r\n\n\n第三段", encoding="utf-8")
    paragraphs = list(read_records(path))
    assert [(r.number, r.line, r.data) for r in paragraphs] == [
        (1, 1, {"text": "第一段第一行\n第一段第二行"}), (2, 5, {"text": "第二段"}), (3, 8, {"text": "第三段"})]
    assert [r.data["text"] for r in read_records(path, sample_by="line")] == [
        "第一段第一行", "第一段第二行", "第二段", "第三段"]
    assert [r.data["text"] for r in read_records(path, sample_by="document")] == [
        "第一段第一行\n第一段第二行\n\n  \n第二段\n\n\n第三段"]  # universal newlines
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        list(read_records(blank))
