"""Every example config runs (shortened: the tiny model, two steps), so examples cannot rot."""

from pathlib import Path

import pytest

from weitiao.config import load_config
from weitiao.train import run

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_trains(path, tmp_path, tiny_model_dir):
    config = load_config(path, ["--model", tiny_model_dir, "--max_steps", "2", "--output_dir", str(tmp_path / "out"),
                                "--save_steps", "0", "--eval_steps", "0"])
    result = run(config)
    assert result.steps == 2 and result.train_loss is not None
    assert result.eval_loss is not None  # every example holds out or names eval data


def test_demo_config_is_valid():
    from weitiao.demo import DEMO_CONFIG

    config = load_config(DEMO_CONFIG)
    assert config.model.name_or_path == "default" and all(Path(s.path).is_file() for s in config.data.train)


def test_the_readme_commands_for_the_real_public_sets_load(monkeypatch):
    """The one-line commands of the README's recipe table give valid configs that read what they say."""
    import re
    import shlex

    from weitiao.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("runs on the real public"):]
    block = block[block.index("```bash") + 7:block.index("```", block.index("```bash") + 7)]
    commands = [shlex.split(re.sub(r"#.*", "", line)) for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("weitiao train")]
    assert len(commands) == 6
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for words in commands:
        args, overrides = build_parser().parse_known_args(words[1:])
        config = load_config(args.config, overrides)
        assert config.data.train[0].path == overrides[overrides.index("--data.train.0.path") + 1]
    sentiment = load_config("examples/sentiment/config.yaml", [
        "--data.train.0.label", '"{file}"', "--data.train.0.encoding", "cp1252", "--data.eval", "[]"])
    assert (sentiment.data.train[0].label, sentiment.data.train[0].sample_by) == ("{file}", "line")
    assert "{text}" in sentiment.data.train[0].prompt_template and sentiment.data.eval == []
