"""Tool-calling evaluation on held-out tool conversations.

Every assistant turn of a conversation is a decision point: given the turns before it (and the tools), the model
either calls functions (when the reference turn does) or answers in text. The model's reply is read with the same
parser the server uses (weitiao.data.tools.ToolFormat). Percentages:
- tool_call_accuracy: reference calls answered by calls of the same functions (names, any order);
- tool_argument_match: ... and with equal arguments (parsed JSON equal, so key order and spacing do not matter);
- tool_valid_json: replies that start a call whose calls all parse as JSON {name, arguments} (0 when no reply
  starts one, so base and tuned always have it);
- tool_no_call_accuracy: reference text replies answered without a call.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from weitiao.data.tools import ToolFormat, message_text


@dataclass
class DecisionPoint:
    prompt: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    reference: dict[str, Any]
    """The reference assistant message (content and/or tool_calls)."""

    @property
    def calls(self) -> bool:
        return bool(self.reference.get("tool_calls"))


def decision_points(conversations: list[list[dict[str, Any]]], tools: list[list[dict[str, Any]] | None]
                    ) -> list[DecisionPoint]:
    return [DecisionPoint(messages[:index], schemas, message)
            for messages, schemas in zip(conversations, tools)
            for index, message in enumerate(messages) if message["role"] == "assistant"]


def _call_key(call: dict[str, Any]) -> tuple[str, str]:
    arguments = call["function"]["arguments"]
    try:
        arguments = json.dumps(json.loads(arguments), sort_keys=True)
    except json.JSONDecodeError:
        pass
    return call["function"]["name"], arguments


def tool_metrics(points: list[DecisionPoint], predictions: list[str], tool_format: ToolFormat) -> dict[str, float]:
    """The metrics above (a key is absent when no point counts for it)."""
    counts: Counter[str] = Counter()
    for point, prediction in zip(points, predictions, strict=True):
        names = [tool["function"]["name"] for tool in point.tools or []]
        parsed = tool_format.parse(prediction, names)
        if parsed.attempted:
            counts["attempted"] += 1
            counts["valid"] += int(bool(parsed.calls) and parsed.malformed == 0)
        if point.calls:
            counts["call_points"] += 1
            expected = Counter(_call_key(call) for call in point.reference["tool_calls"])
            got = Counter(_call_key(call) for call in parsed.calls)
            counts["right_function"] += int(Counter(n for n, _ in expected.elements())
                                            == Counter(n for n, _ in got.elements()))
            counts["right_arguments"] += int(expected == got)
        else:
            counts["reply_points"] += 1
            counts["no_call"] += int(not parsed.calls)
    metrics = {}
    if counts["call_points"]:
        metrics["tool_call_accuracy"] = 100 * counts["right_function"] / counts["call_points"]
        metrics["tool_argument_match"] = 100 * counts["right_arguments"] / counts["call_points"]
    metrics["tool_valid_json"] = 100 * counts["valid"] / max(1, counts["attempted"])  # 0: it never started a call
    if counts["reply_points"]:
        metrics["tool_no_call_accuracy"] = 100 * counts["no_call"] / counts["reply_points"]
    return metrics


def reference_texts(points: list[DecisionPoint]) -> list[str]:
    return [message_text(point.reference) for point in points]
