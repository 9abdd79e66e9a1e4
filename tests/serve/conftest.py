"""Tiny models for the deploy tests: a 2-layer Llama with the default model's tokenizer (and chat template),
and LoRA adapters for it, built in-process in a few seconds. Their replies are gibberish but deterministic,
which is what the tests compare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_tiny_model
from weitiao.config import NAMED_TEMPLATES
from weitiao.data.templates import build_chat_template
from weitiao.models import load_tokenizer



def make_lora_adapter(folder: Path, base: Path, template: str | None = None, seed: int = 1) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved like a weitiao run: adapter, tokenizer with the
    chat template of `template` (a named template) and config.yaml naming the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(folder)
    tokenizer = load_tokenizer(str(base))
    if template:
        tokenizer.chat_template = build_chat_template(NAMED_TEMPLATES[template])
    tokenizer.save_pretrained(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)},
                                                        "data": {"template": template or "auto"}}))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> Path:
    return Path(tiny_model_dir)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory, tokenizer) -> Path:
    """Another architecture (hidden size 48): adapters of tiny_model do not fit it."""
    return make_tiny_model(tmp_path_factory.mktemp("other-tiny-model"), tokenizer, hidden_size=48)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> Path:
    """Trained (so to speak) with the dolly template, whose replies end with '### End'."""
    return make_lora_adapter(tmp_path_factory.mktemp("tiny-adapter"), tiny_model, template="dolly")


@pytest.fixture(scope="session")
def engine(tiny_model, tiny_adapter):
    from weitiao.serve.engine import Engine

    engine = Engine(str(tiny_model), {"tuned": str(tiny_adapter)}, base_name="base")
    yield engine
    engine.close()
