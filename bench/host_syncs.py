"""Where the host waits for the GPU during steady training steps: torch's sync debug mode over steps 6-10 of a
weitiao run on a benchmark shape, each synchronizing call counted with its Python stack.

  python bench/host_syncs.py --shape 1b --method full
  python bench/host_syncs.py --shape 1b --method lora --compile
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model_folder, write_sft_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--compile", action="store_true", help="train.torch_compile")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_syncs.py needs a CUDA GPU (it watches the host waiting for it)")

    from weitiao.config import load_config
    from weitiao.models import load_tokenizer, resolve_model
    from weitiao.train import run

    workdir = Path(args.workdir)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
    model_dir = str(build_model_folder(args.shape, workdir / f"llama-{args.shape}", tokenizer))
    data = write_sft_data(workdir / "sft.jsonl", 3000)
    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        stack = [f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
                 for frame in traceback.extract_stack()[:-2]]
        seen[(str(message)[:60], " <- ".join(reversed(stack[-5:])))] += 1

    def on_log(entry: dict) -> None:  # logged every 5 steps: watch from step 5 to step 10
        if "loss" in entry:
            torch.cuda.set_sync_debug_mode("warn" if entry["step"] == 5 else "default")

    warnings.showwarning = record
    warnings.simplefilter("always")
    settings = {"model": {"name_or_path": model_dir}, "method": args.method, "lora": {"r": 16, "alpha": 32},
                "data": {"train": str(data), "max_length": 2048, "packing_length": 8192, "cache": False},
                "train": {"output_dir": tempfile.mkdtemp(), "max_steps": 10, "logging_steps": 5,
                          "overwrite_output_dir": True, "torch_compile": args.compile, "learning_rate": 1e-4},
                "eval": {"compare": False}}
    run(load_config(None, settings), on_log=on_log)
    syncs = {key: count for key, count in seen.items() if "synchronizing" in key[0]}
    print(f"\nhost syncs in steps 6-10 ({args.shape}, {args.method}, {'compiled' if args.compile else 'eager'}; "
          "the log line at step 10 syncs once by design):")
    for (_, stack), count in sorted(syncs.items(), key=lambda item: -item[1]):
        print(f"{count:5d}  {stack}")


if __name__ == "__main__":
    main()
