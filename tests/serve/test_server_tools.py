"""The tools API of `weitiao serve` as the official openai client uses it, on a tiny model trained to call
get_weather: OpenAI's own tool-calling loop (ask, get tool_calls, run the function, send its output back, get the
answer), streaming deltas, tool_choice, and 400s for requests that break the rules."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import WEATHER_TOOL
from tests.serve.test_server import start_server
from weitiao.data.tools import ToolFormat
from weitiao.serve.tool_calls import CallStream, ToolPlan

ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, weather_run):
    log = tmp_path_factory.mktemp("tool-server") / "server.log"
    server = start_server([str(weather_run), "--name", "weather", "--threads", "1"], log)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    server.process.terminate()
    server.process.wait(timeout=30)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="weather", messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                          max_tokens=40, **kwargs)


def get_weather(city: str) -> str:
    return json.dumps({"temperature": 21})


def test_openai_tool_calling_loop(client):
    """The loop of OpenAI's function-calling guide, unchanged."""
    messages = list(ASK)
    response = ask(client, messages)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages.append(choice.message)  # the client's own message object goes back as it is
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": get_weather(**json.loads(call.function.arguments))})
    answer = ask(client, messages)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content == "It is 21 degrees in Paris."


def test_streamed_calls_arrive_as_openai_deltas(client):
    chunks = list(ask(client, ASK, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:  # accumulated as OpenAI's docs do
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""  # the call is not content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


def test_tool_choice(client):
    greeting = [{"role": "user", "content": "Hi there"}]
    assert ask(client, greeting).choices[0].message.content == "Hello! How can I help?"  # auto: no call needed
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        forced = ask(client, ASK, tool_choice=choice).choices[0]  # the reply was made to start with the call
        assert forced.finish_reason == "tool_calls" and forced.message.content is None
        call = forced.message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    none = ask(client, ASK, tool_choice="none").choices[0]
    assert not none.message.tool_calls and none.finish_reason in ("stop", "length")


@pytest.mark.parametrize("change, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21"}]}, "messages[1]"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: Paris}"}}]}, {"role": "tool", "tool_call_id": "call_1",
                                                                  "content": "21"}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "user", "content": "and?"}]}, "messages[2]"),
])
def test_requests_that_break_the_rules_get_400(client, change, param):
    body = {"model": "weather", "messages": ASK, "tools": [WEATHER_TOOL], **change}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**body)
    assert error.value.status_code == 400 and error.value.body["param"] == param


def test_tool_choice_without_tools_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="tool_choice requires tools"):
        client.chat.completions.create(model="weather", messages=ASK, tool_choice="required")


def test_stream_holds_back_what_may_open_a_call():
    fmt = ToolFormat('<tool_call>\n{"name": "', '", "arguments": ')
    stream = CallStream(ToolPlan([WEATHER_TOOL], "", ["get_weather"]), fmt)
    sent = [d for piece in ["Sure, ", "<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {}}\n",
                            "</tool_call>"] for d in stream.feed(piece)]
    assert sent == [{"content": "Sure, "}]  # "<tool" waited until it turned out to be the marker
    deltas = stream.finish()
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[1]["tool_calls"][0]["function"] == {"arguments": "{}"} and stream.calls
    text = CallStream(ToolPlan([WEATHER_TOOL], "", ["get_weather"]), fmt)
    assert [d for piece in ["a <", "b"] for d in text.feed(piece)] == [{"content": "a "}, {"content": "<b"}]
    assert text.finish() == [] and not text.calls
