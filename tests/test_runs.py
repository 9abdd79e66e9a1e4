"""The run folder's one owner: its metrics log, checkpoints, start checks, base lookup and how replies end."""

import json
from pathlib import Path

import pytest

from weitiao.config import load_config
from weitiao.errors import ConfigError, WeitiaoError
from weitiao.runs import RunFolder


def test_metrics_append_read_and_truncate_for_a_resumed_run(tmp_path):
    run = RunFolder(tmp_path)
    for step in (0, 1, 2, 3):
        run.append_metrics({"step": step, "loss": 1.0 / (step + 1)})
    with (tmp_path / RunFolder.METRICS).open("a") as handle:
        handle.write('{"step": 4, "lo')  # a line being written by a running run
    assert [r["step"] for r in run.metrics()] == [0, 1, 2, 3]
    run.truncate_metrics(1)
    assert [r["step"] for r in run.metrics()] == [0, 1]
    assert json.loads((tmp_path / RunFolder.METRICS).read_text().splitlines()[-1]) == {"step": 1, "loss": 0.5}


def test_checkpoints_latest_and_pruned_to_the_limit(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4, 10):
        folder = run.checkpoint(step)
        folder.mkdir(parents=True)
        run.write_trainer_state(folder, {"global_step": step}, keep=2)
    run.checkpoint(12).mkdir()  # no trainer state: an interrupted save, not a checkpoint
    assert run.latest_checkpoint() == run.checkpoint(10)
    assert sorted(p.name for p in (tmp_path / RunFolder.CHECKPOINTS).iterdir()) == ["step-10", "step-12", "step-4"]
    assert run.trainer_state(run.checkpoint(10)) == {"global_step": 10}


def test_prepare_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    run = RunFolder(tmp_path / "out")
    run.prepare(resume=False, overwrite=False)  # a new folder
    with pytest.raises(ConfigError, match="no checkpoint in"):
        run.prepare(resume=True, overwrite=False)
    run.checkpoint(3).mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds checkpoints of an unfinished run: pass --resume"):
        run.prepare(resume=False, overwrite=False)
    run.append_metrics({"step": 1})
    run.prepare(resume=False, overwrite=True)
    assert not run.metrics() and not (run.path / RunFolder.CHECKPOINTS).exists()
    (run.path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a trained model"):
        run.prepare(resume=False, overwrite=False)


@pytest.mark.parametrize("data, stops", [
    ({"template": "dolly"}, ["### End"]),
    ({"template": "custom", "custom_template": {"user": "Q: {content}\nA: ", "assistant": "{content}\n<END>{eos}"}},
     ["<END>"]),
    ({"template": "auto"}, []),
])
def test_stop_strings_come_from_the_template_trained_with(tmp_path, data, stops):
    run = RunFolder(tmp_path)
    run.write_start(load_config(None, {"data": data}), {}, {})
    assert run.stop_strings() == stops
    assert RunFolder(tmp_path / "elsewhere").stop_strings() == []


def test_adapter_folders_and_their_base(tmp_path, tiny_model_dir):
    with pytest.raises(WeitiaoError, match="adapter folder not found"):
        RunFolder.adapter(tmp_path / "missing")
    with pytest.raises(WeitiaoError, match="holds a full model, not an adapter"):
        RunFolder.adapter(tiny_model_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere"}))
    run = RunFolder.adapter(adapter)
    assert run.base_model() == "/nowhere"  # PEFT's record, when the run has no config.yaml
    run.write_start(load_config(None, {"model": {"name_or_path": str(tiny_model_dir)}}), {}, {})
    assert run.base_model() == str(tiny_model_dir)  # the run's config names it as the user did
    run.check_base(str(tiny_model_dir))
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    with pytest.raises(WeitiaoError, match=r"a different model than .* \(hidden_size 64 vs 128\)"):
        run.check_base(str(other))


def test_eos_ids_add_the_end_of_turn_token_saved_with_the_run(tmp_path, tokenizer):
    from transformers import GenerationConfig

    run = RunFolder(tmp_path)
    assert run.eos_token_ids(tokenizer, fallback=None) == [tokenizer.eos_token_id]
    GenerationConfig(eos_token_id=[7, 9]).save_pretrained(tmp_path)
    assert run.eos_token_ids(tokenizer, fallback=None) == [7, 9, tokenizer.eos_token_id]


def test_a_new_run_starts_a_new_log(tmp_path):
    """An interrupted run without checkpoints left its log and report: the next run (without --resume) must not
    append to them, and --resume keeps them."""
    run = RunFolder(tmp_path / "out")
    run.path.mkdir()
    run.append_metrics({"step": 0, "eval_loss": 9.0})
    run.append_metrics({"step": 10, "loss": 3.0})
    for name in (RunFolder.REPORT, RunFolder.LOSS_PLOT):
        (run.path / name).write_text("old")
    run.prepare(resume=False, overwrite=False)
    assert run.metrics() == [] and not (run.path / RunFolder.REPORT).exists()
    assert not (run.path / RunFolder.LOSS_PLOT).exists()
    run.append_metrics({"step": 0, "eval_loss": 2.0})
    run.checkpoint(5).mkdir(parents=True)
    run.write_trainer_state(run.checkpoint(5), {"global_step": 5}, keep=2)
    run.prepare(resume=True, overwrite=False)
    assert run.metrics() == [{"step": 0, "eval_loss": 2.0}]
