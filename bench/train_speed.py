"""Training speed and memory: the common recipe vs weitiao, on the same machine and synthetic data, each variant in
a fresh process of its own (a run leaves process-wide state behind), the baseline timed in a second run.

Baseline ("the tutorial recipe"): transformers Trainer + PEFT LoRA r=16 on all linear layers (or full
fine-tuning), bf16, sdpa attention, batches of 8 padded to the longest. weitiao: `weitiao.train.run` with its
GPU defaults (packed rows on variable-length FlashAttention, Liger kernels, LoRA dropout 0, the LoRA update in the
base product's epilogue). Real (non-pad) tokens
per second after a warm-up, peak GPU memory, MFU = tokens/s x FLOP per token / 989.4 TFLOP/s (FLOP per token: 4N with a
frozen base, 6N for full fine-tuning, N = weights in linear layers incl. the output head; see common.py).

  python bench/train_speed.py --shape 1b --variants baseline:lora weitiao:lora baseline:full weitiao:full
  python bench/train_speed.py --shape tiny --steps 3 --warmup 1        # a CPU check of the script itself

Writes bench/results/<shape>-<method>.json per method and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (StepTimer, build_model_folder, device_name, flops_per_token, peak_memory_gib,  # noqa: E402
                    reset_memory, write_sft_data, PEAK_BF16_FLOPS)
from trace_gaps import idle_gaps  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOG_EVERY = 5  # steps between throughput observations (each one waits for the GPU)


def tokenized(model_dir: str, data: Path, max_length: int):
    """The synthetic data tokenized by weitiao's own pipeline (same masking for both recipes)."""
    from weitiao.config import DataConfig
    from weitiao.data.dataset import build_datasets
    from weitiao.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    train, _, _ = build_datasets(DataConfig(train=[str(data)], max_length=max_length, cache=False), tokenizer)
    return train, tokenizer


def run_baseline(model_dir: str, data: Path, method: str, steps: int, warmup: int, checkpointing: bool,
                 max_length: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from weitiao.train.kernels import undo_liger_patches

    undo_liger_patches()  # the tutorial recipe runs transformers' own code, also after a weitiao variant
    train, tokenizer = tokenized(model_dir, data, max_length)
    dtype = torch.bfloat16 if method == "lora" else torch.float32  # full FT: fp32 master weights + bf16 autocast
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    seen = {"tokens": 0}

    def collate(rows):
        batch = pad(rows)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    timer = StepTimer(warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOG_EVERY == 0:  # the same observation points (and syncs) as weitiao's
                timer.observe(state.global_step, seen["tokens"])

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=warmup + steps, bf16=on_gpu(),
        learning_rate=1e-4, logging_steps=10, save_strategy="no", report_to=[], remove_unused_columns=False,
        gradient_checkpointing=checkpointing, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=train.select_columns(["input_ids", "labels"]),
                      data_collator=collate, callbacks=[Clock()])
    trainer.train()
    return {"real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib()}


def run_weitiao(model_dir: str, data: Path, method: str, steps: int, warmup: int, checkpointing: bool,
                max_length: int, packing_length: int, extra: dict | None = None, observer=None) -> dict:
    from weitiao.config import load_config
    from weitiao.train import run

    settings = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(data), "max_length": max_length, "packing_length": packing_length, "cache": False},
        "method": method, "lora": {"r": 16, "alpha": 32},
        "train": {"output_dir": tempfile.mkdtemp(), "max_steps": warmup + steps, "bf16": on_gpu(),
                  "learning_rate": 1e-4, "logging_steps": LOG_EVERY, "gradient_checkpointing": checkpointing,
                  "offload_checkpoints": False,  # plain checkpointing, as in the earlier rows; `extra` may set it
                  "overwrite_output_dir": True},
        "eval": {"compare": False},
    }
    for key, value in (extra or {}).items():
        section, _, name = key.rpartition(".")
        (settings.setdefault(section, {}) if section else settings)[name] = value
    timer = StepTimer(warmup)

    def on_log(record: dict) -> None:
        if "loss" in record:
            timer.observe(record["step"], record["tokens"])
            if observer:
                observer()

    result = run(load_config(None, settings), on_log=on_log)
    trainable = result.trainable_params
    del result
    return {"real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib(),
            "trainable_params": trainable}


