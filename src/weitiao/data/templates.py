"""Prompt templates. Every template is a Jinja chat template installed on the tokenizer, so training,
evaluation, chat and serving all render prompts through the one `apply_chat_template` path, and the
tokenizer saved next to a trained model carries the template it was trained with.
"""

from __future__ import annotations

import json
import re

from weitiao.config import NAMED_TEMPLATES, TEMPLATE_STOPS, CustomTemplate, DataConfig
from weitiao.data.tools import add_tool_support
from weitiao.errors import ConfigError


def _jinja_expr(fmt: str, content: str) -> str:
    """'### Q:\\n{content}{eos}' -> '"### Q:\\n" ~ message['content'] ~ eos_token' (a Jinja expression)."""
    parts = []
    for piece in re.split(r"(\{content\}|\{eos\})", fmt):
        if piece == "{content}":
            parts.append(content)
        elif piece == "{eos}":
            parts.append("eos_token")
        elif piece:
            parts.append(json.dumps(piece, ensure_ascii=False))
    return " ~ ".join(parts) or '""'


def build_chat_template(template: CustomTemplate) -> str:
    content = "message['content']"
    system = _jinja_expr(template.system, "system_message")
    user = _jinja_expr(template.user, content)
    assistant = _jinja_expr(template.assistant, content)
    generation = _jinja_expr(template.generation_prompt, '""')
    default_system = json.dumps(template.default_system, ensure_ascii=False)
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system_message = " + default_system + " -%}{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- if system_message -%}{{ " + system + " }}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{{ " + user + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ " + assistant + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + generation + " }}{%- endif -%}"
    )


def template_stops(data: DataConfig) -> list[str]:
    """Text that ends a reply besides EOS: a named template's, or what a custom template writes between a reply's
    {content} and {eos} (e.g. '### End'), so generation stops there and the reply is cut before it."""
    if data.template == "custom" and data.custom_template is not None:
        suffix = data.custom_template.assistant.split("{content}", 1)[1].split("{eos}", 1)[0].strip()
        return [suffix] if suffix else []
    return list(TEMPLATE_STOPS.get(data.template, []))


def install_template(tokenizer, data: DataConfig) -> list[str]:
    """Set the tokenizer's chat template from the config, able to render tools (the model's own tool format, else
    weitiao's default: weitiao.data.tools); return the stop strings that end a reply."""
    name = data.template
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template (a base model?); set data.template to "
                              f"one of {', '.join(NAMED_TEMPLATES)} or custom")
        stops = []
    elif name == "custom":
        assert data.custom_template is not None  # checked by the config
        tokenizer.chat_template = build_chat_template(data.custom_template)
        stops = template_stops(data)
    elif name in NAMED_TEMPLATES:
        tokenizer.chat_template = build_chat_template(NAMED_TEMPLATES[name])
        stops = list(TEMPLATE_STOPS.get(name, []))
    else:
        raise ConfigError(f"unknown data.template '{name}'; choose auto, {', '.join(NAMED_TEMPLATES)} or custom")
    add_tool_support(tokenizer)
    return stops
