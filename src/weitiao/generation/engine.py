"""One loaded model answering many requests at once: what `weitiao serve`, `chat`, the web UI and `eval` use.

The base model is loaded once; fine-tuned LoRA adapters are attached to it by name (PEFT multi-adapter), and each
request picks the base or one adapter. A request for an adapter renders its prompt with the tokenizer and chat
template saved next to that adapter, because that is the template it was trained on.

Continuous batching: a scheduler thread keeps up to `max_batch` replies running. Between two decode steps it
takes waiting requests into free rows (their prompts run packed, in one forward pass) and lets finished or
cancelled ones go, so a request starts as soon as there is room instead of after everything before it. Requests
for different adapters share one batch (generation/adapters.py); on a GPU each decode step is a CUDA graph
(generation/batch.py). Each request gets a `Generation` handle that yields the reply's text as tokens are
produced, for plain threads (iteration) and for asyncio (`stream_async`) alike.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from weitiao.config import ModelConfig
from weitiao.cpu import pick_cpu_threads
from weitiao.data.encode import render
from weitiao.data.tools import ToolFormat, add_tool_support, message_text
from weitiao.errors import WeitiaoError
from weitiao.generation.adapters import AdapterRows, route_lora_rows
from weitiao.generation.batch import BatchModel, SlotCache, pack_linears_for_cpu
from weitiao.generation.requests import (MAX_SEED, ContextLengthError, EngineBusyError, Generation, RequestError,
                                         SamplingParams, ServedModel, UnknownModelError)
from weitiao.generation.sampling import next_tokens
from weitiao.models import load_model, load_tokenizer
from weitiao.runs import RunFolder

log = logging.getLogger("weitiao.generation")

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_MODEL_LEN = 4096  # the KV cache holds max_batch sequences of this many tokens
DEFAULT_MAX_BATCH = {"cuda": 64, "cpu": 8}
CACHE_SHARE_OF_FREE_MEMORY = 0.5  # a GPU's free memory the KV cache may take (fewer rows if it needs more)
PREFILL_TOKENS = {"cuda": 8192, "cpu": 1024}  # prompt tokens packed into one prefill pass
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Command-line spelling -> weitiao.models.pick_dtype spelling.
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_max_batch(device: torch.device) -> int:
    """Replies decoded at once unless told otherwise: 64 on a GPU, 8 on a CPU."""
    return DEFAULT_MAX_BATCH["cuda" if device.type == "cuda" else "cpu"]


def dtype_name(short: str) -> str:
    """'bf16' -> 'bfloat16' (the spelling of weitiao.models.pick_dtype); long names pass through."""
    return DTYPES.get(short, short)


def check_adapter_name(name: str, what: str = "adapter name") -> str:
    """Names are what clients send as `model`, what log lines show and (web UI runs) folder names: keep them
    plain, with no path in them."""
    if not ADAPTER_NAME.fullmatch(name):
        raise WeitiaoError(f"{what} '{name}' may only use letters, digits, '.', '_' and '-' (and not start with "
                           "'.', '_' or '-')")
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


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A PeftModel of prefix tuning, P-Tuning or prompt tuning: virtual tokens the engine's cache cannot hold."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


class Engine:
    """A model (and its named adapters) generating for many requests at once on a scheduler thread.

    `model` is a loaded causal LM (or a PeftModel); `Engine.load` loads one by path. max_batch: replies decoded
    together (default 64 on a GPU, 8 on a CPU; fewer if their KV cache would not fit); max_model_len: the longest
    prompt + reply (default the model's context, at most 4096)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str = "model", path: str = "",
                 eos_token_ids: list[int] | None = None, stop_strings: list[str] | None = None,
                 max_batch: int | None = None, max_model_len: int | None = None, max_queue: int = 256,
                 cuda_graphs: bool | None = None):
        if is_prompt_learning(model):
            raise WeitiaoError("the engine batches base models and LoRA adapters; merge or serve prefix, P-Tuning "
                               "and prompt-tuning adapters with plain PEFT")
        self.model = model
        self.device = next(model.parameters()).device
        self._attention = model.config._attn_implementation
        if self._attention not in ("sdpa", "eager"):  # the engine passes its own 4-D masks, which these take
            model.set_attn_implementation("sdpa")
        self._was_training = model.training
        model.eval()
        window = getattr(model.config.get_text_config(), "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.context_length = min(window, max_model_len or DEFAULT_MAX_MODEL_LEN)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.max_batch = self._fit_batch(max_batch or default_max_batch(self.device))
        self.prefill_tokens = PREFILL_TOKENS[kind]
        self.base_name = name
        self.base_path = path
        self.default_model = name  # what chat and the web UI talk to unless told otherwise
        add_tool_support(tokenizer)  # a hub model's template that cannot render tools gets the default format
        eos = eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer)
        self.models: dict[str, ServedModel] = {name: ServedModel(name, path, None, tokenizer, eos,
                                                                 list(stop_strings or []))}
        self.max_queue = max_queue
        self._rows = AdapterRows(torch.zeros(max(self.max_batch, self.prefill_tokens, self.context_length),
                                             dtype=torch.long, device=self.device))
        self._batch = BatchModel(self._inner_model(), self.max_batch, self.context_length, self._rows.index,
                                 cuda_graphs)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self._model_lock = threading.Lock()  # held for a scheduler step, and while attaching an adapter
        self._wake = threading.Condition()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._running: list[Generation] = []  # row i of the batch is _running[i]
        self._closing = False
        self._scheduler = threading.Thread(target=self._work, name="weitiao-engine", daemon=True)
        self._scheduler.start()

    @classmethod
    def load(cls, model: str = "default", adapters: dict[str, str] | None = None, dtype: str = "auto",
             device: str | None = None, base_name: str | None = None, threads: int | None = None,
             **options: Any) -> Engine:
        """Load MODEL (what weitiao.models.resolve_model accepts) and attach `adapters` ({name: folder})."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":
            # Decoding is many small matrix products: on a CPU that other programs share, one thread can be several
            # times faster than a team of threads waiting for each other (see docs/deploy.md), so the count is
            # measured on decode-sized products unless given.
            threads, why = (threads, "--threads") if threads else pick_cpu_threads(rows=8)
            log.info("CPU threads: %d (%s)", threads, why)
            torch.set_num_threads(threads)
        loaded, tokenizer, base_path = load_model(ModelConfig(name_or_path=model, dtype=dtype_name(dtype)))
        loaded.to(device)
        if device.type == "cpu":  # the engine owns this model: its linear layers may keep CPU-friendly copies
            pack_linears_for_cpu(loaded)
        folder = RunFolder(base_path)  # a merged weitiao run ends replies at its template's stops too
        engine = cls(loaded, tokenizer, name=base_name or model, path=base_path,
                     eos_token_ids=folder.eos_token_ids(tokenizer, loaded.generation_config.eos_token_id),
                     stop_strings=folder.stop_strings(), **options)
        for name, path in (adapters or {}).items():
            engine.add_adapter(name, path)
        engine.warm_up()
        return engine

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
        engine = cls.load(model, adapters, **kwargs)
        if default_adapter:
            engine.default_model = default_adapter
        return engine

    def _fit_batch(self, wanted: int) -> int:
        if self.device.type != "cuda":
            return wanted
        per_row = SlotCache.bytes_per_token(self.model.config, next(self.model.parameters()).dtype) * \
            self.context_length
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(free * CACHE_SHARE_OF_FREE_MEMORY // per_row)
        if fits < 1:
            raise WeitiaoError(f"no room on {self.device} for the KV cache of one {self.context_length}-token "
                               "sequence; lower --max-model-len")
        if fits < wanted:
            log.warning("KV cache: %d rows of %d tokens fit in half the free GPU memory (asked for %d)", fits,
                        self.context_length, wanted)
        return min(wanted, fits)

    def warm_up(self) -> None:
        """Capture the decode steps as CUDA graphs now (on a GPU), so that the first requests do not wait for it.
        The scheduler does it before its next step whenever they are missing (at start, after an adapter is
        attached)."""
        with self._model_lock:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        if self._batch.cuda_graphs and not self._batch.captured:
            try:
                seconds = self._batch.capture_graphs()
            except RuntimeError as error:  # out of memory for the graphs, a model that cannot be captured...
                self._batch.reset_graphs()
                self._batch.cuda_graphs = False
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("decoding without CUDA graphs (slower): capturing them failed: %s",
                            str(error).splitlines()[0])
                return
            log.info("captured %d decode steps as CUDA graphs in %.1f s", self._batch.captured, seconds)

    def _inner_model(self) -> torch.nn.Module:
        """The transformers model under a PeftModel wrapper (its LoRA layers are in place inside it)."""
        from peft import PeftModel

        return self.model.base_model.model if isinstance(self.model, PeftModel) else self.model

    @property
    def queued(self) -> int:
        """Requests waiting for a row in the batch (cancelled ones no longer count)."""
        with self._wake:
            return sum(not g.cancelled for g in self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def names(self) -> list[str]:
        """The base model's name first, then the adapters in the order they were attached."""
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        if name not in self.models:
            raise UnknownModelError(f"The model '{name}' does not exist; this server has: {', '.join(self.models)}")
        return self.models[name]

    def add_adapter(self, name: str, path: str | Path) -> ServedModel:
        """Attach a LoRA adapter (or a weitiao run folder holding one) under `name`. Attaching the same folder
        under the same name again returns the one attached."""
        from peft import PeftConfig, PeftModel

        check_adapter_name(name)
        run = RunFolder.adapter(path)
        folder = run.path
        if name in self.models:
            served = self.models[name]
            if served.adapter is not None and Path(served.path).resolve() == folder.resolve():
                return served
            raise WeitiaoError(f"the name '{name}' is already taken by another model or adapter")
        run.check_base(self.base_path)
        kind = PeftConfig.from_pretrained(str(folder)).peft_type
        if str(kind.value if hasattr(kind, "value") else kind) != "LORA":
            raise WeitiaoError(f"cannot attach adapter {path}: it is a {kind} adapter; the engine batches LoRA "
                               "adapters (lora, dora, qlora). Merge or serve other kinds with plain PEFT")
        tokenizer = load_tokenizer(str(folder)) if run.has_tokenizer else self.models[self.base_name].tokenizer
        add_tool_support(tokenizer)
        with self._model_lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(folder), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, incompatible adapter types
                raise WeitiaoError(f"cannot attach adapter {path}: {str(error).splitlines()[0]}") from None
            self.model.eval()
            self._rows.ids[name] = len(self.models)
            route_lora_rows(self.model, self._rows)
            self._batch.model = self._inner_model()
            self._batch.reset_graphs()  # the captured steps do not have this adapter's layers
        served = ServedModel(name, str(folder), name, tokenizer,
                             run.eos_token_ids(tokenizer, self.model.generation_config.eos_token_id),
                             run.stop_strings(), row_id=self._rows.ids[name])
        self.models[name] = served
        log.info("attached adapter %s from %s", name, folder)
        return served

    # -- prompts --------------------------------------------------------------------------------

    def render_chat(self, name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    prefill: str = "") -> str:
        """The prompt text for a conversation (OpenAI's message form, calls included) and the function schemas
        `tools`, in the chat template of the model `name` selects, followed by `prefill` (the start of the reply)."""
        served = self.get(name)
        self._check_prompt_size(served, sum(len(message_text(m)) for m in messages)
                                + (len(json.dumps(tools)) if tools else 0))
        if not getattr(served.tokenizer, "chat_template", None):
            raise RequestError(f"model '{name}' has no chat template (a base model?); use the completions endpoint, "
                               "or fine-tune it with a data.template")
        from jinja2 import TemplateError

        with self._tokenizer_lock:
            try:
                return render(served.tokenizer, messages, add_generation_prompt=True, tools=tools) + prefill
            except TemplateError as error:
                raise RequestError(f"the chat template of '{name}' rejected these messages: {error}") from None

    def tool_format(self, name: str) -> ToolFormat:
        """How the model `name` writes tool calls (learnt from its chat template once)."""
        served = self.get(name)
        if served.tool_format is None:
            with self._tokenizer_lock:
                served.tool_format = ToolFormat.of(served.tokenizer)
        return served.tool_format

    def count_tokens(self, name: str, text: str, chat: bool = True) -> int:
        return len(self._encode(self.get(name), text, chat))

    def _check_prompt_size(self, served: ServedModel, characters: int) -> None:
        """Refuse a prompt that cannot fit before tokenizing it: no token is longer than the tokenizer's longest
        vocabulary entry, so more characters than the context times that length are too many tokens for sure
        (and a 50 MB prompt costs no tokenizer time or memory)."""
        limit = self.context_length * _longest_token(served.tokenizer)
        if characters > limit:
            raise ContextLengthError(f"the prompt has {characters:,} characters, more than the {self.context_length}-"
                                     f"token context window of this model can hold (at most {limit:,} characters)")

    def _encode(self, served: ServedModel, text: str, chat: bool) -> list[int]:
        # A rendered chat template already holds its special tokens; a raw completion prompt gets the usual ones.
        self._check_prompt_size(served, len(text))
        with self._tokenizer_lock:
            return served.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def fit_messages(self, name: str, messages: list[dict[str, Any]], max_tokens: int | None
                     ) -> list[dict[str, Any]]:
        """Drop the oldest turns (never the system message or the last message) until the prompt and
        `max_tokens` of reply fit in the context window (None: DEFAULT_MAX_TOKENS, at most half the window). What is
        kept starts at a user turn where there is one, so no tool output is left without its call."""
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
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]

    # -- generation -----------------------------------------------------------------------------

    def chat(self, name: str, messages: list[dict[str, Any]], params: SamplingParams,
             tools: list[dict[str, Any]] | None = None, prefill: str = "") -> Generation:
        """Queue a reply to a conversation (OpenAI's message form) and return its handle at once. With `prefill`
        the reply starts with that text (a forced tool call); the handle's text is what follows it."""
        return self.submit(name, [self.render_chat(name, messages, tools, prefill)], params, chat=True)[0]

    def complete(self, name: str, prompt: str, params: SamplingParams) -> Generation:
        """Queue a plain continuation of `prompt` (no chat template)."""
        return self.submit(name, [prompt], params, chat=False)[0]

    def submit(self, name: str, texts: list[str], params: SamplingParams, chat: bool,
               choices: int = 1) -> list[Generation]:
        """Queue `choices` replies per prompt text (prompt by prompt), all or none: a full queue refuses the whole
        request. A seeded request's choice i samples with seed + i, so its choices differ and each repeats."""
        served = self.get(name)
        generations = []
        for text in texts:
            prompt_ids = self._encode(served, text, chat)
            for choice in range(choices):
                seeded = params.seed is not None and choice > 0
                generations.append(self._prepare(served, prompt_ids, replace(
                    params, seed=(params.seed + choice) % (MAX_SEED + 1)) if seeded else params))
        with self._wake:
            if self._closing:
                raise EngineBusyError("the engine is shutting down")
            queued = sum(not g.cancelled for g in self._waiting)
            if queued + len(generations) > self.max_queue:
                raise EngineBusyError(f"the server is busy ({queued} requests waiting, at most {self.max_queue}); "
                                      "retry later")
            self._waiting.extend(generations)
            self._wake.notify()
        return generations

    def _prepare(self, served: ServedModel, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        room = self.context_length - len(prompt_ids)
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, min(DEFAULT_MAX_TOKENS, room)))
        if params.max_tokens > room:
            raise ContextLengthError(f"this model's maximum context length is {self.context_length} tokens; the "
                                     f"prompt has {len(prompt_ids)} and max_tokens asks for {params.max_tokens} more")
        return Generation(served, prompt_ids, params, self._tokenizer_lock)

    # -- the scheduler --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not (self._closing or self._waiting or self._running):
                    self._wake.wait()
                if self._closing:
                    break
                admitted = self._admit()
            try:
                with self._model_lock:
                    self._step(admitted)
            except Exception as error:  # reported to the requesters; the scheduler keeps serving
                log.exception("generation failed")
                for generation in dict.fromkeys(admitted + self._running):
                    generation.fail(error)
                self._running = []
        for generation in [*self._waiting, *self._running]:
            generation.end()

    def _admit(self) -> list[Generation]:
        """Waiting requests for the free rows, as many as one prefill pass takes (at least one)."""
        admitted: list[Generation] = []
        budget = self.prefill_tokens
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            generation = self._waiting[0]
            if generation.cancelled:  # its requester left while it waited
                self._waiting.popleft().end()
                continue
            if admitted and generation.prompt_tokens > budget:
                break
            budget -= generation.prompt_tokens
            admitted.append(self._waiting.popleft())
        return admitted

    @torch.inference_mode()
    def _step(self, admitted: list[Generation]) -> None:
        """Prefill what was admitted, then one decode step for every running reply."""
        self._capture_graphs()
        self._release_finished()
        if admitted:
            now = time.time()
            first = len(self._running)
            for generation in admitted:
                generation.started = now
                if generation.params.temperature > 0 and generation.params.seed is not None:
                    generation.generator = torch.Generator(self.device).manual_seed(generation.params.seed)
            logits = self._batch.prefill([g.prompt_ids for g in admitted],
                                         list(range(first, first + len(admitted))),
                                         [g.served.row_id for g in admitted])
            self._running += admitted
            self._emit(admitted, next_tokens(logits, admitted))
            self._release_finished()
        if self._running:
            running = self._running
            logits = self._batch.decode([g.last_token for g in running], [g.position for g in running],
                                        [g.served.row_id for g in running])
            self._emit(running, next_tokens(logits, running))

    def _emit(self, generations: list[Generation], tokens: list[int]) -> None:
        for generation, token in zip(generations, tokens):
            # The token is fed back at the next step, at the position after everything cached so far.
            generation.position = generation.prompt_tokens + generation.completion_tokens
            generation.last_token = token
            generation.add_token(token)

    def _release_finished(self) -> None:
        """Free the rows of finished and cancelled replies, moving the last row into each gap."""
        running, index = self._running, 0
        while index < len(running):
            generation = running[index]
            if not generation.cancelled:
                index += 1
                continue
            generation.end()
            last = running.pop()
            if last is not generation:
                self._batch.cache.move(len(running), index, last.position)
                running[index] = last

    def close(self) -> None:
        """Stop the scheduler; replies still waiting or running end where they are. A model handed in keeps its
        attention implementation and training mode."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._scheduler.join(timeout=60)
        if self.model.config._attn_implementation != self._attention:
            self.model.set_attn_implementation(self._attention)
        self.model.train(self._was_training)


@functools.cache
def _longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry: more than any one token decodes to (byte-level
    entries spell a byte as one character; SentencePiece's '▁' is the space it stands for)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The model's end-of-sequence ids, and the tokenizer's (the template's end of turn, whatever the base
    model's config says)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
