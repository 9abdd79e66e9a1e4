import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_interrupted, write_jsonl
from weitiao.config import load_config
from weitiao.errors import ConfigError, ModelLoadError
from weitiao.train import run

DEMO = Path(__file__).resolve().parents[2] / "src" / "weitiao" / "demo"


def demo_rows(n: int, split: str = "train") -> list[dict]:
    lines = (DEMO / f"extract_{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def make_config(tmp_path, model_dir, n_train=32, **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(n_train))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", demo_rows(8, "test"))
    settings = {"model": {"name_or_path": model_dir},
                "data": {"train": str(train), "eval": str(evaluation), "max_length": 128},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                          "learning_rate": 1e-2, "logging_steps": 1, "lr_scheduler_type": "constant"},
                "eval": {"compare": False}}
    for name, value in overrides.items():  # lora__r=8 sets settings["lora"]["r"]; method="full" a top-level key
        section, _, key = name.rpartition("__")
        (settings.setdefault(section, {}) if section else settings)[key] = value
    return load_config(None, settings)


def logits(model, tokenizer):
    batch = tokenizer(["Extract the person's details: Ana, 30, a baker in Porto."], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_lora_run_saves_an_adapter_plain_peft_loads_with_identical_logits(tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(make_config(tmp_path, tiny_model_dir))
    out = Path(result.output_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "config.yaml", "metrics.jsonl", "data_stats.json", "train_result.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # the adapter, not another copy of the base
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    trained = result.model.eval()
    torch.testing.assert_close(logits(reloaded.eval(), tokenizer), logits(trained, tokenizer), rtol=0, atol=1e-5)
    # The adapter changed the model: LoRA B starts at zero, so identical logits to the base would mean no training.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (logits(base, tokenizer) - logits(trained, tokenizer)).abs().max() > 1e-3
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert log[0]["step"] == 0 and "eval_loss" in log[0] and "eval_loss" in log[-1]
    assert result.trainable_params < result.total_params


def test_full_fine_tuning_lowers_the_loss_and_saves_a_plain_model(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    result = run(make_config(tmp_path, tiny_model_dir, method="full", train__max_steps=12, train__learning_rate=3e-3))
    assert result.trainable_params == result.total_params
    assert result.eval_loss < result.eval_loss_before - 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(result.model.eval(), tokenizer), rtol=0,
                               atol=1e-5)


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_gradient_accumulation_gives_the_same_step_as_a_larger_batch(tmp_path, tiny_model_dir):
    """The loss is normalised by the label tokens of the whole window, so 2x2 equals 4x1. Plain SGD, so any
    change in the gradient's scale or weighting shows in the weights (Adam would normalise much of it away)."""
    settings = dict(train__max_steps=2, train__optim="sgd", train__learning_rate=0.5)
    big = run(make_config(tmp_path / "a", tiny_model_dir, **settings))
    small = run(make_config(tmp_path / "b", tiny_model_dir, **settings, train__per_device_train_batch_size=2,
                            train__gradient_accumulation_steps=2))
    first, second = adapter_weights(Path(big.output_dir)), adapter_weights(Path(small.output_dir))
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-6)


def test_data_loading_workers_train_the_same_adapter(tmp_path, tiny_model_dir):
    """Worker processes (the GPU default) collate the same rows in the same order as the training process does."""
    settings = dict(train__max_steps=3, train__optim="sgd", train__learning_rate=0.5, data__packing=True,
                    data__packing_length=256)
    inline = run(make_config(tmp_path / "a", tiny_model_dir, **settings))
    workers = run(make_config(tmp_path / "b", tiny_model_dir, **settings, train__dataloader_num_workers=2))
    assert workers.train_loss == inline.train_loss
    first, second = adapter_weights(Path(inline.output_dir)), adapter_weights(Path(workers.output_dir))
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_torch_compile_trains_the_same_adapter_and_saves_it_for_plain_peft(tmp_path, tiny_model_dir):
    """Regional compilation replaces each decoder layer with a compiled wrapper; the saved adapter must keep PEFT's
    own key names (no `_orig_mod`) and hold the weights eager training reaches."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = dict(train__max_steps=2, train__optim="sgd", train__learning_rate=0.5)
    eager = run(make_config(tmp_path / "eager", tiny_model_dir, **settings))
    torch._dynamo.utils.counters.clear()
    compiled = run(make_config(tmp_path / "compiled", tiny_model_dir, **settings, train__torch_compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    first, second = adapter_weights(Path(eager.output_dir)), adapter_weights(Path(compiled.output_dir))
    assert sorted(first) == sorted(second) and not any("_orig_mod" in name for name in second)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-3, atol=1e-5)
    assert any((weight != 0).any() for name, weight in second.items() if "lora_B" in name)  # it trained
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), compiled.output_dir)


def test_evaluation_of_a_flex_attention_model_runs_on_sdpa_and_training_gets_flex_back(tiny_model_dir):
    """Packed training rows need flex attention; padded evaluation batches run on sdpa (inductor's flex kernels had
    no configuration for some padded shapes on the GPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from weitiao.train.core import padded_batch_attention

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention"),
                           LoraConfig(r=4, target_modules="all-linear"))
    attention = model.base_model.model.model.layers[0].self_attn
    with padded_batch_attention(model):
        assert attention.config._attn_implementation == "sdpa"
    assert attention.config._attn_implementation == "flex_attention"


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Interrupt after the step-3 checkpoint, resume, and land on the weights of a run that never stopped.
    LoRA dropout and accumulation make RNG and data order matter."""
    settings = dict(train__max_steps=6, train__save_steps=3, train__per_device_train_batch_size=2,
                    train__gradient_accumulation_steps=2, lora__dropout=0.1, train__lr_scheduler_type="cosine",
                    train__cpu_threads=1)  # one thread count in both runs: the sums' order depends on it
    reference = run(make_config(tmp_path / "whole", tiny_model_dir, **settings))

    config = make_config(tmp_path / "split", tiny_model_dir, **settings)

    run_interrupted(config, step=4)
    out = Path(config.train.output_dir)
    checkpoint = out / "checkpoints" / "step-3"
    assert (checkpoint / "trainer_state.json").is_file()
    from safetensors.torch import load_file

    assert all("lora_" in key for key in load_file(str(checkpoint / "model.safetensors")))  # no frozen base copy
    with pytest.raises(ConfigError, match="pass --resume"):
        run(config)
    resumed = run(config, resume=True)
    assert resumed.steps == 6
    expected, got = adapter_weights(Path(reference.output_dir)), adapter_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # step 4 logged once, not twice
    assert not (out / "checkpoints").exists()  # removed once the run has finished


def test_output_dir_of_a_finished_run_is_protected(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, train__max_steps=1, train__eval_on_start=False)
    run(config)
    with pytest.raises(ConfigError, match="already holds a trained model"):
        run(config)
    config.train.overwrite_output_dir = True
    assert run(config).steps == 1


def test_resume_without_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(make_config(tmp_path, tiny_model_dir), resume=True)


def test_lora_target_that_matches_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"match no module of this model; its linear layers are: .*q_proj"):
        run(make_config(tmp_path, tiny_model_dir, lora__target_modules=["query_key_value"]))


def test_hub_id_fails_clearly_without_network(monkeypatch):
    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot download 'weitiao-test/no-such-model'.*huggingface-cli download"):
        load_model(ModelConfig(name_or_path="weitiao-test/no-such-model"))


def test_missing_local_paths(tmp_path):
    from weitiao.models import resolve_model

    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelLoadError, match="not a transformers model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_model("./no/such/dir")


def test_gguf_file_resolves_to_the_converted_folder(default_model_dir):
    from weitiao.models import default_gguf, resolve_model

    assert resolve_model(str(default_gguf())) == default_model_dir


@pytest.mark.slow
def test_default_model_lora_few_steps_lowers_eval_loss(tmp_path, default_model_dir):
    config = make_config(tmp_path, "default", n_train=48, train__max_steps=6, train__learning_rate=1e-3,
                         lora__r=8, lora__alpha=16)
    result = run(config)
    assert result.eval_loss < result.eval_loss_before * 0.7, (result.eval_loss_before, result.eval_loss)
    log = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
