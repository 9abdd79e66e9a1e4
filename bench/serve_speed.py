"""Serving speed: aggregate generated tokens/s and time to first token for N concurrent chat requests, weitiao's
engine (weitiao.generation) against the one-request-at-a-time engine it replaced and transformers' continuous
batching, in one run on one model; plus evaluation's generation time, old and new.

    python bench/serve_speed.py --old-src OLD/src            # a GPU: the 1B shape, bf16, 1/16/64 clients
    python bench/serve_speed.py --model default --concurrency 1 8 --old-src OLD/src   # the CPU check

OLD/src is the `src` folder of a checkout from before the engine (git worktree add OLD 3dfe6ee). Every engine
is measured in its own process. Each client sends one chat request (a different ~40-token question each) for
--max-tokens greedy tokens and reads the reply as a stream; tokens/s is all generated tokens over the wall
time from the first request to the last reply, time to first token is measured at the client. Random weights
seldom end a reply early; the tokens actually generated are what is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, build_model_folder, device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("old", "weitiao", "transformers-cb", "transformers-generate", "eval-old", "eval-weitiao")


def questions(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(36)) + "?"}]
            for i in range(count)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure_engine(args: argparse.Namespace, model_dir: str) -> list[dict]:
    """The weitiao engine importable from sys.path (the new one, or the old one under --old-src)."""
    try:
        from weitiao.generation.engine import Engine
        from weitiao.generation.requests import SamplingParams
        engine = Engine.load(model_dir, dtype=args.dtype, threads=args.threads)
    except ImportError:  # the engine before weitiao.generation
        from weitiao.serve.engine import Engine, SamplingParams
        engine = Engine(model_dir, dtype=args.dtype, threads=args.threads)
    name = engine.default_model
    rows = []
    for concurrency in args.concurrency:
        prompts = questions(concurrency, seed=concurrency)
        for generation in [engine.chat(name, p, SamplingParams(max_tokens=4, temperature=0)) for p in prompts]:
            generation.result()  # warm-up: the batch shapes of this concurrency (CUDA graphs are captured once)
        barrier = threading.Barrier(concurrency)
        timings: list[tuple[float, float, float, int]] = []

        def client(messages, barrier=barrier, timings=timings):
            barrier.wait()
            sent = time.perf_counter()
            generation = engine.chat(name, messages, SamplingParams(max_tokens=args.max_tokens, temperature=0))
            first = None
            for _ in generation:
                first = first or time.perf_counter()
            timings.append((sent, (first or time.perf_counter()) - sent, time.perf_counter(),
                            generation.completion_tokens))

        threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = max(t[2] for t in timings) - min(t[0] for t in timings)
        tokens = sum(t[3] for t in timings)
        ttfts = [t[1] for t in timings]
        rows.append({"concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttfts), 4),
                     "ttft_p95_s": round(percentile(ttfts, 0.95), 4)})
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    return rows


def measure_transformers_cb(args: argparse.Namespace, model_dir: str) -> list[dict]:
    """transformers' continuous batching (generate_batch, paged attention), its default settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.dtype == "bf16" else "auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    rows = []
    for concurrency in args.concurrency:
        inputs = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"] for p in questions(concurrency, seed=concurrency)]
        model.generate_batch(inputs=inputs, generation_config=GenerationConfig(
            max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id))  # warm-up
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=inputs, generation_config=config)
        wall = time.perf_counter() - started
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        rows.append({"concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": None, "ttft_p95_s": None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_transformers_generate(args: argparse.Namespace, model_dir: str) -> list[dict]:
    """transformers' `generate` on one static batch of all the prompts (left-padded, dynamic cache, sdpa): the
    plain way to batch with transformers, not a server (no request joins a running batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.dtype == "bf16" else "auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    rows = []
    for concurrency in args.concurrency:
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in questions(concurrency, seed=concurrency)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        options = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        model.generate(**batch, max_new_tokens=4, **options)  # warm-up
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        started = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=args.max_tokens, **options)
        sync()
        wall = time.perf_counter() - started
        new = output[:, batch["input_ids"].shape[1]:]
        tokens = int((new != tokenizer.pad_token_id).sum())
        rows.append({"concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": None, "ttft_p95_s": None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_eval(args: argparse.Namespace, model_dir: str) -> list[dict]:
    """weitiao.eval.generate.generate as `weitiao eval` calls it: eval.batch_size 16, --eval-prompts prompts."""
    from transformers import AutoModelForCausalLM

    from weitiao.eval.generate import GenerationSettings, generate
    from weitiao.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.dtype == "bf16" else "auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    settings = GenerationSettings(max_new_tokens=args.max_tokens, batch_size=16)
    generate(model, tokenizer, questions(16, seed=1), GenerationSettings(max_new_tokens=4, batch_size=16))
    started = time.perf_counter()
    replies = generate(model, tokenizer, questions(args.eval_prompts, seed=2), settings)
    wall = time.perf_counter() - started
    row = {"concurrency": args.eval_prompts, "seconds": round(wall, 3), "reply_chars": sum(map(len, replies))}
    print(json.dumps(row), flush=True)
    return [row]


def table(result: dict) -> str:
    lines = [f"Serving, {result['device']}: {result['settings']}", "",
             "| engine | concurrent | tokens/s | old engine tokens/s | x old | TTFT p50 s | TTFT p95 s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            continue
        old = row.get("old_tokens_per_s")
        times = f"{row['tokens_per_s'] / old:.1f}x" if old else ""
        ttft = [f"{row[k]:.3f}" if row.get(k) is not None else "" for k in ("ttft_p50_s", "ttft_p95_s")]
        old_text = f"{old:,.0f}" if old else ""
        lines.append(f"| {row['engine']} | {row['concurrency']} | {row['tokens_per_s']:,.0f} | {old_text} | {times} | "
                     f"{ttft[0]} | {ttft[1]} |")
    evals = {row["engine"]: row for row in result["rows"] if row["engine"].startswith("eval-")}
    if len(evals) == 2:
        old, new = evals["eval-old"]["seconds"], evals["eval-weitiao"]["seconds"]
        lines += ["", f"Evaluation generation ({evals['eval-old']['concurrency']} prompts, eval.batch_size 16): "
                      f"{old:.1f} s before, {new:.1f} s now ({old / new:.1f}x faster)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model to load instead of the random-weight --shape (e.g. default)")
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--old-src", help="src folder of the engine before weitiao.generation (for old, eval-old)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the engines' --threads)")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape (default: the default model's)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "RESULT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from weitiao.models import load_tokenizer, resolve_model

    if args.model:
        model_dir = resolve_model(args.model)
    else:
        tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
        model_dir = str(build_model_folder(args.shape, Path(args.workdir) / f"llama-{args.shape}", tokenizer))
    if args.one:
        engine, result_file = args.one
        measure = {"transformers-cb": measure_transformers_cb,
                   "transformers-generate": measure_transformers_generate}.get(engine) or (
            measure_eval if engine.startswith("eval-") else measure_engine)
        Path(result_file).write_text(json.dumps(measure(args, model_dir)))
        return
    rows: list[dict] = []
    for engine in args.engines:
        if engine in ("old", "eval-old") and not args.old_src:
            continue
        env = dict(os.environ)
        if engine in ("old", "eval-old"):
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.old_src).resolve()), env.get("PYTHONPATH", "")])
        print(f"== {engine}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", engine, result.name], env=env)
            text = Path(result.name).read_text()
        measured = json.loads(text) if text else [{"error": f"the measuring process ended with {child.returncode}"}]
        rows += [{"engine": engine, **row} for row in measured]
    old = {row["concurrency"]: row["tokens_per_s"] for row in rows if row["engine"] == "old" and "tokens_per_s" in row}
    for row in rows:
        if "tokens_per_s" in row and row["concurrency"] in old:
            row["old_tokens_per_s"] = old[row["concurrency"]]
    import transformers

    device = device_name()
    import peft

    result = {"device": device, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                             "peft": peft.__version__},
              "engines": {"old": "weitiao's engine before weitiao.generation: one request at a time (model.generate)",
                          "weitiao": "weitiao.generation.Engine: continuous batching, CUDA-graph decode steps",
                          "transformers-cb": "transformers generate_batch (continuous batching, paged attention), "
                                             "default settings",
                          "transformers-generate": "transformers generate on one left-padded static batch of all "
                                                   "prompts (dynamic cache, sdpa)",
                          "eval-old / eval-weitiao": "weitiao.eval.generate.generate, eval.batch_size 16"},
              "settings": {"model": args.model or f"random-weight {args.shape} Llama", "dtype": args.dtype,
                           "max_tokens": args.max_tokens, "greedy": True, "concurrency": args.concurrency},
              "rows": rows}
    slug = device.lower().replace("nvidia", "").strip().split()[0] if device != "cpu" else "cpu"
    out = Path(args.results) / f"serve-{slug}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(result) + f"\n\nwritten: {out}")


if __name__ == "__main__":
    main()
