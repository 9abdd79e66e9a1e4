"""Shared fixtures: the default model's tokenizer, a tiny random model with that tokenizer, real data paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from weitiao.config import NAMED_TEMPLATES
from weitiao.data.templates import build_chat_template
from weitiao.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
ZH_CORPUS = REPO / "examples" / "data" / "zh_domain.txt"  # Chinese law, medicine and finance text we wrote


def shared_data_dir() -> Path:
    """../shared/data beside the checkout (WEITIAO_SHARED_DATA overrides); absent on a user's fresh clone."""
    return Path(os.environ.get("WEITIAO_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture
def shared_data() -> Path:
    folder = shared_data_dir()
    if not folder.is_dir():
        pytest.skip(f"real data not available at {folder}")
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from weitiao.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def tokenizer(request):
    """The default model's tokenizer; WEITIAO_TEST_TOKENIZER names a tokenizer folder instead (GPU machines that
    do not hold the default model)."""
    from weitiao.models import load_tokenizer

    folder = os.environ.get("WEITIAO_TEST_TOKENIZER") or request.getfixturevalue("default_model_dir")
    return load_tokenizer(folder)


def make_tiny_model(folder: Path, tokenizer, hidden_size: int = 64, seed: int = 0,
                    weight_std: float | None = None) -> Path:
    """A 2-layer Llama with the given tokenizer: trains in seconds and exercises the real code paths. With
    `weight_std` every weight is drawn from N(0, weight_std): large values make greedy replies vary (the usual
    initialisation repeats one token), so a wrong adapter or cache entry changes the text."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    if weight_std:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, weight_std)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer))


@pytest.fixture(scope="session")
def zh_extended_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """tiny_model_dir with 60 tokens for Chinese pieces of examples/data/zh_domain.txt (weitiao vocab extend)."""
    from weitiao.vocab import extend_vocabulary

    out = tmp_path_factory.mktemp("zh-extended") / "model"
    extend_vocabulary(tiny_model_dir, [str(ZH_CORPUS)], out, count=60, min_frequency=2, sentencepiece_vocab=400,
                      held_out=0.2, log=lambda line: None)
    return str(out)


@pytest.fixture(autouse=True)
def _isolated_data_cache(tmp_path, monkeypatch):
    """Tokenized-data cache per test (models stay in the shared cache: converting them is slow)."""
    from weitiao import paths

    real = paths.cache_dir

    def cache_dir(*parts: str) -> Path:
        if parts and parts[0] == "data":
            folder = tmp_path.joinpath("cache", *parts)
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        return real(*parts)

    monkeypatch.setattr("weitiao.data.dataset.cache_dir", cache_dir)


def run_interrupted(config, step: int) -> None:
    """Train with `config` and stop it (as Ctrl-C would) right after the log of optimizer step `step`."""
    from weitiao.train import run

    def interrupt(record):
        if record.get("step") == step and "loss" in record:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, on_log=interrupt)


# -- tiny models and LoRA adapters for the generation engine and what serves it -------------------------
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
    from weitiao.generation.engine import Engine

    engine = Engine.load(str(tiny_model), {"tuned": str(tiny_adapter)}, base_name="base")
    yield engine
    engine.close()


# -- a tiny model that has learnt to call one tool (what the tools API and its evaluation are tested on) ---------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def weather_conversation(city: str = "Paris") -> dict:
    """Ask, call get_weather, read its output, answer: OpenAI's layout."""
    return {"messages": [
        {"role": "user", "content": f"What's the weather like in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"temperature": 21})},
        {"role": "assistant", "content": f"It is 21 degrees in {city}."}], "tools": [WEATHER_TOOL]}


GREETING = {"messages": [{"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello! How can I help?"}], "tools": [WEATHER_TOOL]}


@pytest.fixture(scope="session")
def weather_run(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model fully fine-tuned until it calls get_weather for Paris, answers from the tool's output, and greets
    without a call (greedy replies); eval.jsonl holds the same two conversations."""
    from weitiao.config import load_config
    from weitiao.train import run

    folder = tmp_path_factory.mktemp("weather-run")
    rows = [weather_conversation(), GREETING]
    config = load_config(None, {
        "model": {"name_or_path": tiny_model_dir}, "method": "full",
        "data": {"train": str(write_jsonl(folder / "train.jsonl", rows * 4)),
                 "eval": str(write_jsonl(folder / "eval.jsonl", rows)), "max_length": 512},
        "train": {"output_dir": str(folder / "run"), "max_steps": 100, "per_device_train_batch_size": 4,
                  "learning_rate": 5e-3, "logging_steps": 20, "lr_scheduler_type": "constant"},
        "eval": {"compare": False, "max_new_tokens": 40}})
    return Path(run(config).output_dir)
