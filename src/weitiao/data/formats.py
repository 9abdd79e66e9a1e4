"""The data formats people have, detected and normalised to one shape.

Every chat format becomes {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]};
plain text (continued pre-training) becomes {"text": str}. `to_format` writes a normalised example back
out in any format, which is what `weitiao data convert` does.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from weitiao.data.readers import Record
from weitiao.data.tools import ToolError, calls_from_text, check_calls, make_call, normalize_tools
from weitiao.errors import DataError

# Each format's fields and the column each reads by default; `columns` in the config renames them.
FORMAT_FIELDS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system",
               "history": "history"},
    "sharegpt": {"conversations": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
    # history: earlier [prompt, response] pairs (alpaca; ms-swift's and ChatGLM's query/response/history).
    "qa": {"prompt": "question", "response": "answer", "system": "system", "history": "history"},
    "text": {"text": "text"},
}
REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "openai": ("messages",),
                   "qa": ("prompt", "response"), "text": ("text",)}
_REQUIRED_ANYWHERE = {field for fields in REQUIRED_FIELDS.values() for field in fields}
# Column pairs that mean "question/answer" in the wild.
QA_COLUMN_PAIRS = (("question", "answer"), ("prompt", "response"), ("prompt", "completion"), ("query", "response"))

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "chatgpt": "assistant", "system": "system",
                # Tool calling (weitiao.data.tools): a turn holding calls, and the tools' outputs.
                "function_call": "call", "tool_call": "call", "observation": "tool", "tool": "tool",
                "function": "tool", "ipython": "tool"}


def check_columns(record: dict[str, Any], columns: Iterable[tuple[str, str]], path: str, line: int | None = None
                  ) -> None:
    """Each (field, column) the mapping names is a column of the first record: a typo in the mapping or in the
    file's header says so, with the closest column, instead of failing to detect the format."""
    for field, column in columns:
        if column not in record:
            close = difflib.get_close_matches(column, [str(key) for key in record], n=1, cutoff=0.6)
            raise DataError(f"column '{column}' (columns: {field}={column}) not found; the file has: "
                            f"{', '.join(map(str, record))}" + (f" (did you mean '{close[0]}'?)" if close else ""),
                            path=path, record=1, line=line)


def required_columns(columns: dict[str, str]) -> list[tuple[str, str]]:
    """The mapped columns that some format cannot do without (optional ones such as system may be absent)."""
    return [(field, column) for field, column in columns.items() if field in _REQUIRED_ANYWHERE]


def detect_format(record: dict[str, Any], columns: dict[str, str], path: str, line: int | None = None
                  ) -> tuple[str, dict[str, str]]:
    """Pick the format from the columns mapping and the first record's keys (`line`: where that record starts);
    return it with its field map."""
    check_columns(record, required_columns(columns), path, line)
    if columns:  # the mapping names the format: {prompt: dialogue, response: summary} is qa
        for name, fields in FORMAT_FIELDS.items():
            mapped = {**fields, **columns}
            if set(columns) <= set(fields) and all(mapped[f] in record for f in REQUIRED_FIELDS[name]):
                return name, mapped
    keys = set(record)
    if "messages" in keys:
        return "openai", {**FORMAT_FIELDS["openai"], **columns}
    if "conversations" in keys:
        return "sharegpt", {**FORMAT_FIELDS["sharegpt"], **columns}
    if isinstance(record.get("conversation"), list):  # Firefly: [{human, assistant}, ...]
        return "sharegpt", {**FORMAT_FIELDS["sharegpt"], "conversations": "conversation", **columns}
    if {"instruction", "output"} <= keys:
        return "alpaca", {**FORMAT_FIELDS["alpaca"], **columns}
    by_name = {str(key).lower(): key for key in keys}  # spreadsheet headers say Question, Answer
    for prompt, response in QA_COLUMN_PAIRS:
        if prompt in by_name and response in by_name:
            return "qa", {**FORMAT_FIELDS["qa"], "prompt": by_name[prompt], "response": by_name[response], **columns}
    if "text" in keys:
        return "text", {**FORMAT_FIELDS["text"], **columns}
    raise DataError(
        f"cannot tell the data format from the columns {sorted(keys)}; expected one of: alpaca "
        "(instruction/input/output), sharegpt (conversations), openai (messages), qa (question/answer) or "
        f"text; or set `format` and `columns` for this source ({_mapping_hint(record)})",
        path=path, record=1, line=line)


