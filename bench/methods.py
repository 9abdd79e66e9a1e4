"""Every fine-tuning method on one GPU: trainable parameters, peak memory and real tokens per second.

All methods run through `weitiao.train.run` with weitiao's GPU defaults on a random-weight Llama shape and
synthetic examples of exactly --length tokens; then LoRA vs QLoRA on the default model with the demo data
(held-out response loss after the same training), for the quality gap.

  python bench/methods.py --shape 1b --methods full freeze lora dora qlora ia3 prefix ptuning prompt
  python bench/methods.py --shape 8b --methods lora qlora --length 2048
  python bench/methods.py --shape 8b --methods lora+offload --length 32704 --checkpointing   # 32k-token rows
  python bench/methods.py --quality          # lora vs qlora held-out loss, default model, GSM8K
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (PEAK_BF16_FLOPS, build_model_folder, device_name, flops_per_token,  # noqa: E402
                    reset_memory, write_sft_data)
from train_speed import run_weitiao  # noqa: E402

from tests.conftest import shared_data_dir  # noqa: E402

# What each row sets besides `method` (dora is LoRA with DoRA; +offload needs --checkpointing).
METHOD_SETTINGS = {"dora": {"method": "lora", "lora.use_dora": True},
                   "qlora8": {"method": "qlora", "quantization.bits": 8},
                   "lora+offload": {"method": "lora", "train.offload_checkpoints": True}}


def speed_table(args) -> list[dict]:
    from weitiao.models import load_tokenizer, resolve_model

    workdir = Path(args.workdir)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
    model_dir = str(build_model_folder(args.shape, workdir / f"llama-{args.shape}", tokenizer))
    data = write_sft_data(workdir / f"fixed-{args.length}.jsonl", max(16, 409600 // args.length), fixed=args.length)
    rows = []
    for name in args.methods:
        settings = METHOD_SETTINGS.get(name, {"method": name})
        method = settings["method"]
        reset_memory()
        try:
            measured = run_weitiao(model_dir, data, method, args.steps, args.warmup, args.checkpointing,
                                   args.length + 64, args.row_tokens or max(8192, args.length + 64),
                                   extra={k: v for k, v in settings.items() if k != "method"})
        except torch.cuda.OutOfMemoryError:
            measured = {"real_tokens_per_s": 0.0, "peak_mem_gib": float("nan"), "error": "out of memory"}
        trained = measured.get("trainable_params", None if method == "full" else 0)
        measured["mfu"] = measured["real_tokens_per_s"] * flops_per_token(args.shape, trained) / PEAK_BF16_FLOPS
        rows.append({"method": name, **measured})
        print(json.dumps(rows[-1]), flush=True)
        save(args, rows)  # after every row: a run stopped by its time limit keeps what it measured
    print(f"\ndevice: {device_name()}  shape: {args.shape}  length: {args.length}  "
          f"gradient checkpointing: {args.checkpointing}")
    print(f"{'method':<10}{'trainable':>16}{'peak GiB':>10}{'real tok/s':>12}{'MFU':>8}")
    for row in rows:
        print(f"{row['method']:<10}{row.get('trainable_params', 0):>16,}{row['peak_mem_gib']:>10.1f}"
              f"{row['real_tokens_per_s']:>12,.0f}{100 * row['mfu']:>7.1f}%  {row.get('error', '')}")
    return rows


def quality_gap(args) -> dict:
    """LoRA and QLoRA (4-bit NF4) with the same settings on the default model and real data (GSM8K train, 200
    examples held out): the held-out response loss before and after training, the time and the peak memory."""
    from weitiao.config import load_config
    from weitiao.train import run

    data = Path(args.quality_data or shared_data_dir() / "gsm8k" / "train.jsonl")
    recipe = Path(tempfile.mkdtemp()) / "quality.yaml"
    recipe.write_text(f"""model: {{name_or_path: {args.model}}}
data: {{train: {data}, val_size: 200, max_length: 512}}
method: lora
lora: {{r: 16, alpha: 32}}
train: {{max_steps: {args.quality_steps}, per_device_train_batch_size: 8, learning_rate: 5.0e-4, warmup_steps: 20,
        bf16: true, logging_steps: 50, save_steps: 0}}
eval: {{compare: false}}
""")
    results = {"data": str(data), "steps": args.quality_steps, "batch_size": 8, "val_size": 200}
    for method in ("lora", "qlora"):
        torch.cuda.reset_peak_memory_stats()
        config = load_config(recipe, ["--method", method, "--output_dir", tempfile.mkdtemp()])
        result = run(config)
        results[method] = {"eval_loss_before": result.eval_loss_before, "eval_loss": result.eval_loss,
                           "seconds": result.seconds, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    results["gap"] = results["qlora"]["eval_loss"] - results["lora"]["eval_loss"]
    print(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--methods", nargs="+", default=["full", "freeze", "lora", "dora", "qlora", "ia3", "prefix",
                                                         "ptuning", "prompt"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (a multiple of 5)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--row-tokens", type=int, help="tokens per packed row (default: max(8192, length + 64))")
    parser.add_argument("--quality", action="store_true", help="only the lora vs qlora quality comparison")
    parser.add_argument("--quality-data", help="training data of --quality (default: GSM8K train from shared data)")
    parser.add_argument("--quality-steps", type=int, default=300, help="training steps of --quality")
    parser.add_argument("--model", default="default", help="the model of --quality")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    args = parser.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.quality:
        report = {"device": device_name(), **quality_gap(args)}
        (results / "lora-vs-qlora-default.json").write_text(json.dumps(report, indent=2) + "\n")
        return
    speed_table(args)


def save(args, rows: list[dict]) -> None:
    name = f"methods-{args.shape}-{args.length}{'-ckpt' if args.checkpointing else ''}.json"
    (Path(args.results) / name).write_text(json.dumps({"device": device_name(), "shape": args.shape,
                                                       "length": args.length, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
