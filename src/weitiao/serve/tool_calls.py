"""Tool calling on /v1/chat/completions: what a request's `tools` and `tool_choice` ask of the model, its
messages in the engine's form, and the reply's calls as OpenAI's `tool_calls` (whole, or as stream deltas).

tool_choice: "auto" (the default with tools) lets the model choose; "none" renders no tools and reads no calls;
"required" starts the reply with the chat template's call opening so the model must call one; a named function
starts it with that function's call up to its arguments (weitiao.data.tools.ToolFormat.prefix). Calls are read out
of the reply by ToolFormat.parse, so the server answers in the format the model was trained on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from weitiao.data.tools import ParsedReply, ToolError, ToolFormat, arguments_text


class ToolRequestError(ValueError):
    """A request whose tools, tool_choice or messages break OpenAI's rules; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None
    """The schemas the prompt shows the model (None: no tools)."""
    prefill: str = ""
    """Text the reply is made to start with (a forced call)."""
    names: list[str] = field(default_factory=list)
    """Functions whose calls are read out of the reply (empty: the reply is plain text)."""


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, tool_format: ToolFormat | None) -> ToolPlan:
    """What the request's tools and tool_choice ("none", "auto", "required" or {"type": "function", "function":
    {"name"}}) ask for. `tool_format` is needed only when a call is forced."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolRequestError("tool_choice requires tools: the request lists no functions to call",
                                   "tool_choice")
        return ToolPlan(None)
    names = [tool["function"]["name"] for tool in tools]
    for index, tool in enumerate(tools):
        if names.index(tool["function"]["name"]) != index:
            raise ToolRequestError(f"two tools are named '{tool['function']['name']}'", f"tools[{index}].function.name")
        parameters = tool["function"].get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ToolRequestError("parameters must be a JSON Schema of type 'object'",
                                   f"tools[{index}].function.parameters")
    if tool_choice == "none":
        return ToolPlan(None)
    if tool_choice in (None, "auto"):
        return ToolPlan(tools, "", names)
    assert tool_format is not None
    if tool_choice == "required":
        return ToolPlan(tools, tool_format.prefix(), names)
    name = tool_choice["function"]["name"]
    if name not in names:
        raise ToolRequestError(f"tool_choice names the function '{name}', which is not in tools "
                               f"({', '.join(names)})", "tool_choice.function.name")
    return ToolPlan(tools, tool_format.prefix(name), names)


def engine_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request messages (role, content as text, tool_calls, tool_call_id) checked against OpenAI's rules: each
    tool message answers a call of the assistant message before it, each call gets its answer, and the arguments
    of calls are JSON objects."""
    result: list[dict[str, Any]] = []
    open_calls: dict[str, str] = {}  # id -> where, for calls not answered yet
    for index, message in enumerate(messages):
        role = message["role"]
        if role != "tool" and open_calls:
            where = next(iter(open_calls.values()))
            raise ToolRequestError(f"the assistant message with tool_calls ({where}) must be followed by tool "
                                   f"messages answering each tool_call_id; missing: {', '.join(open_calls)}",
                                   f"messages[{index}]")
        converted: dict[str, Any] = {"role": role, "content": message["content"]}
        if role == "tool":
            call_id = message.get("tool_call_id")
            previous = result[-1]["role"] if result else None
            if previous not in ("tool", "assistant") or (previous == "assistant" and not result[-1].get("tool_calls")):
                raise ToolRequestError("a message with role 'tool' must answer a preceding message with 'tool_calls'",
                                       f"messages[{index}]")
            if call_id is None or call_id not in open_calls:
                raise ToolRequestError(f"tool_call_id {call_id!r} does not match a call of the assistant message "
                                       "before it (or answers one twice)", f"messages[{index}].tool_call_id")
            del open_calls[call_id]
            converted["tool_call_id"] = call_id
        for number, call in enumerate(message.get("tool_calls") or []):
            where = f"messages[{index}].tool_calls[{number}]"
            try:
                arguments = arguments_text(call["function"]["arguments"], f"{where}.function.arguments")
            except ToolError as error:
                raise ToolRequestError(str(error), error.field or where) from None
            converted.setdefault("tool_calls", []).append(
                {"id": call["id"], "type": "function", "function": {"name": call["function"]["name"],
                                                                    "arguments": arguments}})
            open_calls[call["id"]] = f"messages[{index}]"
        result.append(converted)
    if open_calls:
        raise ToolRequestError("the last message calls tools: answer each call with a tool message first",
                               f"messages[{len(messages) - 1}]")
    return result


def _with_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", **call} for call in calls]


def reply_message(text: str, plan: ToolPlan, tool_format: ToolFormat | None) -> tuple[dict[str, Any], bool]:
    """The assistant message for a whole reply (the text after the prefill), and whether it calls tools."""
    if not plan.names:
        return {"role": "assistant", "content": text}, False
    assert tool_format is not None
    parsed = tool_format.parse(plan.prefill + text, plan.names)
    if not parsed.calls:  # no call that parses: the model's text, as it is
        return {"role": "assistant", "content": plan.prefill + text}, False
    return {"role": "assistant", "content": parsed.content or None, "tool_calls": _with_ids(parsed.calls)}, True


class CallStream:
    """Stream deltas for one reply: content as it comes until a call may be starting, then held until the end,
    when the calls go out in OpenAI's delta form (id, type and name first, then the arguments)."""

    def __init__(self, plan: ToolPlan, tool_format: ToolFormat | None):
        self.plan, self.format = plan, tool_format
        self.text = plan.prefill
        self.sent = 0  # characters of self.text sent as content
        self.calls = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        if not self.plan.names:
            return self._content(len(self.text))
        if self.plan.prefill:
            return []  # a forced call: everything is the call
        assert self.format is not None
        marker = self.format.marker
        at = self.text.find(marker)
        if at < 0:  # hold back a tail that may be the start of the marker
            at = next((len(self.text) - k for k in range(min(len(marker) - 1, len(self.text)), 0, -1)
                       if marker.startswith(self.text[-k:])), len(self.text))
        return self._content(at)

    def finish(self) -> list[dict[str, Any]]:
        if not self.plan.names:
            return []
        assert self.format is not None
        parsed: ParsedReply = self.format.parse(self.text, self.plan.names)
        if not parsed.calls:
            return self._content(len(self.text))
        self.calls = True
        deltas = []
        for index, call in enumerate(_with_ids(parsed.calls)):
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
        return deltas

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent:end], end
        return [{"content": piece}]
