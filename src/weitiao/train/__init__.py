"""Training: one core (weitiao.train.core) and a recipe per stage, registered here.

`run(config)` trains the stage the config names. A new stage (preference pairs, a reward model) is a recipe class
on the core, one line in STAGES and its name in the config's `stage`.
"""

from __future__ import annotations

from weitiao.config import Config
from weitiao.train.core import LogHook, TrainResult
from weitiao.train.preference import PreferenceRecipe
from weitiao.train.pt import PretrainRecipe
from weitiao.train.reward import RewardRecipe
from weitiao.train.sft import SFTRecipe

STAGES = {"sft": SFTRecipe, "pt": PretrainRecipe, "dpo": PreferenceRecipe, "kto": PreferenceRecipe,
          "rm": RewardRecipe}


def run(config: Config, resume: bool = False, on_log: LogHook | None = None) -> TrainResult:
    """Train `config.stage` on its recipe; the run folder is config.train.output_dir."""
    return STAGES[config.stage](config, resume, on_log).run()


__all__ = ["STAGES", "TrainResult", "run"]
