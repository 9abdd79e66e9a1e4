"""Tool calling: function schemas, calls inside conversations, the default tool format, and calls read back out of
generated text.

The normalised form is OpenAI's wire form. An example's `tools` is a list of
`{"type": "function", "function": {"name", "description", "parameters"}}`; an assistant message may carry
`tool_calls: [{"type": "function", "function": {"name", "arguments": "<JSON text>"}, "id"?}]` (its `content` may be
empty); a tool's output is `{"role": "tool", "content", "tool_call_id"?}`. Arguments stay JSON text until a
template renders them (`template_messages`), so datasets' Arrow tables hold calls of any shape.

Templates: a model whose chat template renders `tools` and `tool_calls` itself (Qwen2.5, Llama 3.1, ...) keeps it.
Any other template gets `TOOL_PREAMBLE` in front (`add_tool_support`), which rewrites the conversation before the
model's own template runs, in the Hermes format that Qwen2.5 and NousResearch's Hermes models use and that vLLM's
`hermes` tool parser reads: the schemas in the system message inside <tools></tools>, each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant's turn, tool outputs in a user turn
inside <tool_response></tool_response>. Conversations without tools render exactly as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_PREAMBLE_MARK = "{#- weitiao: hermes tool format #}"
# The system text Qwen2.5 writes for its tools, around one JSON schema per line.
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
TOOL_PREAMBLE = TOOL_PREAMBLE_MARK + """
{%- set ns = namespace(messages=[], responses='', text='', tool_turns=false) -%}
{%- for message in messages -%}
{%- if message.role == 'tool' or message.tool_calls -%}{%- set ns.tool_turns = true -%}{%- endif -%}
{%- endfor -%}
{%- if tools or ns.tool_turns -%}
{%- set _rest = messages -%}
{%- if tools -%}
{%- set ns.text = """ + json.dumps(TOOLS_INTRO) + """ -%}
{%- for tool in tools -%}{%- set ns.text = ns.text ~ '\\n' ~ (tool | tojson) -%}{%- endfor -%}
{%- set ns.text = ns.text ~ """ + json.dumps(TOOLS_OUTRO) + """ -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set ns.messages = [{'role': 'system', 'content': messages[0].content ~ '\\n\\n' ~ ns.text}] -%}
{%- set _rest = messages[1:] -%}
{%- else -%}
{%- set ns.messages = [{'role': 'system', 'content': ns.text}] -%}
{%- endif -%}
{%- endif -%}
{%- for message in _rest -%}
{%- if message.role == 'tool' -%}
{%- set ns.responses = ns.responses ~ ('\\n' if ns.responses else '')
    ~ '<tool_response>\\n' ~ message.content ~ '\\n</tool_response>' -%}
{%- else -%}
{%- if ns.responses -%}
{%- set ns.messages = ns.messages + [{'role': 'user', 'content': ns.responses}] -%}{%- set ns.responses = '' -%}
{%- endif -%}
{%- if message.role == 'assistant' and message.tool_calls -%}
{%- set ns.text = message.content or '' -%}
{%- for call in message.tool_calls -%}
{%- set function = call.function if call.function is defined else call -%}
{%- set arguments = function.arguments if function.arguments is string else (function.arguments | tojson) -%}
{%- set ns.text = ns.text ~ ('\\n' if ns.text else '') ~ '<tool_call>\\n{"name": ' ~ (function.name | tojson)
    ~ ', "arguments": ' ~ arguments ~ '}\\n</tool_call>' -%}
{%- endfor -%}
{%- set ns.messages = ns.messages + [{'role': 'assistant', 'content': ns.text}] -%}
{%- else -%}
{%- set ns.messages = ns.messages + [message] -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.responses -%}{%- set ns.messages = ns.messages + [{'role': 'user', 'content': ns.responses}] -%}{%- endif -%}
{%- set messages = ns.messages -%}
{%- endif -%}
{%- set tools = none -%}
"""

# What a probe renders with: a name and an argument no real schema has, so they are found in the rendered text.
_PROBE_NAME, _PROBE_ARGUMENT = "weitiao_probe_fn", "weitiao_probe_arg"
_PROBE_TOOLS = [{"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]


class ToolError(ValueError):
    """A schema or call that is not what the tool format needs; `field` says where (e.g. tools[1].function.name)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# -- schemas and calls -----------------------------------------------------------------------------------


