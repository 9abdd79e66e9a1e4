"""One loaded model that serves chat, the HTTP server and the web UI.

The base model is loaded once; fine-tuned LoRA adapters are attached to it by name (PEFT multi-adapter),
and each request picks the base or one adapter. A request for an adapter renders its prompt with the
tokenizer and chat template saved next to that adapter, because that is the template it was trained on.

Requests run one at a time on a single worker thread, in arrival order: the model, its active adapter and
the random seed are shared state, so serialising them is what keeps concurrent replies from mixing.
Each request gets a `Generation` handle that yields the reply's text as tokens are produced, for plain
threads (iteration) and for asyncio (`stream_async`) alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from weitiao.config import ModelConfig
from weitiao.errors import WeitiaoError
from weitiao.models import load_model, load_tokenizer
from weitiao.runs import RunFolder

log = logging.getLogger("weitiao.serve")

DEFAULT_MAX_TOKENS = 512
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Command-line spelling -> weitiao.models.pick_dtype spelling.
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


@dataclass
class ServedModel:
    """What a request's model name selects: the base model or one adapter, with its tokenizer and stops."""
    name: str
    path: str
    adapter: str | None  # the PEFT adapter name; None for the base model
    tokenizer: Any
    eos_token_ids: list[int]
    stop_strings: list[str]


# ---------------------------------------------------------------------------------------------
# Names and dtypes.


def dtype_name(short: str) -> str:
    """'bf16' -> 'bfloat16' (the spelling of weitiao.models.pick_dtype); long names pass through."""
    return DTYPES.get(short, short)


def check_adapter_name(name: str) -> str:
    """Names are what clients send as `model` and what log lines show: keep them plain."""
    if not ADAPTER_NAME.fullmatch(name):
        raise WeitiaoError(f"adapter name '{name}' may only use letters, digits, '.', '_' and '-'")
    return name


