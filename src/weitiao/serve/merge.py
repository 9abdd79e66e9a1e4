"""`weitiao merge`: fold a LoRA-style adapter into its base model and save a plain transformers folder.

The result loads with `AutoModelForCausalLM.from_pretrained(DIR)` alone, and carries the adapter's tokenizer
(with the chat template it was trained on) and generation config (whose EOS list ends a reply at the
template's end-of-turn token), so it chats exactly like base + adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from weitiao.config import ModelConfig
from weitiao.errors import WeitiaoError
from weitiao.models import load_model, load_tokenizer
from weitiao.runs import RunFolder
from weitiao.generation.engine import dtype_name


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "fp32") -> Path:
    """Merge `adapter` into `base` (default: the base the adapter was trained on) and save to `out`.

    The merge is computed in float32 and the result cast to `dtype` (fp32, bf16 or fp16) before saving."""
    from peft import PeftConfig, PeftModel

    run = RunFolder.adapter(adapter)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeitiaoError(f"--out {out} already exists and is not empty; choose a new folder")
    peft_config = PeftConfig.from_pretrained(str(run.path))
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise WeitiaoError(f"{adapter} is a {peft_config.peft_type} adapter: it adds learned prompt tokens, not weight "
                           "changes, so it cannot be merged into the model; serve it as an adapter instead "
                           "(weitiao serve BASE --adapter NAME=PATH)")
    base = base or run.base_model()
    model, base_tokenizer, base_path = load_model(ModelConfig(name_or_path=base), dtype=torch.float32)
    run.check_base(base_path)
    try:
        merged = PeftModel.from_pretrained(model, str(run.path)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches: an adapter of another architecture
        raise WeitiaoError(f"cannot apply adapter {adapter} to {base}: {str(error).splitlines()[0]}") from None
    merged = merged.to(getattr(torch, dtype_name(dtype)))

    tokenizer = load_tokenizer(str(run.path)) if run.has_tokenizer else base_tokenizer
    if run.generation_config() is not None:
        merged.generation_config = run.generation_config()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (run.path / RunFolder.CONFIG).is_file():
        # Keeps the run's template (its stop strings) and base model known, so `weitiao eval OUT` compares
        # the base with the merged model.
        shutil.copy(run.path / RunFolder.CONFIG, out / RunFolder.CONFIG)
    return out
