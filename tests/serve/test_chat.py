from __future__ import annotations

import io
import subprocess
import sys

from weitiao.serve.chat import chat_loop
from weitiao.generation.requests import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def scripted(lines):
    remaining = list(lines)

    def read(prompt):
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read


class Recorder:
    """The engine, with every conversation it is asked to answer written down."""

    def __init__(self, engine):
        self.engine, self.conversations = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def chat(self, model, messages, params):
        self.conversations.append(messages)
        return self.engine.chat(model, messages, params)


def test_multi_turn_system_reset_and_streaming(engine):
    recorder, out = Recorder(engine), io.StringIO()
    writes = []
    out.write = lambda text, write=out.write: writes.append(text) or write(text)
    chat_loop(recorder, "tuned", GREEDY, read=scripted(["hello", "/system Be brief.", "and again", "/reset",
                                                         "fresh start", "/nonsense", "/exit", "never read"]),
              out=out)
    first_reply = engine.chat("tuned", [{"role": "user", "content": "hello"}], GREEDY).result()
    assert recorder.conversations == [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": first_reply}, {"role": "user", "content": "and again"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fresh start"}],
    ]
    text = out.getvalue()
    assert f"tuned> {first_reply}\n" in text
    assert "(conversation cleared)" in text and "unknown command /nonsense" in text
    assert sum(1 for w in writes if w and w in first_reply) > 2  # the reply arrived in pieces


def test_history_is_trimmed_to_the_context_window(engine):
    recorder, out = Recorder(engine), io.StringIO()
    long_message = "tell me more " * 80  # 241 tokens: two of them and their replies do not fit in 512
    chat_loop(recorder, "base", SamplingParams(max_tokens=16, temperature=0),
              read=scripted([long_message, long_message, long_message]), out=out)
    assert [len(c) for c in recorder.conversations] == [1, 1, 1]
    assert "forgot the 2 oldest messages" in out.getvalue()


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(engine):
    recorder, out = Recorder(engine), io.StringIO()
    pieces = []

    def write(text):
        if text and not text.startswith(("tuned>", "Chatting", "\n", " [")):
            pieces.append(text)
            if len(pieces) == 2:
                raise KeyboardInterrupt
        return len(text)

    out.write = write
    chat_loop(recorder, "tuned", SamplingParams(max_tokens=200, temperature=0),
              read=scripted(["hello", "next"]), out=out)
    partial = recorder.conversations[1][1]
    assert partial["role"] == "assistant" and partial["content"].startswith(pieces[0])
    assert len(recorder.conversations) == 2


def test_chat_command_end_to_end(tiny_adapter):
    result = subprocess.run(
        [sys.executable, "-m", "weitiao", "chat", str(tiny_adapter), "--temperature", "0", "--max-tokens", "6",
         "--system", "You are terse."], input="Hi there\n/exit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"Chatting with {tiny_adapter.name}, context 512 tokens" in result.stdout
    assert f"{tiny_adapter.name}> " in result.stdout
