"""Several processes: engine configuration, the launcher, and real 2-process runs on this CPU (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_sft import make_config
from weitiao.config import dump_config, load_config
from weitiao.errors import ConfigError
from weitiao.train.distributed import deepspeed_config, launch_command


@pytest.mark.parametrize("mode, stage, offload", [("zero2", 2, False), ("zero3", 3, False),
                                                  ("zero3_offload", 3, True)])
def test_deepspeed_config_follows_the_training_settings(mode, stage, offload):
    config = load_config(None, ["--distributed", mode, "--gradient_accumulation_steps", "4", "--max_grad_norm",
                                "0.5"])
    ds = deepspeed_config(config, bf16=True, micro_batch_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    # ZeRO-3 gathers 16-bit weights at save time: the result is the same single folder as a 1-GPU run
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_a_users_own_deepspeed_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    config = load_config(None, ["--distributed", "zero2", "--deepspeed", str(path)])
    assert deepspeed_config(config, bf16=False, micro_batch_size=1) == {"zero_optimization": {"stage": 1}}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(config, bf16=False, micro_batch_size=1)


@pytest.mark.parametrize("overrides, message", [
    (["--method", "qlora", "--distributed", "zero3"], "qlora cannot shard"),
    (["--deepspeed", "ds.json"], "set distributed to zero2"),
])
def test_impossible_combinations_are_rejected_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_launch_commands_for_one_and_several_nodes():
    single = launch_command("run.yaml", ["--learning_rate", "1e-4"], gpus=4)
    assert single[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1"]
    assert "--standalone" in single and single[-6:] == ["-m", "weitiao", "train", "run.yaml", "--learning_rate", "1e-4"]
    multi = launch_command("run.yaml", [], gpus=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", resume=True)
    assert {"--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500", "--nnodes=2"} <= set(multi)
    assert multi[-2:] == ["run.yaml", "--resume"]
    with pytest.raises(ConfigError):
        launch_command("run.yaml", [], gpus=2, nnodes=2, node_rank=2)


def _train(config, gpus: int | None) -> list[dict]:
    path = Path(config.train.output_dir).parent / "run.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    command = [sys.executable, "-m", "weitiao", "train", str(path)] + (["--gpus", str(gpus)] if gpus else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = Path(config.train.output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("engine, method", [("ddp", "lora"), ("ddp", "full")])
def test_two_processes_match_one_with_the_same_global_batch(engine, method, tmp_path, tiny_model_dir):
    """2 processes x 2 examples = 1 process x 4: the same losses, tokens and final weights (gloo on this CPU).
    accelerate runs DeepSpeed and FSDP on GPUs only: their parity is bench/distributed.py's, on the GPU machine."""
    settings = dict(method=method, train__max_steps=3, train__optim="sgd", train__learning_rate=0.5)
    one = make_config(tmp_path / "one", tiny_model_dir, train__per_device_train_batch_size=4, **settings)
    two = make_config(tmp_path / "two", tiny_model_dir, train__per_device_train_batch_size=2,
                      train__distributed=engine, **settings)
    single, double = _train(one, None), _train(two, 2)
    assert len(double) == len(single)  # rank 0 alone writes the log: no line twice
    for a, b in zip(single, double):
        assert a["step"] == b["step"] and a.get("tokens") == b.get("tokens")
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    from safetensors.torch import load_file

    file = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    weights_one = load_file(str(Path(one.train.output_dir) / file))
    weights_two = load_file(str(Path(two.train.output_dir) / file))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-6)


def test_weights_built_partitioned_by_zero3_keep_their_groups_and_counts():
    """ZeRO-3 builds weights as empty local tensors with ds_shape / ds_numel: weight decay must still reach the
    matrices, no optimizer group may be empty (the engine drops it and the LR schedule then fails), and the
    parameter counts are the real ones."""
    from weitiao.train.methods import parameter_counts
    from weitiao.train.core import make_optimizer

    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 4, bias=False), "norm": torch.nn.LayerNorm(4, bias=False)})
    for parameter in model.parameters():  # what deepspeed.zero.Init leaves on each rank
        parameter.ds_shape, parameter.ds_numel = parameter.shape, parameter.numel()
        parameter.data = torch.empty(0)
    config = load_config(None, ["--weight_decay", "0.1"])
    optimizer = make_optimizer(model.named_parameters(), config)
    decayed = [group for group in optimizer.param_groups if group["weight_decay"] == 0.1]
    assert len(decayed) == 1 and decayed[0]["params"] == [model["proj"].weight]
    assert parameter_counts(model) == (36, 36)
    model["norm"].weight.requires_grad_(False)  # a group with nothing to train is left out, not kept empty
    assert [len(group["params"]) for group in make_optimizer(model.named_parameters(), config).param_groups] == [1]
