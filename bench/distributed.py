"""Several GPUs through weitiao's own launcher (`weitiao train CONFIG --gpus N`): loss parity and scaling from
1 to N GPUs, and how large a full fine-tune fits on N GPUs with ZeRO-3 (with and without CPU offload).

Parity and scaling: for each (engine, method), the same config runs on 1 GPU with gradient accumulation N and on
N GPUs with accumulation 1, so every optimizer step sees the same N packed rows (same global batch). The loss
curves are compared step by step; real tokens/s (all processes) gives the speed-up at that fixed global batch.
Capacity: full fine-tuning of bigger shapes on N GPUs, a few steps each; peak GPU memory of rank 0 (each rank of
ZeRO-3 holds about the same), or the error that stopped it.

  python bench/distributed.py parity --shape 1b --gpus 2
  python bench/distributed.py capacity --shapes 8b 14b --engines zero3 zero3_offload --gpus 2
  python bench/distributed.py parity --shape tiny --gpus 2 --steps 4 --warmup 1 --pairs ddp:lora zero3:full   # CPU

Writes bench/results/distributed-<mode>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model_folder, device_name, write_sft_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = ["ddp:lora", "ddp:full", "zero2:full", "zero3:full", "fsdp:full"]
LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}


def train(name: str, workdir: Path, model_dir: Path, data: Path, method: str, engine: str, gpus: int,
          steps: int, accumulation: int, visible: str | None = None, extra: dict | None = None,
          stop_at_last_step: bool = False, timeout: int = 900) -> dict:
    """One `weitiao train --gpus N` run; its metrics.jsonl records, wall time and, if it failed, why."""
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": 2048, "cache": False},
        "method": method, "lora": {"r": 16, "alpha": 32},
        "train": {"output_dir": str(run_dir / "out"), "max_steps": steps, "learning_rate": LEARNING_RATE[method],
                  "warmup_steps": 2, "logging_steps": 1, "gradient_accumulation_steps": accumulation,
                  "distributed": engine, "overwrite_output_dir": True, "seed": 0},
        "eval": {"compare": False},
    }
    for key, value in (extra or {}).items():
        section, _, field = key.rpartition(".")
        settings[section][field] = value
    config = run_dir / "run.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    log_path, metrics = run_dir / "train.log", run_dir / "out" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    started = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "weitiao", "train", str(config), "--gpus", str(gpus)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    status = None
    while status is None:
        time.sleep(2)
        status = process.poll()
        records = _records(metrics)
        done = stop_at_last_step and any(r.get("step") == steps and "loss" in r for r in records)
        if done or time.time() - started > timeout:
            os.killpg(process.pid, signal.SIGTERM)  # measured what was wanted (or ran out of time): skip the save
            process.wait()
            status = 0 if done else "timeout"
    error = None if status == 0 else "timeout" if status == "timeout" else _first_error(log_path)
    return {"name": name, "engine": engine, "method": method, "gpus": gpus, "accumulation": accumulation,
            "wall_s": round(time.time() - started, 1), "records": [r for r in _records(metrics) if "loss" in r],
            "error": error}


def _first_error(log: Path) -> str:
    """The first exception a rank raised (not the launcher's ChildFailedError that follows it)."""
    text = log.read_text(errors="replace")
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "out of memory"
    for line in text.splitlines():
        found = re.search(r"\b(\w+(Error|Exception)): (.*)", line)
        if found and found.group(1) not in ("ChildFailedError", "ImportError"):
            return f"{found.group(1)}: {found.group(3)}"[:300]
    return "failed (see train.log)"


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def tokens_per_second(run: dict, warmup: int) -> float:
    """Median of the per-step real-token rates after the warm-up steps (tokens of all processes)."""
    rates = [r["tokens_per_s"] for r in run["records"] if r["step"] > warmup]
    return statistics.median(rates) if rates else float("nan")


def peak(run: dict) -> float:
    return max((r.get("gpu_peak_gib", float("nan")) for r in run["records"]), default=float("nan"))


def parity(args, workdir: Path, model_dir: Path, data: Path) -> dict:
    rows = []
    for pair in args.pairs:
        engine, method = pair.split(":")
        extra = {"train.gradient_checkpointing": True} if args.checkpointing else None
        # Stopped once the last step is logged: the final save is not what is measured here.
        common = dict(workdir=workdir, model_dir=model_dir, data=data, method=method, engine=engine,
                      steps=args.steps, extra=extra, stop_at_last_step=True)
        single = train(f"{engine}-{method}-1", gpus=1, accumulation=args.gpus, visible="0" if args.gpu else None,
                       **common)
        several = train(f"{engine}-{method}-{args.gpus}", gpus=args.gpus, accumulation=1, **common)
        row = {"engine": engine, "method": method, "single": single, "several": several}
        a, b = {r["step"]: r for r in single["records"]}, {r["step"]: r for r in several["records"]}
        steps = sorted(set(a) & set(b))
        if steps and not single["error"] and not several["error"]:
            differences = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps]
            row.update(
                steps=len(steps), first_loss=[a[steps[0]]["loss"], b[steps[0]]["loss"]],
                last_loss=[a[steps[-1]]["loss"], b[steps[-1]]["loss"]], max_abs_diff=max(differences),
                mean_abs_diff=statistics.mean(differences),
                max_rel_diff=max(d / abs(a[s]["loss"]) for d, s in zip(differences, steps)),
                same_tokens=all(a[s]["tokens"] == b[s]["tokens"] for s in steps),
                tokens_per_s=[tokens_per_second(single, args.warmup), tokens_per_second(several, args.warmup)],
                peak_gib=[peak(single), peak(several)])
            row["speedup"] = row["tokens_per_s"][1] / row["tokens_per_s"][0]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("single", "several")}), flush=True)
    lines = [f"| engine | method | steps | loss step 1 (1 GPU / {args.gpus}) | last loss (1 / {args.gpus}) | "
             f"max abs diff | max rel diff | same tokens | tokens/s 1 GPU | tokens/s {args.gpus} GPUs | speed-up | "
             f"peak GiB (1 / {args.gpus}) |",
             "|---|---|---:|---|---|---:|---:|---|---:|---:|---:|---|"]
    for row in rows:
        if "steps" not in row:
            lines.append(f"| {row['engine']} | {row['method']} | failed: "
                         f"{row['single']['error'] or row['several']['error']} |||||||||")
            continue
        lines.append(
            f"| {row['engine']} | {row['method']} | {row['steps']} | {row['first_loss'][0]:.4f} / "
            f"{row['first_loss'][1]:.4f} | {row['last_loss'][0]:.4f} / {row['last_loss'][1]:.4f} | "
            f"{row['max_abs_diff']:.2e} | {row['max_rel_diff']:.2e} | {'yes' if row['same_tokens'] else 'NO'} | "
            f"{row['tokens_per_s'][0]:,.0f} | {row['tokens_per_s'][1]:,.0f} | {row['speedup']:.2f} | "
            f"{row['peak_gib'][0]:.1f} / {row['peak_gib'][1]:.1f} |")
    return {"rows": rows, "table": "\n".join(lines)}


