"""Examples -> token ids and labels.

A conversation is rendered once with the tokenizer's chat template and tokenized once, so the ids are
exactly what `apply_chat_template` gives at inference time. The assistant replies are located by
rendering growing prefixes of the conversation: reply i spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i+1])`, which covers
the reply and its end-of-turn marker (EOS), so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weitiao.data.tools import message_text, template_messages

IGNORE_INDEX = -100


class TemplateMismatch(ValueError):
    """The chat template renders earlier turns differently once later turns are added."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The one way a conversation becomes text: the tokenizer's chat template, with the function schemas `tools`
    (training, evaluation, chat and serving all render through here)."""
    return tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Split a conversation into the prompt (everything before the last reply) and that reply's text (the
    reference; a reply that calls tools is its calls as JSON text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], message_text(messages[last])


def assistant_spans(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies (and calls; tool outputs are
    not replies)."""
    text = render(tokenizer, messages, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        full = render(tokenizer, messages[: index + 1], tools=tools)
        if not (full.startswith(prompt) and text.startswith(full)):
            raise TemplateMismatch(
                "the chat template renders earlier turns differently once later turns are added, so the reply "
                "tokens cannot be located; set data.template (e.g. chatml) or train_on: all")
        end = len(full)
        # Text after the end-of-turn marker that is only layout (a newline before the next turn) is not trained.
        while end > len(prompt) and full[end - 1].isspace():
            end -= 1
        spans.append((len(prompt), end))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict[str, Any]], train_on: str = "responses",
                        last_reply_only: bool = False, tools: list[dict[str, Any]] | None = None) -> Encoded:
    """Token ids and labels; with last_reply_only only the final assistant reply is labelled (how evaluation
    scores a candidate answer)."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    if last_reply_only:
        spans = spans[-1:]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if train_on == "all":
        return Encoded(list(ids), list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if start >= spans[span_index][0]:
            labels[position] = ids[position]
    return Encoded(list(ids), labels)


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain text for continued pre-training: BOS if the tokenizer uses one, the text, then EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(list(ids), list(ids))


@dataclass
class Document:
    input_ids: list[int]
    characters: int
    """Length of the text the ids spell: loss per character compares models whose tokenizers differ."""


def encode_document(tokenizer, example: dict[str, Any]) -> Document:
    """A pre-training document: plain text (BOS if the tokenizer uses one, the text, EOS), or a conversation
    rendered with the chat template. Either ends in exactly one EOS, which separates it from the next document
    of a block; a conversation's trailing layout (the newline after the last end-of-turn) is dropped first."""
    if example.get("text") is not None:
        return Document(encode_text(tokenizer, example["text"]).input_ids, len(example["text"]))
    text = render(tokenizer, example["messages"], tools=example.get("tools")).rstrip()
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Document(ids, len(text))


def encode_example(tokenizer, example: dict[str, Any], train_on: str) -> Encoded:
    if "text" in example and example.get("text") is not None:
        return encode_text(tokenizer, example["text"])
    return encode_conversation(tokenizer, example["messages"], train_on, tools=example.get("tools"))


def truncate(encoded: Encoded, max_length: int, policy: str) -> tuple[Encoded | None, str | None]:
    """Apply the truncation policy; return the result (None if dropped) and what happened."""
    if len(encoded.input_ids) <= max_length:
        result, event = encoded, None
    elif policy == "drop":
        return None, "dropped: longer than max_length"
    elif policy == "left":
        result, event = Encoded(encoded.input_ids[-max_length:], encoded.labels[-max_length:]), "truncated"
    else:
        result, event = Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length]), "truncated"
    if all(label == IGNORE_INDEX for label in result.labels):
        return None, ("dropped: no response tokens left after truncation" if event else
                      "dropped: no response tokens")
    return result, event
