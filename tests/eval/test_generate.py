"""Evaluation's generation: the engine's batches for base models and LoRA, PEFT's own generate for prompt learning;
either way a reply equals what plain transformers/PEFT generate gives for that prompt alone."""

from __future__ import annotations

import pytest
import torch

from weitiao.errors import WeitiaoError
from weitiao.eval.generate import GenerationSettings, generate
from weitiao.generation.engine import Engine

PROMPTS = [[{"role": "user", "content": q}] for q in
           ("Hello, who are you?", "What is the capital of France? Answer in one word, please.", "2+2=?",
            "Write a long poem about the sea, the wind and the ships that sail at night.", "Hi")]


def alone(model, tokenizer, messages, max_new_tokens: int) -> str:
    """Greedy reply of model.generate for one prompt, no padding, no batch."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in output:
        output = output[:output.index(tokenizer.eos_token_id)]
    return tokenizer.decode(output, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def varied_model(tiny_model_dir):
    """The tiny model with large random weights: its greedy replies vary (the initialised one repeats a newline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def prefix_model(varied_model):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(varied_model,
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with torch.no_grad():  # a prefix that changes the answers, so one the engine ignored would show
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_prompt_learning_replies_equal_peft_generate_alone(prefix_model, tokenizer, batch_size):
    replies = generate(prefix_model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=batch_size))
    expected = [alone(prefix_model, tokenizer, p, 10) for p in PROMPTS]
    assert replies == expected and all(expected)
    with prefix_model.disable_adapter():
        base = [alone(prefix_model, tokenizer, p, 10) for p in PROMPTS]
    assert replies != base  # the prefix was applied


def test_base_model_replies_equal_transformers_generate_alone(varied_model, tokenizer):
    model = varied_model
    replies = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=3))
    assert replies == [alone(model, tokenizer, p, 10) for p in PROMPTS]
    assert generate(model, tokenizer, [], GenerationSettings()) == []


def test_the_engine_refuses_prompt_learning_models_clearly(prefix_model, tokenizer):
    with pytest.raises(WeitiaoError, match="prefix, P-Tuning and prompt-tuning adapters"):
        Engine(prefix_model, tokenizer)
