"""Held-out perplexity and bits per character of a model (optionally with an adapter), and a generation sample.

Bits per character compare models whose tokenizers differ (perplexity per token does not): the summed loss of the
held-out text, in bits, over its characters. The text is cut into blocks exactly as stage pt evaluates it.

python examples/pt_vocab_zh/measure.py --model default --eval outputs/pt_vocab_zh/data/held_out_small.jsonl
python examples/pt_vocab_zh/measure.py --model outputs/pt_vocab_zh/zh-extended --adapter outputs/pt_vocab_zh/pt \
    --eval outputs/pt_vocab_zh/data/held_out_small.jsonl --generate
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.data import DataLoader

from weitiao.config import DataConfig, DataSource, ModelConfig
from weitiao.data.collate import PadCollator
from weitiao.data.dataset import encode_documents, load_source
from weitiao.eval.loss import evaluate_loss
from weitiao.models import load_model

PROMPTS = ["人工智能技术的发展", "如何保持健康的生活方式？"]


def held_out_figures(model, tokenizer, path: str, block_length: int) -> dict[str, float]:
    examples, _ = load_source(DataSource(path=path))
    blocks, summary = encode_documents(examples, tokenizer, DataConfig(max_length=block_length))
    loader = DataLoader(blocks.select_columns(["input_ids", "labels"]), batch_size=8,
                        collate_fn=PadCollator(tokenizer.pad_token_id))
    result = evaluate_loss(model, loader)
    return {"documents": summary["documents"], "characters": summary["characters"], "tokens": summary["tokens"],
            "tokens_per_char": summary["tokens"] / summary["characters"], "loss_per_token": result["loss"],
            "perplexity": result["perplexity"],
            "bits_per_char": result["loss"] * result["tokens"] / math.log(2) / summary["characters"]}


@torch.no_grad()
def samples(model, tokenizer, max_new_tokens: int = 60) -> list[dict[str, str]]:
    """A raw continuation of the first prompt and a chat reply to the second (greedy)."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                         add_generation_prompt=True)
    replies = []
    for kind, text in (("continuation", PROMPTS[0]), ("chat", chat)):
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=kind == "continuation")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                pad_token_id=tokenizer.pad_token_id)
        replies.append({"kind": kind, "prompt": PROMPTS[0] if kind == "continuation" else PROMPTS[1],
                        "output": tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)})
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapter", help="a LoRA run folder to apply")
    parser.add_argument("--eval", required=True, help="held-out text (jsonl with a text column, or .txt)")
    parser.add_argument("--block-length", type=int, default=256)
    parser.add_argument("--generate", action="store_true", help="also print generation samples")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(ModelConfig(name_or_path=args.model), dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    report = {"model": args.model, "adapter": args.adapter,
              "held_out": held_out_figures(model, tokenizer, args.eval, args.block_length)}
    if args.generate:
        report["samples"] = samples(model, tokenizer)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
