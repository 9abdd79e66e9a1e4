import pytest

from weitiao.config import CustomTemplate, DataConfig
from weitiao.data.encode import IGNORE_INDEX, Encoded, encode_conversation, encode_text, truncate
from weitiao.config import NAMED_TEMPLATES
from weitiao.data.templates import install_template

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "用中文说一遍。"},
    {"role": "assistant", "content": "五"},
]


@pytest.fixture
def fresh_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def trained_text(tokenizer, encoded):
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


TEMPLATES = ["auto", *NAMED_TEMPLATES, "custom"]
CUSTOM = CustomTemplate(system="{content}\n\n", user="### 指令:\n{content}\n\n### 输出:\n",
                        assistant="{content}\n### End{eos}\n", default_system="以下是一个任务。")


@pytest.mark.parametrize("template", TEMPLATES)
def test_training_tokens_equal_apply_chat_template(fresh_tokenizer, template):
    """What the model trains on must be exactly what inference renders (multi-turn, system prompt, Chinese)."""
    data = DataConfig(template=template, custom_template=CUSTOM if template == "custom" else None)
    install_template(fresh_tokenizer, data)
    encoded = encode_conversation(fresh_tokenizer, CONVERSATION)
    expected = fresh_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert encoded.input_ids == list(expected)
    # ...and the prompt of the last turn is a prefix of it, so generation continues exactly where training did.
    prompt = fresh_tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
    assert encoded.input_ids[: len(prompt)] == list(prompt)


def test_labels_cover_every_assistant_reply_and_its_end_of_turn(fresh_tokenizer):
    install_template(fresh_tokenizer, DataConfig())  # SmolLM2's own chat template
    encoded = encode_conversation(fresh_tokenizer, CONVERSATION)
    assert trained_text(fresh_tokenizer, encoded) == "5<|im_end|>五<|im_end|>"
    assert len(encoded.labels) == len(encoded.input_ids)


@pytest.mark.parametrize("template, expected", [
    ("alpaca", "5<|im_end|>五<|im_end|>"),  # {content}{eos}; SmolLM2's EOS is <|im_end|>
    ("dolly", "5\n\n### End<|im_end|>五\n\n### End<|im_end|>"),
    ("chatml", "5<|im_end|>五<|im_end|>"),  # the generation prompt "<|im_start|>assistant\n" is not trained
])
def test_labels_with_named_templates(fresh_tokenizer, template, expected):
    install_template(fresh_tokenizer, DataConfig(template=template))
    assert trained_text(fresh_tokenizer, encode_conversation(fresh_tokenizer, CONVERSATION)) == expected


def test_train_on_all_tokens(fresh_tokenizer):
    install_template(fresh_tokenizer, DataConfig())
    encoded = encode_conversation(fresh_tokenizer, CONVERSATION, train_on="all")
    assert encoded.labels == encoded.input_ids


def test_text_gets_eos(tokenizer):
    encoded = encode_text(tokenizer, "hello world")
    assert encoded.input_ids[-1] == tokenizer.eos_token_id and encoded.labels == encoded.input_ids


def test_auto_template_needs_a_chat_template(fresh_tokenizer):
    from weitiao.errors import ConfigError

    fresh_tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        install_template(fresh_tokenizer, DataConfig())


EXAMPLE = Encoded(input_ids=list(range(10)), labels=[IGNORE_INDEX] * 6 + [6, 7, 8, 9])


@pytest.mark.parametrize("policy, kept_ids, event", [
    ("right", [0, 1, 2, 3, 4, 5, 6, 7], "truncated"),
    ("left", [2, 3, 4, 5, 6, 7, 8, 9], "truncated"),
    ("drop", None, "dropped: longer than max_length"),
])
def test_truncation_policies(policy, kept_ids, event):
    result, happened = truncate(EXAMPLE, 8, policy)
    assert happened == event
    assert (result.input_ids if result else None) == kept_ids


def test_truncation_that_removes_every_response_token_drops_the_example():
    result, happened = truncate(EXAMPLE, 5, "right")
    assert result is None and happened == "dropped: no response tokens left after truncation"


def test_short_examples_are_untouched():
    assert truncate(EXAMPLE, 10, "right") == (EXAMPLE, None)
