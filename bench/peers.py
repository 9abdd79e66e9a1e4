"""Training speed against the strongest peers, in one run on one machine: TRL, unsloth, LLaMA-Factory, axolotl and
weitiao, each in a process of its own, on the same synthetic data, tokenizer and model shape as bench/train_speed.py
(random weights: speed and memory do not depend on the values), LoRA r=16 alpha=32 on all linear layers, dropout 0,
8,192-token packed rows (--row-tokens), bf16. Each peer runs with its own best documented settings for speed
(`settings` in each row names them and their source).

Measured the same way for every peer: real (non-pad) tokens that entered the model, counted by a hook on the model
(HF-Trainer peers) or by weitiao's own log; wall time between the step-`warmup` and the last observation, every 5
steps, each after a GPU sync; peak memory from torch; MFU as in bench/common.py.

A peer that needs other versions of transformers, TRL or datasets than another runs on its own package folder:
`--site PEER=DIR` puts DIR first on that peer's PYTHONPATH (the GPU machine receives them as wheels).

  python bench/peers.py --shape 1b --variants trl:lora trl:lora:ckpt weitiao:lora weitiao:lora:ckpt
  python bench/peers.py --shape tiny --steps 5 --warmup 5 --variants trl:lora weitiao:lora   # CPU check
  python bench/peers.py --shape 1b --tag dpo --variants trl:dpo trl:dpo:ckpt weitiao:dpo weitiao:dpo:ckpt

Method `dpo` is LoRA DPO (sigmoid loss, beta 0.1, the reference = the base with the adapter off) on pairs made of the
same records: each question with its own answer as the chosen reply and the next record's answer as the rejected one.
Real tokens are those of the chosen and rejected sequences that enter the policy's forward with gradients (the
reference's forward is not counted again); MFU counts that reference forward's 2N per token as well.

Writes bench/results/peers-<shape>-<device>.json ({device, shape, rows}) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PEAK_BF16_FLOPS, StepTimer, build_model_folder, device_name, flops_per_token,  # noqa: E402
                    linear_params, peak_memory_gib, write_sft_data)
from train_speed import LOG_EVERY, run_weitiao  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all linear layers"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Runner = Callable[[str, Path, str, list, argparse.Namespace], dict]
PEERS: dict[str, Runner] = {}


def peer(name: str) -> Callable[[Runner], Runner]:
    def register(runner: Runner) -> Runner:
        PEERS[name] = runner
        return runner
    return register


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", *names):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def conversations(data: Path) -> list[dict]:
    """The synthetic question/answer records as prompt/completion conversations (TRL's completion-only format)."""
    records = [json.loads(line) for line in data.read_text().splitlines()]
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in records]


def write_pairs(data: Path) -> Path:
    """The synthetic records as preference pairs: {question, chosen, rejected} (weitiao's qa pair layout)."""
    records = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = data.with_name("pairs.jsonl")
    pairs.write_text("".join(json.dumps({"question": r["question"], "chosen": r["answer"],
                                         "rejected": records[(i + 1) % len(records)]["answer"]}) + "\n"
                             for i, r in enumerate(records)))
    return pairs


def clock_hf_trainers(warmup: int) -> StepTimer:
    """Time every transformers Trainer built from now on (TRL, unsloth, LLaMA-Factory and axolotl build one): a
    callback observes (step, tokens) every LOG_EVERY steps, and a hook on the model counts the tokens that enter it
    (non-zero attention-mask entries, or every position of a padding-free row), summed on the GPU."""
    from transformers import Trainer, TrainerCallback

    timer, seen = StepTimer(warmup), {"tokens": None}

    def count(module, args, kwargs):
        if not torch.is_grad_enabled():  # a reference model's forward (DPO): its tokens are counted once already
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = (mask != 0).sum() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else ids.numel()
        seen["tokens"] = tokens if seen["tokens"] is None else seen["tokens"] + tokens

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(count, with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOG_EVERY == 0:
                timer.observe(state.global_step, int(seen["tokens"]))

    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Clock())

    Trainer.__init__ = init
    return timer


