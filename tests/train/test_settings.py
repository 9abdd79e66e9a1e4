"""Every automatic choice is made once, into a record the run folder keeps; the GPU choices are checked on the CPU
with the machine described rather than detected."""

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import LlamaConfig, MistralConfig

from tests.train.test_sft import make_config
from weitiao.config import load_config
from weitiao.errors import ConfigError
from weitiao.runs import RunFolder
from weitiao.train import run
from weitiao.train.settings import Machine, resolve_settings

CPU = Machine(cuda=False, device_name="cpu", bf16=False, varlen_flash=False, liger_installed=False, processes=1)
H200 = Machine(cuda=True, device_name="NVIDIA H200", bf16=True, varlen_flash=True, liger_installed=False,
               processes=1, triton_installed=True)
LLAMA = LlamaConfig(num_hidden_layers=2)


def settings(machine=H200, architecture=LLAMA, **overrides):
    return resolve_settings(load_config(None, overrides), machine, architecture)


def test_a_gpu_packs_rows_on_varlen_in_bf16_with_loader_workers():
    chosen = settings()
    assert (chosen.packing, chosen.attention, chosen.eval_attention) == (True, "varlen_packed_rows", "varlen")
    assert (chosen.precision, chosen.weights_dtype, chosen.loader_workers, chosen.tf32) == ("bf16", "bfloat16", 2, True)
    assert (chosen.row_length, chosen.pad_to_multiple_of, chosen.fused_lora) == (8192, 8, True)
    assert (settings().master_weights, settings(method="full").master_weights) == (None, "optimizer")


def test_fp32_master_weights_go_to_the_optimizer_on_one_gpu_and_stay_in_the_model_elsewhere():
    """A bf16 model with fp32 copies in the optimizer on one GPU without a sharded engine; fp32 weights in the model
    where DeepSpeed or FSDP keep their own, where several processes would reduce the gradients, or without bf16."""
    def chosen(machine=H200, **overrides):
        picked = settings(machine, **{"method": "full", **overrides})
        return picked.master_weights, picked.weights_dtype

    assert chosen() == ("optimizer", "bfloat16")
    assert chosen(method="freeze") == ("optimizer", "bfloat16")
    assert chosen(train={"master_weights": "model"}) == ("model", "float32")
    assert chosen(model={"dtype": "float32"}) == ("model", "float32")
    assert chosen(train={"distributed": "zero2"}) == ("model", "float32")
    assert chosen(replace(H200, processes=2)) == ("model", "float32")
    assert chosen(train={"bf16": False}) == (None, "float32")
    assert chosen(CPU) == (None, "float32")
    assert chosen(CPU, train={"bf16": True}) == ("model", "float32")  # asked for explicitly on a CPU (tests do)
    # One Triton kernel steps the fp32 copies and writes the bf16 weights: where torch's AdamW would, with Triton.
    assert settings(method="full").fused_master_step
    assert not settings(method="full", train={"optim": "sgd"}).fused_master_step
    assert not settings(replace(H200, triton_installed=False), method="full").fused_master_step
    assert not settings(method="full", train={"master_weights": "model"}).fused_master_step
    assert not settings().fused_master_step  # LoRA: no master weights
    with pytest.raises(ConfigError, match="optimizer runs on one process without DeepSpeed or FSDP"):
        chosen(replace(H200, processes=2), train={"master_weights": "optimizer"})
    with pytest.raises(ConfigError, match="model.dtype is float32: set it to auto or bfloat16"):
        chosen(train={"master_weights": "optimizer"}, model={"dtype": "float32"})


@pytest.mark.parametrize("overrides, architecture, attention", [
    ({"train": {"torch_compile": True}}, LLAMA, "flex_attention"),  # compiled code would specialise on varlen
    ({}, MistralConfig(sliding_window=4096), "flex_attention"),  # sliding windows are transformers' flex masks
    ({"train": {"fp16": False, "bf16": False}}, LLAMA, "flex_attention"),  # varlen needs half precision
    ({"model": {"attn_implementation": "eager"}, "data": {"packing": False}}, LLAMA, "eager"),
    ({"data": {"packing": False}}, LLAMA, "sdpa"),
])
def test_attention_follows_the_model_and_the_other_choices(overrides, architecture, attention):
    assert settings(architecture=architecture, **overrides).attention == attention


def test_what_a_gpu_cannot_do_in_its_configuration_is_refused_or_resolved():
    assert settings(method="prefix").packing is False  # virtual tokens cannot be shared by a packed row
    assert settings(train={"torch_compile": True}).fused_lora is False  # inductor fuses PEFT's own forward
    assert settings(lora={"use_dora": True}).fused_lora is False
    assert settings(train={"dataloader_num_workers": 0}).loader_workers == 0
    with pytest.raises(ConfigError, match="varlen .* needs torch >= 2.10, a GPU of compute capability 8.0"):
        settings(replace(H200, varlen_flash=False), model={"attn_implementation": "varlen"})
    with pytest.raises(ConfigError, match=r"data.max_length \(9000\) is longer than data.packing_length \(8192\)"):
        settings(data={"max_length": 9000})
    with pytest.raises(ConfigError, match="train.liger needs a CUDA GPU and the liger-kernel package"):
        settings(train={"liger": True})


