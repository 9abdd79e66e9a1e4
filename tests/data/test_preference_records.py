"""Preference pairs and binary feedback in the layouts people have, and what becomes of bad records."""

import json

import pytest
import torch

from tests.conftest import write_jsonl
from weitiao.config import load_config
from weitiao.data.collate import PadCollator
from weitiao.data.dataset import build_datasets, load_source
from weitiao.data.encode import IGNORE_INDEX
from weitiao.data.packing import PackedCollator
from weitiao.data.preference import FeedbackCollator, PairCollator, encode_pair, split_dialogue
from weitiao.errors import DataError

PROMPT = [{"role": "user", "content": "Capital of France?"}]
EXPECTED = {"messages": PROMPT + [{"role": "assistant", "content": "Paris."}], "rejected": "Lyon."}

LAYOUTS = {
    "sharegpt": {"conversations": [{"from": "human", "value": "Capital of France?"}],
                 "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Lyon."}},
    "openai": {"messages": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
               "rejected": [{"role": "assistant", "content": "Lyon."}]},
    "trl prompt list": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
                        "rejected": [{"role": "assistant", "content": "Lyon."}]},
    "alpaca": {"instruction": "Capital of France?", "input": "", "chosen": "Paris.", "rejected": "Lyon."},
    "prompt strings": {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    "dialogues": {"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
                  "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon."},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_pair_layout_becomes_a_prompt_with_two_replies(tmp_path, layout):
    from weitiao.config import DataSource

    path = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS[layout]])
    examples, stats = load_source(DataSource(path=str(path)), kind="pairs")
    assert {"messages": examples[0].messages, "rejected": examples[0].rejected} == EXPECTED
    assert stats.format.endswith("pairs")


def test_column_mapping_and_multi_turn_dialogues(tmp_path):
    from weitiao.config import DataSource

    row = {"q": "Hi", "better": "Hello!", "worse": "Go away."}
    path = write_jsonl(tmp_path / "mapped.jsonl", [row])
    examples, _ = load_source(DataSource(path=str(path), columns={"prompt": "q", "chosen": "better",
                                                                  "rejected": "worse"}), kind="pairs")
    assert examples[0].messages[-1]["content"] == "Hello!" and examples[0].rejected == "Go away."
    turns = split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"] and turns[-1]["content"] == "d"


def test_bad_pairs_stop_with_file_record_and_field_or_are_counted(tmp_path):
    from weitiao.config import DataSource

    rows = [LAYOUTS["alpaca"],
            {**LAYOUTS["alpaca"], "rejected": "Paris."},  # identical
            {**LAYOUTS["alpaca"], "rejected": "  "},  # empty
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl: record 2 \(line 2\): field 'rejected': chosen and rejected "
                                        "replies are identical"):
        load_source(DataSource(path=str(path)), kind="pairs")
    examples, stats = load_source(DataSource(path=str(path)), on_error="skip", kind="pairs")
    assert len(examples) == 1
    assert stats.skipped == {"chosen and rejected replies are identical: the pair prefers nothing": 1,
                             "empty reply": 1, "missing field": 1}  # the last record has no instruction
    dialogues = write_jsonl(tmp_path / "hh.jsonl", [LAYOUTS["dialogues"], rows[3]])
    with pytest.raises(DataError, match=r"record 2 \(line 2\): field 'rejected': the two dialogues differ before"):
        load_source(DataSource(path=str(dialogues)), kind="pairs")


def test_pairs_share_the_prompt_and_label_only_their_replies(tokenizer):
    pair, event, length = encode_pair(tokenizer, EXPECTED["messages"], EXPECTED["rejected"], 512, "right")
    assert event is None and length == max(len(pair["input_ids"]), len(pair["rejected_input_ids"]))
    prompt = next(i for i, label in enumerate(pair["labels"]) if label != IGNORE_INDEX)
    assert pair["input_ids"][:prompt] == pair["rejected_input_ids"][:prompt]
    chosen_reply = tokenizer.decode([t for t in pair["labels"] if t != IGNORE_INDEX])
    rejected_reply = tokenizer.decode([t for t in pair["rejected_labels"] if t != IGNORE_INDEX])
    assert chosen_reply.startswith("Paris.") and rejected_reply.startswith("Lyon.")
    # A prompt that leaves no room for the replies drops the pair, and says so.
    assert encode_pair(tokenizer, EXPECTED["messages"], "Lyon.", prompt, "right")[:2] == (
        None, "dropped: prompt longer than max_length")
    # Left truncation cuts the shared prompt, never a reply.
    cut, event, _ = encode_pair(tokenizer, EXPECTED["messages"], EXPECTED["rejected"], len(pair["input_ids"]) - 3,
                                "left")
    assert event == "truncated" and cut["labels"][-5:] == pair["labels"][-5:]
    assert cut["input_ids"][0] != pair["input_ids"][0] or cut["input_ids"] == pair["input_ids"][3:]


