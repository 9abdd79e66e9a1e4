"""The training core every stage recipe shares: the pieces a recipe sets up in order (engine, model, method, optimizer)
and the loop (`Trainer`): gradient accumulation, logging, evaluation, checkpoints, exact resume, progress and the
saved result.

One loop on accelerate, so the same code runs on a CPU, one GPU or many (DDP / DeepSpeed / FSDP). The loss of each
optimizer step is the mean over every label token of its gradient-accumulation window on every process, so the
objective does not depend on how examples are split into micro-batches. The data order is a function of (seed,
epoch) and every random state is checkpointed, so --resume reproduces an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from weitiao.config import Config, ModelConfig
from weitiao.data.collate import count_label_tokens
from weitiao.eval.loss import evaluate_loss
from weitiao.models import load_model
from weitiao.runs import RunFolder
from weitiao.train import kernels
from weitiao.train.attention import (PACKED_VARLEN, TORCH_FLASH, VARLEN, packed_rows_block_mask,
                                     register_varlen_attention)
from weitiao.train.checkpoint_graphs import CheckpointGraphs
from weitiao.train.cuda_graphs import LayerGraphs
from weitiao.train.distributed import engine_plugins
from weitiao.train.fused_lora import fuse_lora_updates, watch_optimizer
from weitiao.train.master_weights import MasterWeights
from weitiao.train.methods import (apply_method, decoder_layers, parameter_counts, quantization_config,
                                   set_adapter_input_casting)
from weitiao.train.neftune import add_noisy_embeddings
from weitiao.train.offload import uncompile_layers
from weitiao.train.settings import PADDED_BATCH_ATTENTION, Settings
from weitiao.train.tracking import start_trackers

LogHook = Callable[[dict[str, Any]], None]


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


@dataclass
class Loaders:
    """What a stage recipe hands the loop: its batches, and how long an epoch is."""
    train: DataLoader
    eval: DataLoader | None
    train_examples: int | None
    """None for a stream, whose length is unknown (train.max_steps is then the schedule)."""
    eval_examples: int
    packed_sampler: Any = None
    """A sampler that needs set_epoch (packed rows), beside the loader's own."""


@dataclass
class LoopState:
    """The loop's counters; saved in every checkpoint (trainer_state.json) and restored on resume."""
    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    tokens: int = 0
    eval_loss_before: float | None = None


# ---------------------------------------------------------------------------------------------
# Set-up pieces, in the order a recipe calls them.


def make_accelerator(config: Config, settings: Settings, run: RunFolder):
    """The engine: precision, gradient accumulation, the multi-GPU engine (DDP, DeepSpeed ZeRO, FSDP2), compiled
    layers and trackers are accelerate's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin

    args, on_gpu = config.train, settings.on_gpu
    # accelerate keeps its engine settings (compilation, precision, DeepSpeed/FSDP) in a process-wide singleton that
    # the first Accelerator fixes: a second run in the same process (a notebook, a benchmark) would silently get the
    # first one's. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if settings.torch_compile:  # compiled code is cached per function: an earlier run's would count towards the
        torch._dynamo.reset()  # recompile limit and turn this run's shapes dynamic
    return Accelerator(
        cpu=not on_gpu,  # without a GPU, several processes still form a (gloo) process group
        mixed_precision={"fp32": "no"}.get(settings.precision, settings.precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Regional compilation: each decoder layer is compiled once and reused (minutes less than the whole model),
        # and the loss stays outside, so Liger's fused linear + cross-entropy keeps the logits unmaterialised. With
        # offloaded checkpoints the layers compile their own forward instead (weitiao.train.offload).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True)
        if settings.torch_compile and not settings.offload_checkpoints else None,
        # A stream is not dispatched from process 0 (accelerate's default): the dispatching loader draws its seed from
        # the global RNG, so a resumed run would replay dropout differently. Each process reads the stream instead.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=on_gpu,
                                                  dispatch_batches=False if config.data.streaming else None),
        log_with=args.report_to or None, project_dir=str(run.path / RunFolder.TRACKER_LOGS),
        **engine_plugins(config, settings.precision == "bf16",
                         micro_batch_size=1 if settings.packing else args.per_device_train_batch_size))


def load_model_for_training(config: Config, settings: Settings, accelerator) -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved base path). Methods that update base weights keep fp32 master weights: in the
    optimizer beside a bf16 model, or in the model (settings.master_weights); adapters train next to a base in the
    model's dtype (bf16 on a GPU), or a 4-/8-bit one for qlora."""
    kernels.undo_liger_patches()  # an earlier run in this process may have patched transformers' classes
    loaded_with = VARLEN if settings.attention == PACKED_VARLEN else settings.attention
    model, tokenizer, base_path = load_model(
        ModelConfig(**{**config.model.model_dump(), "attn_implementation": loaded_with}),
        dtype=getattr(torch, settings.weights_dtype), quantization=quantization_config(config),
        device_map={"": accelerator.device}, reward_head=config.stage == "rm")
    if settings.attention != loaded_with:
        register_varlen_attention(settings.varlen_kernel or TORCH_FLASH)
        model.set_attn_implementation(settings.attention)
    return model, tokenizer, base_path


