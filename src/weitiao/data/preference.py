"""Preference data: pairs (a prompt, a chosen and a rejected reply) for stages dpo and rm, and binary feedback (a
conversation and whether its last reply is desirable) for stage kto.

The layouts people have, each normalised to the SFT shape plus one field:
- a chat format next to `chosen`/`rejected` columns: sharegpt `conversations` (LLaMA-Factory's dpo_*_demo.json,
  replies as {from, value}), openai `messages` or TRL's `prompt` message list (replies as message lists), alpaca
  `instruction`/`input` or a question/prompt column (replies as strings);
- whole dialogues as two strings that differ only in the last assistant turn ("\\n\\nHuman: ...\\n\\nAssistant: ...",
  Anthropic HH and most RLHF dumps), split into the shared prompt and the two replies;
- feedback: any chat format with a boolean `label` (TRL's KTO layout; prompt/completion/label too).
A pair becomes {"messages": prompt turns + the chosen reply, "rejected": the rejected reply}, so everything that
reads SFT examples (evaluation's prompts and references, the loss on chosen replies) reads pairs as well.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from weitiao.data.encode import IGNORE_INDEX, Encoded, encode_conversation
from weitiao.data.formats import QA_COLUMN_PAIRS, Normalizer, check_columns, detect_format, field_map, to_format
from weitiao.data.readers import Record
from weitiao.errors import DataError

PAIR_FIELDS = ("chosen", "rejected")
PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
"""A tokenized pair: the chosen sequence (the SFT columns) and the rejected one."""
REPLY_COLUMN = "__reply__"  # where a reply is put for the chat-format normaliser
_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def split_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]; text before the first speaker is an error."""
    parts = _SPEAKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not a dialogue of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def is_pair_record(data: dict[str, Any], columns: dict[str, str]) -> bool:
    """A record of preference pairs: it has the (mapped) chosen and rejected columns."""
    return all(columns.get(field, field) in data for field in PAIR_FIELDS)


def is_dialogue(value: Any) -> bool:
    return isinstance(value, str) and "Human:" in value and "Assistant:" in value and bool(_SPEAKER.search(value))