@peer("trl")
def run_trl(model_dir: str, data: Path, method: str, options: list, args: argparse.Namespace) -> dict:
    """TRL SFTTrainer with the settings its docs give for speed and memory ("Reducing memory usage", "Speeding up
    training"): BFD packing into max_length rows, which turns on padding-free batches; Liger kernels; completion-only
    loss (the default for prompt/completion data); `ckpt`: gradient checkpointing (SFTConfig's default; off
    otherwise).
    FlashAttention 2, which padding-free asks for, is not installed on the GPU machine: `flex` runs transformers'
    flex attention (what a user without flash-attn gets), `varlen` stands in for flash_attention_2 with torch's
    variable-length FlashAttention registered under transformers' attention interface (the same kernel as FA2's
    varlen entry point), fed the example boundaries TRL's collator already computes."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if method == "dpo":
        return run_trl_dpo(model_dir, data, options, args)
    attention = "flex_attention" if torch.cuda.is_available() else "sdpa"  # flex has no CPU backward
    if "varlen" in options:
        from weitiao.train.attention import VARLEN, register_varlen_attention

        register_varlen_attention()
        attention = VARLEN
    checkpointing = "ckpt" in options
    on_gpu = torch.cuda.is_available()
    settings = {"packing": True, "packing_strategy": "bfd", "padding_free": True, "max_length": args.row_tokens,
                "per_device_train_batch_size": 1, "use_liger_kernel": on_gpu, "completion_only_loss": True,
                "gradient_checkpointing": checkpointing, "attn_implementation": attention,
                "weights": "bf16" if method == "lora" else "fp32 master weights, bf16 autocast",
                "optimizer": "adamw_torch_fused", "versions": versions("trl", "liger-kernel", "datasets"),
                "source": "huggingface.co/docs/trl sft_trainer (packing, padding_free) and reducing_memory "
                          "(use_liger_kernel); gradient_checkpointing=True is SFTConfig's default"}
    timer = clock_hf_trainers(args.warmup)
    dtype = torch.bfloat16 if method == "lora" else torch.float32
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=10,
        save_strategy="no", report_to=[], bf16=on_gpu, max_length=args.row_tokens, packing=True,
        packing_strategy="bfd", padding_free=True, per_device_train_batch_size=1, use_liger_kernel=on_gpu,
        gradient_checkpointing=checkpointing, optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        model_init_kwargs={"dtype": dtype, "attn_implementation": attention}, dataset_num_proc=4,
        dataloader_num_workers=0, disable_tqdm=True)
    lora = (LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                       target_modules="all-linear") if method == "lora" else None)
    trainer = SFTTrainer(model=model_dir, args=config, train_dataset=Dataset.from_list(conversations(data)),
                         peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {"settings": settings, "real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib(),
            "trainable_params": trainable}


def run_trl_dpo(model_dir: str, data: Path, options: list, args: argparse.Namespace) -> dict:
    """TRL DPOTrainer: its chunked fused LM head (the logits never materialised; TRL's default), Liger's layer
    kernels (`use_liger_kernel`; its fused linear cross-entropy is refused by the DPO trainer), the reference = the
    base with the adapter off (TRL's behaviour with a peft_config), 8 pairs per micro-batch padded to the longest
    (padding_free is "temporarily unavailable" in TRL 1.16 and falls back to padding), sdpa attention;
    `ckpt`: gradient checkpointing (DPOConfig's default; off otherwise)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    checkpointing = "ckpt" in options
    pairs = [json.loads(line) for line in write_pairs(data).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}],
                                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    settings = {"per_device_train_batch_size": 8, "max_length": 2048, "use_liger_kernel": on_gpu,
                "gradient_checkpointing": checkpointing, "padding_free": False, "precompute_ref_log_probs": False,
                "loss_type": "sigmoid", "beta": 0.1, "attn_implementation": "sdpa", "weights": "bf16",
                "optimizer": "adamw_torch_fused", "versions": versions("trl", "liger-kernel", "datasets"),
                "source": "huggingface.co/docs/trl dpo_trainer and reducing_memory; DPOConfig docstring "
                          "(padding_free unavailable, gradient_checkpointing=True by default)"}
    timer = clock_hf_trainers(args.warmup)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-5, logging_steps=10,
        save_strategy="no", report_to=[], bf16=on_gpu, max_length=2048, per_device_train_batch_size=8,
        use_liger_kernel=on_gpu, gradient_checkpointing=checkpointing, beta=0.1, loss_type=["sigmoid"],
        optim="adamw_torch_fused" if on_gpu else "adamw_torch", dataset_num_proc=4, dataloader_num_workers=2,
        model_init_kwargs={"dtype": torch.bfloat16, "attn_implementation": "sdpa"}, disable_tqdm=True)
    lora = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear")
    trainer = DPOTrainer(model=model_dir, args=config, train_dataset=dataset, peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {"settings": settings, "real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib(),
            "trainable_params": trainable}


@peer("unsloth")
def run_unsloth(model_dir: str, data: Path, method: str, options: list, args: argparse.Namespace) -> dict:
    """unsloth's FastLanguageModel with its documented fast path: its own Triton kernels and patched LoRA layers,
    packing (padding-free), on TRL's SFTTrainer as its notebooks do; `ckpt`: use_gradient_checkpointing="unsloth"
    (its offloaded checkpoints; off otherwise); `qlora` loads the base in 4 bits (bitsandbytes)."""
    import unsloth  # noqa: F401  (first: it patches transformers and TRL on import)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    checkpointing = "unsloth" if "ckpt" in options else False
    settings = {"load_in_4bit": method == "qlora", "use_gradient_checkpointing": checkpointing, "packing": True,
                "max_seq_length": args.row_tokens, "per_device_train_batch_size": 1, "optimizer": "adamw_torch_fused",
                "versions": versions("unsloth", "unsloth_zoo", "trl", "bitsandbytes", "xformers"),
                "source": "docs.unsloth.ai fine-tuning guide (use_gradient_checkpointing='unsloth', lora_dropout=0, "
                          "packing=True)"}
    timer = clock_hf_trainers(args.warmup)
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=args.row_tokens,
                                                         dtype=torch.bfloat16, load_in_4bit=method == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0,
                                             target_modules=LORA_TARGETS, bias="none",
                                             use_gradient_checkpointing=checkpointing)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=10,
        save_strategy="no", report_to=[], bf16=True, max_length=args.row_tokens, packing=True,
        per_device_train_batch_size=1, optim="adamw_torch_fused", dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False)  # unsloth's own checkpointing (get_peft_model) replaces the Trainer's
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config,
                         train_dataset=Dataset.from_list(conversations(data)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train()
    return {"settings": settings, "real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib(),
            "trainable_params": trainable}


@peer("llamafactory")
def run_llamafactory(model_dir: str, data: Path, method: str, options: list, args: argparse.Namespace) -> dict:
    """LLaMA-Factory's `run_exp` (what `llamafactory-cli train` calls) with its speed options: `packing`,
    `enable_liger_kernel`, attention `flash_attn: sdpa` (fa2 is not installed on the GPU machine, and without it
    `neat_packing`, the variant without cross-example attention, is not available), LoRA on `all` linear layers."""
    from llamafactory.train.tuner import run_exp

    on_gpu = torch.cuda.is_available()
    folder = Path(tempfile.mkdtemp())
    records = [json.loads(line) for line in data.read_text().splitlines()]
    (folder / "sft.json").write_text(json.dumps([{"instruction": r["question"], "input": "", "output": r["answer"]}
                                                 for r in records]))
    (folder / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "sft.json"}}))
    options_used = {
        "stage": "sft", "do_train": True, "model_name_or_path": model_dir, "dataset": "synthetic",
        "dataset_dir": str(folder), "template": "chatml", "cutoff_len": args.row_tokens, "packing": True,
        "finetuning_type": "lora" if method == "lora" else "full", "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"],
        "lora_dropout": 0.0, "lora_target": "all", "enable_liger_kernel": on_gpu, "flash_attn": "sdpa",
        "per_device_train_batch_size": 1, "gradient_checkpointing": "ckpt" in options, "bf16": on_gpu,
        "learning_rate": 1e-4, "max_steps": args.warmup + args.steps, "logging_steps": 10, "save_strategy": "no",
        "report_to": "none", "output_dir": str(folder / "out"), "overwrite_output_dir": True,
        "preprocessing_num_workers": 4, "optim": "adamw_torch_fused" if on_gpu else "adamw_torch",
        "disable_tqdm": True, **({} if on_gpu else {"use_cpu": True})}
    if "ckpt" not in options:
        options_used["disable_gradient_checkpointing"] = True
    settings = {key: options_used[key] for key in ("packing", "enable_liger_kernel", "flash_attn", "cutoff_len",
                                                   "per_device_train_batch_size", "finetuning_type")}
    settings.update(gradient_checkpointing="ckpt" in options, neat_packing=False,
                    versions=versions("llamafactory", "trl", "accelerate", "datasets", "liger-kernel"),
                    source="llamafactory.readthedocs.io arguments (packing, enable_liger_kernel, flash_attn)")
    timer = clock_hf_trainers(args.warmup)
    del options_used["gradient_checkpointing"]
    run_exp(options_used)
    return {"settings": settings, "real_tokens_per_s": timer.tokens_per_second(), "peak_mem_gib": peak_memory_gib()}


