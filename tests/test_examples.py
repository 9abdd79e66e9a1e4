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
