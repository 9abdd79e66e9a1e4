"""Every method trains a tiny model, lowers its loss, and saves what plain PEFT / transformers reload exactly."""

from pathlib import Path

import pytest
import torch

from tests.train.test_sft import logits, make_config
from weitiao.config import load_config
from weitiao.errors import ConfigError
from weitiao.methods import METHODS
from weitiao.train import run
from weitiao.train.fused_lora import RecomputeWithoutLastProduct
from weitiao.train.settings import Machine, resolve_settings

CPU = Machine(cuda=False, device_name="cpu", bf16=False, varlen_flash=False, liger_installed=False, processes=1)
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
    if METHODS[method].saves_adapter:
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
def test_gpu_only_choices_are_rejected_on_a_cpu(overrides, message, tiny_model_dir):
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match=message):
        resolve_settings(load_config(None, overrides), CPU, AutoConfig.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize("optim", ["adafactor", "sgd"])
def test_cpu_optimizers(optim, tmp_path, tiny_model_dir):
    result = run(make_config(tmp_path, tiny_model_dir, method="full", train__optim=optim, train__max_steps=6,
                             train__learning_rate=1e-2 if optim == "adafactor" else 0.5))
    assert result.eval_loss < result.eval_loss_before


@pytest.mark.parametrize("every, offload, method", [(1, False, "lora"), (2, False, "lora"), (1, True, "lora"),
                                                   (1, True, "full")])
def test_gradient_checkpointing_gives_the_same_gradients(every, offload, method, tmp_path, tiny_model_dir):
    """offload_checkpoints runs torch's reentrant checkpoint (its copies to CPU memory happen on GPUs only:
    tests/gpu/test_cuda.py), for adapters and for a base that trains."""
    plain = run(make_config(tmp_path / "a", tiny_model_dir, method=method, train__max_steps=2, train__optim="sgd"))
    checkpointed = run(make_config(tmp_path / "b", tiny_model_dir, method=method, train__max_steps=2,
                                   train__optim="sgd", train__gradient_checkpointing=True,
                                   train__checkpoint_every=every, train__offload_checkpoints=offload))
    decoder = checkpointed.model.base_model.model.model if method == "lora" else checkpointed.model.model
    layers = [layer.gradient_checkpointing for layer in decoder.layers]
    assert layers == ([True, True] if every == 1 else [True, False])
    # The recomputation leaves down_proj's output unwritten (fused LoRA layers; a base that trains computes it).
    assert [isinstance(layer._gradient_checkpointing_func, RecomputeWithoutLastProduct)
            for layer in decoder.layers if layer.gradient_checkpointing] == [True] * sum(layers)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_offloaded_checkpoints_move_only_the_layer_inputs(monkeypatch, tmp_path, tiny_model_dir):
    """The saved-tensor hooks see one tensor per checkpointed layer per training forward pass: its input hidden
    states (on a GPU they go to CPU memory; here, on the CPU, they stay)."""
    from weitiao.train import offload

    seen = []
    pack = offload.OffloadedSavedTensors._pack

    def spy(self, tensor):
        seen.append(tuple(tensor.shape))
        return pack(self, tensor)

    monkeypatch.setattr(offload.OffloadedSavedTensors, "_pack", spy)
    run(make_config(tmp_path, tiny_model_dir, train__max_steps=2, train__optim="sgd",
                    train__gradient_checkpointing=True, train__offload_checkpoints=True))
    assert len(seen) == 2 * 2  # 2 layers x 2 steps of one micro-batch
    assert all(len(shape) == 3 and shape[-1] == 64 for shape in seen)  # (batch, tokens, hidden)


def test_offloaded_checkpoints_need_checkpointing(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="set gradient_checkpointing: true"):
        make_config(tmp_path, tiny_model_dir, train__offload_checkpoints=True)


def test_offloaded_checkpoints_around_compiled_layers_train_as_compiled_checkpoints(monkeypatch, tmp_path,
                                                                                    tiny_model_dir):
    """With torch_compile each layer's forward is compiled in place and the offloading checkpoint stays eager around
    it (its hooks see each layer's input, as without compilation); the same adapter as accelerate's compiled
    layers with plain checkpointing; the returned model runs uncompiled."""
    from weitiao.train import offload

    seen = []
    pack = offload.OffloadedSavedTensors._pack
    monkeypatch.setattr(offload.OffloadedSavedTensors, "_pack",
                        lambda self, tensor: seen.append(tuple(tensor.shape)) or pack(self, tensor))
    settings = dict(train__max_steps=3, train__optim="sgd", train__learning_rate=0.5, train__torch_compile=True,
                    train__gradient_checkpointing=True)
    plain = run(make_config(tmp_path / "plain", tiny_model_dir, **settings))
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compiled.append(function) or compile(
        function, **options))
    offloaded = run(make_config(tmp_path / "offloaded", tiny_model_dir, train__offload_checkpoints=True, **settings))
    assert [type(function.__self__).__name__ for function in compiled] == ["LlamaDecoderLayer"] * 2
    assert len(seen) == 2 * 3 and all(shape[-1] == 64 for shape in seen)  # 2 layers x 3 steps
    assert abs(offloaded.eval_loss - plain.eval_loss) < 1e-4 and offloaded.eval_loss < offloaded.eval_loss_before
    for (name, a), (_, b) in zip(plain.model.named_parameters(), offloaded.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    layers = offloaded.model.base_model.model.model.layers
    assert all("forward" not in vars(layer) for layer in layers)


def test_loraplus_steps_the_b_matrices_ratio_times_further(tmp_path, tiny_model_dir):
    """LoRA's B starts at zero, so A's first gradient is zero and one SGD step moves B by -lr x its gradient: with
    LoRA+ exactly `ratio` times as far, A not at all, from the same initialisation."""
    def one_step(folder: str, **loraplus) -> dict[str, torch.Tensor]:
        config = make_config(tmp_path / folder, tiny_model_dir, train__optim="sgd", train__max_steps=1,
                             train__learning_rate=0.1, **loraplus)
        return {name: parameter.detach().clone() for name, parameter in run(config).model.named_parameters()
                if "lora_" in name}

    plain, faster = one_step("plain"), one_step("loraplus", lora__loraplus_lr_ratio=4.0)
    b_names = [name for name in plain if "lora_B" in name]
    assert b_names and all(plain[name].abs().sum() > 0 for name in b_names)
    for name in plain:
        expected = 4.0 * plain[name] if name in b_names else plain[name]
        torch.testing.assert_close(faster[name], expected, rtol=1e-4, atol=1e-7)


def test_loraplus_needs_a_lora_method():
    with pytest.raises(ConfigError, match="lora.loraplus_lr_ratio speeds up LoRA's B matrices; method 'full'"):
        load_config(None, ["--method", "full", "--lora.loraplus_lr_ratio", "16"])
