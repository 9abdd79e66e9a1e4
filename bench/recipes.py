"""Run every recipe under examples/ as a user would (the weitiao command, the recipe's config unchanged) and print
the table recipe x metric x base x tuned x run time.

  python bench/recipes.py                       # all recipes, on this machine
  python bench/recipes.py --only sentiment adgen_lora
  python bench/recipes.py --shared /data/shared # where ../shared/data is elsewhere (gsm8k_cot, chat_zh multiturn)

Each run writes its output dir under --work; the table and the per-recipe summaries go to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from weitiao.runs import RunFolder

REPO = Path(__file__).resolve().parents[1]

# name -> weitiao arguments (a recipe may be a train run or a follow-up eval of an earlier run)
RECIPES: dict[str, list[str]] = {
    "chat_zh_multiturn": ["train", "examples/chat_zh/multiturn.yaml"],
    "chat_zh_school_math": ["train", "examples/chat_zh/school_math.yaml"],
    "dialogue_summary": ["train", "examples/dialogue_summary/config.yaml"],
    "sentiment": ["train", "examples/sentiment/config.yaml"],
    "docs_qa": ["train", "examples/docs_qa/config.yaml"],
    "docs_qa_plain_text": ["train", "examples/docs_qa/config.yaml", "--train_on", "all"],
    # the plain-text run's loss on the answers alone, comparable with docs_qa's
    "docs_qa_plain_text_answers": ["eval", "{work}/docs_qa_plain_text", "--train_on", "responses"],
    "adgen_lora": ["train", "examples/adgen/lora.yaml"],
    "adgen_prefix": ["train", "examples/adgen/prefix.yaml"],
    "text_to_sql": ["train", "examples/text_to_sql/config.yaml"],
    "gsm8k_cot": ["train", "examples/gsm8k_cot/config.yaml"],
}
# Recipes on public data read it from ../shared/data; --shared points elsewhere.
SHARED_FILES = {"chat_zh_multiturn": "sharegpt_zh/sharegpt_zh_1K_format.jsonl", "gsm8k_cot": "gsm8k/train.jsonl"}
HEADLINE = ("loss", "loss_all_tokens", "exact_match", "choice_accuracy", "sql_execution_match", "rouge-l", "bleu-4")


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    arguments = [argument.format(work=args.work) for argument in RECIPES[name]]
    if arguments[0] == "eval":  # a new report for an earlier run
        out, command = Path(arguments[1]), [sys.executable, "-m", "weitiao", *arguments]
    else:
        out = Path(args.work) / name
        command = [sys.executable, "-m", "weitiao", *arguments, "--output_dir", str(out), "--overwrite_output_dir",
                   "true"]
    if args.shared and name in SHARED_FILES:
        command += ["--data.train", str(Path(args.shared) / SHARED_FILES[name])]
    log = Path(args.work) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    row = {"recipe": name, "command": "weitiao " + " ".join(RECIPES[name]), "returncode": code,
           "seconds": round(seconds, 1)}
    if code != 0:
        row["error"] = log.read_text()[-2000:]
        return row
    report, train = RunFolder(out).report(), RunFolder(out).result()
    row.update(metrics=report["metrics"], train_seconds=train.get("seconds"), steps=train.get("steps"),
               eval_examples=report["eval_examples"], generation_examples=report["generation_examples"],
               choices=report.get("choices"), samples=report["samples"][:3])
    return row


def table(rows: list[dict], device: str) -> str:
    lines = [f"Recipes on the default model (SmolLM2-135M-Instruct), {device}.", "",
             "| recipe | metric | base | tuned | change | train s | total s |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["returncode"] != 0:
            lines.append(f"| {row['recipe']} | FAILED (exit {row['returncode']}) | | | | | {row['seconds']} |")
            continue
        first = True
        for metric in HEADLINE:
            if metric not in row["metrics"]:
                continue
            values = row["metrics"][metric]
            times = (f"{row['train_seconds']:.0f} | {row['seconds']:.0f}" if first else " | ")
            label = row["recipe"] if first else ""
            lines.append(f"| {label} | {metric} | {values['base']:.4g} | {values['tuned']:.4g} "
                         f"| {values['delta']:+.4g} | {times} |")
            first = False
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="run only these recipes")
    parser.add_argument("--work", default="outputs/bench-recipes", help="run folders and logs")
    parser.add_argument("--shared", help="folder holding the public data (default ../shared/data)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    args.work = str(Path(args.work).resolve())
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for name in args.only or RECIPES:
        rows.append(run_recipe(name, args))
        print(f"{name}: exit {rows[-1]['returncode']} in {rows[-1]['seconds']:.0f} s", flush=True)
    text = table(rows, device)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "recipes-gpu" if torch.cuda.is_available() else "recipes-cpu"
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