def test_checkpointed_layer_inputs_are_offloaded_where_it_was_measured_to_pay():
    """On by default with gradient checkpointing in eager layers on one CUDA GPU (as fast or faster on average, less
    memory); off without checkpointing, on a CPU, with compiled layers and on several processes; an explicit choice
    wins."""
    checkpointing = {"gradient_checkpointing": True}
    assert settings(train=checkpointing).offload_checkpoints is True
    assert settings().offload_checkpoints is False
    assert settings(CPU, train=checkpointing).offload_checkpoints is False
    assert settings(train={**checkpointing, "torch_compile": True}).offload_checkpoints is False
    assert settings(replace(H200, processes=2), train=checkpointing).offload_checkpoints is False
    assert settings(train={**checkpointing, "offload_checkpoints": False}).offload_checkpoints is False
    assert settings(train={**checkpointing, "torch_compile": True, "offload_checkpoints": True}).offload_checkpoints
    with pytest.raises(ConfigError, match="train.offload_checkpoints runs on one GPU"):
        settings(replace(H200, processes=2), train={**checkpointing, "offload_checkpoints": True})


def test_a_cpu_resolves_to_plain_fp32_batches_and_ddp():
    chosen = settings(CPU, train={"distributed": "zero3"})
    assert (chosen.packing, chosen.attention, chosen.precision, chosen.liger) == (False, "sdpa", "fp32", False)
    assert (chosen.distributed, chosen.loader_workers, chosen.row_length, chosen.tf32) == ("ddp", 0, None, False)
    with pytest.raises(ConfigError, match="fp16 training needs a GPU"):
        settings(CPU, train={"fp16": True})


def test_the_run_folder_says_what_ran(tmp_path, tiny_model_dir, capsys):
    result = run(make_config(tmp_path, tiny_model_dir, data__packing=True))
    saved = RunFolder(result.output_dir).settings()
    assert saved["packing"] is True and saved["attention"] == "sdpa" and saved["precision"] == "fp32"
    assert saved["device"] == "cpu" and saved["loader_workers"] == 0 and saved["stop_strings"] == []
    printed = capsys.readouterr().out
    assert "Settings (saved as settings.json):" in printed and "  packing" in printed
    # config.yaml stays the config as given, so the same file resolves again on another machine.
    assert "packing: true" in (Path(result.output_dir) / "config.yaml").read_text()


def test_preference_stages_refuse_models_that_transform_logits_after_the_head():
    capped = LlamaConfig(num_hidden_layers=2)
    capped.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        settings(architecture=capped, stage="dpo")
    assert settings(architecture=capped, stage="sft").packing  # SFT uses the model's own loss, which applies it
    assert settings(stage="dpo").packing


def test_scored_positions_are_asked_for_and_apply_to_packed_sft_rows_with_liger(monkeypatch):
    """On by default where Liger's fused loss scores packed SFT rows in eager layers; compiled ones when asked."""
    from weitiao.train import kernels
    from weitiao.train import settings as settings_module

    assert settings(train={"scored_positions": True}).scored_positions is False  # no Liger here
    monkeypatch.setattr(settings_module, "_liger", lambda *args: True)
    monkeypatch.setattr(kernels, "liger_scores_positions", lambda model_type: model_type == "llama")
    assert settings().scored_positions is True
    assert settings(train={"scored_positions": True}).scored_positions is True
    assert settings(train={"scored_positions": False}).scored_positions is False
    assert settings(stage="pt").scored_positions is False
    assert settings(train={"torch_compile": True}).scored_positions is False
    assert settings(train={"torch_compile": True, "scored_positions": True}).scored_positions is True
    assert settings(train={"scored_positions": True}, data={"packing": False}).scored_positions is False
    assert settings(train={"scored_positions": True, "distributed": "zero3"}).scored_positions is False
    assert settings(architecture=MistralConfig(), train={"scored_positions": True}).scored_positions is False


