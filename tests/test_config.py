import json

import pytest

from tests.conftest import write_jsonl
from weitiao.config import load_config, parse_overrides
from weitiao.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_with_overrides_of_every_spelling(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    path = write(tmp_path, "data:\n  train: data/train.jsonl\ntrain:\n  learning_rate: 1e-4\n")
    config = load_config(path, ["--train.num_train_epochs", "2", "--learning_rate=3e-4", "--model", "my/model",
                                "--lora.target_modules", "[q_proj, v_proj]", "--method", "full"])
    assert config.train.learning_rate == 3e-4 and config.train.num_train_epochs == 2
    assert config.model.name_or_path == "my/model" and config.method == "full"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    # Data paths are relative to the config file, so a config runs from any directory.
    assert config.data.train[0].path == str(tmp_path / "data" / "train.jsonl")


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train:\n  learning_rte: 1e-4\n")
    message = r"run.yaml: train.learning_rte: unknown key \(did you mean 'learning_rate'\?\)"
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        parse_overrides(["--lerning_rate", "1"])


def test_bad_values_are_reported_with_their_location(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: -1\ndata:\n  truncation: middle\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.learning_rate: Input should be greater than 0" in message
    assert "data.truncation: Input should be 'right', 'left' or 'drop'" in message
    with pytest.raises(ConfigError, match="train: bf16 and fp16 are both set; choose one"):
        load_config(None, ["--bf16", "true", "--fp16", "true"])


def test_a_data_source_typo_is_caught(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - path: a.jsonl\n      colums: {prompt: x}\n")
    with pytest.raises(ConfigError, match=r"data.train.0.colums: unknown key \(did you mean 'columns'\?\)"):
        load_config(path)


def test_valueless_override():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.seed"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_custom_template_needs_content_placeholder():
    with pytest.raises(ConfigError, match=r"data.custom_template.user: must contain the placeholder \{content\}"):
        load_config(None, {"data": {"custom_template": {"user": "### Q"}}})


def test_pretraining_trains_on_all_tokens():
    assert load_config(None, ["--stage", "pt"]).data.train_on == "all"


def test_streaming_and_adapter_continuation_are_checked(tmp_path):
    path = write(tmp_path, "stage: pt\ndata:\n  train: corpus.txt\n  eval: eval.txt\n  streaming: true\n"
                           "train:\n  max_steps: 10\n")
    assert load_config(path).data.streaming
    for change, message in ((["--stage", "sft"], "data.streaming is for stage: pt"),
                            (["--max_steps", "-1"], "data.streaming needs train.max_steps"),
                            (["--data.eval", "[]", "--val_size", "0.1"], "cannot hold records out of a stream"),
                            (["--model.adapter", "outputs/pt", "--method", "full"], "method must be lora or qlora")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, change)


def test_config_docs_are_current():
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "make_config_docs.py"))
    assert script["TARGET"].read_text(encoding="utf-8") == script["render"](), \
        "docs/config.md is stale: run python scripts/make_config_docs.py"


def test_a_saved_config_loads_back_unchanged(tmp_path):
    """Every run writes config.yaml; weitiao eval, the web UI and --resume read it back."""
    from weitiao.config import dump_config

    for method in ("lora", "qlora", "full", "prefix"):
        config = load_config(None, ["--method", method, "--data.train", "[a.jsonl]", "--eval.extractor", "json"])
        path = tmp_path / f"{method}.yaml"
        path.write_text(dump_config(config), encoding="utf-8")
        assert load_config(path) == config


def llamafactory_folder(tmp_path, entries):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def test_a_llamafactory_dataset_becomes_this_sources_path_format_and_columns(tmp_path):
    from weitiao.config import dump_config
    from weitiao.data.dataset import load_source

    folder = llamafactory_folder(tmp_path, {
        "firefly": {"file_name": "firefly.jsonl", "columns": {"prompt": "input", "response": "target"}},
        "chats": {"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                  "system": "sys"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                             "assistant_tag": "assistant"}},
        "wiki": {"file_name": "wiki.jsonl", "columns": {"prompt": "body"}}})
    write_jsonl(folder / "firefly.jsonl", [{"input": "一加一", "target": "二", "kind": "math"}])
    (folder / "chats.json").write_text(json.dumps([{"sys": "S", "messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]), encoding="utf-8")
    write_jsonl(folder / "wiki.jsonl", [{"body": "a document"}])
    config = load_config(write(tmp_path, "data:\n  train:\n    - {path: data, dataset: firefly}\n"
                                         "    - {path: data/dataset_info.json, dataset: chats}\n"
                                         "    - {path: data, dataset: wiki}\n"))
    firefly, chats, wiki = config.data.train
    assert (firefly.path, firefly.format, firefly.columns) == (str(folder / "firefly.jsonl"), "alpaca",
                                                               {"instruction": "input", "output": "target"})
    assert (chats.format, chats.columns) == ("sharegpt", {"conversations": "messages", "system": "sys"})
    assert (wiki.format, wiki.columns) == ("text", {"text": "body"})  # LLaMA-Factory's pre-training entries
    assert [example.messages for example in load_source(firefly)[0]] == [
        [{"role": "user", "content": "一加一"}, {"role": "assistant", "content": "二"}]]
    assert load_source(chats)[0][0].messages[0] == {"role": "system", "content": "S"}
    assert load_source(wiki)[0][0].text == "a document"
    # the run's config.yaml says what was read, and loads back as it is
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(config), encoding="utf-8")
    assert load_config(saved).data.train == config.data.train
    assert "dataset: null" in saved.read_text() and "dataset_info" not in saved.read_text()


@pytest.mark.parametrize("entry, message", [
    ({"hf_hub_url": "llamafactory/alpaca_en"}, r"is on a hub \(hf_hub_url: llamafactory/alpaca_en\)"),
    ({"file_name": "x.json", "num_samples": 100}, "num_samples not supported .*use `weight`"),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"images": "images"}}, "weitiao trains on text"),
    ({"file_name": "x.json", "formatting": "sharegpt", "tags": {"role_tag": "speaker"}},
     "tags.role_tag 'speaker': weitiao reads turns whose keys are from or role"),
    ({"file_name": "x.json", "columns": {"messages": "conversations"}}, "column 'messages' is not one of alpaca's"),
    ({"formatting": "alpaca"}, "has no file_name"),
])
def test_a_llamafactory_entry_weitiao_cannot_read_says_why(tmp_path, entry, message):
    llamafactory_folder(tmp_path, {"mine": entry})
    with pytest.raises(ConfigError, match=rf"run.yaml: .*dataset_info.json: dataset 'mine'.*{message}"):
        load_config(write(tmp_path, "data:\n  train: [{path: data, dataset: mine}]\n"))


def test_a_misspelt_llamafactory_dataset_is_named(tmp_path):
    llamafactory_folder(tmp_path, {"alpaca_zh_demo": {"file_name": "a.json"}})
    with pytest.raises(ConfigError, match="has no dataset 'alpaca_zh' \\(did you mean 'alpaca_zh_demo'\\?\\)"):
        load_config(write(tmp_path, "data:\n  train: [{path: data, dataset: alpaca_zh}]\n"))
    with pytest.raises(ConfigError, match="cannot read LLaMA-Factory's dataset_info.json at .*elsewhere"):
        load_config(None, ["--data.train", f"[{{path: {tmp_path / 'elsewhere'}, dataset: alpaca_zh_demo}}]"])


def test_llamafactorys_own_entries_for_its_demo_sets_read_the_shared_files(tmp_path, shared_data):
    """The entries of LLaMA-Factory's data/dataset_info.json for the demo files in ../shared/data, as they are."""
    from weitiao.data.dataset import load_source
    from weitiao.data.preference import record_kind

    sharegpt = {"formatting": "sharegpt"}
    llamafactory_folder(tmp_path, {
        "alpaca_zh_demo": {"file_name": str(shared_data / "alpaca_zh/alpaca_zh_demo.json")},
        "glaive_toolcall_zh_demo": {**sharegpt, "file_name": str(shared_data / "toolcall/glaive_toolcall_zh_demo.json"),
                                    "columns": {"messages": "conversations", "tools": "tools"}},
        "dpo_zh_demo": {**sharegpt, "file_name": str(shared_data / "preference/dpo_zh_demo.json"), "ranking": True,
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_en_demo": {**sharegpt, "file_name": str(shared_data / "preference/kto_en_demo.json"),
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}}})
    read = {}
    for name, stage in (("alpaca_zh_demo", "sft"), ("glaive_toolcall_zh_demo", "sft"), ("dpo_zh_demo", "dpo"),
                        ("kto_en_demo", "kto")):
        config = load_config(write(tmp_path, f"stage: {stage}\ndata:\n  train: [{{path: data, dataset: {name}}}]\n"))
        examples, stats = load_source(config.data.train[0], on_error="skip", kind=record_kind(stage))
        read[name] = (len(examples), sum(stats.skipped.values()))
    # glaive_toolcall_zh_demo: 2 records call a tool their schema list does not have (as without dataset_info.json)
    assert read == {"alpaca_zh_demo": (1000, 0), "glaive_toolcall_zh_demo": (298, 2), "dpo_zh_demo": (300, 0),
                    "kto_en_demo": (300, 0)}
