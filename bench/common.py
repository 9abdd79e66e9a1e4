"""Shared pieces of the benchmarks: model shapes built from config, synthetic SFT data, FLOP counts, timing."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

# Llama-shaped models with random weights (speed and memory do not depend on the values).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PEAK_BF16_FLOPS = 989.4e12  # H100/H200 SXM dense bf16, datasheet
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part").split()


def build_model_folder(shape: str, folder: Path, tokenizer) -> Path:
    """A random-weight Llama of the given shape saved in bf16, with the tokenizer (ids stay below its vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=32768, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: a 14B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def write_sft_data(path: Path, count: int, seed: int = 0, median: int = 300, sigma: float = 0.8,
                   low: int = 32, high: int = 2048, fixed: int | None = None) -> Path:
    """question/answer records whose token counts follow a lognormal (median 300, sigma 0.8, clipped to
    32..2048): about 30% prompt, 70% response. One common English word is one token."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            length = fixed or int(min(high, max(low, math.exp(rng.gauss(math.log(median), sigma)))))
            length = max(8, length - 30)  # the chat template adds about 30 tokens
            prompt = max(1, int(0.3 * length))
            words = [rng.choice(WORDS) for _ in range(length)]
            handle.write(json.dumps({"question": " ".join(words[:prompt]), "answer": " ".join(words[prompt:])})
                         + "\n")
    return path


def linear_params(shape: str) -> int:
    """Weights that take part in a matrix product per token (every linear layer and the output head)."""
    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h


def flops_per_token(shape: str, trainable: int | None = None) -> float:
    """Forward 2N and input gradients 2N for every linear weight, plus 2 FLOP per trained weight for its weight
    gradient: 6N for full fine-tuning, about 4N for adapters. Attention scores are left out (MFU is understated)."""
    total = linear_params(shape)
    return 4 * total + 2 * min(trainable if trainable is not None else total, total)


class StepTimer:
    """Tokens and wall time after a warm-up, from (step, cumulative real tokens) observations."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.points = warmup, None, []

    def observe(self, step: int, tokens: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step == self.warmup:
            self.start = (now, tokens)
        elif step > self.warmup:
            self.points.append((now, tokens))

    def tokens_per_second(self) -> float:
        if self.start is None or not self.points:
            return float("nan")
        (t0, n0), (t1, n1) = self.start, self.points[-1]
        return (n1 - n0) / (t1 - t0)


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, iterations: int = 30, warmup: int = 5) -> float:
    """Milliseconds per call of `fn` on the GPU: CUDA events around `iterations` calls after `warmup` ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def stage(name: str, work: Path, compute) -> dict:
    """A resumable benchmark stage: its result saved under work/results, or compute and save it (a rerun continues
    where an interrupted one stopped)."""
    path = work / "results" / f"{name.replace('+', '_')}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    print(f"\n=== {name} ({time.strftime('%H:%M:%S')}) ===", flush=True)
    return save_stage(name, work, compute())


def save_stage(name: str, work: Path, result: dict) -> dict:
    """Write (or rewrite) a stage's result where stage() reads it."""
    path = work / "results" / f"{name.replace('+', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, ensure_ascii=False), flush=True)
    return result
