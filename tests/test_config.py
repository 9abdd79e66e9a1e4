import pytest

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
