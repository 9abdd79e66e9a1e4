"""Several GPUs and several nodes on the standard engines: accelerate with DDP, DeepSpeed ZeRO or FSDP2.

weitiao writes the engine configuration from the training settings (batch, accumulation, precision), so one
config file runs on one GPU or many; `weitiao train CONFIG --gpus N` starts the processes with torchrun.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from weitiao.config import Config
from weitiao.errors import ConfigError


def deepspeed_config(config: Config, bf16: bool, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a zero2 / zero3 / zero3_offload run (or the user's own file)."""
    args = config.train
    if args.deepspeed:
        path = Path(args.deepspeed)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed: file not found: {path}")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"train.deepspeed: {path} is not valid JSON: {error}") from None
    stage = 2 if args.distributed == "zero2" else 3
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        # Gathered 16-bit weights at save time: the final artefact is the same single folder as a 1-GPU run.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    if args.distributed == "zero3_offload":
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": True},
                    offload_param={"device": "cpu", "pin_memory": True})
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm if args.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": args.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # weitiao builds the optimizer (torch AdamW, SGD, bitsandbytes...); DeepSpeed then shards its states. With
        # offload the same optimizer steps on the CPU copy, so no DeepSpeed C++/CUDA op has to be compiled.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # weitiao logs; DeepSpeed need not
    }


def engine_plugins(config: Config, bf16: bool, micro_batch_size: int) -> dict[str, Any]:
    """Keyword arguments for `accelerate.Accelerator`: the DeepSpeed or FSDP2 plugin, or none for DDP."""
    mode = config.train.distributed
    if mode == "ddp":
        return {}
    if mode == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # One FSDP unit per decoder layer (the model's _no_split_modules); sharded checkpoints, full weights at the end.
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)}
    try:
        from accelerate.utils import DeepSpeedPlugin
    except ImportError as error:
        raise ConfigError(f"distributed: {mode} needs DeepSpeed: pip install deepspeed ({error})") from None
    if not _has_deepspeed():
        raise ConfigError(f"distributed: {mode} needs DeepSpeed: pip install deepspeed")
    ds_config = deepspeed_config(config, bf16, micro_batch_size)
    # zero3_init_flag: transformers then builds the model already partitioned (a model larger than one GPU loads).
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=zero3)}


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def launch_command(config_path: str, overrides: list[str], gpus: int, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str = "127.0.0.1", master_port: int = 29500, resume: bool = False) -> list[str]:
    """torchrun (torch.distributed.run) starting `weitiao train` once per GPU; the same command on every node,
    with its own --node-rank."""
    if gpus < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"--gpus must be >= 1 and --node-rank between 0 and {nnodes - 1}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        command += [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
    else:
        command += ["--standalone"]
    command += ["-m", "weitiao", "train", config_path, *(["--resume"] if resume else []), *overrides]
    return command


def launch(command: list[str]) -> int:
    """Run the launcher; a crash on any rank ends every rank (torchrun's elastic agent), and its exit code is ours."""
    print("launching: " + " ".join(shlex.quote(part) for part in command), flush=True)
    env = {**os.environ, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)
