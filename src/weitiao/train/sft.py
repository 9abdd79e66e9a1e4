"""The training recipe, top to bottom: supervised fine-tuning (stage sft) and continued pre-training (stage pt).

One loop on accelerate, so the same code runs on a CPU, one GPU or many (DDP / DeepSpeed / FSDP).
The loss of each optimizer step is the mean over every label token of its gradient-accumulation window
on every process, so the objective does not depend on how examples are split into micro-batches.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from weitiao.config import Config, dump_config
from weitiao.data.blocks import DocumentBlockCollator
from weitiao.data.collate import PadCollator, count_label_tokens
from weitiao.data.dataset import build_datasets, format_stats
from weitiao.data.packing import PackedBatchSampler, PackedCollator
from weitiao.data.templates import install_template
from weitiao.errors import ConfigError
from weitiao.eval.loss import evaluate_loss
from weitiao.models import load_model
from weitiao.train.attention import (PACKED_VARLEN, VARLEN, has_varlen_flash_attention, packed_row_attention,
                                     packed_rows_block_mask)
from weitiao.train.distributed import engine_plugins
from weitiao.train import kernels
from weitiao.train.kernels import apply_liger, undo_liger_patches
from weitiao.train.methods import (PROMPT_LEARNING_METHODS, apply_method, check_device, parameter_counts,
                                   fuse_lora_updates, quantization_config, set_adapter_input_casting)

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    output_dir: str
    base_model: str
    steps: int
    epochs: float
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss: float | None
    seconds: float
    tokens: int
    trainable_params: int
    total_params: int
    gpu_peak_gib: float | None = None
    """Peak GPU memory allocated by the main process during the run."""
    data: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)
    """The trained model in memory (PEFT-wrapped for adapter methods)."""

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if key != "model"}


def run(config: Config, resume: bool = False, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    args = config.train
    out = Path(args.output_dir)
    _check_output_dir(out, resume, args.overwrite_output_dir)

    # 1. Engine: precision, gradient accumulation and the multi-GPU engine (DDP, DeepSpeed ZeRO, FSDP2) are
    #    accelerate's; the seeded sampler makes the data order a function of (seed, epoch), which is what lets
    #    --resume reproduce an uninterrupted run.
    on_gpu = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else (not args.fp16 and on_gpu and torch.cuda.is_bf16_supported())
    # Prompt-learning methods prepend virtual tokens to each sequence, which a packed row cannot share.
    packing = config.data.packing if config.data.packing is not None else (
        on_gpu and config.method not in PROMPT_LEARNING_METHODS)
    if packing and config.stage == "sft" and config.data.max_length > config.data.packing_length:
        raise ConfigError(f"data.max_length ({config.data.max_length}) is longer than data.packing_length "
                          f"({config.data.packing_length}): an example must fit in a packed row")
    # accelerate keeps its engine settings (compilation, precision, DeepSpeed/FSDP) in a process-wide singleton that
    # the first Accelerator fixes: a second run in the same process (a notebook, a benchmark) would silently get the
    # first one's. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if args.torch_compile:  # compiled code is cached per function: an earlier run's would count towards the
        torch._dynamo.reset()  # recompile limit and turn this run's shapes dynamic
    accelerator = Accelerator(
        cpu=not on_gpu,  # without a GPU, several processes still form a (gloo) process group
        mixed_precision="bf16" if bf16 else "fp16" if args.fp16 else "no",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Regional compilation: each decoder layer is compiled once and reused (minutes less than the whole model),
        # and the loss stays outside, so Liger's fused linear + cross-entropy keeps the logits unmaterialised.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True)
        if args.torch_compile else None,
        # A stream is not dispatched from process 0 (accelerate's default): the dispatching loader draws its seed from
        # the global RNG, so a resumed run would replay dropout differently. Each process reads the stream instead.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=on_gpu,
                                                  dispatch_batches=False if config.data.streaming else None),
        **engine_plugins(config, bf16, micro_batch_size=1 if packing else args.per_device_train_batch_size))
    is_main = accelerator.is_main_process
    if is_main and not on_gpu and args.distributed != "ddp":
        # accelerate runs DeepSpeed and FSDP on GPUs only; on a CPU its processes fall back to plain DDP over gloo.
        print(f"Note: distributed: {args.distributed} needs GPUs; on this CPU the processes run plain DDP "
              "(same results, nothing sharded)")
    check_device(config, accelerator.device)
    set_seed(args.seed)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32

    # 2. Model and tokenizer. Methods that update base weights keep fp32 master weights (mixed precision does the
    #    speed); adapters train next to a base in the model's dtype (bf16 on a GPU), or a 4-/8-bit one for qlora.
    attention = config.model.attn_implementation
    if attention == VARLEN and on_gpu and not (has_varlen_flash_attention(accelerator.device) and (bf16 or args.fp16)):
        raise ConfigError("model.attn_implementation: varlen (FlashAttention) needs torch >= 2.10, a GPU of compute "
                          "capability 8.0 or later and train.bf16 or train.fp16; use flex_attention otherwise")
    trains_base = config.method in ("full", "freeze")
    dtype = torch.float32 if trains_base and config.model.dtype == "auto" else None
    quantization = quantization_config(config)
    undo_liger_patches()  # an earlier run in this process may have patched transformers' classes
    model, tokenizer, base_path = load_model(config.model, dtype=dtype, quantization=quantization,
                                             device_map={"": accelerator.device})
    if packing and on_gpu and attention is None:
        # Packed rows need attention confined to each example (sdpa would compute the whole row's mask): variable-
        # length FlashAttention computes exactly that, flex attention skips the empty blocks of the block mask.
        attention = packed_row_attention(model.config, accelerator.device, bf16 or args.fp16, args.torch_compile)
        model.set_attn_implementation(attention)
    if packing and attention == VARLEN:  # the rows carry their boundaries: no mask, no search for them (attention.py)
        attention = PACKED_VARLEN
        model.set_attn_implementation(attention)
    stops = install_template(tokenizer, config.data)

    # 3. Data: read, check, tokenize, mask, truncate; every drop counted (main process first fills the cache).
    with accelerator.main_process_first():
        train_set, eval_set, data_stats = build_datasets(config.data, tokenizer, config.stage, args.seed)
    if is_main:
        print("Data:\n" + format_stats(data_stats))

    # 4. Kernels and method: fused kernels patch the base model, then the method decides which weights train.
    fused_cross_entropy = args.distributed not in ("zero3", "zero3_offload")
    liger = apply_liger(model, args.liger, accelerator.device, fused_cross_entropy=fused_cross_entropy,
                        layer_kernels=not args.torch_compile)
    # Passed with each training forward down to Liger's loss (older Liger versions drop what they do not know).
    loss_kwargs = {"chunk_mem_const": kernels.LOGITS_CHUNK_BUDGET} if liger and fused_cross_entropy else {}
    set_seed(args.seed)  # adapter initialisation does not depend on how much randomness data loading used
    model = apply_method(model, config)
    # Under autocast the adapters' matmuls already run in bf16/fp16; PEFT's own cast of every adapter input to the
    # fp32 adapter dtype would copy each activation twice more (a third of the GPU time of a LoRA step).
    set_adapter_input_casting(model, enabled=accelerator.mixed_precision == "no")
    # Eager layers only: inductor already fuses PEFT's scale and add into the neighbouring kernels (compiled 1B LoRA:
    # 75.8k tokens/s with PEFT's forward, 73.7k with this one); zero3 and fsdp gather B only in its own forward.
    fused = (fuse_lora_updates(model, enabled=True)
             if args.fused_lora and not args.torch_compile and args.distributed in ("ddp", "zero2") else 0)
    trainable, total = parameter_counts(model)
    if is_main:
        engine = (f"; {args.distributed} on {accelerator.num_processes} processes"
                  if accelerator.num_processes > 1 or args.distributed != "ddp" else "")
        print(f"Method: {config.method}; trainable parameters {trainable:,} of {total:,} "
              f"({100 * trainable / total:.2f}%)" + ("; Liger kernels" if liger else "")
              + (f"; LoRA update fused into {fused} layers' products" if fused else "") + engine)

    pad_collate = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if on_gpu else None)
    # The loader gets its own generator: starting an epoch's iterator then leaves the global RNG (dropout) alone,
    # which a resumed run relies on to replay the same random numbers.
    generator = torch.Generator().manual_seed(args.seed)
    packed_sampler = None
    streaming = config.data.streaming
    workers = args.dataloader_num_workers
    if workers is None:  # see TrainConfig.dataloader_num_workers
        workers = 2 if on_gpu and not streaming else 0
    # varlen reads each row's example boundaries; compiled code needs their longest fixed (see PackedCollator).
    boundaries = {"boundaries": attention in (VARLEN, PACKED_VARLEN),
                  "longest": config.data.max_length if args.torch_compile else None}
    if config.stage == "pt":
        # Blocks are full rows already; packing only decides whether attention may cross documents in a block.
        collate = DocumentBlockCollator(tokenizer.pad_token_id, config.data.max_length if on_gpu else None,
                                        **boundaries) if packing else pad_collate
        train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=not streaming,
                                  collate_fn=collate, num_workers=workers,
                                  generator=generator, pin_memory=on_gpu)
    elif packing:
        packed_sampler = PackedBatchSampler([len(ids) for ids in train_set["input_ids"]],
                                            config.data.packing_length, args.seed)
        # A fixed row length on the GPU keeps compiled flex-attention kernels from recompiling per row length.
        collate = PackedCollator(tokenizer.pad_token_id, config.data.packing_length if on_gpu else None, **boundaries)
        train_loader = DataLoader(train_set, batch_sampler=packed_sampler, collate_fn=collate,
                                  num_workers=workers, generator=generator, pin_memory=on_gpu)
        if is_main:
            print(f"Packing: {len(train_set)} examples in {len(packed_sampler)} rows of up to "
                  f"{config.data.packing_length} tokens ({100 * packed_sampler.fill:.1f}% filled)")
    else:
        train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
                                  collate_fn=pad_collate, num_workers=workers,
                                  generator=generator, pin_memory=on_gpu)
    eval_loader = (DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=pad_collate)
                   if eval_set is not None and len(eval_set) else None)

    # 5. Schedule: optimizer steps per epoch over this process's share of the batches.
    accumulation = args.gradient_accumulation_steps
    if streaming:  # the length of a stream is unknown: max_steps (required) is the schedule
        batches_per_epoch, total_steps = None, args.max_steps
    else:
        batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    if quantization is None and args.distributed == "ddp":
        # Before the optimizer, so fused AdamW sees device tensors. Quantized weights were placed at load
        # (bitsandbytes models cannot be moved); ZeRO and FSDP place and shard the model themselves.
        model.to(accelerator.device)
    optimizer = _make_optimizer(model, config)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    # Not prepared (accelerate would step it once per process); still saved and restored with checkpoints.
    accelerator.register_for_checkpointing(scheduler)
    _keep_only_trainable_weights_in_checkpoints(accelerator)

    # 6. Resume: restore weights, optimizer, scheduler and RNG states, then skip the batches already seen.
    state = {"global_step": 0, "epoch": 0, "batches_done_in_epoch": 0, "tokens": 0, "eval_loss_before": None}
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS} (set train.save_steps to write them)")
        accelerator.load_state(str(checkpoint), strict=False)
        state.update(json.loads((checkpoint / "trainer_state.json").read_text()))
        if is_main:
            _truncate_log(out / "metrics.jsonl", state["global_step"])  # those steps run again
            print(f"Resuming from {checkpoint} (step {state['global_step']} of {total_steps})")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        (out / "data_stats.json").write_text(json.dumps(data_stats, indent=2, ensure_ascii=False), encoding="utf-8")
    metrics_file = out / "metrics.jsonl"
    # Stage pt: nats per token -> bits per character of the held-out text, which compares tokenizers.
    eval_characters = ((data_stats.get("eval") or {}).get("characters") or 0)
    eval_tokens = 0  # tokens the eval loss is the mean over (the same at every evaluation)

    def bits_per_char(loss: float) -> float:
        return loss * eval_tokens / math.log(2) / eval_characters

    def epochs_done() -> float:
        fraction = state["batches_done_in_epoch"] / batches_per_epoch if batches_per_epoch else 0.0
        return round(state["epoch"] + fraction, 3)

    def log(record: dict[str, Any]) -> None:
        if not is_main:
            return
        with metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if on_log:
            on_log(record)

    def evaluate(step: int) -> float | None:
        nonlocal eval_tokens
        if eval_loader is None:
            return None
        # Compiled layers would recompile for every padded eval shape: evaluation runs the same weights uncompiled.
        plain = accelerator.unwrap_model(model, keep_torch_compile=False)
        with padded_batch_attention(plain):
            result = evaluate_loss(plain if args.torch_compile else model, eval_loader, accelerator)
        eval_tokens = result["tokens"]
        record = {"step": step, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
                  "eval_tokens": result["tokens"]}
        if eval_characters:
            record["eval_bits_per_char"] = bits_per_char(result["loss"])
        log(record)
        return result["loss"]

    if state["global_step"] == 0 and eval_loader is not None and args.eval_on_start:
        state["eval_loss_before"] = evaluate(0)
        if is_main:
            print(f"eval loss before training: {state['eval_loss_before']:.4f}")

    # 7. The loop. Nothing in a step waits for the GPU (losses and counts stay on the device until a log line),
    #    so the host queues the next step while the GPU still works on this one.
    model.train()
    progress = tqdm(total=total_steps, initial=state["global_step"], desc="training", disable=not is_main,
                    dynamic_ncols=True)
    started = time.time()
    interval = {"loss": torch.zeros((), device=accelerator.device), "steps": 0, "tokens": 0, "start": time.time()}
    block_masks = packing and attention == "flex_attention"  # built here: see attention.packed_rows_block_mask
    last_train_loss, grad_norm = None, None

    def flush_log(step: int) -> None:
        """Sum the interval's losses and tokens over processes (one sync) and write a log line."""
        nonlocal last_train_loss
        loss_sum, tokens = accelerator.reduce(torch.stack(
            [interval["loss"], torch.tensor(float(interval["tokens"]), device=accelerator.device)]), "sum").tolist()
        state["tokens"] += int(tokens)
        last_train_loss = loss_sum / interval["steps"]
        elapsed = time.time() - interval["start"]
        record = {"step": step, "epoch": epochs_done(), "loss": last_train_loss,
                  "learning_rate": scheduler.get_last_lr()[0],
                  "tokens": state["tokens"], "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if on_gpu:  # this process's peak so far (ranks of a sharded engine hold about the same)
            record["gpu_peak_gib"] = _gpu_peak_gib(accelerator.device)
        log(record)
        progress.set_postfix(loss=f"{last_train_loss:.4f}", lr=f"{record['learning_rate']:.2e}")
        interval.update(loss=torch.zeros((), device=accelerator.device), steps=0, tokens=0, start=time.time())

    while state["global_step"] < total_steps:
        train_loader.set_epoch(state["epoch"])
        if packed_sampler is not None:
            packed_sampler.set_epoch(state["epoch"])
        skip = state["batches_done_in_epoch"]
        batches = iter(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader)
        while state["global_step"] < total_steps:
            window = list(islice(batches, accumulation))
            if not window:
                break
            interval["tokens"] += sum(batch.pop("num_tokens") for batch in window)
            # Loss normaliser: label tokens in this window on all processes.
            window_tokens = accelerator.reduce(sum(count_label_tokens(b["labels"]) for b in window), "sum")
            scale = accumulation * accelerator.num_processes  # undoes accelerate's /accumulation and DDP's mean
            for batch in window:
                if block_masks:
                    batch["attention_mask"] = packed_rows_block_mask(batch["position_ids"])
                with accelerator.accumulate(model):
                    loss = model(**batch, use_cache=False, num_items_in_batch=window_tokens, **loss_kwargs).loss
                    accelerator.backward(loss * scale)
                    interval["loss"] += loss.detach()
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["global_step"] += 1
            state["batches_done_in_epoch"] += len(window)
            interval["steps"] += 1
            progress.update(1)
            step = state["global_step"]
            saving = args.save_steps and step % args.save_steps == 0 and step != total_steps
            if step % args.logging_steps == 0 or step == total_steps or saving:
                flush_log(step)  # before a checkpoint too, so its state counts every token seen
            if args.eval_steps and step % args.eval_steps == 0 and step != total_steps:
                evaluate(step)
            if saving:
                _save_checkpoint(accelerator, out, state, args.save_total_limit)
        if state["global_step"] < total_steps:
            state["epoch"] += 1
            state["batches_done_in_epoch"] = 0
    progress.close()
    seconds = time.time() - started

    # 8. Final evaluation and the artefacts other tools load.
    eval_loss = evaluate(state["global_step"])
    accelerator.wait_for_everyone()
    fuse_lora_updates(model, enabled=False)  # the saved and returned model runs PEFT's own code
    if attention == PACKED_VARLEN:  # and meets padded batches
        accelerator.unwrap_model(model, keep_torch_compile=False).set_attn_implementation(VARLEN)
    _save_final(accelerator, model, tokenizer, out, stops)
    set_adapter_input_casting(model, enabled=True)  # the returned model also works outside autocast
    result = TrainResult(
        output_dir=str(out), base_model=base_path, steps=state["global_step"], epochs=epochs_done(),
        train_loss=last_train_loss, eval_loss_before=state["eval_loss_before"], eval_loss=eval_loss,
        seconds=round(seconds, 1), tokens=state["tokens"], trainable_params=trainable, total_params=total,
        gpu_peak_gib=_gpu_peak_gib(accelerator.device) if on_gpu else None,
        data={"train_examples": None if streaming else len(train_set),
              "eval_examples": len(eval_set) if eval_set is not None else 0},
        model=accelerator.unwrap_model(model, keep_torch_compile=False))
    if is_main:
        (out / "train_result.json").write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
        print(f"Saved to {out} ({result.steps} steps, {result.seconds:.0f} s, {result.tokens:,} tokens at "
              f"{result.tokens / max(seconds, 1e-9):.0f} tokens/s"
              + (f", peak GPU memory {result.gpu_peak_gib:.1f} GiB" if result.gpu_peak_gib is not None else "")
              + (f", eval loss {result.eval_loss_before:.4f} -> {result.eval_loss:.4f}" if eval_loss is not None
                 and result.eval_loss_before is not None else "") + ")")
        if eval_characters and eval_loss is not None and result.eval_loss_before is not None:
            before, after = result.eval_loss_before, eval_loss
            print(f"Held-out text: perplexity {math.exp(min(before, 50)):.2f} -> {math.exp(min(after, 50)):.2f}, "
                  f"bits per character {bits_per_char(before):.3f} -> {bits_per_char(after):.3f}")
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume or not out.exists():
        return
    finished = (out / "adapter_config.json").exists() or (out / "config.json").exists()
    if overwrite:
        for name in ("metrics.jsonl", CHECKPOINTS):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return
    if (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        raise ConfigError(f"{out} holds checkpoints of an unfinished run: pass --resume to continue it, or "
                          "--overwrite_output_dir true to start again")
    if finished:
        raise ConfigError(f"{out} already holds a trained model: choose another train.output_dir, or pass "
                          "--overwrite_output_dir true")


def _make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    args = config.train
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # Biases and norm weights are not decayed (as in transformers' Trainer). A weight that DeepSpeed ZeRO-3
            # built partitioned is an empty local tensor; ds_shape is its real shape.
            shape = getattr(parameter, "ds_shape", parameter.shape)
            (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(parameter)
    # Empty groups are left out: ZeRO drops them, and the LR scheduler must see the same groups as the engine.
    groups = [group for group in ({"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if group["params"]]
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=0.9)
    if args.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=args.learning_rate, scale_parameter=False, relative_step=False)
    if args.optim in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.PagedAdamW8bit if args.optim.startswith("paged") else bnb.optim.AdamW8bit
        return optimizer_class(groups, **adam)
    # Fused AdamW for weights on the GPU; ZeRO-3 offload steps the optimizer on CPU copies instead.
    on_cuda = all(p.is_cuda for group in groups for p in group["params"]) and args.distributed != "zero3_offload"
    return torch.optim.AdamW(groups, fused=on_cuda or None, **adam)


# The attention that padded batches (evaluation, the returned model) get instead of the one for packed training rows.
# Inductor's flex kernels found no configuration for some padded shapes (8 rows of 96 tokens, 64-dimension heads,
# H200); PACKED_VARLEN has no mask for padding at all.
PADDED_BATCH_ATTENTION = {"flex_attention": "sdpa", PACKED_VARLEN: VARLEN}


@contextmanager
def padded_batch_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` on padded batches inside the block, with the attention for packed rows back afterwards."""
    packed = getattr(model.config, "_attn_implementation", None)
    if packed not in PADDED_BATCH_ATTENTION:
        yield
        return
    model.set_attn_implementation(PADDED_BATCH_ATTENTION[packed])
    try:
        yield
    finally:
        model.set_attn_implementation(packed)


def _keep_only_trainable_weights_in_checkpoints(accelerator) -> None:
    """Checkpoints of an adapter run hold the adapter, not another copy of the frozen base model."""

    def hook(models, weights, _output_dir):
        for index, (model, state) in enumerate(zip(models, weights)):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[index] = {name: tensor for name, tensor in state.items() if name in trainable}

    accelerator.register_save_state_pre_hook(hook)


def _gpu_peak_gib(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _truncate_log(path: Path, last_step: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(accelerator, out: Path, state: dict[str, Any], limit: int) -> None:
    target = out / CHECKPOINTS / f"step-{state['global_step']}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / "trainer_state.json").write_text(json.dumps(state, indent=2))
        older = sorted((p for p in (out / CHECKPOINTS).glob("step-*") if p != target),
                       key=lambda p: int(p.name.split("-")[1]))
        for stale in older[: max(0, len(older) - (limit - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_final(accelerator, model, tokenizer, out: Path, stops: list[str]) -> None:
    """A PEFT adapter folder or a full model folder, plus tokenizer (with the chat template trained on) and a
    generation config whose EOS list includes the template's end-of-turn token."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3 / FSDP: every process calls it
    if not accelerator.is_main_process:
        return
    # Regionally compiled layers name their weights "layers.0._orig_mod.…"; saved files keep the model's own names.
    state_dict = {name.replace("_orig_mod.", ""): weight for name, weight in state_dict.items()}
    unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    generation = copy.deepcopy(getattr(unwrapped, "generation_config", None))
    if generation is not None:
        eos = generation.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        vocab = tokenizer.get_vocab()
        for token in [tokenizer.eos_token] + stops:
            if token in vocab and vocab[token] not in eos_ids:
                eos_ids.append(vocab[token])
        generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
