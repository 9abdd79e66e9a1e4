import bz2
import gzip
import json
import lzma

import pytest

from weitiao.data.readers import check_output, content_size, expand_paths, read_records, to_json, write_records
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
    with pytest.raises(DataError, match=r"bad.json: line 2: invalid JSON: Expecting value at column 11$"):
        list(read_records(path))


def test_non_object_record(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"record 2 \(line 2\): expected a JSON object, got list"):
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


DELIMITED = pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])


@DELIMITED
def test_delimited_file_with_quoted_separators_and_newlines(tmp_path, suffix, sep):
    path = tmp_path / f"qa{suffix}"
    path.write_text(f'question{sep}answer\n"a{sep} b?"{sep}"line one\nline two"\nsecond{sep}\n', encoding="utf-8")
    records = list(read_records(path))
    assert records[0].data == {"question": f"a{sep} b?", "answer": "line one\nline two"}
    assert records[1].data == {"question": "second", "answer": None}  # empty cell = missing
    copy = tmp_path / f"copy{suffix}"
    write_records([r.data for r in records], copy)
    assert copy.read_text(encoding="utf-8").startswith(f"question{sep}answer")
    assert [r.data for r in read_records(copy)] == [r.data for r in records]


def test_a_tsv_cell_may_hold_commas_unquoted(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("question\tanswer\na, b, c?\td, e\n", encoding="utf-8")
    assert [r.data for r in read_records(path)] == [{"question": "a, b, c?", "answer": "d, e"}]


@DELIMITED
def test_delimited_row_with_too_many_fields(tmp_path, suffix, sep):
    path = tmp_path / f"x{suffix}"
    path.write_text(f"question{sep}answer\na{sep}b{sep}c\n", encoding="utf-8")
    with pytest.raises(DataError, match="record 1 .*3 fields, the header has 2"):
        list(read_records(path))


def test_an_output_type_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="unsupported output file type '.txt'"):
        check_output(tmp_path / "out.txt", str(source))
    with pytest.raises(DataError, match="would overwrite the input"):
        check_output(source, str(source))
    assert check_output(tmp_path / "out.tsv", str(source)) == tmp_path / "out.tsv"


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
    workbook = tmp_path / "标注.xlsx"
    workbook.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"标注.xlsx: an Excel workbook: save the sheet as CSV"):
        list(read_records(workbook))
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


# -- encodings: the files users really have ----------------------------------------------------------------

CP1252_REVIEWS = "A fine film\x85 really.\nGreat \x96 the best \x97 ever.\nplain line\n"  # bytes only cp1252 maps


def write_cp1252(path):
    path.write_bytes(CP1252_REVIEWS.encode("latin-1"))  # the code points 0x85/0x96/0x97 as single bytes
    return path


def test_cp1252_text_names_file_line_offset_bytes_and_fix(tmp_path):
    path = write_cp1252(tmp_path / "reviews.txt")
    with pytest.raises(DataError) as error:
        list(read_records(path, sample_by="line"))
    # The first bad byte is 0x85, the 12th byte of line 1 (offset 11).
    assert str(error.value) == (
        f"{path}: line 1: byte 0x85 at byte offset 11 is not valid UTF-8: the file looks like cp1252 (Windows "
        "Western European); read it with `encoding: cp1252` on its data source (--encoding cp1252 on the command "
        "line), or convert it to UTF-8 (iconv -f cp1252 -t utf-8)")


