"""One request to the engine: how to sample it (`SamplingParams`), and its reply in flight (`Generation`)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from weitiao.data.tools import ToolFormat
from weitiao.errors import WeitiaoError

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; OpenAI clients send signed 64-bit integers


class UnknownModelError(WeitiaoError):
    """A request named a model that is neither the base nor an attached adapter."""


class RequestError(WeitiaoError):
    """A request the engine cannot serve as asked (too long for the context, no chat template...)."""


class ContextLengthError(RequestError):
    """The prompt plus the requested reply length do not fit in the model's context window."""


class EngineBusyError(WeitiaoError):
    """The request queue is full."""


@dataclass
class SamplingParams:
    """How to generate one reply. temperature 0 means greedy decoding (then top_p and seed do not matter).
    max_tokens None: DEFAULT_MAX_TOKENS, or less where the context window has less room."""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise RequestError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class ServedModel:
    """What a request's model name selects: the base model or one adapter, with its tokenizer and stops."""
    name: str
    path: str
    adapter: str | None  # the PEFT adapter name; None for the base model
    tokenizer: Any
    eos_token_ids: list[int]
    stop_strings: list[str]
    row_id: int = 0  # what the batch's adapter-per-row index holds for this model (0: the base)
    tool_format: ToolFormat | None = None  # learnt from the chat template when first needed (Engine.tool_format)


class Generation:
    """The reply to one request. The engine's scheduler feeds it tokens (`add_token`); readers take the text as
    it grows, cut before any stop string, and may cancel it.

    Text is decoded incrementally (only the tokens since the last complete character, with a few before them
    for context, as TGI and vLLM do), so a long reply costs the scheduler the same per token as a short one.
    Stop strings are found in the decoded text, so a stop that spans several tokens is still caught, and the
    text that might be the start of a stop string is held back until the next token decides it.
    """

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams,
                 tokenizer_lock: threading.Lock):
        assert params.max_tokens is not None  # resolved by the engine
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.created = time.time()
        self.started: float | None = None  # when the scheduler took it into the running batch
        self.first_token_at: float | None = None
        self.generator: torch.Generator | None = None  # a seeded request's own random stream (set by the engine)
        self.position = 0  # where the next token's keys and values go in its batch row (set by the engine)
        self.last_token = 0  # the token the next decode step feeds in
        self._stops = [s for s in dict.fromkeys(params.stop + served.stop_strings) if s]
        self._tokenizer_lock = tokenizer_lock
        self._ids: list[int] = []
        self._prefix_offset = 0  # _ids[_prefix_offset:_read_offset] decode to the end of _decoded
        self._read_offset = 0
        self._decoded = ""
        self._text = ""  # _decoded, cut at a stop string once one is found
        self._sent = 0  # characters of _text handed to the readers
        self._stop_requested = threading.Event()
        self.was_cancelled = False
        self._pieces: queue.Queue[str | BaseException | None] = queue.Queue()
        self._wakeup: Callable[[], None] | None = None
        self.done = threading.Event()

    # -- written by the engine's scheduler ------------------------------------------------------

    def add_token(self, token: int) -> None:
        """One more generated token; decides whether the reply is finished (end of turn, a stop string, the
        length limit)."""
        if self.finish_reason is not None:
            return
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.completion_tokens += 1
        if token in self.served.eos_token_ids:
            self._finish("stop")
            return
        self._ids.append(token)
        tokenizer = self.served.tokenizer
        with self._tokenizer_lock:
            before = tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
            now = tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):  # "\ufffd": half of a multi-byte character
            searched_from = max(0, len(self._decoded) - max((len(s) for s in self._stops), default=0))
            self._decoded += now[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._text = self._decoded
            cut = min((i for i in (self._decoded.find(s, searched_from) for s in self._stops) if i >= 0), default=-1)
            if cut >= 0:
                self._text = self._decoded[:cut]
                self._finish("stop")
                return
            self._send(len(self._text) - self._pending_stop_prefix(self._text))
        if self.completion_tokens >= self.params.max_tokens:
            self._finish("length")

    def end(self) -> None:
        """No more tokens will come (cancelled, or the engine is shutting down)."""
        if self.finish_reason is None:
            self._finish("length" if self.completion_tokens >= self.params.max_tokens else "stop")

    def fail(self, error: BaseException) -> None:
        self.finish_reason = self.finish_reason or "error"
        self._push(error)
        self._close()

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _send(self, upto: int) -> None:
        if upto > self._sent:
            self._push(self._text[self._sent:upto])
            self._sent = upto

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._stop_requested.set()
        self._send(len(self._text))
        self._close()

    def _close(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self._push(None)

    def _push(self, item: str | BaseException | None) -> None:
        self._pieces.put(item)
        if self._wakeup is not None:
            self._wakeup()

    # -- read by the requester ------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The reply so far (all of it once `done` is set)."""
        return self._text[:self._sent]

    @property
    def cancelled(self) -> bool:
        """Finished or cancelled: the scheduler has nothing more to do for it."""
        return self._stop_requested.is_set()

    def cancel(self) -> None:
        """Stop generating (a client went away, a user pressed Stop). Safe to call at any time."""
        if not self.done.is_set():
            self.was_cancelled = True
            self._stop_requested.set()

    def __iter__(self) -> Iterator[str]:
        """The reply's text, piece by piece, as it is generated (blocking)."""
        while True:
            item = self._pieces.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> str:
        for _ in self:
            pass
        return self.text

    async def stream_async(self) -> AsyncIterator[str]:
        """Like iteration, for asyncio code: waits without holding a thread. Cancelling the awaiting task
        (a client disconnect) cancels the generation."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wakeup() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(ready.set)

        self._wakeup = wakeup
        try:
            while True:
                ready.clear()
                try:
                    item = self._pieces.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the reader stopped early (cancelled task, closed generator): stop generating for it
            self.cancel()

    async def result_async(self) -> str:
        async for _ in self.stream_async():
            pass
        return self.text
