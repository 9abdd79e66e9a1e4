"""The fused LoRA update (a subclass of PEFT's LoRA Linear) gives PEFT's losses and gradients, follows adapter
switches, leaves other variants to PEFT, and is gone from the trained model."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.test_sft import make_config
from weitiao.train import run
from weitiao.train.fused_lora import FusedLoraLinear, fuse_lora_updates


def fused_layers(model) -> int:
    return sum(isinstance(module, FusedLoraLinear) for module in model.modules())


def _lora_model(tiny_model_dir, dropout: float = 0.0, **options):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                      init_lora_weights=False, **options))  # B random: the update is not zero
    return model


def _loss_and_gradients(model, seed: int = 0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 500, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_update_gives_peft_loss_and_gradients(dropout, tiny_model_dir):
    model = _lora_model(tiny_model_dir, dropout).train()
    loss, grads = _loss_and_gradients(model)
    assert fuse_lora_updates(model, enabled=True) == 14  # 7 linear layers x 2 decoder layers
    fused_loss, fused_grads = _loss_and_gradients(model)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == fused_grads.keys() and any("lora_B" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert fused_layers(model) == 14
    assert fuse_lora_updates(model, enabled=False) == 14
    assert fused_layers(model) == 0


def test_fused_lora_update_follows_adapter_switches_and_leaves_dora_alone(tiny_model_dir):
    model = _lora_model(tiny_model_dir).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        fuse_lora_updates(model, enabled=True)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-6)
        with model.disable_adapter():  # PEFT's own forward takes over: the base model's output
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tuned, base, atol=1e-3)
    dora = _lora_model(tiny_model_dir, use_dora=True)
    reference, _ = _loss_and_gradients(dora)
    assert fuse_lora_updates(dora, enabled=True) == 14  # switched, but DoRA layers fall through to PEFT's forward
    loss, _ = _loss_and_gradients(dora)
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_fused_lora_training_follows_peft_step_by_step(tmp_path, tiny_model_dir):
    runs = [run(make_config(tmp_path / str(fused), tiny_model_dir, train__max_steps=4, train__fused_lora=fused))
            for fused in (False, True)]
    losses = [[json.loads(line)["loss"] for line in (Path(r.output_dir) / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for r in runs]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert runs[1].eval_loss < runs[1].eval_loss_before
    assert fused_layers(runs[1].model) == 0  # PEFT's code after training
