"""Stage sft, supervised fine-tuning on conversations: the recipe, top to bottom, on the shared core.

`SFTRecipe.run` sets the pieces up in order, then hands them to the core's loop (weitiao.train.core.Trainer).
A stage that differs in its data only (continued pre-training, weitiao.train.pt) overrides `loaders`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from weitiao.config import Config
from weitiao.data.collate import PadCollator
from weitiao.data.dataset import build_datasets, format_stats
from weitiao.data.packing import PackedBatchSampler, PackedCollator
from weitiao.data.templates import install_template
from weitiao.models import load_model_config
from weitiao.runs import RunFolder
from weitiao.train.attention import PACKED_VARLEN, VARLEN
from weitiao.train.core import (LogHook, Loaders, Trainer, TrainResult, apply_method_and_kernels,
                                load_model_for_training, make_accelerator)
from weitiao.train.settings import Machine, Settings, resolve_settings
from weitiao.train.tracking import check_trackers


class SFTRecipe:
    def __init__(self, config: Config, resume: bool = False, on_log: LogHook | None = None):
        self.config, self.resume, self.on_log = config, resume, on_log

    def run(self) -> TrainResult:
        from accelerate.utils import set_seed

        config, args = self.config, self.config.train
        # 1. The run folder, and every automatic choice made once (printed, saved as settings.json).
        run = RunFolder(args.output_dir)
        run.prepare(self.resume, args.overwrite_output_dir)
        check_trackers(args.report_to)
        settings = resolve_settings(config, Machine.detect(args.cpu_threads), load_model_config(config.model))
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        # 2. The engine; the seeded sampler makes the data order a function of (seed, epoch).
        accelerator = make_accelerator(config, settings, run)
        self.is_main = accelerator.is_main_process
        set_seed(args.seed)
        if settings.on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.tf32
        self._print_settings(settings)
        # 3. Model and tokenizer, with the chat template the run trains with (saved with the result).
        model, tokenizer, base_path = load_model_for_training(config, settings, accelerator)
        stops = install_template(tokenizer, config.data)
        # 4. Data: read, check, tokenize, mask, truncate; every drop counted (main process first fills the cache).
        with accelerator.main_process_first():
            train_set, eval_set, data_stats = build_datasets(config.data, tokenizer, config.stage, args.seed)
        if self.is_main:
            print("Data:\n" + format_stats(data_stats))
        # 5. Kernels, then the method (which weights train).
        model, fused = apply_method_and_kernels(model, config, settings, args.seed)
        # 6. What a step minimises (a stage's own loss, with what it needs: a reference model, precomputed data).
        objective, train_set, eval_set = self.prepare(model, tokenizer, settings, accelerator, train_set, eval_set)
        # 7. Batches: packed rows or padded ones.
        loaders = self.loaders(train_set, eval_set, tokenizer.pad_token_id, settings)
        # 8. The loop, evaluation and the saved result.
        trainer = Trainer(config, settings, accelerator, run, model, tokenizer, loaders, self.on_log,
                          self.eval_extras(data_stats), objective)
        self._print_method(trainer, settings, fused)
        if self.is_main:
            run.write_start(config, settings.to_dict() | {"stop_strings": stops}, data_stats)
        result = trainer.fit(self.resume, base_path, stops)
        if self.is_main:
            self.summarize(result, data_stats)
        return result

    def loaders(self, train_set, eval_set, pad_id: int, settings: Settings) -> Loaders:
        """Packed rows of whole examples (attention kept within each), or padded batches of shuffled examples."""
        args, data = self.config.train, self.config.data
        common = loader_options(args.seed, settings)
        if settings.packing:
            sampler = PackedBatchSampler([len(ids) for ids in train_set["input_ids"]], data.packing_length, args.seed)
            collate = PackedCollator(pad_id, settings.row_length, **row_boundaries(self.config, settings),
                                     scored_positions=settings.scored_positions)
            train = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, **common)
            if self.is_main:
                print(f"Packing: {len(train_set)} examples in {len(sampler)} rows of up to {data.packing_length} "
                      f"tokens ({100 * sampler.fill:.1f}% filled)")
        else:
            sampler = None
            train = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
                               collate_fn=padded(pad_id, settings), **common)
        return Loaders(train, eval_loader(eval_set, pad_id, settings, args.per_device_eval_batch_size),
                       len(train_set), len(eval_set) if eval_set is not None else 0, sampler)

    def prepare(self, model, tokenizer, settings: Settings, accelerator, train_set, eval_set):
        """(objective, train set, eval set): None keeps the model's own token loss (sft, pt)."""
        return None, train_set, eval_set

    def eval_extras(self, data_stats: dict):
        """Metrics a stage adds to each evaluation (none for sft)."""
        return None

    def summarize(self, result: TrainResult, data_stats: dict) -> None:
        """What a stage prints after the run's own summary line (nothing for sft)."""

    # ---------------------------------------------------------------------------------------------

    def _print_settings(self, settings: Settings) -> None:
        if not self.is_main:
            return
        configured = self.config.train.distributed
        if settings.distributed != configured:
            # accelerate runs DeepSpeed and FSDP on GPUs only; on a CPU its processes fall back to plain DDP over gloo.
            print(f"Note: distributed: {configured} needs GPUs; on this CPU the processes run plain DDP "
                  "(same results, nothing sharded)")
        print("Settings (saved as settings.json):\n" + settings.describe())

    def _print_method(self, trainer: Trainer, settings: Settings, fused: int) -> None:
        if not self.is_main:
            return
        trainable, total = trainer.trainable, trainer.total
        engine = (f"; {settings.distributed} on {settings.processes} processes"
                  if settings.processes > 1 or settings.distributed != "ddp" else "")
        print(f"Method: {self.config.method}; trainable parameters {trainable:,} of {total:,} "
              f"({100 * trainable / total:.2f}%)" + ("; Liger kernels" if settings.liger else "")
              + (f"; LoRA update fused into {fused} layers' products" if fused else "") + engine)



# ---------------------------------------------------------------------------------------------
# Loader pieces both stages use.


def loader_options(seed: int, settings: Settings) -> dict:
    # The loader gets its own generator: starting an epoch's iterator then leaves the global RNG (dropout) alone,
    # which a resumed run relies on to replay the same random numbers.
    return {"num_workers": settings.loader_workers, "generator": torch.Generator().manual_seed(seed),
            "pin_memory": settings.on_gpu}


def row_boundaries(config: Config, settings: Settings) -> dict:
    """varlen reads each row's example boundaries; compiled code needs their longest fixed (see PackedCollator)."""
    return {"boundaries": settings.attention in (VARLEN, PACKED_VARLEN),
            "longest": config.data.max_length if settings.torch_compile else None}


def padded(pad_id: int, settings: Settings) -> PadCollator:
    return PadCollator(pad_id, pad_to_multiple_of=settings.pad_to_multiple_of)


def eval_loader(eval_set, pad_id: int, settings: Settings, batch_size: int) -> DataLoader | None:
    if eval_set is None or not len(eval_set):
        return None
    return DataLoader(eval_set, batch_size=batch_size, collate_fn=padded(pad_id, settings))