def profile_weitiao(model_dir: str, data: Path, method: str, checkpointing: bool, packing_length: int,
                    results: Path, name: str, extra: dict | None, gaps: bool = True) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    marks = []  # wall clock at the log points of steps 5 and 10 (each after a GPU sync)

    def observer() -> None:
        marks.append(time.perf_counter())
        profiler.step()

    # Recorded: steps 6-10 only, after the warm-up (and compilation) of steps 1-5, with Python stacks for the gaps
    # (their trace takes a minute or more to write and read on the GPU machine; kernel times alone do not need it).
    results.mkdir(parents=True, exist_ok=True)
    trace = Path(tempfile.gettempdir()) / f"trace-{name}.json.gz"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=gaps,
                 schedule=schedule(wait=1, warmup=0, active=1),
                 on_trace_ready=(lambda done: done.export_chrome_trace(str(trace))) if gaps else None) as profiler:
        measured = run_weitiao(model_dir, data, method, 5, 5, checkpointing, 2048, packing_length, extra,
                               observer)
    events = profiler.key_averages()
    kernels = [event for event in events if event.device_type == DeviceType.CUDA and not event.is_user_annotation]
    busy = sum(event.self_device_time_total for event in kernels) / 1e3 / 5
    table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    table += (f"\nper step: GPU kernel time {busy:.1f} ms of {(marks[1] - marks[0]) / 5 * 1e3:.1f} ms wall "
              "(steps 6-10, profiler overhead included)\n\n")
    table += idle_gaps(trace) if gaps else ""
    (results / f"profile-{name}.txt").write_text(table)
    print(table)
    return measured


class HostGpuLag:
    """How far the GPU runs behind the launching thread through one training step, without a profiler: a sync
    before the step's first forward, then at each mark (every decoder layer's forward and backward, the loss's
    return, the optimizer step, the next forward) the host's clock and a CUDA event. The event's time minus the
    host's is the work the GPU still had queued when the host passed that point: where it falls to ~0 the GPU
    waited for the host (launch-bound), where it grows the host ran ahead (kernel-bound). Each mark also takes the
    peak of allocated GPU memory since the mark before (the allocator's own count: no sync), then resets it, so the
    table says in which part of the step the run's peak falls (and the run's own peak is not reported)."""

    def __init__(self, step: int) -> None:
        self.step, self.steps_done, self.armed, self.marks, self.handles = step, 0, False, [], []
        self.backward_started = False

    def mark(self, label: str) -> None:
        if self.armed:
            event = peak = None
            if on_gpu():
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            self.marks.append((label, time.perf_counter(), event, peak))

    def attach(self, model) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        from weitiao.train.methods import decoder_layers

        def model_start(module, args, kwargs):
            if self.armed and self.marks:  # the next step's forward closes the recorded one
                self.mark("next step: forward starts")
                self.armed = self.backward_started = False
            elif self.steps_done == self.step - 1 and not self.marks:
                if on_gpu():
                    torch.cuda.synchronize()
                self.armed = True
                self.mark("forward starts (after a sync)")

        def layer_start(index):
            def hook(module, args, kwargs):
                if self.backward_started:  # a checkpointed layer's forward again, in the backward pass
                    self.mark(f"layer {index} recomputed")
                    return
                self.mark(f"layer {index} forward")
                hidden = args[0] if args else kwargs.get("hidden_states")
                if self.armed and hidden is not None and hidden.requires_grad:
                    hidden.register_hook(lambda grad: self.mark(f"layer {index} backward done"))
            return hook

        def model_end(*_):
            self.mark("forward returned (loss included)")
            self.backward_started = self.armed

        self.handles = [model.register_forward_pre_hook(model_start, with_kwargs=True),
                        model.register_forward_hook(model_end),
                        *(layer.register_forward_pre_hook(layer_start(index), with_kwargs=True)
                          for index, layer in enumerate(decoder_layers(model)[1])),
                        register_optimizer_step_pre_hook(lambda *_: self.mark("backward done: optimizer step starts"))]

        def stepped(optimizer, args, kwargs):
            self.mark("optimizer step launched")
            self.steps_done += 1
        self.handles.append(register_optimizer_step_post_hook(stepped))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def table(self) -> str:
        if len(self.marks) < 2:
            return "no step recorded\n"
        _, host0, event0, _ = self.marks[0]
        lines = [f"{'mark':42s} {'host ms':>9s} {'GPU ms':>9s} {'GPU behind by':>14s} {'peak GiB since':>15s}"]
        for label, host, event, peak in self.marks:
            gpu = event0.elapsed_time(event) if event is not None else float("nan")
            peak_gib = peak / 2**30 if peak is not None else float("nan")
            lines.append(f"{label:42s} {(host - host0) * 1e3:9.2f} {gpu:9.2f} {gpu - (host - host0) * 1e3:14.2f} "
                         f"{peak_gib:15.3f}")
        return "\n".join(lines) + "\n"


