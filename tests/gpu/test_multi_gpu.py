"""Several GPUs (skipped on machines with fewer than 2): every engine trains the tiny model on 2 GPUs to the losses
of 1 GPU at the same global batch, in fp32, and ends with the same single-folder artefact. bench/distributed.py
measures the same on the 1B shape, with speed and memory."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.train.test_distributed import _train
from tests.train.test_sft import make_config

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.parametrize("engine, method", [("ddp", "lora"), ("zero2", "full"), ("zero3", "full"),
                                            ("zero3", "lora"), ("fsdp", "full")])
def test_two_gpus_match_one_gpu(engine, method, tmp_path, tiny_model_dir):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    settings = dict(method=method, train__max_steps=4, train__learning_rate=1e-3, train__bf16=False,
                    train__distributed=engine, data__packing=False)
    one = make_config(tmp_path / "one", tiny_model_dir, train__per_device_train_batch_size=4, **settings)
    two = make_config(tmp_path / "two", tiny_model_dir, train__per_device_train_batch_size=2, **settings)
    single, double = _train(one, 1), _train(two, 2)
    losses = [(a["loss"], b["loss"]) for a, b in zip(single, double) if "loss" in a]
    print(engine, method, losses)
    assert len(double) == len(single) and len(losses) == 4
    for a, b in losses:
        assert b == pytest.approx(a, rel=1e-4)
    artefact = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (Path(two.train.output_dir) / artefact).is_file()
