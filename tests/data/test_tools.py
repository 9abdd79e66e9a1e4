"""Tool-call conversations: read from the layouts people have, rendered with the model's tool format or the default
one, trained on the calls and replies only, written back out, and read back out of generated text."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import shared_data_dir, write_jsonl
from weitiao.config import DataConfig, DataSource
from weitiao.data.dataset import encode_examples, load_source
from weitiao.data.encode import IGNORE_INDEX, encode_conversation, render
from weitiao.data.formats import to_format
from weitiao.data.templates import install_template
from weitiao.data.tools import (TOOL_PREAMBLE, ToolFormat, add_tool_support, message_text, normalize_tools,
                                supports_tools)
from weitiao.errors import DataError

SHARED = shared_data_dir() / "toolcall"
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "Local time of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def sharegpt_record(city: str = "Paris", arguments=None) -> dict:
    """glaive / LLaMA-Factory layout: tools as a JSON string, calls as JSON text in function_call turns."""
    call = {"name": "get_weather", "arguments": arguments if arguments is not None else {"city": city}}
    return {"conversations": [{"from": "human", "value": f"What's the weather in {city}?"},
                              {"from": "function_call", "value": json.dumps(call)},
                              {"from": "observation", "value": json.dumps({"temperature": 21, "sky": "clear"})},
                              {"from": "gpt", "value": f"It is 21 degrees and clear in {city}."},
                              {"from": "human", "value": "Thanks!"},
                              {"from": "gpt", "value": "You're welcome."}],
            "tools": json.dumps([WEATHER, TIME])}


def openai_record(city: str = "Oslo") -> dict:
    return {"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": f"Weather and time in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": json.dumps({"city": city})}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"city": city}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": {"time": "09:30"}},
        {"role": "assistant", "content": f"12 degrees, 09:30 in {city}."}],
        "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]}


@pytest.fixture
def tool_tokenizer(tokenizer):
    """The default model's tokenizer with the template training installs (its own cannot render tools)."""
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer keeps its template
    install_template(tokenizer, DataConfig(template="auto"))
    return tokenizer


def test_both_layouts_normalise_to_openai_calls(tmp_path):
    sharegpt, stats = load_source(DataSource(path=str(write_jsonl(tmp_path / "s.jsonl", [sharegpt_record()]))))
    messages = sharegpt[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Paris"}'}}]
    assert [t["function"]["name"] for t in sharegpt[0].tools] == ["get_weather", "get_time"]
    assert stats.notes["tool calls"] == 1 and stats.notes["records with tools"] == 1
    openai_, _ = load_source(DataSource(path=str(write_jsonl(tmp_path / "o.jsonl", [openai_record()]))))
    calls = openai_[0].messages[2]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}, {"city": "Oslo"}]
    assert calls[0]["id"] == "call_1" and openai_[0].messages[3]["tool_call_id"] == "call_1"
    assert openai_[0].messages[4]["content"] == '{"time": "09:30"}'  # a JSON value as a tool output: its text


@pytest.mark.parametrize("record, field, message", [
    (sharegpt_record(arguments="{city: Paris"), "conversations[1].value.arguments", "not valid JSON"),
    ({**sharegpt_record(), "tools": json.dumps([TIME])}, "conversations[1].value", "'get_weather', which is not"),
    ({**sharegpt_record(), "tools": "[{'name': 'x'}]"}, "tools", "not valid JSON"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "ok"}]},
     "conversations[2].value", "no assistant turn with a tool call"),
    ({"conversations": [{"from": "human", "value": "hi"}, sharegpt_record()["conversations"][1],
                        {"from": "gpt", "value": "ok"}], "tools": json.dumps([WEATHER])},
     "conversations[2].value", "right after a tool call"),
])
def test_malformed_calls_name_file_record_and_field_or_are_counted(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [sharegpt_record(), record])
    with pytest.raises(DataError) as error:
        load_source(DataSource(path=str(path)))
    assert error.value.record == 2 and error.value.field == field and message in error.value.reason
    kept, stats = load_source(DataSource(path=str(path)), on_error="skip")
    assert len(kept) == 1 and sum(stats.skipped.values()) == 1


def test_default_format_renders_tools_and_trains_on_calls_and_replies_only(tmp_path, tool_tokenizer):
    example = load_source(DataSource(path=str(write_jsonl(tmp_path / "o.jsonl", [openai_record()]))))[0][0]
    text = render(tool_tokenizer, example.messages, tools=example.tools)
    assert "<tools>\n" + json.dumps(example.tools[0], ensure_ascii=False) in text  # the schemas, one per line
    assert 'You answer briefly.\n\n# Tools' in text  # the user's system message comes first
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n12 degrees\n</tool_response>\n<tool_response>" in text  # both outputs, one turn
    encoded = encode_conversation(tool_tokenizer, example.messages, tools=example.tools)
    trained = tool_tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    assert '"name": "get_time"' in trained and "12 degrees, 09:30 in Oslo." in trained
    assert "12 degrees\n" not in trained and "<tool_response>" not in trained and "Weather and time" not in trained
    # without tools the template renders exactly as the model's own
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tool_tokenizer.chat_template.startswith(TOOL_PREAMBLE)
    original = tool_tokenizer.chat_template[len(TOOL_PREAMBLE):]
    assert render(tool_tokenizer, plain) == tool_tokenizer.apply_chat_template(plain, tokenize=False,
                                                                              chat_template=original)


