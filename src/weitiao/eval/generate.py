"""Generation for evaluation: the serving engine (continuous batching, CUDA graphs on a GPU) over the model being
evaluated, the same chat template as training, greedy by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from weitiao.generation.engine import Engine
from weitiao.generation.requests import SamplingParams


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def prompt_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Split a conversation into the prompt (everything before the last reply) and that reply (the reference)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def generate(model, tokenizer, prompts: Sequence[list[dict[str, str]]], settings: GenerationSettings,
             stop_strings: Sequence[str] = (), desc: str = "generating") -> list[str]:
    """Reply to each prompt conversation, up to settings.batch_size replies decoded at once; each reply ends at
    the model's end of turn or before the first of `stop_strings`."""
    from tqdm.auto import tqdm

    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    longest = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), default=1)
    engine = Engine(model, tokenizer, stop_strings=list(stop_strings), max_batch=settings.batch_size,
                    max_model_len=longest + settings.max_new_tokens, max_queue=max(len(texts), 1))
    params = SamplingParams(max_tokens=settings.max_new_tokens,
                            temperature=settings.temperature if settings.do_sample else 0.0,
                            top_p=settings.top_p if settings.do_sample else 1.0)
    try:
        generations = engine.submit(engine.base_name, texts, params, chat=True) if texts else []
        return [generation.result().strip() for generation in tqdm(generations, desc=desc, leave=False)]
    finally:
        engine.close()