class PairNormalizer:
    """Preference records of one source -> {"messages": prompt + chosen reply, "rejected": rejected reply}."""

    def __init__(self, first: Record, fmt: str, columns: dict[str, str], prompt_template: str | None,
                 system: str | None):
        self.chosen = columns.get("chosen", "chosen")
        self.rejected = columns.get("rejected", "rejected")
        check_columns(first.data, [("chosen", self.chosen), ("rejected", self.rejected)], first.path, first.line)
        rest = {field: column for field, column in columns.items() if field not in PAIR_FIELDS}
        self.layout, fields = self._layout(first, fmt, rest)
        self.chat = Normalizer("openai" if self.layout == "dialogue" else self.layout, fields, prompt_template, system)
        self.fmt = self.layout
        self.notes: Counter[str] = self.chat.notes

    def _layout(self, first: Record, fmt: str, columns: dict[str, str]) -> tuple[str, dict[str, str]]:
        data = first.data
        if fmt == "auto":
            prompt = columns.get("prompt") or next((c for c in ("prompt", "question", "query") if c in data), None)
            if columns.get("conversations", "conversations") in data:
                fmt = "sharegpt"
            elif columns.get("messages", "messages") in data:
                fmt = "openai"
            elif prompt is not None and isinstance(data.get(prompt), list):  # TRL's conversational prompt
                fmt, columns = "openai", {"messages": prompt}
            elif columns.get("instruction", "instruction") in data:
                fmt = "alpaca"
            elif prompt is not None:
                fmt, columns = "qa", {**columns, "prompt": prompt}
            elif is_dialogue(data.get(self.chosen)):
                return "dialogue", {"messages": "messages"}
            else:
                raise DataError(
                    f"cannot tell the prompt of these preference pairs from the columns {sorted(data)}: expected "
                    "conversations, messages, instruction or a prompt/question column next to chosen/rejected, or "
                    "whole dialogues ('\\n\\nHuman: ...\\n\\nAssistant: ...') in chosen and rejected; map them with "
                    "columns: {prompt: ..., chosen: ..., rejected: ...}", path=first.path, record=1, line=first.line)
        reply_field = {"alpaca": "output", "qa": "response"}.get(fmt)
        if reply_field is not None:
            columns = {**columns, reply_field: REPLY_COLUMN}
        try:
            return fmt, field_map(fmt, columns)
        except DataError as error:
            raise DataError(error.reason, path=first.path) from None

    def __call__(self, record: Record) -> dict[str, Any]:
        chosen, rejected = self._reply(record, self.chosen), self._reply(record, self.rejected)
        prompt = None  # a dialogue's shared turns; chat formats keep their prompt in the record (see _with_reply)
        if self.layout == "dialogue":
            prompt = self._dialogue_prompt(record, chosen, rejected)
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
        for name, reply in ((self.chosen, chosen), (self.rejected, rejected)):
            if not reply.strip():
                raise DataError("empty reply", path=record.path, record=record.number, field=name, line=record.line)
        if chosen == rejected:
            raise DataError("chosen and rejected replies are identical: the pair prefers nothing", path=record.path,
                            record=record.number, field=self.rejected, line=record.line)
        example = self.chat(Record(record.path, record.number, record.line,
                                   {**record.data, **self._with_reply(record, prompt, chosen)}))
        return {"messages": example["messages"], "rejected": rejected}

    def _with_reply(self, record: Record, dialogue: list[dict[str, str]] | None, reply: str) -> dict[str, Any]:
        """The record's columns to change so the chat normaliser reads the prompt followed by `reply`."""
        if self.layout == "dialogue":
            return {"messages": dialogue + [{"role": "assistant", "content": reply}]}
        if self.layout in ("sharegpt", "openai"):
            column = self.chat.fields["conversations" if self.layout == "sharegpt" else "messages"]
            turns = record.data.get(column)
            if not isinstance(turns, list):
                raise DataError(f"expected a list of turns, got {type(turns).__name__}", path=record.path,
                                record=record.number, field=column, line=record.line)
            turn = {"from": "gpt", "value": reply} if self.layout == "sharegpt" else {"role": "assistant",
                                                                                    "content": reply}
            return {column: turns + [turn]}
        return {REPLY_COLUMN: reply}

    def _reply(self, record: Record, column: str) -> Any:
        """A reply as text ({from, value}, {role, content} and one-message lists too); a dialogue's turns."""
        value = record.data.get(column)

        def error(message: str) -> DataError:
            return DataError(message, path=record.path, record=record.number, field=column, line=record.line)

        if value is None:
            raise error("missing field" if column not in record.data else "value is null")
        if self.layout == "dialogue":
            try:
                turns = split_dialogue(value) if isinstance(value, str) else None
            except ValueError as reason:
                raise error(str(reason)) from None
            if not turns or turns[-1]["role"] != "assistant":
                raise error("the dialogue does not end with an Assistant turn")
            return turns
        if isinstance(value, list):  # TRL: [{"role": "assistant", "content": ...}]
            if len(value) != 1:
                raise error(f"expected one reply message, got a list of {len(value)}")
            value = value[0]
        if isinstance(value, dict):
            value = next((value[key] for key in ("value", "content", "text") if key in value), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise error("expected a reply: a string, a {from, value} / {role, content} turn or a list of one")
        return value

    def _dialogue_prompt(self, record: Record, chosen: list[dict[str, str]], rejected: list[dict[str, str]]
                         ) -> list[dict[str, str]]:
        if chosen[:-1] != rejected[:-1]:
            raise DataError("the two dialogues differ before their last Assistant turn, so they cannot be split into "
                            "one prompt and two replies", path=record.path, record=record.number,
                            field=self.rejected, line=record.line)
        return chosen[:-1]


class FeedbackNormalizer:
    """KTO records -> {"messages": ..., "label": bool}: a conversation and whether its last reply is desirable."""

    def __init__(self, first: Record, fmt: str, columns: dict[str, str], prompt_template: str | None,
                 system: str | None):
        self.label = columns.get("label", "label")
        check_columns(first.data, [("label", self.label)], first.path, first.line)
        rest = {field: column for field, column in columns.items() if field != "label"}
        if fmt == "auto":
            data = first.data
            pair = next(((p, r) for p, r in QA_COLUMN_PAIRS if p in data and r in data), None)
            if not rest and pair is not None and "messages" not in data and "conversations" not in data:
                rest = {"prompt": pair[0], "response": pair[1]}  # prompt/completion/label
            fmt, fields = detect_format(data, rest, first.path, first.line)
        else:
            fields = field_map(fmt, rest)
        self.chat = Normalizer(fmt, fields, prompt_template, system)
        self.fmt = fmt
        self.notes: Counter[str] = self.chat.notes

    def __call__(self, record: Record) -> dict[str, Any]:
        value = record.data.get(self.label)
        label = _BOOLEANS.get(str(value).strip().lower()) if not isinstance(value, bool) else value
        if label is None:
            raise DataError(f"expected a boolean label (true: the last reply is desirable), got {value!r}",
                            path=record.path, record=record.number, field=self.label, line=record.line)
        return {"messages": self.chat(record)["messages"], "label": label}


NORMALIZERS = {"pairs": PairNormalizer, "feedback": FeedbackNormalizer}


def preference_to_format(messages: list[dict[str, str]], fmt: str, rejected: str | None = None,
                         label: bool | None = None, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pair (the chosen reply ends `messages`) or a feedback example written in `fmt`, in the layout this module
    reads back: the format's prompt fields with chosen/rejected replies in its own style, or its record plus label.
    A conversation that is neither is written as `to_format` writes it."""
    record = to_format({"messages": messages, "tools": tools}, fmt)
    if label is not None:
        return {**record, "label": label}
    if rejected is None:
        return record
    chosen = messages[-1]["content"]
    if fmt in ("sharegpt", "openai"):
        turns = "conversations" if fmt == "sharegpt" else "messages"
        record[turns] = record[turns][:-1]
        reply = (lambda text: {"from": "gpt", "value": text}) if fmt == "sharegpt" else (
            lambda text: [{"role": "assistant", "content": text}])
        return {**record, "chosen": reply(chosen), "rejected": reply(rejected)}
    record.pop("output" if fmt == "alpaca" else "answer")
    return {**record, "chosen": chosen, "rejected": rejected}


def record_kind(stage: str) -> str | None:
    """The kind of preference record a stage reads (None: SFT conversations or text)."""
    return {"dpo": "pairs", "rm": "pairs", "kto": "feedback"}.get(stage)


def _first_label(encoded: Encoded) -> int:
    return next((i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX), len(encoded.labels))


def encode_pair(tokenizer, messages: list[dict[str, str]], rejected: str, max_length: int, truncation: str
                ) -> tuple[dict[str, list[int]] | None, str | None, int]:
    """Chosen and rejected sequences of a pair, labels on the last reply only, what truncation did and the
    longer one's length before it.

    Both share the prompt, so both are cut the same way: right cuts their ends; left cuts the prompt's start by
    what the longer one is over (keeping a prompt token), then the ends; a prompt that leaves no room drops the pair.
    """
    chosen = encode_conversation(tokenizer, messages, last_reply_only=True)
    worse = encode_conversation(tokenizer, messages[:-1] + [{"role": "assistant", "content": rejected}],
                                last_reply_only=True)
    prompt = min(_first_label(chosen), _first_label(worse))
    longest = max(len(chosen.input_ids), len(worse.input_ids))
    event = None
    if longest > max_length:
        if truncation == "drop":
            return None, "dropped: longer than max_length", longest
        if prompt >= max_length:
            return None, "dropped: prompt longer than max_length", longest
        cut = min(longest - max_length, prompt - 1) if truncation == "left" else 0
        chosen, worse = (Encoded(e.input_ids[cut:cut + max_length], e.labels[cut:cut + max_length])
                         for e in (chosen, worse))
        event = "truncated"
    return {"input_ids": chosen.input_ids, "labels": chosen.labels, "rejected_input_ids": worse.input_ids,
            "rejected_labels": worse.labels}, event, longest


# ---------------------------------------------------------------------------------------------
# Batches: every sequence of a micro-batch numbered, so log-probs are summed per sequence in padded rows and in
# packed ones alike.


def sequence_index(batch: dict[str, Any]) -> torch.Tensor:
    """Each token's sequence: its row in padded batches; in a packed row, a new sequence wherever positions
    restart at 0 (padding becomes sequences of its own, which have no labels)."""
    if "position_ids" in batch:
        return (batch["position_ids"] == 0).cumsum(-1) - 1
    rows, length = batch["input_ids"].shape
    return torch.arange(rows).unsqueeze(1).repeat(1, length)  # not a stride-0 view: the loader pins it


class PairCollator:
    """Pairs -> sequences [chosen 0, rejected 0, chosen 1, rejected 1, ...] batched by `inner` (PadCollator or
    PackedCollator), with `sequence_index`, the number of `pairs` and, when precomputed, `reference_logps`."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = []
        for pair in pairs:
            sequences += [{"input_ids": pair["input_ids"], "labels": pair["labels"]},
                          {"input_ids": pair["rejected_input_ids"], "labels": pair["rejected_labels"]}]
        batch = self.inner(sequences)
        batch.update(sequence_index=sequence_index(batch), pairs=len(pairs))
        if "reference_logps" in pairs[0]:
            batch["reference_logps"] = torch.tensor([pair["reference_logps"] for pair in pairs]).flatten()
        return batch


class FeedbackCollator:
    """KTO examples -> sequences [example 0, ..., example n-1, then each prompt with the next example's reply]:
    the mismatched pairs estimate the KL term (as TRL's KTOTrainer does), with `desirable` per example."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        splits = [_first_label(Encoded(e["input_ids"], e["labels"])) for e in examples]
        mismatched = []
        for index, (example, split) in enumerate(zip(examples, splits)):
            other = (index + 1) % len(examples)
            reply = slice(splits[other], None)
            mismatched.append({"input_ids": example["input_ids"][:split] + examples[other]["input_ids"][reply],
                               "labels": [IGNORE_INDEX] * split + examples[other]["labels"][reply]})
        batch = self.inner([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples] + mismatched)
        batch.update(sequence_index=sequence_index(batch), examples=len(examples),
                     desirable=torch.tensor([bool(e["label"]) for e in examples]))
        return batch