def test_layers_are_replayed_from_cuda_graphs_where_they_run_and_refused_where_asked_and_they_cannot():
    """On by default for fused LoRA on packed varlen rows on one GPU, with gradient checkpointing too, and for full
    and freeze fine-tuning with master weights in the optimizer, without it; each missing condition turns it off, and
    named in the error where it was asked for."""
    from transformers import Qwen3Config

    assert settings().cuda_graphs
    assert settings(train={"gradient_checkpointing": True}).cuda_graphs  # weitiao.train.checkpoint_graphs
    assert settings(architecture=Qwen3Config(num_hidden_layers=2), stage="pt").cuda_graphs
    assert not settings(train={"cuda_graphs": False}).cuda_graphs
    blocked = {"a CUDA GPU": dict(machine=CPU), "one process": dict(machine=replace(H200, processes=2)),
               "packed rows on varlen attention": dict(model={"attn_implementation": "flex_attention"}),
               "eager layers": dict(train={"torch_compile": True}),
               "fused LoRA layers": dict(lora={"use_dora": True}),
               "lora.dropout 0": dict(lora={"dropout": 0.05}),
               "stage sft or pt": dict(stage="dpo"),
               "this one is mistral": dict(architecture=MistralConfig(num_hidden_layers=2))}
    for missing, overrides in blocked.items():
        assert not settings(**overrides).cuda_graphs, missing
        asked = {**overrides, "train": {**overrides.get("train", {}), "cuda_graphs": True}}
        with pytest.raises(ConfigError, match=f"train.cuda_graphs needs .*{missing}"):
            settings(**asked)
    # Base weights on the graphs: bf16 in the model with their fp32 copies in the optimizer, no checkpointing.
    assert settings(method="full").cuda_graphs and settings(method="freeze").cuda_graphs
    assert settings(method="full").master_weights == "optimizer"
    assert not settings(method="full", train={"master_weights": "model"}).cuda_graphs
    assert not settings(method="full", train={"gradient_checkpointing": True}).cuda_graphs
    with pytest.raises(ConfigError, match="train.cuda_graphs needs .*no gradient_checkpointing"):
        settings(method="full", train={"gradient_checkpointing": True, "cuda_graphs": True})
    assert settings(method="full", lora={"dropout": 0.05}).cuda_graphs  # no LoRA layers: their dropout is moot
    assert not settings(method="ia3").cuda_graphs


def test_the_logits_chunk_budget_reaches_ligers_fused_loss_where_it_runs(monkeypatch):
    """train.logits_chunk_budget is recorded where Liger's fused loss runs (sft and pt with Liger on a GPU) and handed
    to it with every training forward, 8 by default with checkpointing and 32 without; elsewhere nothing is passed."""
    from weitiao.train import settings as settings_module
    from weitiao.train.core import TokenLoss

    monkeypatch.setattr(settings_module, "_liger", lambda wanted, machine, model_type: machine.cuda)  # not on a CPU
    monkeypatch.setattr(settings_module.kernels, "liger_scores_positions", lambda model_type: True)
    chosen = settings(train={"logits_chunk_budget": 8})
    assert (chosen.fused_cross_entropy, chosen.logits_chunk_budget) == (True, 8)
    assert TokenLoss(chosen).loss_kwargs == {"chunk_mem_const": 8}
    assert settings().logits_chunk_budget == 32
    assert settings(train={"gradient_checkpointing": True}).logits_chunk_budget == 8  # the logits chunk is its peak
    assert settings(train={"gradient_checkpointing": True, "logits_chunk_budget": 32}).logits_chunk_budget == 32
    for elsewhere in (settings(stage="dpo"), settings(train={"distributed": "zero3"}), settings(CPU)):
        assert elsewhere.logits_chunk_budget is None and TokenLoss(elsewhere).loss_kwargs == {}
    with pytest.raises(ConfigError, match="logits_chunk_budget"):
        settings(train={"logits_chunk_budget": 0})


def test_checkpointed_graphs_keep_attention_where_its_backward_runs_alone_and_their_inputs_are_offloaded():
    """Settings.checkpoint_keeps_attention: on for checkpointed layers on CUDA graphs with offloaded inputs and
    torch's varlen kernels, where torch runs FlashAttention's backward alone; off wherever one of those is missing
    (kept on the GPU it would double the checkpoints' memory)."""
    checkpointing = {"gradient_checkpointing": True}
    able = replace(H200, varlen_backward_alone=True)
    chosen = settings(able, train=checkpointing)
    assert (chosen.cuda_graphs, chosen.offload_checkpoints, chosen.varlen_kernel) == (True, True, "torch")
    assert chosen.checkpoint_keeps_attention
    assert not settings(H200, train=checkpointing).checkpoint_keeps_attention  # a torch without it
    assert not settings(able).checkpoint_keeps_attention  # nothing is recomputed
    for off in ({"offload_checkpoints": False}, {"cuda_graphs": False}):
        assert not settings(able, train={**checkpointing, **off}).checkpoint_keeps_attention, off
    assert not settings(replace(able, flash_attn_4=True), train=checkpointing).checkpoint_keeps_attention
    assert not settings(CPU, train=checkpointing).checkpoint_keeps_attention


def test_varlen_attention_runs_on_flash_attention_4_where_it_is_installed_and_refuses_it_where_not():
    """model.varlen_kernel: flash_attn_4 where the package runs on this GPU, else torch's FlashAttention; asked for
    where it cannot run, an error saying what to install; no kernel where the rows are not on varlen."""
    with_fa4 = replace(H200, flash_attn_4=True)
    assert settings(with_fa4).varlen_kernel == "flash_attn_4"
    assert settings().varlen_kernel == "torch"
    assert settings(with_fa4, model={"varlen_kernel": "torch"}).varlen_kernel == "torch"
    assert settings(with_fa4, model={"attn_implementation": "flex_attention"}).varlen_kernel is None
    assert settings(CPU).varlen_kernel is None
    with pytest.raises(ConfigError, match="flash_attn_4 needs the flash-attn-4 package"):
        settings(model={"varlen_kernel": "flash_attn_4"})
