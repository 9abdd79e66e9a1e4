"""train.report_to: the trackers get the loss curve the run wrote to metrics.jsonl (all of them offline here)."""

import json
from pathlib import Path

import pytest

from tests.train.test_sft import make_config
from weitiao.errors import ConfigError
from weitiao.train import run
from weitiao.train.tracking import check_trackers, hyperparameters


def logged_losses(output_dir: str) -> list[tuple[int, float]]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def assert_same_curve(curve: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in curve] == [step for step, _ in expected] == [1, 2, 3, 4]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in expected], rel=1e-6)


def test_tensorboard_event_file_holds_the_loss_curve_of_the_run(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(make_config(tmp_path, tiny_model_dir, train__report_to=["tensorboard"]))
    events = list((Path(result.output_dir) / "runs").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    curve = [(event.step, event.value) for event in scalars.Scalars("loss")]
    assert_same_curve(curve, logged_losses(result.output_dir))
    assert [e.step for e in scalars.Scalars("eval_loss")] == [0, 4]


def test_mlflow_to_a_local_folder_gets_the_losses_and_the_config(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no SQL backend
    result = run(make_config(tmp_path, tiny_model_dir, train__report_to=["mlflow"]))
    client = MlflowClient()
    (found,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    history = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")]
    assert_same_curve(sorted(history), logged_losses(result.output_dir))
    assert found.data.params["method"] == "lora" and found.data.params["lora.r"] == "4"


def test_wandb_offline_records_every_logged_loss(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(make_config(tmp_path, tiny_model_dir, train__report_to=["wandb"]))
    # The offline run file (what `wandb sync` uploads) holds each history value as JSON text.
    (record,) = (Path(result.output_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for _, loss in logged_losses(result.output_dir):
        assert json.dumps(loss).encode() in data


def test_a_tracker_without_its_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.report_to \['mlflow'\] needs its package: pip install mlflow-skinny"):
        check_trackers(["mlflow"])


def test_hyperparameters_are_flat_scalars(tmp_path, tiny_model_dir):
    flat = hyperparameters(make_config(tmp_path, tiny_model_dir))
    assert flat["lora.r"] == 4 and flat["train.learning_rate"] == 0.01
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