# Words in column names that say "the prompt" and "the reply", for the mapping an error message suggests.
_PROMPT_WORDS = ("question", "prompt", "query", "instruction", "input", "problem")
_REPLY_WORDS = ("answer", "response", "output", "completion", "target", "reply", "solution")


def _mapping_hint(record: dict[str, Any]) -> str:
    """A `columns` mapping guessed from the names of the record's text columns (question + std_answer ->
    {prompt: question, response: std_answer}), or a generic example."""
    names = [str(key) for key, value in record.items() if isinstance(value, str)]

    def first(words: tuple[str, ...], exclude: str | None = None) -> str | None:
        return next((name for word in words for name in names if word in name.lower() and name != exclude), None)

    prompt = first(_PROMPT_WORDS)
    response = first(_REPLY_WORDS, exclude=prompt)
    if prompt and response:
        return f"these look like a prompt and its reply: columns: {{prompt: {prompt}, response: {response}}}"
    return "e.g. columns: {prompt: dialogue, response: summary}"


def field_map(fmt: str, columns: dict[str, str]) -> dict[str, str]:
    unknown = set(columns) - set(FORMAT_FIELDS[fmt])
    if unknown:
        raise DataError(f"columns {sorted(unknown)} are not fields of format '{fmt}' "
                        f"(its fields: {', '.join(FORMAT_FIELDS[fmt])})")
    return {**FORMAT_FIELDS[fmt], **columns}