def test_the_offset_counts_bytes_of_earlier_lines(tmp_path):
    path = tmp_path / "later.jsonl"
    path.write_bytes('{"text": "héllo"}\n{"text": "ok"}\n'.encode() + '{"text": "na\x96ve"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"later.jsonl: line 3: byte 0x96 at byte offset 46 is not valid UTF-8"):
        list(read_records(path))


def test_encoding_option_reads_cp1252_and_latin1_never_adds_lines(tmp_path):
    path = write_cp1252(tmp_path / "reviews.txt")
    lines = [r.data["text"] for r in read_records(path, sample_by="line", encoding="cp1252")]
    assert lines == ["A fine film\u2026 really.", "Great \u2013 the best \u2014 ever.", "plain line"]
    # latin-1 reads 0x85 as U+0085 (NEL), which str.splitlines would split on: still three lines, as in the file.
    latin = [r.data["text"] for r in read_records(path, sample_by="line", encoding="latin-1")]
    assert len(latin) == 3 and "\x85" in latin[0]
    assert [r.data["text"] for r in read_records(path, sample_by="line", encoding="auto")] == lines


def test_utf16_with_bom_is_named_and_readable(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "一"}\n{"text": "two"}\n', encoding="utf-16")  # writes the FF FE mark
    with pytest.raises(DataError) as error:
        list(read_records(path))
    assert str(error.value).startswith(f"{path}: line 1: the file starts with a UTF-16 (little-endian) byte-order "
                                       "mark (FF FE), so it is not UTF-8; read it with `encoding: utf-16`")
    assert [r.data["text"] for r in read_records(path, encoding="utf-16")] == ["一", "two"]
    assert [r.data["text"] for r in read_records(path, encoding="auto")] == ["一", "two"]


def test_gbk_csv_is_recognised_as_chinese(tmp_path):
    path = tmp_path / "qa.csv"
    rows = "question,answer\n今天天气怎么样？,今天天气很好，适合出去散步。\n你叫什么名字？,我是一个语言模型助手。\n"
    path.write_bytes(rows.encode("gbk"))
    with pytest.raises(DataError, match=r"qa.csv: line 2: byte 0x.. at byte offset 16 is not valid UTF-8: the file "
                                        r"looks like GB18030/GBK \(Chinese\); read it with `encoding: gb18030`"):
        list(read_records(path))
    assert [r.data["answer"] for r in read_records(path, encoding="gb18030")][1] == "我是一个语言模型助手。"


def test_utf8_bom_and_explicit_utf8_drop_the_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquestion,answer\nq,a\n".encode())
    assert list(next(read_records(path)).data) == ["question", "answer"]
    assert list(next(read_records(path, encoding="UTF8")).data) == ["question", "answer"]


def test_unknown_encoding_name(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(DataError, match="a.txt: unknown encoding 'win-1252'"):
        list(read_records(path, encoding="win-1252"))


def test_cut_off_jsonl_line_says_so_with_its_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "this reply was cut off in the mid\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        list(read_records(path))
    assert str(error.value) == (f"{path}: record 3 (line 4): invalid JSON: Invalid control character at column 44; "
                                "the line ends before its JSON closes with '}': it looks cut off")


def test_complete_but_invalid_line_is_not_called_cut_off(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a",}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        list(read_records(path))
    assert str(error.value).endswith("record 1 (line 1): invalid JSON: Expecting property name enclosed in double "
                                     "quotes at column 14; a comma before '}', which JSON does not allow: remove it")


def test_any_suffix_reads_as_text_when_asked(tmp_path):
    path = tmp_path / "reviews.pos"
    path.write_text("good one\n\nloved it\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.pos'.*`label`"):
        list(read_records(path))
    assert [(r.number, r.line, r.data) for r in read_records(path, sample_by="line", as_text=True)] == [
        (1, 1, {"text": "good one"}), (2, 3, {"text": "loved it"})]


def test_a_bad_byte_past_the_first_megabyte_of_utf8(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' * 70000 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 70001: byte 0xE9 at byte offset 1190013 is not valid UTF-8: the rest "
                                        r"of its first megabyte is UTF-8, so these bytes may be damaged"):
        list(read_records(path))


@pytest.mark.parametrize("name, compress", [("qa.jsonl.gz", gzip.compress), ("qa.json.xz", lzma.compress),
                                            ("qa.csv.bz2", bz2.compress), ("qa.tsv.gz", gzip.compress)])
def test_compressed_files_read_as_their_inner_type(tmp_path, name, compress):
    rows = [{"question": "一, 二?", "answer": "三"}, {"question": "q2", "answer": "a2"}]
    plain = tmp_path / name.rsplit(".", 1)[0]
    write_records(rows, plain)
    packed = tmp_path / "packed" / name
    packed.parent.mkdir()
    packed.write_bytes(compress(plain.read_bytes()))
    assert [(r.number, r.line, r.data) for r in read_records(packed)] == \
        [(r.number, r.line, r.data) for r in read_records(plain)]
    assert expand_paths(str(packed.parent)) == [packed]


def test_compressed_text_keeps_its_paragraphs_and_encoding_checks(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    first = "今天我们学习如何微调一个语言模型。\n数据的质量比数量更重要。"
    second = "第二段：评估要对比基础模型和微调后的模型。"
    path.write_bytes(gzip.compress(f"{first}\n\n{second}\n".encode("gb18030")))
    with pytest.raises(DataError, match=r"corpus.txt.gz: line 1: byte 0xBD .*GB18030.*"
                                         r"\(gzip -dc corpus.txt.gz \| iconv -f gb18030 -t utf-8\)"):
        list(read_records(path))
    assert [r.data["text"] for r in read_records(path, encoding="gb18030")] == [first, second]


def test_a_cut_or_misnamed_compressed_file_is_one_clear_error(tmp_path):
    lines = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)).encode()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines)[:300])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot decompress the file \(gz\).*download it again"):
        list(read_records(cut))
    misnamed = tmp_path / "plain.jsonl.gz"
    misnamed.write_bytes(lines)
    with pytest.raises(DataError, match=r"plain.jsonl.gz: cannot decompress the file \(gz\): Not a gzipped file"):
        list(read_records(misnamed))


def test_content_size_is_the_decompressed_size_for_gzip(tmp_path):
    text = ("a line of text that compresses well\n" * 1000).encode()
    packed = tmp_path / "x.txt.gz"
    packed.write_bytes(gzip.compress(text))
    assert packed.stat().st_size < len(text) // 10
    assert content_size(packed) == len(text)
    plain = tmp_path / "x.txt"
    plain.write_bytes(text)
    assert content_size(plain) == len(text)


