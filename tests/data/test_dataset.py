
import pytest

from tests.conftest import write_jsonl
from weitiao.config import DataConfig, DataSource
from weitiao.data.dataset import build_datasets, format_stats, load_source
from weitiao.data.encode import IGNORE_INDEX
from weitiao.errors import DataError


def qa_rows(n, answer="yes"):
    return [{"question": f"question number {i}?", "answer": f"{answer} {i}"} for i in range(n)]


def test_validation_split_and_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(10, "no"))
    data = DataConfig(train=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}], val_size=0.2)
    train, evaluation, stats = build_datasets(data, tokenizer)
    # 6 of 30 records held out first; the weights then apply to what is left of each source.
    assert len(evaluation) == 6 and stats["held_out_for_eval"] == 6
    used = [source["examples_used"] for source in stats["sources"]]
    assert len(train) == sum(used) and used[0] % 2 == 0 and 3 <= used[1] <= 5
    assert stats["train"]["examples"] == len(train)
    assert "messages" in evaluation.column_names  # eval rows keep their conversation: references for generation


def test_skip_policy_counts_every_bad_record(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    rows = qa_rows(5) + [{"question": "no answer"}, {"question": "empty", "answer": " "}]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"record 6 \(line 6\): field 'answer': missing field"):
        build_datasets(DataConfig(train=[str(path)]), tokenizer)
    train, _, stats = build_datasets(DataConfig(train=[str(path)], on_error="skip"), tokenizer)
    assert len(train) == 5
    source = stats["sources"][0]
    assert source["skipped"] == 2
    assert source["skipped_by_reason"] == {"missing field": 1, "empty response": 1}
    assert "2 skipped" in format_stats(stats)


def test_truncated_and_dropped_examples_are_counted(tmp_path, tokenizer):
    long_answer = " ".join(["word"] * 200)
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(3) + [{"question": "long?", "answer": long_answer}])
    _, _, stats = build_datasets(DataConfig(train=[str(path)], max_length=64, truncation="right"), tokenizer)
    assert stats["train"]["truncated"] == 1 and stats["train"]["examples"] == 4
    train, _, stats = build_datasets(DataConfig(train=[str(path)], max_length=64, truncation="drop"), tokenizer)
    assert stats["train"]["dropped"] == {"dropped: longer than max_length": 1} and len(train) == 3
    assert max(len(ids) for ids in train["input_ids"]) <= 64


def test_labels_mask_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Say hi", "answer": "hi"}])
    train, _, _ = build_datasets(DataConfig(train=[str(path)]), tokenizer)
    labels = train[0]["labels"]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "hi<|im_end|>"
    assert labels[0] == IGNORE_INDEX


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    data = DataConfig(train=[str(path)])
    _, _, first = build_datasets(data, tokenizer)
    _, _, second = build_datasets(data, tokenizer)
    assert "cached" not in first and "cached" in second
    write_jsonl(path, qa_rows(6))
    train, _, third = build_datasets(data, tokenizer)
    assert "cached" not in third and len(train) == 6


def test_plain_text_needs_stage_pt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "domain text"}])
    with pytest.raises(DataError, match="stage: pt"):
        build_datasets(DataConfig(train=[str(path)]), tokenizer)
    train, _, _ = build_datasets(DataConfig(train=[str(path)]), tokenizer, stage="pt")
    assert train[0]["labels"] == train[0]["input_ids"]


def test_no_training_data_and_val_size_too_large(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no training data"):
        build_datasets(DataConfig(), tokenizer)
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(3))
    with pytest.raises(DataError, match="leaves no training data"):
        build_datasets(DataConfig(train=[str(path)], val_size=3), tokenizer)


# -- the real datasets in ../shared/data (skipped on a fresh clone) ------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("relative, fmt, records", [
    ("alpaca_zh/alpaca_zh_demo.json", "alpaca", 1000),
    ("gsm8k/test.jsonl", "qa", 1319),
    ("belle_zh/zh_seed_tasks.json", None, 175),
])
def test_real_datasets_load(shared_data, tokenizer, relative, fmt, records):
    from weitiao.config import DataSource
    from weitiao.data.dataset import load_source

    path = shared_data / relative
    if fmt is None:  # BELLE seed tasks: instruction + instances[0] -> a prompt template does the mapping
        with pytest.raises(DataError, match="cannot tell the data format"):
            load_source(DataSource(path=str(path)))
        return
    examples, stats = load_source(DataSource(path=str(path)))
    assert stats.format == fmt and stats.records == records and len(examples) == records


