"""Every method trains a tiny model, lowers its loss, and saves what plain PEFT / transformers reload exactly."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.test_sft import logits, make_config
from weitiao.config import load_config
from weitiao.errors import ConfigError
from weitiao.train.methods import ADAPTER_METHODS, check_device, fuse_lora_updates
from weitiao.train.sft import run

SETTINGS = {
    "full": {"train__learning_rate": 3e-3},
    "freeze": {"freeze__trainable_layers": 1, "freeze__extra_modules": ["lm_head"]},
    "lora": {"lora__use_rslora": True},
    "dora": {"lora__use_dora": True},
    "ia3": {"train__learning_rate": 3e-2},
    "prefix": {"train__learning_rate": 3e-2, "prompt_learning__prefix_projection": True,
               "prompt_learning__encoder_hidden_size": 32},
    "ptuning": {"train__learning_rate": 3e-2, "prompt_learning__encoder_hidden_size": 32},
    "prompt": {"train__learning_rate": 3e-2, "prompt_learning__init_text": "Extract the details as JSON."},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_method_trains_saves_and_reloads(name, tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = "lora" if name == "dora" else name
    result = run(make_config(tmp_path, tiny_model_dir, method=method, train__max_steps=8, **SETTINGS[name]))
    assert result.eval_loss < result.eval_loss_before, (result.eval_loss_before, result.eval_loss)
    assert 0 < result.trainable_params <= result.total_params
    out = Path(result.output_dir)
    if method in ADAPTER_METHODS:
        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded.eval(), tokenizer), logits(result.model.eval(), tokenizer),
                               rtol=0, atol=1e-5)


def test_freeze_trains_only_the_chosen_layers(tmp_path, tiny_model_dir):
    result = run(make_config(tmp_path, tiny_model_dir, method="freeze", train__max_steps=1,
                             freeze__trainable_layers=-1, freeze__trainable_modules=["mlp"]))
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.layers.0.mlp.") for n in trainable)


def test_freeze_rejects_names_that_match_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="freeze.extra_modules \\['lm_hed'\\] match no module"):
        run(make_config(tmp_path, tiny_model_dir, method="freeze", freeze__extra_modules=["lm_hed"]))
    with pytest.raises(ConfigError, match="trainable_layers must be between -2 and 2"):
        run(make_config(tmp_path, tiny_model_dir, method="freeze", freeze__trainable_layers=5))


def test_quantized_full_fine_tuning_is_rejected_at_load():
    with pytest.raises(ConfigError, match="use method: qlora"):
        load_config(None, {"method": "full", "quantization": {"bits": 4}})


@pytest.mark.parametrize("overrides, message", [
    (["--method", "qlora"], "method qlora needs a CUDA GPU"),
    (["--optim", "paged_adamw_8bit"], "optim paged_adamw_8bit needs a CUDA GPU"),
    (["--fp16", "true"], "fp16 training needs a GPU"),
])
def test_gpu_only_choices_are_rejected_on_a_cpu(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_device(load_config(None, overrides), torch.device("cpu"))


@pytest.mark.parametrize("optim", ["adafactor", "sgd"])
def test_cpu_optimizers(optim, tmp_path, tiny_model_dir):
    result = run(make_config(tmp_path, tiny_model_dir, method="full", train__optim=optim, train__max_steps=6,
                             train__learning_rate=1e-2 if optim == "adafactor" else 0.5))
    assert result.eval_loss < result.eval_loss_before


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every, tmp_path, tiny_model_dir):
    plain = run(make_config(tmp_path / "a", tiny_model_dir, train__max_steps=2, train__optim="sgd"))
    checkpointed = run(make_config(tmp_path / "b", tiny_model_dir, train__max_steps=2, train__optim="sgd",
                                   train__gradient_checkpointing=True, train__checkpoint_every=every))
    layers = [layer.gradient_checkpointing for layer in checkpointed.model.base_model.model.model.layers]
    assert layers == ([True, True] if every == 1 else [True, False])
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


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
    assert fuse_lora_updates(model, enabled=False) == 14
    assert not any("forward" in vars(module) for module in model.modules())


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
    assert fuse_lora_updates(dora, enabled=True) == 14  # installed, but DoRA layers fall through to PEFT
    loss, _ = _loss_and_gradients(dora)
    fuse_lora_updates(dora, enabled=False)
    reference, _ = _loss_and_gradients(dora)
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_fused_lora_training_follows_peft_step_by_step(tmp_path, tiny_model_dir):
    runs = [run(make_config(tmp_path / str(fused), tiny_model_dir, train__max_steps=4, train__fused_lora=fused))
            for fused in (False, True)]
    losses = [[json.loads(line)["loss"] for line in (Path(r.output_dir) / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for r in runs]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert runs[1].eval_loss < runs[1].eval_loss_before
    assert not any("forward" in vars(module) for module in runs[1].model.modules())  # PEFT's code after training
