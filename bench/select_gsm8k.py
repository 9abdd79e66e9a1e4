"""Does IFD selection beat random sampling at the same budget? GSM8K with the default model, on this machine.

  python bench/select_gsm8k.py                     # every stage; a rerun continues where it stopped
  python bench/select_gsm8k.py --stages score ifd  # only some stages

Stages (each saves its result under --work, so an interrupted run loses at most the stage it was in):
  score    IFD scores of a pool of --pool GSM8K train examples (a seeded sample), timed
  ifd      LoRA-train on the --ratio of the pool with the highest IFD below 1 (`weitiao data select --method ifd`)
  random   the same budget drawn at random, once per --seeds
  base     the untrained model
  full     the whole pool (or its first --full-count examples)
  kcenter  ifd+kcenter at the same budget (not in the default stages)
Every trained model and the base model are evaluated on the same held-out set: the first --eval-count questions
of GSM8K test, response loss (teacher-forced) and exact match of greedy answers (max 256 new tokens, extractor
gsm8k: the number after '####', else the last number). Training: LoRA r=16 alpha=32 on all linear layers, one
epoch, batch 8, cosine schedule with 5% warm-up, seed 42 for every run; only the training data differs.
Results: --work/results/*.json, and the table in bench/results/select-gsm8k.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import shared_data_dir  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from common import stage  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "gsm8k"), help="folder with train.jsonl, test.jsonl")
    parser.add_argument("--work", default="outputs/bench-select", help="pool, subsets, runs and results")
    parser.add_argument("--pool", type=int, default=2000, help="train examples scored and selected from")
    parser.add_argument("--ratio", type=float, default=0.1, help="share of the pool each selection keeps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the random subsets")
    parser.add_argument("--eval-count", type=int, default=100, help="held-out test questions")
    parser.add_argument("--full-count", type=int, help="train the 'full' row on this many pool examples")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--model", default="default", help="the base model (scores, trains, is evaluated)")
    parser.add_argument("--score-dtype", default="auto", help="dtype of the scoring model (SelectConfig.dtype)")
    parser.add_argument("--stages", nargs="+", default=["score", "ifd", "random", "base", "full"],
                        choices=["score", "ifd", "random", "base", "full", "kcenter"])
    parser.add_argument("--table", default=str(REPO / "bench" / "results" / "select-gsm8k.md"))
    return parser.parse_args()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The pool (seeded sample of train, in file order) and the held-out set (the first test questions)."""
    train = [json.loads(line) for line in (Path(args.data) / "train.jsonl").read_text().splitlines() if line]
    test = [json.loads(line) for line in (Path(args.data) / "test.jsonl").read_text().splitlines() if line]
    # A seeded shuffle, so that a larger pool contains a smaller one (and reuses its cached scores).
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    chosen = sorted(order[:args.pool])
    return (write_jsonl(work / "pool.jsonl", [train[i] for i in chosen]),
            write_jsonl(work / "heldout.jsonl", test[:args.eval_count]))


def select(pool: Path, out: Path, method: str, args: argparse.Namespace, seed: int = 42) -> dict:
    from weitiao.config import DataSource, SelectConfig
    from weitiao.data.dataset import load_source
    from weitiao.data.select import select_examples, write_selection

    examples, _ = load_source(DataSource(path=str(pool)))
    config = SelectConfig(method=method, ratio=args.ratio, seed=seed, model=args.model, dtype=args.score_dtype,
                          max_length=512)
    return write_selection(examples, select_examples(examples, config), out, config, str(pool))


def heldout_set(heldout: Path, tokenizer):
    from weitiao.config import DataConfig, DataSource
    from weitiao.data.dataset import encode_examples, load_source

    examples, _ = load_source(DataSource(path=str(heldout)))
    dataset, _ = encode_examples(examples, tokenizer, DataConfig(max_length=512), "sft", keep_source=True)
    return dataset


def bench_config(train: Path, output_dir: Path, args: argparse.Namespace):
    from weitiao.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": args.model}, "data": {"train": [str(train)], "max_length": 512},
        "method": "lora", "lora": {"r": 16, "alpha": 32},
        "train": {"output_dir": str(output_dir), "num_train_epochs": 1, "learning_rate": args.learning_rate,
                  "per_device_train_batch_size": 8, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
                  "logging_steps": 5, "eval_on_start": False, "overwrite_output_dir": True, "seed": 42},
        "eval": {"extractor": "gsm8k", "max_new_tokens": 256, "batch_size": 16, "max_examples": args.eval_count},
    })


def evaluate(model, tokenizer, heldout: Path, config, name: str) -> dict:
    from weitiao.eval.compare import evaluate_model

    result = evaluate_model(model, tokenizer, heldout_set(heldout, tokenizer), config, name)
    return {"response_loss": result["metrics"]["loss"], "exact_match": result["metrics"]["exact_match"],
            "seconds": result["seconds"], "predictions": result["predictions"][:5]}