def capacity(args, workdir: Path, tokenizer, data: Path) -> dict:
    rows = []
    for shape in args.shapes:
        model_dir = build_model_folder(shape, workdir / f"llama-{shape}", tokenizer)
        for engine in args.engines:
            run = train(f"capacity-{shape}-{engine}", workdir, model_dir, data, "full", engine, args.gpus,
                        args.steps, 1, extra={"train.gradient_checkpointing": True}, stop_at_last_step=True,
                        timeout=args.timeout)
            row = {"shape": shape, "engine": engine, "steps_done": len(run["records"]), "error": run["error"],
                   "peak_gib": peak(run), "tokens_per_s": tokens_per_second(run, 1), "wall_s": run["wall_s"],
                   "losses": [r["loss"] for r in run["records"]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"| shape | engine | steps done | peak GiB per GPU (rank 0) | tokens/s ({args.gpus} GPUs) | wall s | "
             "result |", "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['engine']} | {row['steps_done']} | {row['peak_gib']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['wall_s']:.0f} | {row['error'] or 'fits'} |")
    return {"rows": rows, "table": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["parity", "capacity"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--shape", default="1b", help="parity: the model shape")
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="parity: engine:method pairs")
    parser.add_argument("--checkpointing", action="store_true", help="parity: gradient checkpointing on")
    parser.add_argument("--shapes", nargs="+", default=["8b", "14b"], help="capacity: model shapes")
    parser.add_argument("--engines", nargs="+", default=["zero3", "zero3_offload"], help="capacity: engines")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the speed")
    parser.add_argument("--timeout", type=int, default=900, help="capacity: seconds per run")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--workdir", default="/tmp/wt-distributed")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    args = parser.parse_args()
    args.gpu = torch.cuda.is_available()

    from weitiao.models import load_tokenizer, resolve_model

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
    data = write_sft_data(workdir / "sft.jsonl", args.examples)
    if args.mode == "parity":
        result = parity(args, workdir, build_model_folder(args.shape, workdir / f"llama-{args.shape}", tokenizer),
                        data)
    else:
        result = capacity(args, workdir, tokenizer, data)
    header = (f"device: {device_name()} x {args.gpus}; torch {torch.__version__}; mode {args.mode}; "
              f"steps {args.steps}" + (f"; shape {args.shape}" if args.mode == "parity" else ""))
    print("\n" + header + "\n" + result["table"])
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    record = {"device": device_name(), "gpus": args.gpus, "torch": torch.__version__, "mode": args.mode,
              "steps": args.steps, "shape": args.shape if args.mode == "parity" else args.shapes, **result}
    (results / f"distributed-{args.mode}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
