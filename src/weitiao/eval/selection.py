"""`weitiao data select --report`: does the selection beat a random subset of the same size, on your own data?

A seeded share of the examples is held out first (never selected from). The method selects from the rest, random
subsets of the same size (several seeds) are drawn from the same rest, and `data clean`'s rules mark the fault-like
records (with language auto). Then a LoRA probe is trained on each subset with the same settings (PROBE: r 16, one
epoch, batch 8, lr 1e-3) and the held-out response loss of the base model, the selection and the random subsets is
compared, on the held-out examples that no rule marks (a broken reference makes the loss say nothing); the gap is
judged in the random subsets' standard deviations (verdict).

Training is a layer below evaluation's callers but above evaluation (it imports eval.loss), so the caller passes
the training function in (`weitiao.train.run`; the CLI does).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weitiao.config import CleanConfig, Config, DataConfig, DataSource, ModelConfig, SelectConfig, config_from_dict
from weitiao.data.clean import find_faults
from weitiao.data.dataset import Example, encode_examples, original_records
from weitiao.data.readers import side_file, write_records
from weitiao.data.select import Selection, select_examples, write_selection

# The probe trained on each subset: small and fixed, so that only the data differs.
PROBE = {"method": "lora", "lora": {"r": 16, "alpha": 32},
         "train": {"num_train_epochs": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                   "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 10, "eval_on_start": False,
                   "overwrite_output_dir": True, "seed": 42},
         "eval": {"generation": False}}


def probe_config(train_file: Path, output_dir: Path, model: str, max_length: int, template: str = "auto",
                 on_error: str = "raise") -> Config:
    """The PROBE training run on `train_file` (`on_error: skip` trains on a file with broken records too)."""
    return config_from_dict({**PROBE, "model": {"name_or_path": model},
                             "data": {"train": [str(train_file)], "max_length": max_length, "template": template,
                                      "on_error": on_error},
                             "train": {**PROBE["train"], "output_dir": str(output_dir)}})


def heldout_loss(model, tokenizer, examples: list[Example], max_length: int, template: str = "auto") -> float:
    """Mean teacher-forced cross-entropy over the reply tokens of `examples`."""
    from torch.utils.data import DataLoader

    from weitiao.data.collate import PadCollator
    from weitiao.eval.loss import evaluate_loss

    dataset, _ = encode_examples(examples, tokenizer, DataConfig(max_length=max_length, template=template), "sft")
    loader = DataLoader(dataset.select_columns(["input_ids", "labels"]), batch_size=8,
                        collate_fn=PadCollator(tokenizer.pad_token_id))
    return round(evaluate_loss(model, loader)["loss"], 4)


def split_heldout(total: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(pool, held-out) indices, both in input order: a seeded share held out, at least one example each."""
    count = min(total - 1, max(1, round(share * total)))
    held = sorted(random.Random(seed).sample(range(total), count))
    chosen = set(held)
    return [i for i in range(total) if i not in chosen], held


def _probe(name: str, train_file: Path, heldout: list[Example], config: SelectConfig, folder: Path,
           train: Callable[[Config], Any]) -> dict[str, Any]:
    from weitiao.models import load_tokenizer

    result = train(probe_config(train_file, folder / name, config.model, config.max_length, config.template))
    loss = heldout_loss(result.model, load_tokenizer(result.output_dir), heldout, config.max_length, config.template)
    return {"train_tokens": result.tokens, "train_seconds": round(result.seconds, 1), "heldout_loss": loss}


