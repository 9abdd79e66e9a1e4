import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_interrupted
from tests.train.test_sft import make_config
from weitiao.errors import ConfigError
from weitiao.train import run
from weitiao.train.master_weights import MasterWeights


def test_gradients_are_summed_in_fp32_and_updates_too_small_for_bf16_are_kept():
    layer = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    masters = MasterWeights(layer)
    optimizer = torch.optim.SGD([master for _, master in masters.named_parameters()], lr=5e-4)
    masters.watch(optimizer)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    layer(x).sum().backward()  # two micro-batches of one step
    layer(x).sum().backward()
    assert layer.weight.grad is None  # moved to the fp32 copy as soon as it was complete
    torch.testing.assert_close(masters.masters[0].grad, 2 * x.float().expand(3, 4), rtol=0, atol=0)
    # Each step moves the first column by 1e-3: 1 - 1e-3 rounds back to 1 in bf16 (spacing 2^-8 below 1), so bf16
    # weights updated in place would never move. The fp32 copy keeps every step.
    assert torch.tensor(1.0 - 1e-3, dtype=torch.bfloat16) == 1.0
    optimizer.step()
    assert layer.weight[0, 0] == 1.0
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        layer(x).sum().backward()
        optimizer.step()
    assert masters.masters[0].dtype == torch.float32
    torch.testing.assert_close(masters.masters[0][:, 0], torch.full((3,), 1 - 5 * 1e-3), rtol=0, atol=1e-6)
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight, masters.masters[0].to(torch.bfloat16), rtol=0, atol=0)
    assert layer.weight[0, 0] < 1.0


def test_a_checkpoint_restores_the_fp32_weights():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    masters = MasterWeights(model)
    state = {"masters": {name: master.detach() + 1e-3 for name, master in masters.named_parameters()}}
    masters.load_state_dict(state)
    torch.testing.assert_close(masters.masters[0], state["masters"]["weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.weight, state["masters"]["weight"].to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no fp32 master weights for 1 trained weights, e.g. bias"):
        masters.load_state_dict({"masters": {"weight": state["masters"]["weight"]}})


def full_bf16(tmp_path, model_dir, master_weights, **overrides):
    return make_config(tmp_path, model_dir, method="full", train__bf16=True, train__master_weights=master_weights,
                       **{"train__max_steps": 12, "train__learning_rate": 3e-3, **overrides})


def test_full_fine_tuning_with_fp32_weights_in_the_optimizer_learns_as_with_fp32_weights_in_the_model(
        tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    in_model = run(full_bf16(tmp_path / "model", tiny_model_dir, "model"))
    in_optimizer = run(full_bf16(tmp_path / "optimizer", tiny_model_dir, "optimizer"))
    assert in_optimizer.eval_loss < in_optimizer.eval_loss_before - 0.5
    assert in_optimizer.eval_loss == pytest.approx(in_model.eval_loss, rel=0.02)
    out = Path(in_optimizer.output_dir)
    assert json.loads((out / "settings.json").read_text())["master_weights"] == "optimizer"
    with safe_open(str(out / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.bfloat16}
    with safe_open(str(Path(in_model.output_dir) / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.float32}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    trained = in_optimizer.model.state_dict()
    for name, weight in reloaded.state_dict().items():
        torch.testing.assert_close(weight, trained[name], rtol=0, atol=0)


def test_resume_with_fp32_weights_in_the_optimizer_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    settings = dict(train__max_steps=6, train__save_steps=3, train__per_device_train_batch_size=2,
                    train__gradient_accumulation_steps=2, train__learning_rate=1e-3,
                    train__cpu_threads=1)  # one thread count in both runs: the sums' order depends on it
    reference = run(full_bf16(tmp_path / "whole", tiny_model_dir, "optimizer", **settings))
    config = full_bf16(tmp_path / "split", tiny_model_dir, "optimizer", **settings)
    run_interrupted(config, step=4)
    resumed = run(config, resume=True)
    expected = load_file(str(Path(reference.output_dir) / "model.safetensors"))
    got = load_file(str(Path(resumed.output_dir) / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_master_weights_in_the_optimizer_need_bf16_and_a_method_that_trains_the_base(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="is for bf16 mixed precision, and this run's precision is fp32"):
        run(make_config(tmp_path / "fp32", tiny_model_dir, method="full", train__master_weights="optimizer"))
    with pytest.raises(ConfigError, match="for methods that train the base weights"):
        make_config(tmp_path / "lora", tiny_model_dir, train__master_weights="optimizer")


def test_recomputed_layers_hand_their_gradients_to_the_fp32_weights_too(tmp_path, tiny_model_dir):
    """With gradient checkpointing the layers' weight gradients are completed inside the recomputation's own
    backward pass: they must still reach the fp32 copies, for the same training as without it."""
    plain = run(full_bf16(tmp_path / "plain", tiny_model_dir, "optimizer", train__max_steps=4))
    recomputed = run(full_bf16(tmp_path / "recomputed", tiny_model_dir, "optimizer", train__max_steps=4,
                               train__gradient_checkpointing=True))
    assert recomputed.eval_loss < recomputed.eval_loss_before - 0.5
    assert recomputed.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)