def apply_method_and_kernels(model, config: Config, settings: Settings, seed: int) -> tuple[Any, int]:
    """Fused kernels patch the base model, then the method decides which weights train. Returns the model and
    how many LoRA layers take the fused update."""
    from accelerate.utils import set_seed

    if settings.liger:
        kernels.apply_liger(model, settings.fused_cross_entropy, settings.liger_layer_kernels)
    set_seed(seed)  # adapter initialisation does not depend on how much randomness data loading used
    model = apply_method(model, config, settings.offload_checkpoints)
    # Under autocast the adapters' matmuls already run in bf16/fp16; PEFT's own cast of every adapter input to the
    # fp32 adapter dtype would copy each activation twice more (a third of the GPU time of a LoRA step).
    set_adapter_input_casting(model, enabled=settings.precision == "fp32")
    if config.train.neftune_noise_alpha is not None:
        add_noisy_embeddings(model, config.train.neftune_noise_alpha)
    return model, fuse_lora_updates(model, enabled=True) if settings.fused_lora else 0


def make_optimizer(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], config: Config,
                   fused_masters: MasterWeights | None = None) -> torch.optim.Optimizer:
    """The optimizer of `named_parameters` (a model's, or its fp32 master weights'); those not trained are skipped.
    `fused_masters`: the master weights named, for AdamW in one Triton kernel that writes their bf16 weights too
    (settings.fused_master_step)."""
    args = config.train
    ratio = config.lora.loraplus_lr_ratio  # LoRA+: the B matrices learn `ratio` times faster
    # (decayed, a LoRA+ B matrix) -> parameters; the groups keep this order (plain runs: decayed, then not)
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (True, False): [], (False, False): [], (True, True): [], (False, True): []}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            # Biases and norm weights are not decayed (as in transformers' Trainer). A weight that DeepSpeed ZeRO-3
            # built partitioned is an empty local tensor; ds_shape is its real shape.
            shape = getattr(parameter, "ds_shape", parameter.shape)
            decayed = len(shape) >= 2 and "norm" not in name.lower()
            lora_b = ratio is not None and ("lora_B" in name or "lora_embedding_B" in name)
            buckets[decayed, lora_b].append(parameter)
    # Empty groups are left out: ZeRO drops them, and the LR scheduler must see the same groups as the engine.
    groups = [{"params": params, "weight_decay": args.weight_decay if decayed else 0.0,
               **({"lr": args.learning_rate * ratio} if lora_b else {})}
              for (decayed, lora_b), params in buckets.items() if params]
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
    if fused_masters is not None:
        from weitiao.train.master_adamw import MasterAdamW  # Triton: CUDA machines only

        return MasterAdamW(groups, fused_masters, **adam)
    # Fused AdamW for weights on the GPU; ZeRO-3 offload steps the optimizer on CPU copies instead.
    on_cuda = all(p.is_cuda for group in groups for p in group["params"]) and args.distributed != "zero3_offload"
    return torch.optim.AdamW(groups, fused=on_cuda or None, **adam)


