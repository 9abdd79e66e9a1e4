"""Experiment tracking (train.report_to) on accelerate's own trackers: TensorBoard, Weights & Biases, MLflow, ...

The trackers get what metrics.jsonl gets (weitiao.train.core.Trainer.log) and the resolved config as the run's
hyper-parameters. Each needs its package; a missing one is a one-line error before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from weitiao.config import Config
from weitiao.errors import ConfigError
from weitiao.runs import RunFolder

# Package that each tracker needs (its import name).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def check_trackers(report_to: list[str]) -> None:
    missing = [name for name in report_to if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        packages = ["mlflow-skinny" if name == "mlflow" else TRACKER_PACKAGES[name] for name in missing]
        raise ConfigError(f"train.report_to {missing} needs its package: pip install {' '.join(packages)}")


def start_trackers(accelerator, config: Config, run: RunFolder) -> None:
    """Open the configured trackers under a project named after the run folder (W&B: WANDB_PROJECT when set)."""
    if not config.train.report_to:
        return
    init_kwargs: dict[str, Any] = {"wandb": {"name": run.path.name, "dir": str(run.path)}}
    project = os.environ.get("WANDB_PROJECT", "weitiao") if "wandb" in config.train.report_to else run.path.name
    accelerator.init_trackers(project, config=hyperparameters(config), init_kwargs=init_kwargs)


def hyperparameters(config: Config) -> dict[str, Any]:
    """The config flattened to 'section.key' scalars, what every tracker's hyper-parameter table takes."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", config.model_dump(mode="json"))
    return flat
