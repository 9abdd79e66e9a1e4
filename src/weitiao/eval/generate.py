"""Generation for evaluation: the serving engine (continuous batching, CUDA graphs on a GPU) over the model being
evaluated (PEFT's generate for prompt-learning methods), the same chat template as training, greedy by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weitiao.data.encode import render
from weitiao.generation.engine import Engine, default_max_batch, eos_ids, is_prompt_learning
from weitiao.generation.requests import SamplingParams


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def generate(model, tokenizer, prompts: Sequence[list[dict[str, Any]]], settings: GenerationSettings,
             stop_strings: Sequence[str] = (), desc: str = "generating",
             tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[str]:
    """Reply to each prompt conversation (with its function schemas `tools[i]`); each reply ends at the model's end
    of turn or before the first of `stop_strings`. The engine decodes settings.batch_size replies at once, or its
    default where that is more (64 on a GPU: a decode step of 64 rows costs about what one of 16 does, and the KV
    cache is what it holds)."""
    tools = tools or [None] * len(prompts)
    texts = [render(tokenizer, list(p), add_generation_prompt=True, tools=t) for p, t in zip(prompts, tools)]
    if not texts:
        return []
    if is_prompt_learning(model):
        return _generate_static(model, tokenizer, texts, settings, stop_strings, desc)
    from tqdm.auto import tqdm

    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    batch = max(settings.batch_size, default_max_batch(next(model.parameters()).device))
    engine = Engine(model, tokenizer, stop_strings=list(stop_strings), max_batch=batch,
                    max_model_len=longest + settings.max_new_tokens, max_queue=len(texts))
    params = SamplingParams(max_tokens=settings.max_new_tokens,
                            temperature=settings.temperature if settings.do_sample else 0.0,
                            top_p=settings.top_p if settings.do_sample else 1.0)
    try:
        generations = engine.submit(engine.base_name, texts, params, chat=True)
        return [generation.result().strip() for generation in tqdm(generations, desc=desc, leave=False)]
    finally:
        engine.close()


@torch.no_grad()
def _generate_static(model, tokenizer, texts: list[str], settings: GenerationSettings,
                     stop_strings: Sequence[str], desc: str) -> list[str]:
    """PEFT's own generate in left-padded batches, for prefix, P-Tuning and prompt tuning: their virtual tokens
    live in PEFT's forward, which the engine's cache does not go through. Prompts are sorted by length so
    batches waste little padding."""
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    results: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos_ids(model, tokenizer)}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # greedy: clear sampling knobs a model's generation_config may carry, to avoid warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    try:
        for start in tqdm(range(0, len(order), settings.batch_size), desc=desc, leave=False):
            batch = order[start:start + settings.batch_size]
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            output = model.generate(**encoded, **kwargs)
            for index, row in zip(batch, output[:, encoded["input_ids"].shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in stop_strings:  # generation stops after the stop string; the reply ends before it
                    text = text.split(stop)[0]
                results[index] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results