def clipping_in_the_step(optimizer, settings: Settings) -> torch.Tensor | None:
    """A clipping factor that `optimizer`'s own step divides the gradients by, or None where it cannot. torch's fused
    Adam and AdamW (and MasterAdamW) read a `grad_scale` attribute (the protocol torch's GradScaler uses) inside
    their kernel, which saves clipping's own pass over every gradient (1B full fine-tuning: 3.6 ms of a 134 ms H100
    step). Not under a sharded engine (DeepSpeed and FSDP clip their own shards) or with fp16's loss scaler (it sets
    grad_scale itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    fused = (getattr(inner, "divides_by_grad_scale", False)  # weitiao.train.master_adamw's
             or (isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
                 and all(group.get("fused") for group in inner.param_groups)))
    if not (fused and settings.distributed == "ddp" and settings.precision != "fp16"):
        return None
    device = inner.param_groups[0]["params"][0].device
    inner.grad_scale = torch.ones((), device=device)
    return inner.grad_scale


def set_clipping_factor(factor: torch.Tensor, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Write into `factor` what the gradients of `parameters` are to be divided by to clip their total norm to
    `max_norm` (as torch's clip_grad_norm_, which multiplies by max_norm / (norm + 1e-6) where that is below 1);
    returns the norm. No host sync."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    # Each tensor's norm in fp32: get_total_norm rounds those of bf16 gradients (MasterAdamW reads them) to bf16.
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gradients, 2.0, dtype=torch.float32)))
    torch.clamp((norm + 1e-6) / max_norm, min=1.0, out=factor)
    return norm


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


# ---------------------------------------------------------------------------------------------
# What a step minimises.


class Objective(Protocol):
    """A stage's loss: the loop averages it over `window_size` (summed over processes) per optimizer step."""

    def window_size(self, window: list[dict[str, Any]]) -> torch.Tensor:
        """What this process's micro-batches of a step hold that the loss is a mean over (tokens, pairs)."""

    def __call__(self, model, batch: dict[str, Any], window_size: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the step's mean loss, and its shares of other numbers to log."""

    def evaluate(self, model, loader: DataLoader, accelerator) -> dict[str, float]:
        """Held-out metrics, `loss` among them."""


class TokenLoss:
    """The model's own loss: cross-entropy averaged over every label token of the step (sft, pt)."""

    def __init__(self, settings: Settings):
        # Passed with each training forward down to Liger's loss (older Liger versions drop what they do not know).
        self.loss_kwargs = ({"chunk_mem_const": settings.logits_chunk_budget} if settings.fused_cross_entropy
                            else {})

    def window_size(self, window: list[dict[str, Any]]) -> torch.Tensor:
        return sum(count_label_tokens(batch["labels"]) for batch in window)

    def __call__(self, model, batch: dict[str, Any], window_size: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "shift_labels" in batch:  # the row's scored positions and their labels (PackedCollator): no shift again
            batch = {**batch, "labels": None}
        return model(**batch, use_cache=False, num_items_in_batch=window_size, **self.loss_kwargs).loss, {}

    def evaluate(self, model, loader: DataLoader, accelerator) -> dict[str, float]:
        result = evaluate_loss(model, loader, accelerator)
        return {"loss": result["loss"], "perplexity": result["perplexity"], "tokens": result["tokens"]}


# ---------------------------------------------------------------------------------------------
# The loop.


class Trainer:
    """Trains a prepared model on a recipe's loaders and writes the run folder. `objective` is what a step
    minimises and what evaluation measures (the model's own token loss unless a stage brings its own, e.g. a
    preference loss); `eval_extras` lets a stage add metrics to each evaluation (stage pt: bits per character)."""

    def __init__(self, config: Config, settings: Settings, accelerator, run: RunFolder, model, tokenizer,
                 loaders: Loaders, on_log: LogHook | None = None,
                 eval_extras: Callable[[dict[str, float]], dict[str, float]] | None = None,
                 objective: Objective | None = None):
        self.config, self.args, self.settings, self.accelerator, self.run = (
            config, config.train, settings, accelerator, run)
        self.objective = objective or TokenLoss(settings)
        self.tokenizer, self.loaders, self.on_log, self.eval_extras = tokenizer, loaders, on_log, eval_extras
        self.is_main = accelerator.is_main_process
        self.state = LoopState()
        self.trainable, self.total = parameter_counts(model)
        self.steps_total, self.batches_per_epoch = self._schedule()
        self.model, self.optimizer, self.scheduler, self.eval_loader = self._prepare(model)
        # Listed once: walking a PEFT model's modules for them took ~1 ms of host time per step, time a GPU waits.
        # All of them, not only the trained ones: accelerate recognises an FSDP model's clipping by the full list.
        # With master weights in the optimizer the gradients are theirs.
        self.clipped_parameters = (self.master_weights.gradient_holders if self.master_weights is not None
                                   else list(self.model.parameters()))
        self.block_masks = settings.packing and settings.attention == "flex_attention"  # see packed_rows_block_mask
        self.last_train_loss: float | None = None
        self.grad_norm: torch.Tensor | None = None
        self.clipping_factor = clipping_in_the_step(self.optimizer, settings) if self.args.max_grad_norm > 0 else None
        self.layer_graphs: LayerGraphs | CheckpointGraphs | None = None
        if settings.cuda_graphs:
            layers = decoder_layers(accelerator.unwrap_model(self.model))[1]
            self.layer_graphs = (CheckpointGraphs(layers, keep_attention=settings.checkpoint_keeps_attention)
                                 if self.args.gradient_checkpointing else LayerGraphs(layers))
        # A layer replayed by LayerGraphs returns its weights' gradients in its graph's buffers, which the first
        # backward pass after zero_grad(set_to_none) takes as the weights' .grad, and the next replay overwrites: a
        # window of several micro-batches would sum the last one's twice. Gradients that stay allocated are added to
        # instead. CheckpointGraphs adds each layer's gradients itself, in one multi-tensor add where they exist.
        self.gradients_kept = settings.cuda_graphs and (self.args.gradient_checkpointing
                                                        or self.args.gradient_accumulation_steps > 1)
        if self.gradients_kept:
            for parameter in self.clipped_parameters:
                if parameter.requires_grad:
                    parameter.grad = torch.zeros_like(parameter)

    def _schedule(self) -> tuple[int, int | None]:
        """Optimizer steps in all, and batches per epoch on this process (None for a stream)."""
        args = self.args
        if self.loaders.train_examples is None:  # the length of a stream is unknown: max_steps is the schedule
            return args.max_steps, None
        batches = math.ceil(len(self.loaders.train) / self.accelerator.num_processes)
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        return (args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)), batches

    def _prepare(self, model):
        from transformers import get_scheduler

        args, accelerator = self.args, self.accelerator
        if quantization_config(self.config) is None and self.settings.distributed == "ddp":
            # Before the optimizer, so fused AdamW sees device tensors. Quantized weights were placed at load
            # (bitsandbytes models cannot be moved); ZeRO and FSDP place and shard the model themselves.
            model.to(accelerator.device)
        # The optimizer updates the fp32 master weights where the model holds bf16 ones (weitiao.train.master_weights).
        # On a GPU one kernel steps them and writes the bf16 weights; with one backward pass per step it reads the
        # bf16 gradients on the model (weitiao.train.master_adamw).
        fused_step = self.settings.fused_master_step
        masters = self.master_weights = MasterWeights(
            model, fp32_gradients=not fused_step or args.gradient_accumulation_steps > 1,
        ) if self.settings.master_weights == "optimizer" else None
        optimizer = make_optimizer(model.named_parameters() if masters is None else masters.named_parameters(),
                                   self.config, masters if fused_step else None)
        watch_optimizer(model, optimizer)  # fused LoRA layers rewrite their bf16 adapter copies after each step
        if masters is not None and not fused_step:
            masters.watch(optimizer)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.steps_total)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.steps_total)
        model, optimizer, self.loaders.train = accelerator.prepare(model, optimizer, self.loaders.train)
        eval_loader = accelerator.prepare(self.loaders.eval) if self.loaders.eval is not None else None
        # Not prepared (accelerate would step it once per process); still saved and restored with checkpoints.
        accelerator.register_for_checkpointing(scheduler)
        if masters is not None:  # the checkpoint's model weights are bf16: a resumed run needs the fp32 ones
            accelerator.register_for_checkpointing(masters)
        accelerator.register_save_state_pre_hook(_only_trainable_weights)
        return model, optimizer, scheduler, eval_loader

    # -- the run, start to end --------------------------------------------------------------------

    def fit(self, resume: bool, base_model: str, stops: list[str]) -> TrainResult:
        if resume:
            self._resume()
        if self.is_main:
            start_trackers(self.accelerator, self.config, self.run)
        if self.state.global_step == 0 and self.eval_loader is not None and self.args.eval_on_start:
            self.state.eval_loss_before = self.evaluate(0)
            if self.is_main:
                print(f"eval loss before training: {self.state.eval_loss_before:.4f}")
        started = time.time()
        self._loop()
        seconds = time.time() - started
        eval_loss = self.evaluate(self.state.global_step)
        result = self._finish(base_model, stops, seconds, eval_loss)
        self.accelerator.end_training()
        return result

    def _resume(self) -> None:
        """Restore weights, optimizer, scheduler and RNG states; the loop then skips the batches already seen."""
        checkpoint = self.run.latest_checkpoint()
        self.accelerator.load_state(str(checkpoint), strict=False)
        self.state = LoopState(**self.run.trainer_state(checkpoint))
        if self.is_main:
            self.run.truncate_metrics(self.state.global_step)  # those steps run again
            print(f"Resuming from {checkpoint} (step {self.state.global_step} of {self.steps_total})")

    def _loop(self) -> None:
        """Nothing in a step waits for the GPU (losses and counts stay on the device until a log line), so the
        host queues the next step while the GPU still works on this one."""
        from tqdm.auto import tqdm

        self.model.train()
        self.progress = tqdm(total=self.steps_total, initial=self.state.global_step, desc="training",
                             disable=not self.is_main, dynamic_ncols=True)
        self.interval = _Interval(self.accelerator.device)
        while self.state.global_step < self.steps_total:
            self.loaders.train.set_epoch(self.state.epoch)
            if self.loaders.packed_sampler is not None:
                self.loaders.packed_sampler.set_epoch(self.state.epoch)
            skip = self.state.batches_done_in_epoch
            batches = iter(self.accelerator.skip_first_batches(self.loaders.train, skip) if skip
                           else self.loaders.train)
            while self.state.global_step < self.steps_total:
                window = list(islice(batches, self.args.gradient_accumulation_steps))
                if not window:
                    break
                self._step(window)
                self._after_step()
            if self.state.global_step < self.steps_total:
                self.state.epoch += 1
                self.state.batches_done_in_epoch = 0
        self.progress.close()

    def _step(self, window: list[dict[str, Any]]) -> None:
        """One optimizer step over a gradient-accumulation window of micro-batches."""
        accelerator = self.accelerator
        self.interval.tokens += sum(batch.pop("num_tokens") for batch in window)
        # Loss normaliser: what the objective averages over (label tokens, pairs) in this window on all processes.
        window_size = accelerator.reduce(self.objective.window_size(window), "sum")
        scale = self.args.gradient_accumulation_steps * accelerator.num_processes  # undoes accelerate's and DDP's mean
        for batch in window:
            if self.block_masks:
                batch["attention_mask"] = packed_rows_block_mask(batch["position_ids"])
            with accelerator.accumulate(self.model):
                loss, stats = self.objective(self.model, batch, window_size)
                accelerator.backward(loss * scale)
                self.interval.add(loss, stats)
                if accelerator.sync_gradients and self.args.max_grad_norm > 0:
                    self.grad_norm = self._clip_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=not self.gradients_kept)
        self.scheduler.step()
        self.state.global_step += 1
        self.state.batches_done_in_epoch += len(window)
        self.interval.steps += 1
        self.progress.update(1)

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm, and the gradients scaled to at most max_grad_norm: by the optimizer's own step
        where it takes a clipping factor (clipping_in_the_step), else by accelerate."""
        if self.clipping_factor is None:
            return self.accelerator.clip_grad_norm_(self.clipped_parameters, self.args.max_grad_norm)
        return set_clipping_factor(self.clipping_factor, self.clipped_parameters, self.args.max_grad_norm)

    def _after_step(self) -> None:
        """Log, evaluate and checkpoint on their schedules."""
        step, args = self.state.global_step, self.args
        saving = args.save_steps and step % args.save_steps == 0 and step != self.steps_total
        if step % args.logging_steps == 0 or step == self.steps_total or saving:
            self._log_interval(step)  # before a checkpoint too, so its state counts every token seen
        if args.eval_steps and step % args.eval_steps == 0 and step != self.steps_total:
            self.evaluate(step)
        if saving:
            self._save_checkpoint()

    # -- logging, evaluation, checkpoints -----------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, the trackers' point and the caller's hook (main process only)."""
        if not self.is_main:
            return
        self.run.append_metrics(record)
        if self.args.report_to:
            self.accelerator.log({key: value for key, value in record.items()
                                  if key != "step" and isinstance(value, (int, float))}, step=record["step"])
        if self.on_log:
            self.on_log(record)

    def _log_interval(self, step: int) -> None:
        """Sum the interval's losses and tokens over processes (one sync) and write a log line."""
        loss_sum, tokens, steps, elapsed, extras = self.interval.flush(self.accelerator)
        self.state.tokens += int(tokens)
        self.last_train_loss = loss_sum / steps
        record = {"step": step, "epoch": self.epochs_done(), "loss": self.last_train_loss,
                  **{name: total / steps for name, total in extras.items()},
                  "learning_rate": self.scheduler.get_last_lr()[0],
                  "tokens": self.state.tokens, "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        if self.settings.on_gpu:  # this process's peak so far (ranks of a sharded engine hold about the same)
            record["gpu_peak_gib"] = _gpu_peak_gib(self.accelerator.device)
        self.log(record)
        self.progress.set_postfix(loss=f"{self.last_train_loss:.4f}", lr=f"{record['learning_rate']:.2e}")

    def evaluate(self, step: int) -> float | None:
        if self.eval_loader is None:
            return None
        # Compiled layers would recompile for every padded eval shape: evaluation runs the same weights uncompiled.
        plain = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        with padded_batch_attention(plain), torch.compiler.set_stance(
                "force_eager" if self.settings.torch_compile else "default"):
            result = self.objective.evaluate(plain if self.settings.torch_compile else self.model, self.eval_loader,
                                             self.accelerator)
        record = {"step": step, **{f"eval_{name}": value for name, value in result.items()},
                  **(self.eval_extras(result) if self.eval_extras else {})}
        self.log(record)
        return result["loss"]

    def epochs_done(self) -> float:
        fraction = self.state.batches_done_in_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0
        return round(self.state.epoch + fraction, 3)

    def _save_checkpoint(self) -> None:
        target = self.run.checkpoint(self.state.global_step)
        self.accelerator.save_state(str(target))
        if self.is_main:
            self.run.write_trainer_state(target, asdict(self.state), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, base_model: str, stops: list[str], seconds: float, eval_loss: float | None) -> TrainResult:
        """Save what other tools load (a PEFT adapter or a full model, the tokenizer, the generation config) and
        the run's summary; return the trained model, on PEFT's own code and the attention for padded batches."""
        accelerator, on_gpu = self.accelerator, self.settings.on_gpu
        accelerator.wait_for_everyone()
        if self.layer_graphs is not None:
            self.layer_graphs.remove()
        fuse_lora_updates(self.model, enabled=False)
        unwrapped = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.settings.torch_compile and self.settings.offload_checkpoints:  # layers compiled in place (offload.py)
            uncompile_layers(decoder_layers(unwrapped)[1])
        if self.settings.attention == PACKED_VARLEN:
            unwrapped.set_attn_implementation(VARLEN)  # it meets padded batches from now on
        state_dict = accelerator.get_state_dict(self.model)  # collective under ZeRO-3 / FSDP: every process calls it
        if self.is_main:
            # Regionally compiled layers name their weights "layers.0._orig_mod.…"; saved files keep the model's own.
            state_dict = {name.replace("_orig_mod.", ""): weight for name, weight in state_dict.items()}
            self.run.save_trained(unwrapped, state_dict, self.tokenizer, stops)
        set_adapter_input_casting(self.model, enabled=True)  # the returned model also works outside autocast
        result = TrainResult(
            output_dir=str(self.run.path), base_model=base_model, steps=self.state.global_step,
            epochs=self.epochs_done(), train_loss=self.last_train_loss, eval_loss_before=self.state.eval_loss_before,
            eval_loss=eval_loss, seconds=round(seconds, 1), tokens=self.state.tokens,
            trainable_params=self.trainable, total_params=self.total,
            gpu_peak_gib=_gpu_peak_gib(accelerator.device) if on_gpu else None,
            data={"train_examples": self.loaders.train_examples, "eval_examples": self.loaders.eval_examples},
            model=unwrapped)
        if self.is_main:
            self.run.write_result(result.summary())
            print(f"Saved to {self.run.path} ({result.steps} steps, {result.seconds:.0f} s, {result.tokens:,} tokens "
                  f"at {result.tokens / max(seconds, 1e-9):.0f} tokens/s"
                  + (f", peak GPU memory {result.gpu_peak_gib:.1f} GiB" if result.gpu_peak_gib is not None else "")
                  + (f", eval loss {result.eval_loss_before:.4f} -> {result.eval_loss:.4f}" if eval_loss is not None
                     and result.eval_loss_before is not None else "") + ")")
        return result


class _Interval:
    """Losses and tokens since the last log line, kept on the device until it is written."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.extras: dict[str, torch.Tensor] = {}
        self.steps, self.tokens, self.start = 0, 0, time.time()

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """A micro-batch's share of its window's loss, and of the objective's other numbers (reward margins...)."""
        self.loss += loss.detach()
        for name, value in stats.items():
            self.extras[name] = self.extras.get(name, 0) + value.detach()

    def flush(self, accelerator) -> tuple[float, float, int, float, dict[str, float]]:
        """(loss sum, tokens) over all processes, steps and seconds since the last flush, and the sums of the
        objective's numbers; starts a new interval."""
        names = sorted(self.extras)
        totals = accelerator.reduce(torch.stack(
            [self.loss, torch.tensor(float(self.tokens), device=self.device)]
            + [self.extras[name].float().reshape(()) for name in names]), "sum").tolist()
        steps, elapsed = self.steps, time.time() - self.start
        self._reset()
        return totals[0], totals[1], steps, elapsed, dict(zip(names, totals[2:]))


def _only_trainable_weights(models, weights, _output_dir) -> None:
    """Checkpoints hold what trains: an adapter run's the adapter, not another copy of the frozen base model."""
    for index, (model, state) in enumerate(zip(models, weights)):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[index] = {name: tensor for name, tensor in state.items() if name in trainable}


def _gpu_peak_gib(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