# Peers that cannot run on the GPU machine, and why (a row with this `error`, no process).
NOT_RUN = {"axolotl": (
    "not installed on the GPU machine: axolotl 0.21.0 requires torch>=2.13 (the machine has 2.11); 0.19.0, the newest "
    "that accepts torch 2.11, pins transformers==5.16.1, peft==0.20.0, accelerate==1.13.0, datasets==4.8.4, "
    "trl==1.9.0 and about 50 more packages (gradio 6.10, modal, wandb, lm_eval 0.4.11, s3fs/gcsfs/adlfs/ocifs, "
    "mistral-common, xformers, bitsandbytes, torchao, flash-linear-attention), more than the 64 MiB a call to the "
    "machine carries")}


@peer("weitiao")
def run_weitiao_peer(model_dir: str, data: Path, method: str, options: list, args: argparse.Namespace) -> dict:
    """weitiao's defaults on a GPU (packed rows on variable-length FlashAttention, Liger's fused linear + cross
    entropy and layer kernels, the LoRA update in the base product's epilogue); `compile` adds train.torch_compile,
    `ckpt` train.gradient_checkpointing, `offload` train.offload_checkpoints; `scored` / `noscored` set
    train.scored_positions on / off (default: on in eager layers, off in compiled ones); `fp32model` sets
    train.master_weights: model (full fine-tuning's fp32 weights in the model, cast by autocast); `graphs` /
    `nographs` set train.cuda_graphs on / off (default: on where it runs: eager LoRA, with or without
    checkpointing); `fa4` / `fa2` set model.varlen_kernel to flash_attn_4 / torch (default: flash_attn_4 where
    installed); `ceN` sets train.logits_chunk_budget to N."""
    kernel = "flash_attn_4" if "fa4" in options else "torch" if "fa2" in options else None
    scored = True if "scored" in options else False if "noscored" in options else None
    graphs = True if "graphs" in options else False if "nographs" in options else None
    extra = {"train.torch_compile": "compile" in options, "train.offload_checkpoints": "offload" in options,
             "train.scored_positions": scored, "train.cuda_graphs": graphs, "model.varlen_kernel": kernel}
    if "fp32model" in options:  # full fine-tuning's fp32 weights in the model (autocast), not in the optimizer
        extra["train.master_weights"] = "model"
    budget = next((int(option[2:]) for option in options if option.startswith("ce") and option[2:].isdigit()), None)
    if budget is not None:
        extra["train.logits_chunk_budget"] = budget
    if method == "dpo":  # whole pairs packed into the rows; the same LoRA, loss and reference as TRL's row
        extra.update(stage="dpo", method="lora", **{"pref.loss": "sigmoid", "pref.beta": 0.1})
        data = write_pairs(data)
    settings = {"packing_length": args.row_tokens, "torch_compile": "compile" in options,
                "gradient_checkpointing": "ckpt" in options, "offload_checkpoints": "offload" in options,
                "scored_positions": "default" if scored is None else scored,
                "cuda_graphs": "default" if graphs is None else graphs,
                "varlen_kernel": kernel or "default", "logits_chunk_budget": budget or "default",
                **({"master_weights": "model" if "fp32model" in options else "default"} if method == "full" else {}),
                "versions": versions("liger-kernel", "flash-attn-4",
                                     *(["bitsandbytes"] if method == "qlora" else [])),
                "source": "weitiao defaults (docs/config.md)"}
    measured = run_weitiao(model_dir, data, method, args.steps, args.warmup, "ckpt" in options,
                           min(2048, args.row_tokens), args.row_tokens, extra)
    return {"settings": settings, **measured}