class Normalizer:
    """Turns raw records of one source into normalised examples, counting every repair it makes."""

    def __init__(self, fmt: str, fields: dict[str, str], prompt_template: str | None = None,
                 system: str | None = None, references: list[str] | None = None):
        self.fmt, self.fields, self.prompt_template, self.system = fmt, fields, prompt_template, system
        self.references = references or []
        """Columns holding the references of the reply (the first is the reply itself), when there are several."""
        self.notes: Counter[str] = Counter()

    def __call__(self, record: Record) -> dict[str, Any]:
        if self.fmt == "text":
            return {"text": self._string(record, "text", allow_empty=False)}
        messages = getattr(self, f"_{self.fmt}")(record)
        tools = self._tools(record)
        example: dict[str, Any] = {"messages": self._validate(messages, record, tools)}
        if tools:
            example["tools"] = tools
        if self.references:
            references = [str(value) for column in self.references
                          if (value := record.data.get(column)) is not None and str(value).strip()]
            self.notes["references"] += len(references)
            example["references"] = references
        return example

    # -- field access ------------------------------------------------------------------------
    def _error(self, record: Record, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=record.path, record=record.number, field=field, line=record.line)

    def _get(self, record: Record, name: str, required: bool = True) -> Any:
        column = self.fields[name]
        value = record.data.get(column)
        if value is None and required:
            raise self._error(record, "missing field" if column not in record.data else "value is null", column)
        return value

    def _string(self, record: Record, name: str, allow_empty: bool = True, required: bool = True) -> str:
        value = self._get(record, name, required)
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric answers in csv/parquet files are fine as text
        if not isinstance(value, str):
            raise self._error(record, f"expected a string, got {type(value).__name__}", self.fields[name])
        if not allow_empty and not value.strip():
            raise self._error(record, "empty text", self.fields[name])
        return value

    def _user_turn(self, record: Record, text: str) -> str:
        if self.prompt_template is None:
            return text
        try:
            return self.prompt_template.format(**{k: "" if v is None else v for k, v in record.data.items()})
        except KeyError as error:
            raise self._error(record, f"prompt_template uses {{{error.args[0]}}} but the record has no such column "
                                      f"(columns: {', '.join(record.data)})") from None
        except (IndexError, ValueError) as error:
            raise self._error(record, f"bad prompt_template: {error}") from None

    def _system(self, record: Record) -> list[dict[str, str]]:
        system = self._string(record, "system", required=False) if "system" in self.fields else ""
        system = system or self.system or ""
        return [{"role": "system", "content": system}] if system else []

    # -- formats -----------------------------------------------------------------------------
    def _alpaca(self, record: Record) -> list[dict[str, str]]:
        instruction = self._string(record, "instruction")
        # {instruction: input} (firefly's columns) reads that column once, as the instruction
        same = self.fields["input"] == self.fields["instruction"]
        extra = "" if same else self._string(record, "input", required=False)
        prompt = self._user_turn(record, f"{instruction}\n{extra}" if extra.strip() else instruction)
        return self._system(record) + self._history(record) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": self._string(record, "output")}]

    def _qa(self, record: Record) -> list[dict[str, str]]:
        prompt = self._user_turn(record, self._string(record, "prompt"))
        return self._system(record) + self._history(record) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": self._string(record, "response")}]

    def _history(self, record: Record) -> list[dict[str, str]]:
        """The turns before the record's own prompt, from its [prompt, response] pairs."""
        history = self._get(record, "history", required=False) or []
        column = self.fields["history"]
        if not isinstance(history, list):
            raise self._error(record, f"expected a list of [prompt, response] pairs, got {type(history).__name__}",
                              column)
        messages = []
        for index, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise self._error(record, "expected a [prompt, response] pair of strings", f"{column}[{index}]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        return messages

    def _turns(self, record: Record, name: str, role_keys: tuple[str, ...], content_keys: tuple[str, ...]):
        column = self.fields[name]
        turns = self._get(record, name)
        if not isinstance(turns, list):
            raise self._error(record, f"expected a list of turns, got {type(turns).__name__}", column)
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate(turns):
            where = f"{column}[{index}]"
            if not isinstance(turn, dict):
                raise self._error(record, f"expected an object, got {type(turn).__name__}", where)
            if {"human", "assistant"} <= set(turn) and not any(k in turn for k in role_keys):
                messages += self._exchange(record, turn, where)  # Firefly's layout: one exchange per item
                continue
            role_key = next((k for k in role_keys if k in turn), None)
            content_key = next((k for k in content_keys if k in turn), None)
            calls = turn.get("tool_calls") or turn.get("function_call")  # openai: an assistant turn's calls
            if role_key is None or (content_key is None and not calls):
                raise self._error(record, f"a turn needs {'/'.join(role_keys)} and {'/'.join(content_keys)} keys",
                                  where)
            role = ROLE_ALIASES.get(str(turn[role_key]).lower())
            if role is None:
                raise self._error(record, f"unknown role '{turn[role_key]}' (expected one of "
                                          f"{', '.join(sorted(ROLE_ALIASES))})", f"{where}.{role_key}")
            content = turn.get(content_key) if content_key else None
            if isinstance(content, list):  # openai content parts
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise self._error(record, "only text content parts are supported", f"{where}.{content_key}")
                content = "".join(p.get("text", "") for p in content)
            if content is None:
                content = ""
            if role in ("tool", "call") and not isinstance(content, str):  # an output or a call as a JSON value
                content = json.dumps(content, ensure_ascii=False)
            if not isinstance(content, str):
                raise self._error(record, f"expected a string, got {type(content).__name__}", f"{where}.{content_key}")
            message: dict[str, Any] = {"role": role, "content": content, "_where": f"{where}.{content_key}"}
            try:
                if role == "call":  # sharegpt function_call: the turn's text is the call
                    message = {"role": "assistant", "content": "", "_where": f"{where}.{content_key}",
                               "tool_calls": calls_from_text(content, f"{where}.{content_key}")}
                elif calls and role == "assistant":
                    key = "tool_calls" if turn.get("tool_calls") else "function_call"
                    listed = calls if isinstance(calls, list) else [calls]
                    message["tool_calls"] = [
                        make_call(call.get("function", call) if isinstance(call, dict) else call,
                                  f"{where}.{key}[{number}]", call.get("id") if isinstance(call, dict) else None)
                        for number, call in enumerate(listed)]
            except ToolError as error:
                raise self._error(record, str(error), error.field) from None
            if role == "tool" and isinstance(turn.get("tool_call_id"), str):
                message["tool_call_id"] = turn["tool_call_id"]
            previous = messages[-1] if messages else None
            if message.get("tool_calls") and previous is not None and previous["role"] == "assistant" \
                    and not previous.get("tool_calls"):  # "Let me look that up." then the call: one turn
                previous["tool_calls"] = message["tool_calls"]
                continue
            messages.append(message)
        if messages and messages[0]["role"] == "system":
            return messages
        return [dict(m, _where="") for m in self._system(record)] + messages

    def _exchange(self, record: Record, turn: dict[str, Any], where: str) -> list[dict[str, Any]]:
        for key in ("human", "assistant"):
            if not isinstance(turn[key], str):
                raise self._error(record, f"expected a string, got {type(turn[key]).__name__}", f"{where}.{key}")
        return [{"role": "user", "content": turn["human"], "_where": f"{where}.human"},
                {"role": "assistant", "content": turn["assistant"], "_where": f"{where}.assistant"}]

    def _tools(self, record: Record) -> list[dict[str, Any]]:
        if "tools" not in self.fields:
            return []
        try:
            return normalize_tools(record.data.get(self.fields["tools"]), self.fields["tools"])
        except ToolError as error:
            raise self._error(record, str(error), error.field) from None

    def _sharegpt(self, record: Record):
        return self._turns(record, "conversations", ("from", "role"), ("value", "content"))

    def _openai(self, record: Record):
        return self._turns(record, "messages", ("role", "from"), ("content", "value"))

    # -- checks shared by every chat format ---------------------------------------------------
    def _validate(self, messages: list[dict[str, Any]], record: Record, tools: list[dict[str, Any]] | None = None
                  ) -> list[dict[str, Any]]:
        """Turns go user, assistant, user, ...; an assistant turn with calls is followed by the tools' outputs and
        then the assistant again. Calls name the record's tools."""
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        notes: Counter[str] = Counter()  # counted only if the record is kept
        previous = "assistant"  # what came before the first turn: the conversation starts with the user
        for message in body:
            where = message.get("_where") or None
            role = message["role"]
            if role == "system":
                raise self._error(record, "a system turn may only come first", where)
            calls = message.get("tool_calls")
            expected = ("tool", "assistant") if previous == "tool" else ("tool",) if previous == "call" else \
                ("assistant",) if previous == "user" else ("user",)
            if role not in expected:
                if role == "tool":
                    problem = "a tool's output, but the turn before it is no assistant turn with a tool call"
                elif previous == "call":
                    problem = f"a {role} turn right after a tool call: the tool's output (an observation) comes first"
                else:
                    article = "an" if expected[0] == "assistant" else "a"
                    problem = (f"expected {article} {expected[0]} turn here (turns alternate user/assistant, starting "
                               f"with user), got {role}")
                raise self._error(record, problem, where)
            if calls:
                try:
                    check_calls(calls, tools or [], where or "tool_calls")
                except ToolError as error:
                    raise self._error(record, str(error), error.field) from None
                notes["tool calls"] += len(calls)
            elif role == "assistant" and not message["content"].strip():
                raise self._error(record, "empty response", where or self.fields.get("output")
                                  or self.fields.get("response"))
            if role == "user" and not message["content"].strip():
                notes["empty user turns kept"] += 1
            previous = "call" if calls else role
        while body and body[-1]["role"] in ("user", "tool"):
            notes[f"trailing {body[-1]['role']} turns removed"] += 1
            body = body[:-1]
        if not body:
            raise self._error(record, "no assistant reply to train on")
        if tools:
            notes["records with tools"] += 1
        self.notes.update(notes)
        return [{key: value for key, value in m.items() if key != "_where"} for m in head + body]


def to_format(example: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Write a normalised example in `fmt` (the inverse of Normalizer), for `weitiao data convert`."""
    if "text" in example:
        if fmt != "text":
            raise DataError(f"plain text cannot be converted to '{fmt}'")
        return {"text": example["text"]}
    messages = [{key: value for key, value in m.items() if value is not None} for m in example["messages"]]
    tools = example.get("tools")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    if fmt == "openai":
        return {"messages": messages, **({"tools": tools} if tools else {})}
    if fmt == "sharegpt":
        roles = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
        turns = []
        for message in messages:
            if message.get("content") or not message.get("tool_calls"):
                turns.append({"from": roles[message["role"]], "value": message["content"]})
            if message.get("tool_calls"):  # LLaMA-Factory's layout: {name, arguments} as JSON text, a list if several
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in message["tool_calls"]]
                turns.append({"from": "function_call",
                              "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)})
        return {"conversations": turns, **({"tools": json.dumps(tools, ensure_ascii=False)} if tools else {})}
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise DataError(f"a conversation with tool calls cannot be written as '{fmt}'; use sharegpt or openai")
    if fmt in ("alpaca", "qa"):
        prompt, response = ("instruction", "output") if fmt == "alpaca" else ("question", "answer")
        result = {prompt: body[-2]["content"], **({"input": ""} if fmt == "alpaca" else {}),
                  response: body[-1]["content"]}
        if system is not None:
            result["system"] = system
        pairs = [[body[i]["content"], body[i + 1]["content"]] for i in range(0, len(body) - 2, 2)]
        if pairs:
            result["history"] = pairs
        return result
    raise DataError(f"cannot convert a conversation to '{fmt}'")