def lag_weitiao(model_dir: str, data: Path, method: str, checkpointing: bool, packing_length: int, results: Path,
                name: str, extra: dict | None) -> dict:
    """Option `lag`: HostGpuLag's table for step 7 of a 10-step run (its tokens/s are not comparable: one sync; nor
    is its peak, reset at each mark)."""
    from weitiao.train import sft

    lag = HostGpuLag(step=7)
    original = sft.apply_method_and_kernels

    def with_marks(*args, **kwargs):
        model, fused = original(*args, **kwargs)
        lag.attach(model)
        return model, fused

    sft.apply_method_and_kernels = with_marks
    try:
        measured = run_weitiao(model_dir, data, method, 5, 5, checkpointing, 2048, packing_length, extra)
    finally:
        sft.apply_method_and_kernels = original
        lag.detach()
    table = lag.table()
    results.mkdir(parents=True, exist_ok=True)
    (results / f"lag-{name}.txt").write_text(table)
    print(table)
    return measured


def on_gpu() -> bool:
    return torch.cuda.is_available()


def measure(variant: str, args: argparse.Namespace, model_dir: str, data: Path) -> dict:
    """One variant's tokens/s and peak memory (run in a process of its own)."""
    recipe, method, *options = variant.split(":")
    options = options[0].split(",") if options else []
    checkpointing = "ckpt" in options
    thousands = [int(option[:-1]) for option in options if option[:-1].isdigit() and option.endswith("k")]
    packing_length = 1024 * thousands[0] if thousands else 8192
    try:
        if recipe == "baseline":
            # The Trainer measured first in a fresh process ran full fine-tuning at 6.6k-7.7k tokens/s, and at
            # 15.0k-15.6k after another run in the same process (logs run15-run18; TF32 ruled out, cause not
            # isolated): an untimed run first, so the baseline is timed at its faster state.
            run_baseline(model_dir, data, method, 5, 5, checkpointing, 2048)
            reset_memory()
            return run_baseline(model_dir, data, method, args.steps, args.warmup, checkpointing, 2048)
        extra = {"train.torch_compile": "compile" in options, "train.fused_lora": "peftlora" not in options,
                 "train.cuda_graphs": True if "graphs" in options else False if "nographs" in options else None,
                 "train.offload_checkpoints": "offload" in options}
        budgets = [int(option[2:]) for option in options if option.startswith("ce") and option[2:].isdigit()]
        if budgets:
            extra["train.logits_chunk_budget"] = budgets[0]
        per_step = [int(option[2:]) for option in options if option.startswith("ga") and option[2:].isdigit()]
        if per_step:
            extra["train.gradient_accumulation_steps"] = per_step[0]
        workers = [int(option[1:]) for option in options if option.startswith("w") and option[1:].isdigit()]
        if workers:
            extra["train.dataloader_num_workers"] = workers[0]
        if "flex" in options:
            extra["model.attn_implementation"] = "flex_attention"
        if "fp32model" in options:  # full fine-tuning's fp32 weights in the model (autocast), not the optimizer
            extra["train.master_weights"] = "model"
        if "lag" in options:  # where the GPU waits for the host, without a profiler
            return lag_weitiao(model_dir, data, method, checkpointing, packing_length, Path(args.results),
                               f"{args.shape}-{variant.replace(':', '-').replace(',', '-')}", extra)
        if "prof" in options or "kprof" in options:  # where the GPU time goes: the top kernels of a short run
            return profile_weitiao(model_dir, data, method, checkpointing, packing_length, Path(args.results),
                                   f"{args.shape}-{variant.replace(':', '-').replace(',', '-')}", extra,
                                   gaps="prof" in options)
        return run_weitiao(model_dir, data, method, args.steps, args.warmup, checkpointing, 2048, packing_length,
                           extra)
    except torch.cuda.OutOfMemoryError:
        return {"real_tokens_per_s": 0.0, "peak_mem_gib": float("nan"), "error": "out of memory"}
    except Exception as error:  # one failing variant (a compiler error, say) must not lose the others' rows
        traceback.print_exc()
        return {"real_tokens_per_s": 0.0, "peak_mem_gib": float("nan"),
                "error": f"{type(error).__name__}: {error}"[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--variants", nargs="+", default=["baseline:lora", "weitiao:lora"],
                        help="recipe:method[:option,...]; options: ckpt (gradient checkpointing), offload (with ckpt: "
                             "train.offload_checkpoints), 12k/16k/... (rows of "
                             "that many thousand tokens; 8k by default), compile (train.torch_compile), flex (flex "
                             "attention instead of varlen FlashAttention), peftlora (PEFT's own LoRA forward), graphs/"
                             "nographs (train.cuda_graphs on / off; default: where it runs), ceN "
                             "(train.logits_chunk_budget N), gaN (N rows per optimizer step), wN (N data-loading "
                             "worker processes), fp32model (full fine-tuning's fp32 weights in the model), prof (a "
                             "profile, with the host's idle gaps), kprof (kernel times only: quicker), lag (how far "
                             "the GPU runs behind the host through step 7, and where its memory peaks; no profiler)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON results")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "RESULT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from weitiao.models import load_tokenizer, resolve_model

    workdir = Path(args.workdir)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
    model_dir = str(build_model_folder(args.shape, workdir / f"llama-{args.shape}", tokenizer))
    data = write_sft_data(workdir / "sft.jsonl", args.examples)
    if args.one:  # a child process: measure one variant, write the result, exit
        Path(args.one[1]).write_text(json.dumps(measure(args.one[0], args, model_dir, data)))
        return
    rows = []
    for variant in args.variants:
        recipe, method, *options = variant.split(":")
        options = options[0].split(",") if options else []
        # A fresh process per variant: no variant is timed in a state an earlier one left (see measure()).
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", variant, result.name])
            text = Path(result.name).read_text()
        measured = json.loads(text) if text else {"real_tokens_per_s": 0.0, "peak_mem_gib": float("nan"),
                                                  "error": f"the measuring process ended with {child.returncode}"}
        trained = measured.get("trainable_params", None if method == "full" else 0)
        measured["mfu"] = measured["real_tokens_per_s"] * flops_per_token(args.shape, trained) / PEAK_BF16_FLOPS
        rows.append({"variant": variant, "recipe": recipe, "method": method, "options": options, **measured})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\ndevice: {device_name()}  shape: {args.shape}  steps: {args.steps} after {args.warmup} warm-up")
    print(f"{'variant':<28}{'real tok/s':>12}{'peak GiB':>10}{'MFU':>8}{'x speed':>9}{'x mem':>8}")
    baselines = {}  # per method: the first baseline run that did not fail
    for row in rows:
        if row["recipe"] == "baseline" and "error" not in row:
            baselines.setdefault(row["method"], row)
    for row in rows:
        base = baselines.get(row["method"])
        speed = row["real_tokens_per_s"] / base["real_tokens_per_s"] if base and base["real_tokens_per_s"] else None
        memory = row["peak_mem_gib"] / base["peak_mem_gib"] if base else None
        print(f"{row['variant']:<28}{row['real_tokens_per_s']:>12,.0f}{row['peak_mem_gib']:>10.1f}"
              f"{100 * row['mfu']:>7.1f}%" + (f"{speed:>9.2f}{memory:>8.2f}" if speed else "") + "  " +
              row.get("error", ""))
        if base and row["recipe"] == "weitiao" and "prof" not in row["options"]:
            results = Path(args.results)
            results.mkdir(parents=True, exist_ok=True)
            record = {"device": device_name(), "shape": args.shape, "method": row["method"],
                      "variant": row["variant"], "real_tokens_per_s": row["real_tokens_per_s"],
                      "peak_mem_gib": row["peak_mem_gib"], "mfu": row["mfu"],
                      "baseline_real_tokens_per_s": base["real_tokens_per_s"],
                      "baseline_peak_mem_gib": base["peak_mem_gib"], "baseline_mfu": base["mfu"],
                      "steps": args.steps, "warmup": args.warmup}
            name = f"{args.shape}-{row['variant'].replace(':', '-').replace(',', '-')}.json"
            (results / name).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