@pytest.mark.shared_data
def test_sharegpt_quirks_are_repaired_and_counted(shared_data):
    from weitiao.config import DataSource
    from weitiao.data.dataset import load_source

    source = DataSource(path=str(shared_data / "sharegpt_zh/sharegpt_zh_1K_format.jsonl"))
    # Record 781 is a single human turn: nothing to learn, so a run stops on it unless told to skip.
    with pytest.raises(DataError, match=r"sharegpt_zh_1K_format.jsonl: record 781 \(line 781\): no assistant reply "
                                        r"to train on"):
        load_source(source)
    examples, stats = load_source(source, on_error="skip")
    assert stats.format == "sharegpt" and stats.records == 1000 and len(examples) == 999
    assert stats.skipped == {"no assistant reply to train on": 1}
    # The data's README: 7 conversations end on a human turn (781 among them), 17 turns have an empty value
    # (all human turns).
    assert stats.notes["trailing user turns removed"] == 6
    assert stats.notes["empty user turns kept"] == 17


@pytest.mark.shared_data
def test_belle_eval_set_with_empty_answers(shared_data):
    from weitiao.config import DataSource
    from weitiao.data.dataset import load_source

    source = DataSource(path=str(shared_data / "belle_zh/eval_set.json"),
                        columns={"prompt": "question", "response": "std_answer"})
    with pytest.raises(DataError, match=r"eval_set.json: record \d+ \(line \d+\): field 'std_answer': empty response"):
        load_source(source)
    examples, stats = load_source(source, on_error="skip")
    assert stats.skipped == {"empty response": 369} and len(examples) == 631


# -- real-file layouts: classification folders, column typos, eval shares, several references ---------------

def test_label_files_become_question_answer_pairs(tmp_path, tokenizer):
    (tmp_path / "reviews.pos").write_text("a joy to watch\nloved every minute\n", encoding="utf-8")
    (tmp_path / "reviews.neg").write_bytes("a mess\x85 from start to end\n\ntoo long\nboring\n".encode("latin-1"))
    source = DataSource(path=str(tmp_path / "reviews.*"), label="{file}", encoding="cp1252",
                        prompt_template="Review: {text}\nSentiment:")
    examples, stats = load_source(source)
    pairs = [(example.messages[-2]["content"], example.messages[-1]["content"]) for example in examples]
    assert sorted(pairs) == sorted([
        ("Review: a joy to watch\nSentiment:", "pos"), ("Review: loved every minute\nSentiment:", "pos"),
        ("Review: a mess\u2026 from start to end\nSentiment:", "neg"), ("Review: too long\nSentiment:", "neg"),
        ("Review: boring\nSentiment:", "neg")])
    assert stats.format == "qa" and stats.records == 5
    train, _, _ = build_datasets(DataConfig(train=[source], cache=False), tokenizer)
    assert len(train) == 5


def test_fixed_label_and_txt_stems(tmp_path, tokenizer):
    (tmp_path / "pos.txt").write_text("great\n", encoding="utf-8")
    (tmp_path / "neg.txt").write_text("awful\n", encoding="utf-8")
    examples = [example for source in (DataSource(path=str(tmp_path / "*.txt"), label="{file}"),
                                       DataSource(path=str(tmp_path / "pos.txt"), label="positive"))
                for example in load_source(source)[0]]
    assert sorted(example.messages[-1]["content"] for example in examples) == ["neg", "pos", "positive"]


def test_label_on_a_file_with_columns_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(2))
    with pytest.raises(DataError, match=r"d.jsonl: `label` is for plain-text files .* columns: \{prompt: text, "):
        build_datasets(DataConfig(train=[{"path": str(path), "label": "x"}], cache=False), tokenizer)