def normalize_tools(value: Any, where: str = "tools") -> list[dict[str, Any]]:
    """Function schemas as OpenAI's `tools` list, from that list, a list of bare `{name, description, parameters}`
    objects (glaive, LLaMA-Factory), or either as JSON text; None or "" -> []."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ToolError(f"not valid JSON ({error.msg} at character {error.pos})", where) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ToolError(f"expected a list of function schemas, got {type(value).__name__}", where)
    tools = []
    for index, tool in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(tool, dict):
            raise ToolError(f"expected a function schema (an object), got {type(tool).__name__}", here)
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise ToolError(f"only tools of type 'function' are supported, got {tool.get('type')!r}", here)
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ToolError("a function schema needs a name", f"{here}.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolError(f"parameters must be a JSON schema object, got {type(parameters).__name__}",
                            f"{here}.parameters")
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def arguments_text(arguments: Any, where: str) -> str:
    """A call's arguments as JSON text of an object (they arrive as an object or as JSON text of one)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ToolError(f"arguments are not valid JSON ({error.msg} at character {error.pos})", where) from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}", where)
    return json.dumps(arguments, ensure_ascii=False)


def make_call(function: Any, where: str, call_id: str | None = None) -> dict[str, Any]:
    """One call in the normalised form from {name, arguments} (or {name, parameters}, Llama's spelling)."""
    if not isinstance(function, dict):
        raise ToolError(f"expected a call object with name and arguments, got {type(function).__name__}", where)
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolError("a call needs a function name", f"{where}.name")
    arguments = function.get("arguments", function.get("parameters"))
    call: dict[str, Any] = {"type": "function",
                            "function": {"name": name, "arguments": arguments_text(arguments, f"{where}.arguments")}}
    if call_id:
        call["id"] = call_id
    return call


def calls_from_text(text: str, where: str) -> list[dict[str, Any]]:
    """A sharegpt `function_call` turn: JSON text of one call {name, arguments} or of a list of calls."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ToolError(f"the call is not valid JSON ({error.msg} at character {error.pos})", where) from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolError("an empty list of calls", where)
    return [make_call(call, where) for call in calls]


def check_calls(calls: list[dict[str, Any]], tools: list[dict[str, Any]], where: str) -> None:
    """Every call names one of the record's tools."""
    names = tool_names(tools)
    for call in calls:
        name = call["function"]["name"]
        if name not in names:
            known = f"its tools: {', '.join(names)}" if names else "the record has no tools"
            raise ToolError(f"calls '{name}', which is not among the functions in tools ({known})", where)


def message_text(message: dict[str, Any]) -> str:
    """A message as plain text, for rules and scores that read text: its content, then its calls as JSON."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])},
                        ensure_ascii=False) for c in message.get("tool_calls") or []]
    return "\n".join(part for part in [message.get("content") or "", *calls] if part)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: without the None fields a datasets row fills in, the arguments of
    calls as objects (what transformers documents and Qwen/Llama templates expect)."""
    result = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_call(call) for call in message["tool_calls"]]
        else:
            message.pop("tool_calls", None)
        result.append(message)
    return result


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass  # rendered as it is
    return {key: value for key, value in {**call, "function": function}.items() if value is not None}


# -- templates ------------------------------------------------------------------------------------------