def train_and_evaluate(name: str, subset: Path, heldout: Path, work: Path, args: argparse.Namespace) -> dict:
    from weitiao.models import load_tokenizer
    from weitiao.train import run

    config = bench_config(subset, work / "runs" / name, args)
    started = time.time()
    result = run(config)
    trained = {"examples": result.data["train_examples"], "steps": result.steps, "train_tokens": result.tokens,
               "train_seconds": result.seconds, "train_loss": result.train_loss,
               "tokens_per_s": round(result.tokens / result.seconds, 1)}
    evaluation = evaluate(result.model, load_tokenizer(result.output_dir), heldout, config, name)
    return {"name": name, **trained, **evaluation, "wall_seconds": round(time.time() - started, 1)}


def base_row(heldout: Path, args: argparse.Namespace) -> dict:
    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    model, tokenizer, _ = load_model(ModelConfig(name_or_path=args.model))
    config = bench_config(heldout, Path("unused"), args)
    return {"name": "base", "examples": 0, **evaluate(model, tokenizer, heldout, config, "base")}


def table(rows: dict[str, dict], scoring: dict | None, args: argparse.Namespace) -> str:
    def line(label: str, row: dict) -> str:
        return (f"| {label} | {row['examples']} | {row.get('train_tokens', 0):,} | "
                f"{row.get('train_seconds', 0):,.0f} | {row['response_loss']:.4f} | {row['exact_match']:.1f} |")

    lines = ["| training data | examples | trained tokens | training s | held-out response loss | exact match % |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = {"base": "none (base model)", "ifd": f"IFD top {args.ratio:.0%}", "kcenter": f"IFD+k-center "
              f"{args.ratio:.0%}", "full": "whole pool"}
    randoms = [rows[f"random-{seed}"] for seed in args.seeds if f"random-{seed}" in rows]
    for name in ("base", "ifd", "kcenter"):
        if name in rows:
            lines.append(line(labels[name], rows[name]))
    for seed in args.seeds:
        if f"random-{seed}" in rows:
            lines.append(line(f"random {args.ratio:.0%}, seed {seed}", rows[f"random-{seed}"]))
    if len(randoms) > 1:
        losses, matches = [r["response_loss"] for r in randoms], [r["exact_match"] for r in randoms]
        lines.append(f"| random {args.ratio:.0%}, mean ± sd of {len(randoms)} | {randoms[0]['examples']} | | | "
                     f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} | "
                     f"{statistics.mean(matches):.1f} ± {statistics.stdev(matches):.1f} |")
    if "full" in rows:
        lines.append(line(labels["full"], rows["full"]))
    if scoring:
        passes = scoring["timing"]["passes"]
        lines += ["", f"IFD scoring of the {scoring['examples']}-example pool: "
                  + "; ".join(f"{name} pass {p['seconds']:,.0f} s ({p['rows_per_s']} examples/s)"
                              for name, p in passes.items() if p["rows_per_s"])
                  + (f"; {scoring['timing']['examples_per_s']} examples/s for both passes"
                     if scoring["timing"].get("examples_per_s") else "")
                  + "; excluded: " + (", ".join(f"{n} {why}" for why, n in scoring["excluded"].items()) or "none")
                  + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    pool, heldout = prepare(args, work)
    budget = round(args.ratio * args.pool)
    print(f"pool {args.pool}, budget {budget}, held-out {args.eval_count}; torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}", flush=True)
    rows: dict[str, dict] = {}
    scoring = None
    if "score" in args.stages or "ifd" in args.stages:
        scoring = stage("scoring", work, lambda: select(pool, work / "subsets" / "ifd.jsonl", "ifd", args))
    def selected_run(name: str, method: str, seed: int = 42) -> dict:
        subset = work / "subsets" / f"{name}.jsonl"
        if not subset.is_file():
            select(pool, subset, method, args, seed)
        return train_and_evaluate(name, subset, heldout, work, args)

    if "ifd" in args.stages:
        rows["ifd"] = stage("ifd", work, lambda: selected_run("ifd", "ifd"))
    if "random" in args.stages:
        for seed in args.seeds:
            rows[f"random-{seed}"] = stage(f"random-{seed}", work,
                                           lambda seed=seed: selected_run(f"random-{seed}", "random", seed))
    if "base" in args.stages:
        rows["base"] = stage("base", work, lambda: base_row(heldout, args))
    if "kcenter" in args.stages:
        rows["kcenter"] = stage("kcenter", work, lambda: selected_run("kcenter", "ifd+kcenter"))
    if "full" in args.stages:
        subset = pool
        if args.full_count:
            subset = write_jsonl(work / "subsets" / f"first-{args.full_count}.jsonl",
                                 [json.loads(line) for line in pool.read_text().splitlines()[:args.full_count]])
        rows["full"] = stage("full", work, lambda: train_and_evaluate("full", subset, heldout, work, args))
    text = table(rows, scoring, args)
    print("\n" + text)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