def test_packed_and_padded_pair_batches_number_the_same_sequences():
    pairs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "rejected_input_ids": [1, 2, 4, 5],
              "rejected_labels": [-100, 2, 4, 5]},
             {"input_ids": [7, 8], "labels": [-100, 8], "rejected_input_ids": [7, 9], "rejected_labels": [-100, 9]}]
    padded = PairCollator(PadCollator(0))(pairs)
    packed = PairCollator(PackedCollator(0, pad_to_multiple_of=8))(pairs)
    assert padded["pairs"] == packed["pairs"] == 2 and padded["input_ids"].shape[0] == 4
    for batch in (padded, packed):
        labelled = batch["labels"] != IGNORE_INDEX
        assert batch["sequence_index"][labelled].tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert packed["sequence_index"][0, -1] >= 4  # padding is a sequence of its own, with no labels


def test_feedback_batches_pair_each_prompt_with_the_next_reply():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "label": True},
                {"input_ids": [4, 5, 6, 7], "labels": [-100, -100, 6, 7], "label": False}]
    batch = FeedbackCollator(PadCollator(0))(examples)
    assert batch["examples"] == 2 and batch["desirable"].tolist() == [True, False]
    rows = [row[mask].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"].bool())]
    assert rows[2] == [1, 6, 7] and rows[3] == [4, 5, 2, 3]  # prompt 0 + reply 1, prompt 1 + reply 0
    assert torch.equal(batch["labels"][2][:3], torch.tensor([-100, 6, 7]))


def test_kto_reads_a_boolean_label_and_refuses_others(tmp_path):
    from weitiao.config import DataSource

    rows = [{"messages": PROMPT + [{"role": "assistant", "content": "Paris."}], "label": True},
            {"prompt": "Capital of France?", "completion": "Lyon.", "label": "false"}]
    examples, _ = load_source(DataSource(path=str(write_jsonl(tmp_path / "a.jsonl", rows[:1]))), kind="feedback")
    assert examples[0].label is True
    examples, _ = load_source(DataSource(path=str(write_jsonl(tmp_path / "b.jsonl", rows[1:]))), kind="feedback")
    assert examples[0].label is False and examples[0].messages[-1]["content"] == "Lyon."
    bad = write_jsonl(tmp_path / "c.jsonl", [{**rows[0], "label": "maybe"}])
    with pytest.raises(DataError, match=r"c.jsonl: record 1 \(line 1\): field 'label': expected a boolean label"):
        load_source(DataSource(path=str(bad)), kind="feedback")


def test_real_preference_files_read_whole_with_drops_counted(shared_data, tokenizer):
    for name, stage in (("dpo_en_demo.json", "dpo"), ("dpo_zh_demo.json", "rm"), ("kto_en_demo.json", "kto")):
        config = load_config(None, {"stage": stage, "data": {"train": str(shared_data / "preference" / name),
                                                             "max_length": 512, "cache": False}})
        train, _, stats = build_datasets(config.data, tokenizer, config.stage)
        source, summary = stats["sources"][0], stats["train"]
        assert source["records"] == 300 and source["skipped"] == 0
        assert summary["examples"] + sum(summary["dropped"].values()) == 300
        assert len(train) == summary["examples"] > 150
        if stage != "kto":
            assert summary["dropped"].get("dropped: prompt longer than max_length", 0) > 0
            assert all(len(ids) <= 512 for ids in train["rejected_input_ids"])
        else:
            assert sorted(set(train["label"])) == [False, True]
    first = json.loads((shared_data / "preference" / "dpo_en_demo.json").read_text())[0]
    assert first["chosen"]["value"] != first["rejected"]["value"]


def test_sft_on_pairs_trains_on_the_chosen_replies(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["sharegpt"]] * 2)
    config = load_config(None, {"data": {"train": str(path), "cache": False}})
    train, _, stats = build_datasets(config.data, tokenizer, "sft")
    assert stats["sources"][0]["format"] == "sharegpt pairs (chosen replies)"
    assert "rejected_input_ids" not in train.column_names and len(train) == 2
    replies = [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in train["labels"]]
    assert all(reply.startswith("Paris.") for reply in replies)


@pytest.mark.parametrize("fmt", ["sharegpt", "openai", "alpaca", "qa"])
def test_convert_keeps_pairs_and_feedback_whole(tmp_path, fmt):
    from weitiao.config import DataSource
    from weitiao.data.inspect import convert

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [LAYOUTS["sharegpt"]])
    convert(DataSource(path=str(pairs)), fmt, tmp_path / f"pairs-{fmt}.jsonl")
    examples, _ = load_source(DataSource(path=str(tmp_path / f"pairs-{fmt}.jsonl")), kind="pairs")
    assert {"messages": examples[0].messages, "rejected": examples[0].rejected} == EXPECTED
    feedback = write_jsonl(tmp_path / "kto.jsonl", [{"messages": EXPECTED["messages"], "label": False}])
    convert(DataSource(path=str(feedback)), fmt, tmp_path / f"kto-{fmt}.jsonl")
    examples, _ = load_source(DataSource(path=str(tmp_path / f"kto-{fmt}.jsonl")), kind="feedback")
    assert examples[0].messages == EXPECTED["messages"] and examples[0].label is False
