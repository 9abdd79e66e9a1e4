"""Does cleaning and selecting pay off on a realistic noisy pool? Every method at the same budgets, same settings.

  python bench/noisy_pool.py --work outputs/noisy-pool-cpu --scale 0.25 --heldout 40 --ratios 0.1   # 2-core CPU
  python bench/noisy_pool.py --work /tmp/np --generation                                              # GPU

The pool is bench/noisy_pool_data.py's (mixed zh/en tasks, faults injected and labelled). Stages, each saved
under --work/results so that a rerun continues where it stopped:
  clean       `weitiao data clean` with language auto and the model rules under the model to be trained
              (mismatched, IFD >= 1, and the end-of-reply check of truncated), the rest at defaults; precision and
              recall of the injected fault labels, overall and per fault, for the text rules alone and with the
              model rules
  rows        per training set: LoRA-train the model on it, then held-out response loss per task type (teacher-
              forced), and with --generation greedy answers (exact match on GSM8K, ROUGE-L on the others,
              computed where rouge-score and jieba are installed, else saved for `--stages rescore`)
  generate    greedy answers (as --generation) for the rows already trained without them: the base model, or the
              base with the row's saved adapter (--work/runs/<row>); the held-out loss is kept as it was
Training sets: base (none), full (the noisy pool), clean (the cleaned pool); at each --ratios share of the noisy
pool's size: random from the noisy pool (--seeds), clean+random (--seeds), and from the cleaned pool each of
--methods (ifd, kcenter, ifd+kcenter, perplexity, quality: a reward model trained on the preference demo sets
when --reward-model is given a folder, else the judge prompt on the model itself).
Settings for every run: `weitiao data select --report`'s probe (weitiao.eval.selection.PROBE): LoRA r 16, alpha
32, all linear layers, one epoch, batch 8, lr 1e-3 cosine with 5% warm-up, seed 42; max_length 512.
Results: --results (default bench/results/noisy-pool-<device>.json), `rows` as issue 26 asks.
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
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import device_name, save_stage, stage  # noqa: E402
from noisy_pool_data import BOILERPLATE, FAULTS, build  # noqa: E402

from tests.conftest import shared_data_dir  # noqa: E402

MAX_LENGTH = 512
TASK_EXTRACTOR = {"math_en": "gsm8k"}  # others: ROUGE-L against the reference


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir()))
    parser.add_argument("--work", default="outputs/noisy-pool")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["ifd", "kcenter", "ifd+kcenter", "perplexity", "quality"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward-model", help="folder of a reward model (stage rm) for the quality method")
    parser.add_argument("--reward-data", nargs="+", help="preference files: train a reward model on them first "
                        "(stage rm, LoRA r 16, 2 epochs) and use it for the quality method")
    parser.add_argument("--generation", action="store_true", help="also greedy answers (EM, ROUGE-L)")
    parser.add_argument("--gen-count", type=int, default=50, help="held-out prompts per task answered")
    parser.add_argument("--stages", nargs="+", default=["clean", "rows"],
                        choices=["clean", "rows", "rescore", "generate"])
    parser.add_argument("--only", nargs="*", help="train only rows whose name starts with one of these")
    parser.add_argument("--results", help="default bench/results/noisy-pool-<device>.json")
    parser.add_argument("--device", help="the device the rows ran on (default: this machine's), for --stages rescore "
                        "of results brought back from another machine")
    return parser.parse_args()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Faults


def fault_counts(ids: list[str], labels: dict[str, dict]) -> dict:
    counts = Counter(labels[i]["fault"] for i in ids if labels[i]["fault"])
    return {"faults_kept": sum(counts.values()), "faults_kept_by_type": dict(counts)}


def detection(removed: dict[str, str], labels: dict[str, dict]) -> dict:
    """Precision and recall of removals against the injected fault labels, overall and per fault / rule."""
    faulty = {i for i, label in labels.items() if label["fault"]}
    hits = faulty & set(removed)
    by_fault = Counter(labels[i]["fault"] for i in faulty)
    caught = Counter(labels[i]["fault"] for i in hits)
    unlabelled = Counter(rule for i, rule in removed.items() if i not in faulty)
    return {"removed": len(removed), "faults": len(faulty), "caught": len(hits),
            "precision": round(len(hits) / max(1, len(removed)), 4), "recall": round(len(hits) / len(faulty), 4),
            "recall_by_fault": {f: f"{caught[f]}/{n}" for f, n in by_fault.items()},
            "unlabelled_removed_by_rule": dict(unlabelled)}


def run_clean(pool: Path, args: argparse.Namespace, out: Path) -> dict:
    from weitiao.config import CleanConfig, DataSource
    from weitiao.data.clean import clean_examples, write_clean

    labels = {r["id"]: r for r in read_jsonl(pool.with_name("pool.labels.jsonl"))}
    config = CleanConfig(language="auto", model=args.model, max_length=MAX_LENGTH)
    started = time.time()
    result = clean_examples(DataSource(path=str(pool)), config)
    seconds = time.time() - started
    summary = write_clean(result, out, str(pool))
    removed = {item.original["id"]: item.rule for item in result.removed}
    # The model scores only what the text rules keep, so these are the text rules' removals in the run above too.
    text_only = clean_examples(DataSource(path=str(pool)), config.model_copy(update={"model": None}))
    text_rules = {item.original["id"]: item.rule for item in text_only.removed}
    return {"config": config.model_dump(), "seconds": round(seconds, 1), "kept": summary["kept"],
            "removed_by_rule": summary["removed_by_rule"], "text_rules": detection(text_rules, labels),
            "with_model": detection(removed, labels),
            "unlabelled_examples": [{"rule": item.rule, "detail": item.detail, "id": item.original["id"],
                                     "reply": item.original["conversations"][-1]["value"][:160]}
                                    for item in result.removed if not labels[item.original["id"]]["fault"]]}


# ---------------------------------------------------------------------------------------------
# Training sets


def select_subset(source: Path, out: Path, method: str, count: int, seed: int, args: argparse.Namespace) -> dict:
    from weitiao.config import DataSource, SelectConfig
    from weitiao.data.dataset import load_source
    from weitiao.data.select import select_examples, write_selection

    examples, _ = load_source(DataSource(path=str(source)))
    options = {"scorer": args.reward_model} if method == "quality" and args.reward_model else {}
    config = SelectConfig(method=method, count=count, seed=seed, model=args.model, max_length=MAX_LENGTH, **options)
    started = time.time()
    summary = write_selection(examples, select_examples(examples, config), out, config, DataSource(path=str(source)))
    return {"seconds": round(time.time() - started, 1), "timing": summary["timing"]}


def training_sets(work: Path, pool: Path, clean: Path, args: argparse.Namespace) -> list[dict]:
    """Every row to train: name, ratio, seed and a function that writes its training file."""
    size = len(read_jsonl(pool))
    sets = [{"name": "full", "ratio": 1.0, "seed": None, "make": lambda out: pool},
            {"name": "clean", "ratio": None, "seed": None, "make": lambda out: clean}]
    for ratio in args.ratios:
        count = round(ratio * size)
        for seed in args.seeds:
            # Records drawn from the file as a user would, broken ones included (training skips and counts those).
            sets.append({"name": "random", "ratio": ratio, "seed": seed,
                         "make": lambda out, c=count, s=seed: write_jsonl(out, sorted(
                             random.Random(s).sample(read_jsonl(pool), c), key=lambda r: r["id"]))})
            sets.append({"name": "clean+random", "ratio": ratio, "seed": seed,
                         "make": lambda out, c=count, s=seed: select_subset(clean, out, "random", c, s, args) and out})
        for method in args.methods:
            sets.append({"name": method, "ratio": ratio, "seed": 42,
                         "make": lambda out, c=count, m=method: select_subset(clean, out, m, c, 42, args) and out})
    return sets


def row_id(entry: dict) -> str:
    return "-".join(str(part) for part in (entry["name"], entry["ratio"], entry["seed"]) if part is not None)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def evaluate(model, tokenizer, heldout: dict[str, Path], args: argparse.Namespace) -> dict:
    """Held-out response loss per task (and their mean); with --generation greedy answers (answer())."""
    from weitiao.config import DataSource
    from weitiao.data.dataset import load_source
    from weitiao.eval.selection import heldout_loss

    started = time.time()
    losses = {task: heldout_loss(model, tokenizer, load_source(DataSource(path=str(path)))[0], MAX_LENGTH)
              for task, path in heldout.items()}
    result: dict = {"response_loss_by_task": losses, "response_loss": round(statistics.mean(losses.values()), 4)}
    if args.generation:
        result.update(answer(model, tokenizer, heldout, args))
    result["eval_seconds"] = round(time.time() - started, 1)
    rescore(result)
    return result


def answer(model, tokenizer, heldout: dict[str, Path], args: argparse.Namespace) -> dict:
    """Greedy answers of the first --gen-count held-out prompts per task that leave room for a 256-token answer
    within max_length (long chats are scored by loss only); exact match on GSM8K here, ROUGE-L and the faults in
    the answers from the saved predictions (rescore)."""
    from weitiao.config import DataSource
    from weitiao.data.dataset import load_source
    from weitiao.data.encode import prompt_messages, render
    from weitiao.eval.generate import GenerationSettings, generate
    from weitiao.eval.metrics import exact_match, make_extractor

    result: dict = {"predictions": {}}
    started = time.time()
    for task, path in heldout.items():
        pairs = [prompt_messages(e.messages) for e in load_source(DataSource(path=str(path)))[0]]
        room = MAX_LENGTH - 256
        pairs = [(p, r) for p, r in pairs if len(tokenizer(render(tokenizer, p, add_generation_prompt=True),
                                                          add_special_tokens=False)["input_ids"]) <= room]
        prompts, references = zip(*pairs[:args.gen_count])
        predictions = generate(model, tokenizer, list(prompts), GenerationSettings(256, 64, False, 1.0, 1.0),
                               desc=f"generating {task}")
        result["predictions"][task] = {"predictions": predictions, "references": list(references),
                                       "prompts": list(prompts)}
        if task in TASK_EXTRACTOR:
            result["exact_match"] = exact_match(predictions, list(references), make_extractor(TASK_EXTRACTOR[task]))
    result["generation_seconds"] = round(time.time() - started, 1)
    return result


def answer_saved_row(row: dict, work: Path, heldout: dict[str, Path], args: argparse.Namespace) -> dict:
    """--stages generate: the greedy answers of a row trained without them, from its saved adapter."""
    from peft import PeftModel

    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    import torch

    model, tokenizer, _ = load_model(ModelConfig(name_or_path=args.model))
    if row["name"] != "base":
        model = PeftModel.from_pretrained(model, str(work / "runs" / row_id(row)))
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    row = {**row, **answer(model, tokenizer, heldout, args)}
    rescore(row)
    return row


def generation_faults(result: dict) -> dict | None:
    """How many saved greedy answers show a fault the pool injected: a refusal, a filler, the wrong language (`data
    clean`'s rules, on the prompt and the answer) or one of the pool's footers. Answers stop at 256 new tokens, so
    truncation is not counted."""
    from weitiao.config import CleanConfig
    from weitiao.data.clean import find_faults
    from weitiao.data.dataset import Example

    config = CleanConfig(exact_dedup=False, near_dedup=False, truncated=False, boilerplate_records=None,
                         language="auto")
    footers = [line[:20] for lines in BOILERPLATE.values() for line in lines]
    counts, answers = Counter(), 0
    for saved in result.get("predictions", {}).values():
        if "prompts" not in saved:
            return None
        examples = [Example(messages=prompt + [{"role": "assistant", "content": answer}], text=None,
                            source="generations", record=i + 1)
                    for i, (prompt, answer) in enumerate(zip(saved["prompts"], saved["predictions"], strict=True))]
        faults = find_faults(examples, config)
        for i, answer in enumerate(saved["predictions"]):
            rule = faults.get(i, (None,))[0] or ("boilerplate" if any(f in answer for f in footers) else None)
            counts[rule or "none"] += 1
        answers += len(examples)
    if not answers:
        return None
    faulty = answers - counts.pop("none", 0)
    return {"answers": answers, "faulty": faulty, "share": round(faulty / answers, 4), "by_rule": dict(counts)}


def rescore(result: dict) -> None:
    """ROUGE-L of the saved predictions of the non-GSM8K tasks, where rouge-score and jieba are installed, and the
    faults in them (generation_faults)."""
    if (faults := generation_faults(result)) is not None:
        result["generation_faults"] = faults
    try:
        from weitiao.eval.metrics import rouge
        import jieba  # noqa: F401
        import rouge_score  # noqa: F401
    except ImportError:
        return
    for task, saved in result.get("predictions", {}).items():
        if task not in TASK_EXTRACTOR:
            result.setdefault("rouge_l_by_task", {})[task] = round(
                rouge(saved["predictions"], saved["references"])["rouge-l"], 2)
    if result.get("rouge_l_by_task"):
        result["rouge_l"] = round(statistics.mean(result["rouge_l_by_task"].values()), 2)


def train_row(entry: dict, train_file: Path, heldout: dict[str, Path], labels: dict, work: Path,
              args: argparse.Namespace) -> dict:
    from weitiao.eval.selection import probe_config
    from weitiao.models import load_tokenizer
    from weitiao.train import run

    ids = [r["id"] for r in read_jsonl(train_file)]
    # The selection report's probe (LoRA r 16, one epoch, ...); broken records of the noisy pool skipped and counted.
    result = run(probe_config(train_file, work / "runs" / row_id(entry), args.model, MAX_LENGTH, on_error="skip"))
    trained = {"examples": result.data["train_examples"], "train_tokens": result.tokens,
               "train_seconds": round(result.seconds, 1), "train_loss": result.train_loss}
    evaluation = evaluate(result.model, load_tokenizer(result.output_dir), heldout, args)
    return {"name": entry["name"], "ratio": entry["ratio"], "seed": entry["seed"], "records": len(ids), **trained,
            **fault_counts(ids, labels), **evaluation}


def train_reward_model(files: list[str], work: Path, args: argparse.Namespace) -> dict:
    from weitiao.config import config_from_dict
    from weitiao.runs import RunFolder
    from weitiao.train import run

    output = work / "reward_model"
    result = run(config_from_dict({
        "stage": "rm", "model": {"name_or_path": args.model},
        "data": {"train": files, "val_size": 60, "max_length": MAX_LENGTH}, "method": "lora",
        "lora": {"r": 16, "alpha": 32},
        "train": {"output_dir": str(output), "num_train_epochs": 2, "learning_rate": 2e-4,
                  "per_device_train_batch_size": 8, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
                  "overwrite_output_dir": True, "seed": 42}}))
    accuracy = [record["eval_reward_accuracy"] for record in RunFolder(output).metrics()
                if "eval_reward_accuracy" in record]
    return {"folder": str(output), "files": files, "steps": result.steps, "seconds": round(result.seconds, 1),
            "heldout_pair_accuracy_before_after": [accuracy[0], accuracy[-1]] if accuracy else None}


def base_row(heldout: dict[str, Path], args: argparse.Namespace) -> dict:
    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    import torch

    model, tokenizer, _ = load_model(ModelConfig(name_or_path=args.model))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return {"name": "base", "ratio": 0.0, "seed": None, "examples": 0, **evaluate(model, tokenizer, heldout, args)}


# ---------------------------------------------------------------------------------------------
# Report


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (name, ratio), seeds as mean ± sd."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["ratio"]), []).append(row)
    tasks = sorted({task for row in rows for task in row["response_loss_by_task"]})
    head = ["training data", "share", "runs", "examples", "faults kept", "loss (mean)", *tasks, "EM gsm8k", "ROUGE-L",
            "faulty answers %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(values: list[float], digits: int) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    order = ["base", "full", "clean", "random", "clean+random", "ifd", "kcenter", "ifd+kcenter", "perplexity",
             "quality"]
    def position(item):
        (name, ratio), _ = item
        return (name not in ("base", "full", "clean"), ratio or 0, order.index(name))

    for (name, ratio), group in sorted(groups.items(), key=position):
        lines.append("| " + " | ".join([
            name, "-" if ratio is None else f"{ratio:.0%}", str(len(group)),
            cell([g.get("examples") for g in group], 0), cell([g.get("faults_kept") for g in group], 0),
            cell([g["response_loss"] for g in group], 4),
            *[cell([g["response_loss_by_task"].get(t) for g in group], 4) for t in tasks],
            cell([g.get("exact_match") for g in group], 1), cell([g.get("rouge_l") for g in group], 2),
            cell([100 * g["generation_faults"]["share"] if "generation_faults" in g else None for g in group], 1)])
            + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    data = work / "data"
    if not (data / "build.json").is_file():
        build(Path(args.data), data, args.scale, args.heldout)
    built = json.loads((data / "build.json").read_text())
    pool, clean = data / "pool.jsonl", work / "clean.jsonl"
    heldout = {path.stem: path for path in sorted((data / "heldout").glob("*.jsonl"))}
    labels = {r["id"]: r for r in read_jsonl(data / "pool.labels.jsonl")}
    print(f"pool {built['records']} records ({built['clean']} clean), faults {built['faults']}; held-out "
          f"{ {t: v['kept'] for t, v in built['overlap']['tasks'].items()} }; {platform.machine()}", flush=True)
    if "rows" in args.stages and not clean.is_file():  # an input of the rows to train: clean again when it is gone
        (work / "results" / "cleaning.json").unlink(missing_ok=True)
    cleaning = stage("cleaning", work, lambda: run_clean(pool, args, clean))
    reward_model = None
    if args.reward_data:
        reward_model = stage("reward_model", work, lambda: train_reward_model(args.reward_data, work, args))
        args.reward_model = reward_model["folder"]
    rows = []
    if {"rows", "rescore", "generate"} & set(args.stages):
        rows.append(stage("base", work, lambda: base_row(heldout, args)))
        for entry in training_sets(work, pool, clean, args):
            name = row_id(entry)
            if args.only is not None and not any(name.startswith(prefix) for prefix in args.only):
                continue
            if "rows" not in args.stages and not (work / "results" / f"{name.replace('+', '_')}.json").is_file():
                continue

            def compute(entry=entry, name=name):
                train_file = entry["make"](work / "subsets" / f"{name}.jsonl")
                return train_row(entry, train_file, heldout, labels, work, args)

            rows.append(stage(name, work, compute))
    if "rescore" in args.stages:
        for row in rows:
            rescore(row)
    if "generate" in args.stages:
        for i, row in enumerate(rows):
            name = "base" if row["name"] == "base" else row_id(row)
            if not row.get("predictions"):  # rows trained without --generation saved an empty dict
                print(f"\n=== {name}: answers ({time.strftime('%H:%M:%S')}) ===", flush=True)
                rows[i] = save_stage(name, work, answer_saved_row(row, work, heldout, args))
    # 'NVIDIA H200' -> h200, for the results file name
    device = args.device or device_name().split()[-1].split("-")[0].lower()
    results = Path(args.results or REPO / "bench" / "results" / f"noisy-pool-{device}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows) if rows else ""
    results.write_text(json.dumps({
        "device": device, "pool": built, "fault_rates": FAULTS, "clean": cleaning, "reward_model": reward_model,
        "settings": {"model": args.model, "max_length": MAX_LENGTH, "lora_r": 16, "epochs": 1, "batch": 8,
                     "learning_rate": 1e-3, "ratios": args.ratios, "seeds": args.seeds, "methods": args.methods,
                     "reward_model": args.reward_model, "generation": args.generation, "gen_count": args.gen_count},
        "table": table,
        "rows": [{k: v for k, v in row.items() if k != "predictions"} for row in rows],
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nclean: text rules {cleaning['text_rules']['precision']:.1%} precision, "
          f"{cleaning['text_rules']['recall']:.1%} recall; with the model rules "
          f"{cleaning['with_model']['precision']:.1%} / {cleaning['with_model']['recall']:.1%}\n{table}\n"
          f"-> {results}")


if __name__ == "__main__":
    main()
