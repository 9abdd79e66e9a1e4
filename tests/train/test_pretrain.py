"""Stage pt end to end on the tiny model: blocks, streaming, a vocabulary-extended model, then SFT on top."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ZH_CORPUS, run_interrupted, write_jsonl
from weitiao.config import load_config
from weitiao.errors import WeitiaoError
from weitiao.train import run


def pt_config(tmp_path, model_dir, **sections):
    held_out = tmp_path / "held_out.txt"  # two paragraphs of the corpus: a quick evaluation
    held_out.parent.mkdir(parents=True, exist_ok=True)
    held_out.write_text("\n\n".join(ZH_CORPUS.read_text(encoding="utf-8").split("\n\n")[:2]), encoding="utf-8")
    settings = {"stage": "pt", "model": {"name_or_path": model_dir},
                "data": {"train": str(ZH_CORPUS), "eval": str(held_out), "max_length": 64},
                "lora": {"r": 4, "alpha": 8},
                "train": {"output_dir": str(tmp_path / "pt"), "max_steps": 4, "per_device_train_batch_size": 4,
                          "learning_rate": 1e-2, "logging_steps": 2, "lr_scheduler_type": "constant"},
                "eval": {"compare": False}}
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values} if isinstance(values, dict) else values
    return load_config(None, settings)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_logs_tokens_throughput_and_held_out_bits_per_character(tmp_path, tiny_model_dir):
    result = run(pt_config(tmp_path, tiny_model_dir))
    log = metrics(result.output_dir)
    stats = json.loads((Path(result.output_dir) / "data_stats.json").read_text())
    assert stats["train"]["blocks"] == result.data["train_examples"]
    first, last = log[0], log[-1]
    assert last["eval_loss"] < first["eval_loss"]
    # Bits per character: the summed loss of the held-out text over its characters.
    characters = stats["eval"]["characters"]
    for record in (first, last):
        expected = record["eval_loss"] * record["eval_tokens"] / torch.log(torch.tensor(2.0)).item() / characters
        assert record["eval_bits_per_char"] == pytest.approx(expected)
    steps = [record for record in log if "loss" in record]
    assert [r["tokens"] for r in steps] == [2 * 4 * 64, 4 * 4 * 64] and all(r["tokens_per_s"] > 0 for r in steps)
    assert result.tokens == 4 * 4 * 64


def test_streamed_pretraining_runs_past_the_end_of_the_stream_and_resumes_exactly(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    # The corpus is 30 blocks of 64 tokens: 8 steps of 4 blocks read it once, the 9th starts a second pass.
    # LoRA dropout makes the RNG state matter, per-document attention (packing) the collation.
    # One CPU thread in both runs: the order of the products' sums depends on the count, measured per run.
    settings = dict(lora={"dropout": 0.1}, train={"max_steps": 10, "save_steps": 4, "cpu_threads": 1},
                    data={"streaming": True, "packing": True})
    reference = run(pt_config(tmp_path / "whole", tiny_model_dir, **settings))
    assert reference.steps == 10 and reference.data["train_examples"] is None
    assert reference.epochs == 1  # one whole pass done, the second under way
    log = metrics(reference.output_dir)
    assert log[-1]["eval_loss"] < log[0]["eval_loss"]

    config = pt_config(tmp_path / "split", tiny_model_dir, **settings)

    run_interrupted(config, step=6)
    resumed = run(config, resume=True)
    assert resumed.steps == 10
    expected = load_file(str(Path(reference.output_dir) / "adapter_model.safetensors"))
    got = load_file(str(Path(resumed.output_dir) / "adapter_model.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_extended_vocabulary_trains_through_tied_modules_to_save_then_sft_continues_the_adapter(
        tmp_path, zh_extended_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(zh_extended_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(zh_extended_model_dir)
    new_ids = list(range(base.config.vocab_size - 60, base.config.vocab_size))
    pretrained = run(pt_config(tmp_path, zh_extended_model_dir,
                               lora={"modules_to_save": ["embed_tokens", "lm_head"]}))
    model = pretrained.model
    embeddings = model.get_input_embeddings().weight
    # The output head is the same trained matrix (PEFT's ensure_weight_tying), and the new rows moved.
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()
    assert (embeddings[new_ids] - base.get_input_embeddings().weight[new_ids]).abs().amax(dim=1).min() > 0

    # SFT continues the same adapter (model.adapter): one adapter holds both stages, on the unchanged base.
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"question": "什么是违约责任？", "answer": "违约责任包括继续履行、"
                                                     "采取补救措施或者赔偿损失。"}] * 8)
    sft = load_config(None, {"model": {"name_or_path": zh_extended_model_dir, "adapter": pretrained.output_dir},
                             "data": {"train": str(sft_data), "max_length": 64},
                             "train": {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "learning_rate": 1e-2,
                                       "per_device_train_batch_size": 4}, "eval": {"compare": False}})
    tuned = run(sft)
    assert tuned.trainable_params == pretrained.trainable_params
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zh_extended_model_dir),
                                         tuned.output_dir).eval()
    batch = tokenizer(["当事人应当履行合同。"], return_tensors="pt")
    with torch.no_grad():
        expected = tuned.model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        pt_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zh_extended_model_dir),
                                            pretrained.output_dir).eval()(**batch).logits
    assert (pt_only - expected).abs().max() > 1e-3  # SFT changed the adapter further

    # Merge-then-train starts from the merged folder: the merge keeps the head tied to the trained embeddings.
    from weitiao.serve.merge import merge_adapter

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tuned.output_dir, tmp_path / "merged")).eval()
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_adapter_to_continue_must_be_lora_on_this_base(tmp_path, tiny_model_dir, zh_extended_model_dir):
    pretrained = run(pt_config(tmp_path, tiny_model_dir, train={"max_steps": 1, "eval_on_start": False}))
    config = pt_config(tmp_path / "next", zh_extended_model_dir, model={"adapter": pretrained.output_dir})
    with pytest.raises(WeitiaoError, match="different model"):
        run(config)
    with pytest.raises(WeitiaoError, match="not an adapter folder"):
        run(pt_config(tmp_path / "other", tiny_model_dir, model={"adapter": str(tmp_path)}))


def test_per_document_attention_on_varlen_follows_sdpa(tmp_path, tiny_model_dir):
    """Stage pt with packing: the block collator's document boundaries give varlen sdpa's per-step losses."""
    losses = {}
    for attention in ("sdpa", "varlen"):
        result = run(pt_config(tmp_path / attention, tiny_model_dir, data={"packing": True},
                               model={"attn_implementation": attention}))
        losses[attention] = [r["loss"] for r in metrics(result.output_dir) if "loss" in r] + [result.eval_loss]
    assert len(losses["sdpa"]) == 3
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-5)