def measure(variant: str, args: argparse.Namespace, model_dir: str, data: Path) -> dict:
    """One variant, in a process of its own; a failure becomes the row's `error`, never a lost table."""
    name, method, *rest = variant.split(":")
    options = rest[0].split(",") if rest else []
    try:
        return PEERS[name](model_dir, data, method, options, args)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory", "peak_mem_gib": peak_memory_gib()}
    except BaseException as error:  # ImportError, a peer's own exit, a compiler error: the row says which
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"[:600]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--variants", nargs="+", required=True,
                        help="peer:method[:option,...]; peers: " + ", ".join(PEERS) + "; methods: lora, qlora, full; "
                             "options: ckpt (activation checkpointing), compile, offload, scored and noscored, graphs "
                             "and nographs, fa4 and fa2, fp32model, ceN (weitiao), flex / varlen (TRL's attention)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--row-tokens", type=int, default=8192, help="tokens per packed row, for every peer")
    parser.add_argument("--tag", default="", help="results file peers-<shape>-<tag>-<device>.json (e.g. dpo)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    parser.add_argument("--site", action="append", default=[], metavar="PEER=DIR",
                        help="a package folder put first on PEER's PYTHONPATH (its own transformers/TRL versions)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "RESULT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one and args.one[0].startswith("unsloth"):
        import unsloth  # noqa: F401  (before transformers, which it patches on import)

    from weitiao.models import load_tokenizer, resolve_model

    workdir = Path(args.workdir)
    tokenizer = load_tokenizer(args.tokenizer or resolve_model("default"))
    model_dir = str(build_model_folder(args.shape, workdir / f"llama-{args.shape}", tokenizer))
    data = write_sft_data(workdir / "sft.jsonl", args.examples)
    if args.one:
        Path(args.one[1]).write_text(json.dumps(measure(args.one[0], args, model_dir, data)))
        return
    sites = dict(item.split("=", 1) for item in args.site)
    rows = []
    for variant in args.variants:
        name, method, *rest = variant.split(":")
        if name in NOT_RUN:
            rows.append({"peer": name, "variant": variant, "method": method, "options": [], "settings": {},
                         "real_tokens_per_s": 0.0, "peak_mem_gib": None, "mfu": 0.0, "error": NOT_RUN[name]})
            continue
        environment = dict(os.environ)
        if name in sites:
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [sites[name], environment.get("PYTHONPATH")]))
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", variant, result.name],
                                   env=environment)
            text = Path(result.name).read_text()
        measured = json.loads(text) if text else {"error": f"the measuring process ended with {child.returncode}"}
        tokens_per_s = measured.get("real_tokens_per_s") or 0.0
        trained = measured.get("trainable_params", None if method == "full" else 0)
        rows.append({"peer": name, "variant": variant, "method": method, "options": rest[0].split(",") if rest else [],
                     "settings": measured.get("settings", {}), "real_tokens_per_s": tokens_per_s,
                     "peak_mem_gib": measured.get("peak_mem_gib"),
                     "mfu": tokens_per_s * (flops_per_token(args.shape, trained)
                                            + (2 * linear_params(args.shape) if method == "dpo" else 0))
                     / PEAK_BF16_FLOPS,
                     **({"error": measured["error"]} if "error" in measured else {})})
        print(json.dumps(rows[-1]), flush=True)
        write_results(rows, args)  # after every row: a run stopped part-way keeps what it measured
    print_table(rows, args)


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    device = device_name()
    tag = f"-{args.tag}" if args.tag else ""
    (results / f"peers-{args.shape}{tag}-{device.split()[-1].lower()}.json").write_text(
        json.dumps({"device": device, "shape": args.shape, "steps": args.steps, "warmup": args.warmup,
                    "row_tokens": args.row_tokens, "rows": rows}, indent=2) + "\n")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Per peer row, the fastest weitiao row of the same method within that peer's memory (the target: a multiple of
    each peer's speed at no more than its memory); per weitiao row, the fastest peer."""
    print(f"\ndevice: {device_name()}  shape: {args.shape}  steps: {args.steps} after {args.warmup} warm-up")
    print(f"{'variant':<28}{'real tok/s':>12}{'peak GiB':>10}{'MFU':>8}  versus")
    for row in rows:
        memory, versus = row.get("peak_mem_gib"), ""
        same = [other for other in rows if "error" not in other and other["method"] == row["method"]
                and (other["peer"] == "weitiao") != (row["peer"] == "weitiao")]
        if row["peer"] != "weitiao" and "error" not in row:
            same = [other for other in same if other["peak_mem_gib"] <= memory]
        best = max(same, key=lambda other: other["real_tokens_per_s"], default=None)
        if best and "error" not in row:
            weitiao, peer_row = (best, row) if row["peer"] != "weitiao" else (row, best)
            versus = (f"weitiao {weitiao['real_tokens_per_s'] / peer_row['real_tokens_per_s']:.2f}x "
                      f"({weitiao['variant']} at {weitiao['peak_mem_gib']:.1f} GiB vs {peer_row['variant']})")
        shown = f"{memory:>10.1f}" if memory is not None else f"{'-':>10}"
        print(f"{row['variant']:<28}{row['real_tokens_per_s']:>12,.0f}{shown}{100 * row['mfu']:>7.1f}%  {versus}"
              + row.get("error", "")[:160])


if __name__ == "__main__":
    main()