def parse_adapter_specs(specs: list[str] | None) -> dict[str, str]:
    """['tuned=outputs/demo', ...] -> {'tuned': 'outputs/demo'}, checking the NAME=PATH syntax and unique names."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise WeitiaoError(f"--adapter expects NAME=PATH (e.g. tuned=outputs/demo), got '{spec}'")
        check_adapter_name(name)
        if name in adapters:
            raise WeitiaoError(f"adapter name '{name}' is given twice")
        adapters[name] = path
    return adapters


# ---------------------------------------------------------------------------------------------
# One reply in flight.


class Generation(BaseStreamer):
    """The reply to one request. The worker thread feeds it tokens (it is the `streamer` of `generate`);
    readers take the text as it grows, cut before any stop string, and may cancel it.

    Stop strings are found in the decoded text, so a stop that spans several tokens is still caught, and
    the text that might be the start of a stop string is held back until the next token decides it.
    """

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams,
                 tokenizer_lock: threading.Lock):
        assert params.max_tokens is not None  # resolved by the engine
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.created = time.time()
        self.started: float | None = None  # when the worker took it from the queue
        self._stops = [s for s in dict.fromkeys(params.stop + served.stop_strings) if s]
        self._tokenizer_lock = tokenizer_lock
        self._ids: list[int] = []
        self._text = ""  # decoded and cut at a stop string once one is found
        self._sent = 0  # characters of _text handed to the readers
        self._seen_prompt = False
        self._stop_requested = threading.Event()  # read by the stopping criterion on every step
        self.was_cancelled = False
        self._pieces: queue.Queue[str | BaseException | None] = queue.Queue()
        self._wakeup: Callable[[], None] | None = None
        self.done = threading.Event()

    # -- written by the worker thread -----------------------------------------------------------

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt
            self._seen_prompt = True
            return
        if self.finish_reason is not None:  # decoding runs a step past the stop decision; drop that token
            return
        token = int(value.reshape(-1)[0])
        self.completion_tokens += 1
        if token in self.served.eos_token_ids:
            self._finish("stop")
            return
        self._ids.append(token)
        with self._tokenizer_lock:
            text = self.served.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self._text = text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._text = text[:cut]
            self._finish("stop")
            return
        self._send(len(text) - self._pending_stop_prefix(text))
        if self.completion_tokens >= self.params.max_tokens:
            self._finish("length")

    def end(self) -> None:
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


class _StopWhenRequested(StoppingCriteria):
    def __init__(self, generation: Generation):
        self.generation = generation

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.generation.cancelled, dtype=torch.bool,
                          device=input_ids.device)


# ---------------------------------------------------------------------------------------------
# The engine.


class Engine:
    """A base model with named adapters, answering one request at a time on a worker thread."""

    def __init__(self, model: str = "default", adapters: dict[str, str] | None = None, dtype: str = "auto",
                 device: str | None = None, base_name: str | None = None, max_queue: int = 256,
                 threads: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            # Decoding one token is many tiny matrix products: on a CPU that other programs share, one thread
            # can be several times faster than a team of threads waiting for each other (see docs/deploy.md).
            torch.set_num_threads(threads)
        model_config = ModelConfig(name_or_path=model, dtype=dtype_name(dtype))
        self.model, tokenizer, self.base_path = load_model(model_config)
        self.model.to(self.device).eval()
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        base_folder = RunFolder(self.base_path)  # a merged weitiao run ends replies at its template's stops too
        self.base_name = base_name or model
        self.default_model = self.base_name  # what chat and the web UI talk to unless told otherwise
        self.models: dict[str, ServedModel] = {self.base_name: ServedModel(
            self.base_name, self.base_path, None, tokenizer,
            base_folder.eos_token_ids(tokenizer, self.model.generation_config.eos_token_id),
            base_folder.stop_strings())}
        self.max_queue = max_queue
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self._model_lock = threading.Lock()  # held while generating or attaching an adapter
        self._jobs: queue.Queue[Generation | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="weitiao-engine", daemon=True)
        self._worker.start()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @classmethod
    def from_model_arg(cls, model: str, adapters: dict[str, str] | None = None, **kwargs: Any) -> Engine:
        """MODEL as the commands take it: what resolve_model accepts, or an adapter (run) folder, which loads
        its base and attaches the adapter under the folder's name (and makes it `default_model`)."""
        adapters = dict(adapters or {})
        default_adapter = None
        run = RunFolder(model)
        if run.holds_adapter:
            default_adapter = run.path.resolve().name
            adapters = {default_adapter: str(run.path), **adapters}
            model = run.base_model()
        engine = cls(model, adapters, **kwargs)
        if default_adapter:
            engine.default_model = default_adapter
        return engine

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return self._jobs.qsize()

    @property
    def names(self) -> list[str]:
        """The base model's name first, then the adapters in the order they were attached."""
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        if name not in self.models:
            raise UnknownModelError(f"The model '{name}' does not exist; this server has: {', '.join(self.models)}")
        return self.models[name]

    def add_adapter(self, name: str, path: str | Path) -> ServedModel:
        """Attach a PEFT adapter (or a weitiao run folder holding one) under `name`."""
        from peft import PeftModel

        check_adapter_name(name)
        if name in self.models:
            raise WeitiaoError(f"the name '{name}' is already taken by another model or adapter")
        run = RunFolder.adapter(path)
        run.check_base(self.base_path)
        folder = run.path
        tokenizer = load_tokenizer(str(folder)) if run.has_tokenizer else self.models[self.base_name].tokenizer
        with self._model_lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(folder), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, incompatible adapter types
                raise WeitiaoError(f"cannot attach adapter {path}: {str(error).splitlines()[0]}") from None
            self.model.eval()
        served = ServedModel(name, str(folder), name, tokenizer,
                             run.eos_token_ids(tokenizer, self.model.generation_config.eos_token_id),
                             run.stop_strings())
        self.models[name] = served
        log.info("attached adapter %s from %s", name, folder)
        return served

    # -- prompts --------------------------------------------------------------------------------

    def render_chat(self, name: str, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, in the chat template of the model `name` selects."""
        served = self.get(name)
        if not getattr(served.tokenizer, "chat_template", None):
            raise RequestError(f"model '{name}' has no chat template (a base model?); use the completions endpoint, "
                               "or fine-tune it with a data.template")
        from jinja2 import TemplateError

        with self._tokenizer_lock:
            try:
                return served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as error:
                raise RequestError(f"the chat template of '{name}' rejected these messages: {error}") from None

    def count_tokens(self, name: str, text: str, chat: bool = True) -> int:
        return len(self._encode(self.get(name), text, chat))

    def _encode(self, served: ServedModel, text: str, chat: bool) -> list[int]:
        # A rendered chat template already holds its special tokens; a raw completion prompt gets the usual ones.
        with self._tokenizer_lock:
            return served.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def fit_messages(self, name: str, messages: list[dict[str, str]], max_tokens: int | None
                     ) -> list[dict[str, str]]:
        """Drop the oldest turns (never the system message or the last message) until the prompt and
        `max_tokens` of reply fit in the context window (None: DEFAULT_MAX_TOKENS, at most half the window)."""
        if self.context_length is None:
            return messages
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.context_length // 2)
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        while True:
            fitted = system + turns
            if self.count_tokens(name, self.render_chat(name, fitted)) + max_tokens <= self.context_length:
                return fitted
            if len(turns) <= 1:
                raise ContextLengthError(f"the last message alone does not leave room for {max_tokens} new tokens "
                                         f"in the {self.context_length}-token context window")
            turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]

    # -- generation -----------------------------------------------------------------------------

    def chat(self, name: str, messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        """Queue a reply to a conversation ({'role', 'content'} dicts) and return its handle at once."""
        return self._submit(self.get(name), self.render_chat(name, messages), params, chat=True)

    def complete(self, name: str, prompt: str, params: SamplingParams) -> Generation:
        """Queue a plain continuation of `prompt` (no chat template)."""
        return self._submit(self.get(name), prompt, params, chat=False)

    def _submit(self, served: ServedModel, text: str, params: SamplingParams, chat: bool) -> Generation:
        prompt_ids = self._encode(served, text, chat)
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        room = self.context_length - len(prompt_ids) if self.context_length is not None else None
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, min(DEFAULT_MAX_TOKENS, room if room is not None
                                                           else DEFAULT_MAX_TOKENS)))
        if room is not None and params.max_tokens > room:
            raise ContextLengthError(f"this model's maximum context length is {self.context_length} tokens; the "
                                     f"prompt has {len(prompt_ids)} and max_tokens asks for {params.max_tokens} more")
        if self._jobs.qsize() >= self.max_queue:
            raise EngineBusyError(f"the server is busy ({self.max_queue} requests waiting); retry later")
        generation = Generation(served, prompt_ids, params, self._tokenizer_lock)
        self._jobs.put(generation)
        return generation

    def _work(self) -> None:
        while True:
            generation = self._jobs.get()
            if generation is None:
                return
            if generation.cancelled:  # its requester left while it waited
                generation.end()
                continue
            generation.started = time.time()
            try:
                with self._model_lock:
                    self._generate(generation)
            except Exception as error:  # reported to the requester; the worker keeps serving
                log.exception("generation failed")
                generation.fail(error)

    @torch.inference_mode()
    def _generate(self, generation: Generation) -> None:
        served, params = generation.served, generation.params
        tokenizer = served.tokenizer
        input_ids = torch.tensor([generation.prompt_ids], device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens, "eos_token_id": served.eos_token_ids,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else served.eos_token_ids[0],
            "streamer": generation, "stopping_criteria": StoppingCriteriaList([_StopWhenRequested(generation)])}
        if params.temperature > 0:
            # top_k=0: no top-k cut, so temperature and top_p alone decide (OpenAI's semantics).
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:  # greedy: clear sampling knobs the model's generation_config may carry (avoids warnings)
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and served.adapter is not None:
            self.model.set_adapter(served.adapter, inference_mode=True)
            adapters = contextlib.nullcontext()
        elif isinstance(self.model, PeftModel):
            adapters = self.model.disable_adapter()
        else:
            adapters = contextlib.nullcontext()
        with adapters:
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        generation.end()

    def close(self) -> None:
        """Stop the worker thread after the queued requests."""
        self._jobs.put(None)
        self._worker.join(timeout=60)