def test_a_template_with_its_own_tool_format_is_kept_and_its_calls_are_read(tokenizer):
    """A Llama-3.1-like template: bare JSON calls with `parameters`. weitiao keeps it and learns its call opening."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{%- if tools %}Functions: {{ tools | tojson }}\n{% endif %}"
        "{%- for m in messages %}<{{ m.role }}>"
        "{%- if m.tool_calls %}{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
        "{{ c.function.arguments | tojson }}}{%- endfor %}{%- else %}{{ m.content }}{%- endif %}</s>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<assistant>{% endif %}")
    assert supports_tools(tokenizer) and not add_tool_support(tokenizer)
    fmt = ToolFormat.of(tokenizer)
    assert fmt.prefix("get_weather") == '{"name": "get_weather", "parameters":' and fmt.marker == '{"name"'
    parsed = fmt.parse('{"name": "get_weather", "parameters": {"city": "Rome"}}', ["get_weather"])
    assert parsed.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    # bare JSON naming no known function is text
    assert not fmt.parse('{"name": "Ann", "parameters": {}}', ["get_weather"]).calls


def test_calls_are_read_back_out_of_generated_text(tool_tokenizer):
    fmt = ToolFormat.of(tool_tokenizer)
    assert fmt.prefix() == '<tool_call>\n{"name":' and fmt.marker == "<tool_call>"
    assert fmt.prefix("f") == '<tool_call>\n{"name": "f", "arguments":'
    two = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>')
    parsed = fmt.parse(two, ["get_weather", "get_time"])
    assert [c["function"]["name"] for c in parsed.calls] == ["get_weather", "get_time"]
    assert parsed.content == "Let me check." and parsed.malformed == 0
    broken = fmt.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"\n</tool_call>')
    assert broken.attempted and not broken.calls and broken.malformed == 1
    # inside the tags any name counts (an unknown function is still a call the client should see)
    assert fmt.parse('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', ["get_weather"]).calls
    assert not fmt.parse("The sky is clear.", ["get_weather"]).attempted


def test_tool_conversations_convert_between_layouts_and_refuse_the_others(tmp_path):
    examples, _ = load_source(DataSource(path=str(write_jsonl(tmp_path / "o.jsonl", [openai_record()]))))
    content = examples[0].content()
    as_sharegpt = to_format(content, "sharegpt")
    assert [t["from"] for t in as_sharegpt["conversations"]] == ["system", "human", "function_call", "observation",
                                                                 "observation", "gpt"]
    assert isinstance(as_sharegpt["tools"], str)  # the layout glaive and LLaMA-Factory use
    again, _ = load_source(DataSource(path=str(write_jsonl(tmp_path / "s.jsonl", [as_sharegpt]))))
    strip = [{k: v for k, v in m.items() if k not in ("id", "tool_call_id")} for m in content["messages"]]
    strip[2]["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in strip[2]["tool_calls"]]
    assert again[0].messages == strip and again[0].tools == examples[0].tools
    as_openai = to_format(content, "openai")
    assert as_openai["tools"] == examples[0].tools and as_openai["messages"][2]["tool_calls"][1]["id"] == "call_2"
    with pytest.raises(DataError, match="tool calls cannot be written as 'alpaca'"):
        to_format(content, "alpaca")


def test_tool_rows_tokenize_in_datasets(tmp_path, tool_tokenizer):
    """Calls of different shapes and tools as JSON text live in one Arrow table and tokenize as they render."""
    path = write_jsonl(tmp_path / "mix.jsonl", [openai_record(), {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    examples, _ = load_source(DataSource(path=str(path)))
    dataset, summary = encode_examples(examples, tool_tokenizer, DataConfig(max_length=2048), "sft")
    assert summary["examples"] == 2
    direct = encode_conversation(tool_tokenizer, examples[0].messages, tools=examples[0].tools)
    assert dataset[0]["input_ids"] == direct.input_ids and dataset[0]["labels"] == direct.labels


def test_tool_schemas_in_the_layouts_people_have():
    wrapped = {"type": "function", "function": WEATHER}
    assert normalize_tools(json.dumps([WEATHER])) == normalize_tools([wrapped]) == [wrapped]
    assert normalize_tools(None) == normalize_tools("") == []
    with pytest.raises(ValueError, match="needs a name"):
        normalize_tools([{"description": "x"}])
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert message_text({"role": "assistant", "content": "", "tool_calls": [call]}) == \
        '{"name": "f", "arguments": {"a": 1}}'


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
def test_the_shared_glaive_files_read_with_every_call_and_the_broken_records_named():
    english, stats = load_source(DataSource(path=str(SHARED / "glaive_toolcall_en_demo.json")))
    assert len(english) == 300 and stats.notes["tool calls"] == 211
    assert sum(1 for e in english if e.tools) == 191
    with pytest.raises(DataError) as error:  # two Chinese records write a call as text in a gpt turn
        load_source(DataSource(path=str(SHARED / "glaive_toolcall_zh_demo.json")))
    assert error.value.record == 198 and error.value.field == "conversations[2].value"
    chinese, stats = load_source(DataSource(path=str(SHARED / "glaive_toolcall_zh_demo.json")), on_error="skip")
    assert len(chinese) == 298 and sum(stats.skipped.values()) == 2