def report_selection(examples: list[Example], source: DataSource, config: SelectConfig, output: Path,
                     train: Callable[[Config], Any], skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """Select from all but a held-out share, write the selection as `data select` does, and compare it with
    `report_random_subsets` random subsets of the same size, a probe trained on each by `train` (weitiao.train.run);
    writes OUT.random.jsonl (OUT.random.2.jsonl, ... for the further subsets), OUT.heldout.jsonl, OUT.faults.jsonl,
    OUT.report.json and OUT.report.md, trains in OUT.report/. Returns the report."""
    from weitiao.models import load_model

    started = time.time()
    pool_indices, held_indices = split_heldout(len(examples), config.report_heldout, config.seed)
    pool = [examples[i] for i in pool_indices]
    selection = select_examples(pool, config)
    summary = write_selection(pool, selection, output, config, source, skipped)
    seeds = [config.seed + k for k in range(config.report_random_subsets)]
    baselines = [select_examples(pool, config.model_copy(update={"method": "random", "ratio": None, "seed": seed,
                                                                 "count": len(selection.selected)}))
                 for seed in seeds]
    faults = find_faults(examples, CleanConfig(language="auto"))
    files = _write_subsets(examples, pool_indices, held_indices, selection, baselines, faults, source, output)
    heldout = [examples[i] for i in held_indices if i not in faults]
    folder = side_file(output, "report")
    base_model, tokenizer, _ = load_model(ModelConfig(name_or_path=config.model))
    base_model.to("cuda" if torch.cuda.is_available() else "cpu")
    rows = {"base": {"examples": 0, "heldout_loss": heldout_loss(base_model, tokenizer, heldout, config.max_length,
                                                                   config.template)}}
    del base_model

    def fault_like(subset: Selection) -> int:
        return sum(pool_indices[i] in faults for i in subset.selected)

    rows["selected"] = {"examples": len(selection.selected), "fault_like": fault_like(selection),
                        **_probe("selected", output, heldout, config, folder, train)}
    runs = [{"seed": seed, "examples": len(baseline.selected), "fault_like": fault_like(baseline),
             **_probe(f"random-{seed}", path, heldout, config, folder, train)}
            for seed, baseline, path in zip(seeds, baselines, files["random"], strict=True)]
    losses = [run["heldout_loss"] for run in runs]
    rows["random"] = {"examples": len(selection.selected),
                      "fault_like": round(statistics.mean(run["fault_like"] for run in runs), 1),
                      "heldout_loss": round(statistics.mean(losses), 4),
                      "heldout_loss_sd": round(statistics.stdev(losses), 4) if len(losses) > 1 else None, "runs": runs}
    report = {"method": config.method, "examples": len(examples), "pool": len(pool), "heldout": len(held_indices),
              "heldout_scored": len(heldout), "fault_like": len(faults),
              "fault_like_by_rule": dict(Counter(rule for rule, _ in faults.values())), "rows": rows,
              "verdict": verdict(rows["selected"]["heldout_loss"], losses),
              "selection": {k: summary[k] for k in ("budget", "selected", "excluded", "skipped")}, "probe": PROBE,
              "seconds": round(time.time() - started, 1),
              "files": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()}}
    side_file(output, "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    side_file(output, "report.md").write_text(format_report(report) + "\n", encoding="utf-8")
    return report


# A selection beats random data when its held-out loss is this many standard deviations of the random subsets'
# losses below their mean (issue 26's criterion): two or three draws give a rough spread, so the bar is high.
SIGNIFICANT_SD = 3.0


def verdict(selected: float, random_losses: list[float]) -> dict[str, Any]:
    """How the selection's held-out loss compares with the random subsets': the gap to their mean (positive: the
    selection is better), in their standard deviations where there are two or more, and what that means."""
    mean = statistics.mean(random_losses)
    gap = round(mean - selected, 4)
    if len(random_losses) < 2:
        return {"gap": gap, "sd": None, "gap_in_sd": None, "outcome": "one random subset: no spread to judge by"}
    sd = statistics.stdev(random_losses)
    # Decided on the rounded figure the report shows (0.03 / 0.01 is 2.9999999999999996 in floating point).
    in_sd = round(gap / sd, 2) if sd > 0 else (0.0 if gap == 0 else float("inf") if gap > 0 else float("-inf"))
    outcome = ("better than random" if in_sd >= SIGNIFICANT_SD else "worse than random" if in_sd <= -SIGNIFICANT_SD
               else "within the noise")
    return {"gap": gap, "sd": round(sd, 4), "gap_in_sd": in_sd if abs(in_sd) != float("inf") else None,
            "outcome": outcome}


def _write_subsets(examples: list[Example], pool_indices: list[int], held_indices: list[int], selection: Selection,
                   baselines: list[Selection], faults: dict[int, tuple[str, str]], source: DataSource, output: Path
                   ) -> dict[str, Any]:
    """OUT.random.jsonl, OUT.random.2.jsonl, ... and OUT.heldout.jsonl (records as in the input), OUT.faults.jsonl
    (one line per fault-like record: where it is, the rule, whether the selection kept it and how many of the random
    subsets did)."""
    files: dict[str, Any] = {"random": [side_file(output, "random.jsonl" if k == 0 else f"random.{k + 1}.jsonl")
                                       for k in range(len(baselines))],
                             "heldout": side_file(output, "heldout.jsonl"), "faults": side_file(output, "faults.jsonl")}
    for baseline, path in zip(baselines, files["random"], strict=True):
        write_records(original_records([examples[pool_indices[i]] for i in baseline.selected], source), path)
    write_records(original_records([examples[i] for i in held_indices], source), files["heldout"])
    selected = {pool_indices[i] for i in selection.selected}
    in_random = Counter(pool_indices[i] for baseline in baselines for i in baseline.selected)
    held = set(held_indices)
    with files["faults"].open("w", encoding="utf-8") as handle:
        for index, (rule, detail) in sorted(faults.items()):
            handle.write(json.dumps({"source": examples[index].source, "record": examples[index].record,
                                     "rule": rule, "detail": detail, "selected": index in selected,
                                     "in_random": in_random[index], "heldout": index in held},
                                    ensure_ascii=False) + "\n")
    return files


def format_report(report: dict[str, Any]) -> str:
    rows = report["rows"]
    runs = rows["random"]["runs"]
    skipped = report["selection"]["skipped"]
    lines = [f"# Selection report: {report['method']} vs random subsets of the same size", "",
             f"{report['examples']} examples: {report['heldout']} held out (never selected; "
             f"{report['heldout_scored']} without a fault-like mark are scored), {report['pool']} to select from"
             + (f" ({sum(skipped.values())} unreadable records skipped: "
                f"{'; '.join(f'{n} x {reason}' for reason, n in skipped.items())})" if skipped else "") + ". "
             f"Fault-like records (data clean's rules): {report['fault_like']}"
             + (f" ({', '.join(f'{n} {rule}' for rule, n in report['fault_like_by_rule'].items())})"
                if report["fault_like"] else "") + ".", "",
             "| training data | examples | fault-like kept | trained tokens | held-out response loss |",
             "|---|---:|---:|---:|---:|"]

    def line(label: str, row: dict[str, Any], loss: str | None = None) -> str:
        return (f"| {label} | {row['examples']} | {row.get('fault_like', '-')} | {row.get('train_tokens', '-')} | "
                f"{loss or format(row['heldout_loss'], '.4f')} |")

    lines += [line("none (base model)", rows["base"]), line(f"{report['method']} selection", rows["selected"])]
    lines += [line(f"random, same size, seed {run['seed']}", run) for run in runs]
    if len(runs) > 1:
        lines.append(line(f"random: mean of {len(runs)}", rows["random"],
                          f"{rows['random']['heldout_loss']:.4f} ± {rows['random']['heldout_loss_sd']:.4f}"))
    outcome = report["verdict"]
    gap = outcome["gap"]
    where = "below" if gap > 0 else "above"
    if outcome["sd"] is None:
        text = (f"The selection's held-out loss is {abs(gap):.4f} {where} the random subset's. One random draw is "
                f"lucky or unlucky too (random subsets differ by a standard deviation of 0.003-0.006 in this loss on "
                f"the benchmark pools of docs/data-selection.md): compare more than one (--report-random-subsets).")
    else:
        size = (f"{abs(outcome['gap_in_sd']):.1f} of their standard deviations, {outcome['sd']:.4f}"
                if outcome["gap_in_sd"] is not None else "their losses do not vary")
        meaning = {"better than random": "the selection is better than random data of the same size",
                   "worse than random": "the selection is worse than random data of the same size: train on a "
                                        "random subset, or on all of the data",
                   "within the noise": f"within the noise (a real difference is {SIGNIFICANT_SD:.0f} or more): no "
                                       "evidence that the selection beats random data of the same size"}
        text = (f"The selection's held-out loss is {abs(gap):.4f} {where} the mean of {len(runs)} random subsets "
                f"({size}): {meaning[outcome['outcome']]}.")
    lines += ["", text + " Probe: LoRA r 16, one epoch, batch 8, lr 1e-3, the same for every subset."]
    return "\n".join(lines)