def _probe_call(arguments: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": _PROBE_NAME, "arguments": arguments}}]}]


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders both the tools' schemas and an assistant's calls."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        with_tools = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=_PROBE_TOOLS,
                                                   tokenize=False)
        call = tokenizer.apply_chat_template(_probe_call({_PROBE_ARGUMENT: 1}), tools=_PROBE_TOOLS, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that raises on tools (e.g. "tools are not supported") has none
        return False
    return _PROBE_NAME in with_tools and call.count(_PROBE_NAME) > with_tools.count(_PROBE_NAME) \
        and _PROBE_ARGUMENT in call


def add_tool_support(tokenizer) -> bool:
    """Put TOOL_PREAMBLE in front of a chat template that cannot render tools; True if it did."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or template.startswith(TOOL_PREAMBLE_MARK) or supports_tools(tokenizer):
        return False
    tokenizer.chat_template = TOOL_PREAMBLE + template
    return True


# -- calls in generated text ------------------------------------------------------------------------------


@dataclass
class ParsedReply:
    content: str
    """The reply without its calls (and without the tags around them)."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """Calls in the normalised form: {"type": "function", "function": {"name", "arguments": JSON text}}."""
    attempted: bool = False
    """The reply started a call (its marker, or a parsed call)."""
    malformed: int = 0
    """Started calls that are not valid JSON of {name, arguments}."""


@dataclass
class ToolFormat:
    """How a chat template writes a call, learnt by rendering a probe call: the text before the function's name
    (`<tool_call>\\n{"name": "` in the Hermes format) and between the name and the arguments."""
    before_name: str
    before_arguments: str

    @classmethod
    def of(cls, tokenizer) -> ToolFormat:
        from weitiao.data.encode import render

        prompt = render(tokenizer, _probe_call({})[:1], add_generation_prompt=True, tools=_PROBE_TOOLS)
        reply = render(tokenizer, _probe_call({_PROBE_ARGUMENT: 1}), tools=_PROBE_TOOLS)[len(prompt):]
        name_at = reply.find(_PROBE_NAME)
        arguments_at = reply.find("{", name_at)
        if name_at < 0 or arguments_at < 0:
            return cls('<tool_call>\n{"name": "', '", "arguments": ')
        return cls(reply[:name_at].lstrip(), reply[name_at + len(_PROBE_NAME):arguments_at])

    @property
    def marker(self) -> str:
        """The text that opens a call: its tag, or `{"name"` for formats that write bare JSON."""
        tag = self.before_name.split("{", 1)[0].strip()
        return tag or '{"name"'

    def prefix(self, name: str | None = None) -> str:
        """What a forced call starts with: up to the name (any function), or up to the arguments (`name`). It ends
        before the space and quote that open the next value: tokenizers join those to the following text, so a
        prompt cut after them would end in a token the model never saw there."""
        if name is None:
            return self.before_name.rstrip().rstrip('"').rstrip()
        return (self.before_name + name + self.before_arguments).rstrip()

    def parse(self, text: str, names: list[str] | None = None) -> ParsedReply:
        """Calls in `text`: JSON objects {name, arguments|parameters} inside the format's call tags, or bare ones
        naming one of `names`."""
        marker = self.marker
        closing = "</" + marker[1:] if marker.startswith("<") and marker.endswith(">") else None
        tagged = [m.end() for m in re.finditer(re.escape(marker), text)] if closing else []
        reply = ParsedReply(content=text, attempted=marker in text)
        spans: list[tuple[int, int]] = []
        decoder = json.JSONDecoder()
        position = 0
        while (start := text.find("{", position)) >= 0:
            try:
                value, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                position = start + 1
                continue
            inside_tag = any(t <= start and not text[t:start].strip() for t in tagged)
            call = _as_call(value) if isinstance(value, dict) else None
            if call is not None and (inside_tag or (names is not None and call["function"]["name"] in names)):
                reply.calls.append(call)
                spans.append((start, end))
            position = end
        reply.attempted = reply.attempted or bool(reply.calls)
        reply.malformed = max(0, len(tagged) - len(reply.calls)) if closing else 0
        if spans:
            pieces, last = [], 0
            for start, end in spans:
                pieces.append(text[last:start])
                last = end
            content = "".join(pieces) + text[last:]
            if closing:
                content = content.replace(marker, "").replace(closing, "")
            reply.content = content.strip()
        return reply


def _as_call(value: dict[str, Any]) -> dict[str, Any] | None:
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(name, str) or not name:
        return None
    try:
        return make_call({"name": name, "arguments": arguments}, "call")
    except ToolError:
        return None