def test_nan_is_a_missing_value_in_json_and_parquet(tmp_path):
    # json.dumps of a pandas frame's records writes NaN for its missing cells; parquet keeps float NaN.
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "input": NaN, "score": Infinity}\n', encoding="utf-8")
    assert [r.data for r in read_records(path)] == [{"instruction": "a", "input": None, "score": float("inf")}]
    array = tmp_path / "x.json"
    array.write_text('[{"instruction": "a", "input": NaN}]', encoding="utf-8")
    assert [r.data for r in read_records(array)] == [{"instruction": "a", "input": None}]
    table = tmp_path / "x.parquet"
    write_records([{"answer": float("nan"), "question": "q"}, {"answer": 2.0, "question": "r"}], table)
    assert [r.data for r in read_records(table)] == [{"answer": None, "question": "q"},
                                                    {"answer": 2.0, "question": "r"}]


def test_a_datasets_folder_reads_its_arrow_rows_and_a_dataset_dict_names_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    rows = [{"instruction": "一", "output": "1"}, {"instruction": "二", "output": "2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    files = expand_paths(str(tmp_path / "saved"))
    assert [p.suffix for p in files] == [".arrow"]  # not its dataset_info.json and state.json
    assert [r.data for r in read_records(files[0])] == rows
    # the Arrow IPC file format (pyarrow's default for .arrow files) as well as datasets' stream format
    ipc_file = tmp_path / "table.arrow"
    with pa.OSFile(str(ipc_file), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows))
    assert [(r.number, r.data) for r in read_records(ipc_file)] == [(1, rows[0]), (2, rows[1])]
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:1])
                         ).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"DatasetDict folder with the splits train, test: give the folder of one "
                                        r"split \(e\.g\. .*splits/train\)"):
        expand_paths(str(tmp_path / "splits"))
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="broken.arrow: not a readable arrow file"):
        list(read_records(broken))


def test_a_llamafactory_folder_asks_for_one_of_its_datasets(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_zh_demo": {"file_name": "a.json"},
                                                            "dpo_zh_demo": {"file_name": "d.json", "ranking": True}}))
    write_records([{"instruction": "i", "output": "o"}], tmp_path / "a.json")
    for spec in (tmp_path, tmp_path / "dataset_info.json"):
        with pytest.raises(DataError, match=r"a LLaMA-Factory data folder: name one dataset of its "
                                            r"dataset_info.json with `dataset:` \(--dataset\), e.g. alpaca_zh_demo; "
                                            r"it has 2: alpaca_zh_demo, dpo_zh_demo"):
            expand_paths(str(spec))
    assert expand_paths(str(tmp_path / "a.json")) == [tmp_path / "a.json"]


def test_parquet_dates_and_decimals_write_to_json_and_csv_and_bytes_say_where(tmp_path):
    import datetime
    import decimal

    rows = [{"question": "q", "answer": "a", "created": datetime.datetime(2024, 5, 1, 8, 30),
             "day": datetime.date(2024, 5, 1), "price": decimal.Decimal("1.10")}]
    table = tmp_path / "x.parquet"
    write_records(rows, table)
    read = [r.data for r in read_records(table)]
    for suffix in (".jsonl", ".json", ".csv"):
        write_records(read, tmp_path / f"out{suffix}")
        assert [r.data for r in read_records(tmp_path / f"out{suffix}")] == [
            {"question": "q", "answer": "a", "created": "2024-05-01T08:30:00", "day": "2024-05-01", "price": "1.10"}]
    blob = [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a", "image": b"\x89PNG"}]
    with pytest.raises(DataError, match=r"out.jsonl: record 2: field 'image': a bytes value cannot be written as "
                                        r"jsonl; write this output as .parquet"):
        write_records(blob, tmp_path / "out.jsonl")
    write_records(blob, tmp_path / "out.parquet")
    assert [r.data for r in read_records(tmp_path / "out.parquet")][1]["image"] == b"\x89PNG"
    assert json.loads(to_json(blob[1], report=True))["image"] == "<4 bytes>"


@pytest.mark.parametrize("name, text, message", [
    ("commas.jsonl", '{"q": "a", "a": "b"},\n{"q": "c", "a": "d"},\n',
     r"record 1 \(line 1\): invalid JSON: Extra data at column 21; a comma after the record: JSON Lines has one"),
    ("trailing.json", '[\n{"q": "a", "a": "b"},\n]\n', r"line 3: .*; a comma before '\]', which JSON does not allow"),
    ("python.jsonl", "{'q': 'a', 'a': 'b'}\n", r"single quotes: this is a Python dict, not JSON"),
])
def test_the_usual_json_mistakes_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        list(read_records(path))


def test_files_joined_with_cat_keep_every_record_past_a_byte_order_mark(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_bytes(b'{"q": "a"}\n' + "\ufeff".encode() + b'{"q": "b"}\n')
    assert [(r.number, r.data) for r in read_records(path)] == [(1, {"q": "a"}), (2, {"q": "b"})]
