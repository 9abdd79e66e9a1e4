"""Tool-calling metrics: per decision point, parsed as the server parses, and base vs tuned in the report."""

from __future__ import annotations

import json

import pytest

from tests.conftest import GREETING, WEATHER_TOOL, weather_conversation
from weitiao.data.tools import ToolFormat
from weitiao.eval.compare import compare_run
from weitiao.eval.tool_calls import decision_points, tool_metrics

HERMES = ToolFormat('<tool_call>\n{"name": "', '", "arguments": ')


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def normalised(conversation: dict) -> list[dict]:
    messages = [dict(m) for m in conversation["messages"]]
    for message in messages:
        if message.get("tool_calls"):
            message["content"] = ""
    return messages


def test_each_assistant_turn_is_scored():
    conversations = [normalised(weather_conversation("Paris")), normalised(weather_conversation("Rome")),
                     normalised(GREETING)]
    points = decision_points(conversations, [[WEATHER_TOOL]] * 3)
    assert [p.calls for p in points] == [True, False, True, False, False]
    predictions = [
        call_text("get_weather", {"city": "Paris"}),  # right function, right arguments
        "It is 21 degrees in Paris.",  # text where text is due
        call_text("get_weather", {"city": "Paris"}),  # right function, wrong arguments
        call_text("get_weather", {"city": "Rome"}),  # a call where none is due
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # a broken call, none due
    ]
    metrics = tool_metrics(points, predictions, HERMES)
    assert metrics == {"tool_call_accuracy": 100.0, "tool_argument_match": 50.0,
                       "tool_valid_json": pytest.approx(100 * 3 / 4), "tool_no_call_accuracy": pytest.approx(200 / 3)}
    # argument order and spacing do not matter; the function names must
    swapped = [call_text("get_weather", {"city": "Paris"}).replace('"city": "Paris"', '"city":"Paris"'),
               "x", call_text("get_time", {"city": "Rome"}), "y", "z"]
    again = tool_metrics(points, swapped, HERMES)
    assert again["tool_call_accuracy"] == again["tool_argument_match"] == 50.0
    assert again["tool_no_call_accuracy"] == 100.0


def test_base_vs_tuned_report_says_what_the_tool_fine_tune_changed(weather_run):
    report = compare_run(weather_run)
    metrics = report["metrics"]
    assert metrics["tool_call_accuracy"] == {"base": 0.0, "tuned": 100.0, "delta": 100.0}
    assert metrics["tool_argument_match"]["tuned"] == 100.0 and metrics["tool_no_call_accuracy"]["tuned"] == 100.0
    assert metrics["tool_valid_json"]["tuned"] == 100.0
    assert "| tool calls: right function % | 0.0 | 100.0 | +100.0 |" in (weather_run / "report.md").read_text()
