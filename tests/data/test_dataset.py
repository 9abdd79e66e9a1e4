
import pytest

from tests.conftest import write_jsonl
from weitiao.config import DataConfig
from weitiao.data.dataset import build_datasets, format_stats
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
    with pytest.raises(DataError, match="record 6: field 'answer': missing field"):
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
    with pytest.raises(DataError, match="sharegpt_zh_1K_format.jsonl: record 781: no assistant reply to train on"):
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
    with pytest.raises(DataError, match=r"eval_set.json: record \d+: field 'std_answer': empty response"):
        load_source(source)
    examples, stats = load_source(source, on_error="skip")
    assert stats.skipped == {"empty response": 369} and len(examples) == 631
