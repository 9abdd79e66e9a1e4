from __future__ import annotations

import json

import pytest
import torch

from weitiao.cli import main
from weitiao.errors import WeitiaoError
from weitiao.serve.merge import merge_adapter


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(tiny_adapter, tmp_path / "merged", dtype="fp32")

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no weitiao or peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    input_ids = torch.tensor([[1, 504, 3100, 28, 9, 2, 17, 4000, 31, 99]])
    base_logits = _logits(base, input_ids)
    adapted_logits = _logits(PeftModel.from_pretrained(base, str(tiny_adapter)), input_ids)
    merged_logits = _logits(merged, input_ids)

    relative_error = ((merged_logits - adapted_logits).norm() / adapted_logits.norm()).item()
    adapter_effect = ((adapted_logits - base_logits).norm() / base_logits.norm()).item()
    assert relative_error < 1e-4
    assert adapter_effect > 1e-2  # the adapter really changes the model, so the comparison means something

    # The merged folder chats like the adapter: its chat template and end-of-turn ids came along.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_adapter).chat_template
    assert "### Instruction:" in tokenizer.chat_template
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert (out / "config.yaml").is_file()
    assert not (out / "adapter_config.json").exists()


def test_merge_cli_casts_to_the_requested_dtype(tmp_path, tiny_adapter, tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-bf16"
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(tiny_adapter), "--out", str(out),
                 "--dtype", "bf16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_prefix_tuning_adapter_cannot_be_merged(tmp_path, tiny_model):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "prefix"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(adapter)
    with pytest.raises(WeitiaoError, match="PREFIX_TUNING adapter.*cannot be merged"):
        merge_adapter(adapter, tmp_path / "out", base=str(tiny_model))
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_non_empty_output_folder(tmp_path, tiny_adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(WeitiaoError, match="not empty"):
        merge_adapter(tiny_adapter, tmp_path / "out")


def test_merge_refuses_an_adapter_of_another_base(tmp_path, tiny_adapter, other_tiny_model):
    with pytest.raises(WeitiaoError, match="trained on .*a different model.*hidden_size 64 vs 48"):
        merge_adapter(tiny_adapter, tmp_path / "out", base=str(other_tiny_model))