def test_mapping_to_a_missing_column_names_the_columns_and_the_closest(tmp_path, tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text("question,anwser\nwhat?,this\n", encoding="utf-8")
    source = {"path": str(path), "columns": {"response": "answer"}}
    for data in (DataConfig(train=[source], cache=False), DataConfig(train=[{**source, "format": "qa"}], cache=False)):
        with pytest.raises(DataError) as error:
            build_datasets(data, tokenizer)
        assert str(error.value) == (f"{path}: record 1 (line 2): column 'answer' (columns: response=answer) not "
                                    "found; the file has: question, anwser (did you mean 'anwser'?)")


def test_eval_weight_keeps_a_seeded_share_and_the_report_says_so(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    test = write_jsonl(tmp_path / "test.jsonl", qa_rows(40, "no"))
    data = DataConfig(train=[str(train)], eval=[{"path": str(test), "weight": 0.25}], cache=False)
    _, evaluation, stats = build_datasets(data, tokenizer, seed=1)
    assert len(evaluation) == 10 and stats["sources"][1]["examples_used"] == 10
    records = evaluation["record"]
    assert records == sorted(records) and records != list(range(1, 11))  # a random share, in file order
    assert build_datasets(data, tokenizer, seed=1)[1]["record"] == records  # the same share again
    assert build_datasets(data, tokenizer, seed=2)[1]["record"] != records


def test_eval_weight_above_one_is_refused():
    with pytest.raises(ValueError, match=r"data.eval\[0\].weight is 2.0: evaluation would count examples more than "
                                         r"once"):
        DataConfig(train=["a.jsonl"], eval=[{"path": "b.jsonl", "weight": 2}])


def test_several_reference_columns(tmp_path, tokenizer):
    rows = [{"dialogue": f"talk {i}", "summary1": f"first {i}", "summary2": f"second {i}", "summary3": ""}
            for i in range(3)]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    source = {"path": str(path), "columns": {"prompt": "dialogue", "response": ["summary1", "summary2", "summary3"]}}
    data = DataConfig(train=[str(write_jsonl(tmp_path / "t.jsonl", qa_rows(3)))], eval=[source], cache=False)
    _, evaluation, stats = build_datasets(data, tokenizer)
    assert evaluation["references"][0] == ["first 0", "second 0"]  # empty references are not references
    assert evaluation["messages"][0][-1]["content"] == "first 0"  # the first is the reply (loss)
    assert stats["sources"][1]["notes"]["references"] == 6
    wrong = {**source, "columns": {"prompt": "dialogue", "response": ["summary1", "summary_2"]}}
    with pytest.raises(DataError, match=r"column 'summary_2' \(columns: response=summary_2\) not found; .*did you "
                                        r"mean 'summary2'"):
        build_datasets(DataConfig(train=data.train, eval=[wrong], cache=False), tokenizer)


def test_reference_lists_only_for_the_reply():
    with pytest.raises(ValueError, match="columns.prompt: only the reply"):
        DataConfig(train=[{"path": "a.jsonl", "columns": {"prompt": ["a", "b"]}}])


def test_label_from_the_folder_one_document_per_file(tmp_path):
    for label, texts in {"pos": ["Great film.\nLoved it.", "Fine."], "neg": ["Dull."]}.items():
        (tmp_path / "train" / label).mkdir(parents=True)
        for index, text in enumerate(texts):
            (tmp_path / "train" / label / f"{index}_7.txt").write_text(text + "\n", encoding="utf-8")
    examples, _ = load_source(DataSource(path=str(tmp_path / "train" / "*" / "*.txt"), label="{folder}",
                                         sample_by="document"))
    assert sorted((e.messages[-2]["content"], e.messages[-1]["content"]) for e in examples) == [
        ("Dull.", "neg"), ("Fine.", "pos"), ("Great film.\nLoved it.", "pos")]


def test_auto_encoding_says_what_each_file_was_read_as(tmp_path):
    (tmp_path / "a.neg").write_bytes("dull\x85 and long\n".encode("latin-1"))
    (tmp_path / "b.neg").write_text("tedious\n", encoding="utf-16")
    examples, stats = load_source(DataSource(path=str(tmp_path / "*.neg"), label="{file}", encoding="auto"))
    assert [e.messages[-2]["content"] for e in examples] == ["dull\u2026 and long", "tedious"]
    assert dict(stats.notes) == {"files read as cp1252": 1, "files read as utf-16": 1}
