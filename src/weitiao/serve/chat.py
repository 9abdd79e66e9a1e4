"""`weitiao chat`: a multi-turn conversation in the terminal, the reply printed as it is generated."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from weitiao.generation.engine import Engine
from weitiao.generation.requests import RequestError, SamplingParams

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def chat_loop(engine: Engine, model: str, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read user lines with `read` until /exit or end of input; stream each reply to `out`.

    The history is trimmed from the oldest turn when it no longer fits the context window with room for
    `params.max_tokens`; Ctrl-C while a reply streams stops that reply and keeps what was said."""
    history: list[dict[str, str]] = []
    window = f", context {engine.context_length} tokens" if engine.context_length else ""
    out.write(f"Chatting with {model}{window}. {HELP}\n")
    while True:
        try:
            line = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/exit":
                return
            if command == "/reset":
                history = []
                out.write("(conversation cleared)\n")
            elif command == "/system":
                system = argument.strip() or None
                out.write(f"(system prompt {'set' if system else 'cleared'})\n")
            else:
                out.write(f"unknown command {command}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        prefix = [{"role": "system", "content": system}] if system else []
        try:
            messages = engine.fit_messages(model, prefix + history, params.max_tokens)
        except RequestError as error:
            history.pop()
            out.write(f"error: {error}\n")
            continue
        if len(messages) < len(prefix) + len(history):
            dropped = len(prefix) + len(history) - len(messages)
            history = messages[len(prefix):]
            out.write(f"(forgot the {dropped} oldest messages to stay within the context window)\n")
        out.write(f"{model}> ")
        out.flush()
        generation = engine.chat(model, messages, params)
        try:
            for piece in generation:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            generation.cancel()
            generation.done.wait()
            out.write(" [stopped]")
        out.write("\n")
        history.append({"role": "assistant", "content": generation.text})
