"""The one typed config of a weitiao run: YAML file + command-line overrides, validated at load.

Every key, its default and its meaning is documented here (and rendered in docs/config.md).
Training hyper-parameters keep the names users know from transformers' TrainingArguments.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from weitiao.errors import ConfigError
from weitiao.methods import METHODS


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


_SectionType = typing.TypeVar("_SectionType", bound=_Section)


class ModelConfig(_Section):
    name_or_path: str = "default"
    """'default' (bundled SmolLM2-135M-Instruct), a local HF model dir, a hub id, or a .gguf file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bfloat16 on a GPU that supports it, float32 otherwise."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by some architectures, e.g. ChatGLM, Baichuan)."""
    attn_implementation: str | None = None
    """e.g. sdpa, eager, flex_attention, varlen (packed rows on PyTorch's variable-length FlashAttention: CUDA
    compute capability 8.0+, bf16/fp16). None: for packed training rows on a GPU varlen, or flex_attention with
    train.torch_compile (or where varlen cannot run); otherwise transformers' choice."""
    varlen_kernel: Literal["torch", "flash_attn_4"] | None = None
    """Kernels of varlen attention on packed training rows: torch (PyTorch's FlashAttention 2) or flash_attn_4
    (FlashAttention 4's CuTe kernels: pip install 'weitiao[flash]'; compute capability 9.0+, e.g. H100, H200, B200).
    None: flash_attn_4 where it is installed and runs, else torch."""
    adapter: str | None = None
    """A LoRA adapter (a weitiao run folder) trained on name_or_path to keep training, e.g. SFT after continued
    pre-training. Its rank, targets and modules_to_save are the adapter's own (the lora section is not used)."""


# Format fields that may name several columns: the references of a reply (DataSource.columns).
REFERENCE_FIELDS = ("response", "output")


class DataSource(_Section):
    path: str
    """A file (json, jsonl, csv, tsv, parquet, arrow, txt; also compressed: data.jsonl.gz, .bz2, .xz), a directory
    of them (a `datasets` save_to_disk folder reads its .arrow shards), or a glob pattern."""
    format: Literal["auto", "alpaca", "sharegpt", "openai", "qa", "text"] = "auto"
    """Data format; auto detects it from the columns of the first record."""
    columns: dict[str, str | list[str]] = Field(default_factory=dict)
    """Map a format's fields to this file's column names, e.g. {prompt: dialogue, response: summary}. The reply
    (qa's response, alpaca's output) may be a list of columns holding several references, e.g. {response: [summary1,
    summary2, summary3]}: the first is the reply trained on and scored by loss, all of them are the references of
    ROUGE (best of) and BLEU (multi-reference) in evaluation."""
    prompt_template: str | None = None
    """Python format string over the record's columns that builds the user turn, e.g. '{dialogue}\\n\\nSummarize.'"""
    system: str | None = None
    """System prompt for records that carry none."""
    weight: float = Field(1.0, gt=0)
    """Share of this source: 0.5 keeps a random half of its records, 2 uses each twice. In data.eval at most 1: a
    seeded random subset (train.seed), counted in the report."""
    sample_by: Literal["line", "paragraph", "document"] | None = None
    """How text files are cut into documents: each line, each blank-line-separated paragraph, or the whole file.
    None: line with a `label`, else paragraph."""
    encoding: str | None = None
    """Text encoding of the files (json, jsonl, csv, tsv, txt). None: UTF-8 (with or without a byte-order mark); a file
    in another encoding stops with its line and byte offset and the encoding it looks like. A codec name (gb18030,
    cp1252, utf-16, latin-1, ...) reads it; auto guesses it per file (byte-order mark, else charset-normalizer) and
    data_stats.json says what was used."""
    dataset: str | None = None
    """A dataset named in a LLaMA-Factory dataset_info.json, which `path` names (the file or its folder): the
    entry's file_name, formatting (alpaca, sharegpt), columns and tags become this source's path, format and
    columns (the run's config.yaml keeps what they became), so a LLaMA-Factory data folder trains unchanged. Hub
    entries (hf_hub_url, ...) are refused: download the files and name them."""
    label: str | None = None
    """Classification sets that ship one text per line and the label as the file (reviews.pos / reviews.neg,
    pos.txt / neg.txt): every line of these files (any suffix but json/jsonl/csv/tsv/parquet) becomes an example whose
    prompt is the text (or prompt_template over {text}) and whose reply is this label. '{file}' stands for the
    label in the file's name: its suffix (reviews.pos -> pos), or for .txt files its stem (neg.txt -> neg);
    '{folder}' for the name of the file's folder (IMDB's aclImdb/train/pos/*.txt -> pos, with sample_by:
    document). Quote it in YAML: label: "{file}"."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("columns")
    @classmethod
    def _reference_lists(cls, columns: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for field, column in columns.items():
            if isinstance(column, list) and (field not in REFERENCE_FIELDS or not column):
                raise ValueError(f"columns.{field}: only the reply ({' or '.join(REFERENCE_FIELDS)}) may list "
                                 "several columns (references), and the list must not be empty")
        return columns

    @model_validator(mode="after")
    def _text_unit(self) -> DataSource:
        if self.sample_by is None:
            self.sample_by = "line" if self.label is not None else "paragraph"
        return self

    @model_validator(mode="after")
    def _from_dataset_info(self) -> DataSource:
        if self.dataset is not None:
            path, fmt, columns = llamafactory_dataset(Path(self.path).expanduser(), self.dataset)
            if self.format not in ("auto", fmt):
                raise ValueError(f"format {self.format}, but dataset_info.json says {fmt} for '{self.dataset}'")
            self.path, self.format, self.columns, self.dataset = path, fmt, {**columns, **self.columns}, None
        return self


# LLaMA-Factory's dataset_info.json (DataSource.dataset): its columns per formatting, as weitiao's fields.
_LLAMAFACTORY_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                 "rejected": "rejected", "kto_tag": "label"},
}
_LLAMAFACTORY_TAG_KEYS = {"role_tag": ("from", "role"), "content_tag": ("value", "content")}  # the keys weitiao reads
_LLAMAFACTORY_HUB = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_LLAMAFACTORY_MEDIA = ("images", "videos", "audios")
# Entry keys read; file_sha1 changes nothing that is read; role tags are checked per turn by the data reader.
_LLAMAFACTORY_KEYS = ("file_name", "formatting", "ranking", "columns", "tags", "file_sha1")


def llamafactory_dataset(info: Path, name: str) -> tuple[str, str, dict[str, str]]:
    """(path, format, columns) of the dataset `name` in LLaMA-Factory's dataset_info.json (`info`: the file or its
    folder). An alpaca entry that maps only `prompt` is a text corpus (pre-training), as LLaMA-Factory reads it."""
    info_file = info / "dataset_info.json" if info.is_dir() else info
    try:
        registry = json.loads(info_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read LLaMA-Factory's dataset_info.json at {info}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{info_file}: invalid JSON: {error}") from None
    if not isinstance(registry, dict) or name not in registry:
        close = difflib.get_close_matches(name, list(registry) if isinstance(registry, dict) else [], n=1)
        raise ValueError(f"{info_file} has no dataset '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    entry = registry[name]
    where = f"{info_file}: dataset '{name}'"
    hub = next((key for key in _LLAMAFACTORY_HUB if entry.get(key)), None)
    if hub:
        raise ValueError(f"{where} is on a hub ({hub}: {entry[hub]}); weitiao reads local files: download them and "
                         "give their path (or a file_name in dataset_info.json)")
    unknown = sorted(set(entry) - set(_LLAMAFACTORY_KEYS))
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)} not supported (num_samples: use `weight`, a share of the "
                         "records)")
    if "file_name" not in entry:
        raise ValueError(f"{where} has no file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _LLAMAFACTORY_COLUMNS:
        raise ValueError(f"{where}: formatting '{formatting}' (expected alpaca or sharegpt)")
    columns: dict[str, str] = {}
    for key, column in (entry.get("columns") or {}).items():
        if key in _LLAMAFACTORY_MEDIA:
            raise ValueError(f"{where}: column {key}: weitiao trains on text; images, videos and audio are not read")
        if key not in _LLAMAFACTORY_COLUMNS[formatting]:
            raise ValueError(f"{where}: column '{key}' is not one of {formatting}'s "
                             f"({', '.join(_LLAMAFACTORY_COLUMNS[formatting])})")
        if column != _LLAMAFACTORY_COLUMNS[formatting][key]:  # weitiao reads its own names without a mapping
            columns[_LLAMAFACTORY_COLUMNS[formatting][key]] = column
    for key, value in (entry.get("tags") or {}).items():
        if key in _LLAMAFACTORY_TAG_KEYS and value not in _LLAMAFACTORY_TAG_KEYS[key]:
            raise ValueError(f"{where}: tags.{key} '{value}': weitiao reads turns whose keys are "
                             f"{' or '.join(_LLAMAFACTORY_TAG_KEYS[key])}")
    path = str(info_file.parent / entry["file_name"])
    mapped = entry.get("columns") or {}
    if formatting == "alpaca" and set(mapped) == {"prompt"}:
        return path, "text", {} if mapped["prompt"] == "text" else {"text": mapped["prompt"]}
    return path, formatting, columns


class CustomTemplate(_Section):
    """A prompt template for base models: format strings with {content} (and {eos} for the EOS token)."""
    system: str = "{content}\n\n"
    """How a system prompt is written; {content} is the prompt."""
    user: str = "{content}"
    """How a user turn is written, including what precedes the reply (e.g. '### Response:\\n')."""
    assistant: str = "{content}{eos}"
    """How a reply is written; {eos} is the tokenizer's EOS token, which teaches the model to stop."""
    default_system: str = ""
    """System prompt used when a conversation has none."""
    generation_prompt: str = ""
    """Text appended after the last user turn at inference time (usually empty: put it in `user`)."""

    @field_validator("user", "assistant", "system")
    @classmethod
    def _has_content(cls, value: str) -> str:
        if "{content}" not in value:
            raise ValueError("must contain the placeholder {content}")
        return value


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

# Named templates (data.template) for base models that ship without a chat template: presets of custom_template.
NAMED_TEMPLATES: dict[str, CustomTemplate] = {
    "alpaca": CustomTemplate(default_system=ALPACA_SYSTEM, user="### Instruction:\n{content}\n\n### Response:\n",
                             assistant="{content}{eos}\n\n"),
    "qa": CustomTemplate(user="### Question:\n{content}\n\n### Answer:\n", assistant="{content}{eos}\n\n"),
    "dolly": CustomTemplate(default_system=ALPACA_SYSTEM, user="### Instruction:\n{content}\n\n### Response:\n",
                            assistant="{content}\n\n### End{eos}\n\n"),
    "chatml": CustomTemplate(system="<|im_start|>system\n{content}<|im_end|>\n",
                             user="<|im_start|>user\n{content}<|im_end|>\n",
                             assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
                             generation_prompt="<|im_start|>assistant\n"),
}


def _known_template(value: str) -> str:
    if value != "auto" and value not in NAMED_TEMPLATES:
        raise ValueError(f"unknown template '{value}'; choose auto or {', '.join(NAMED_TEMPLATES)}")
    return value


# A template for scoring (data select, data clean's mismatch rule): auto or a named one.
ScoringTemplate = Annotated[str, AfterValidator(_known_template)]
# Text that ends an assistant turn besides the tokenizer's EOS; generation stops on it.
TEMPLATE_STOPS = {"dolly": ["### End"], "chatml": ["<|im_end|>"]}


class DataConfig(_Section):
    train: list[DataSource] = Field(default_factory=list)
    """Training data: a path, or a list of paths / sources (see data.train[] below)."""
    eval: list[DataSource] = Field(default_factory=list)
    """Evaluation data, same forms as train. Without it, val_size holds some training records out."""
    val_size: float = Field(0.0, ge=0)
    """Held out from train when no eval data is given: a fraction (< 1) or a record count (>= 1)."""
    template: str = "auto"
    """auto (the tokenizer's chat template), alpaca, qa, dolly, chatml, or custom (see custom_template)."""
    custom_template: CustomTemplate | None = None
    max_length: int = Field(1024, gt=0)
    """Longest example in tokens (prompt + response); longer ones follow `truncation`. Stage pt: the block length
    (documents are concatenated with EOS between them and cut into blocks of max_length tokens)."""
    truncation: Literal["right", "left", "drop"] = "right"
    """Examples longer than max_length: cut the end (right), cut the start (left), or drop them."""
    packing: bool | None = None
    """Pack several whole examples into each row (no padding, attention kept within each example).
    None: on with a CUDA GPU, off on a CPU. A packed micro-batch is one row of up to packing_length tokens.
    Stage pt: blocks are always full; packing keeps attention within each document of a block."""
    packing_length: int = Field(8192, gt=0)
    """Tokens per packed row: the token budget of a micro-batch when packing (must be >= max_length). Longer rows
    spread each row's fixed costs over more tokens: full fine-tuning of a 1B model ran 15% faster per token with
    16384 than with 8192 (42 instead of 30 GiB, half as many optimizer steps per epoch; docs/performance.md)."""
    train_on: Literal["responses", "all"] = "responses"
    """Loss on assistant replies only (SFT), or on every token."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records stop the run with a precise error (raise) or are skipped and counted (skip)."""
    num_proc: int = Field(1, ge=1)
    """Processes for tokenization (used above 1000 examples)."""
    cache: bool = True
    """Cache the tokenized data (keyed by each file's size and modification time, the data config and the tokenizer)."""
    streaming: bool = False
    """Stage pt: read the training files as a stream instead of loading them, for corpora larger than memory
    (needs train.max_steps; evaluation data comes from data.eval)."""

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.template == "custom" and self.custom_template is None:
            raise ValueError("template: custom needs a custom_template section")
        if self.custom_template is not None and self.template not in ("custom", "auto"):
            raise ValueError(f"custom_template is set but template is '{self.template}'; set template: custom")
        if self.custom_template is not None:
            self.template = "custom"
        for index, source in enumerate(self.eval):
            if source.weight > 1:
                raise ValueError(f"data.eval[{index}].weight is {source.weight}: evaluation would count examples "
                                 "more than once; an eval source's weight keeps a random share of it (0 < weight <= 1)")
        return self


class LoraConfig(_Section):
    r: int = Field(8, gt=0)
    """LoRA rank."""
    alpha: float = 16
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input (0 skips the op: faster, and usual for LLM fine-tuning)."""
    target_modules: list[str] | str = "all-linear"
    """'all-linear' (every linear layer but the output head) or a list of module names."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full next to the adapter, e.g. [embed_tokens, lm_head] after extending the vocabulary."""
    loraplus_lr_ratio: float | None = Field(None, ge=1)
    """LoRA+ (Hayou et al., 2024): the B matrices learn this many times faster than learning_rate (the paper uses
    16, with a learning_rate about half of plain LoRA's); None: one rate for all (plain LoRA)."""


class FreezeConfig(_Section):
    """method: freeze trains a few whole layers and keeps the rest of the model fixed."""
    trainable_layers: int = 2
    """Train the last N decoder layers (a negative N: the first N)."""
    trainable_modules: list[str] = Field(default_factory=lambda: ["all"])
    """Within those layers, what trains: all, or module names such as mlp, self_attn."""
    extra_modules: list[str] = Field(default_factory=list)
    """Modules outside the decoder layers that train too, e.g. [lm_head] or [embed_tokens]."""


class QuantizationConfig(_Section):
    """How method: qlora quantizes the frozen base model (bitsandbytes)."""
    bits: Literal[4, 8] | None = None
    """4-bit (QLoRA) or 8-bit (LLM.int8) base weights; only with method qlora, where None means 4."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is the QLoRA paper's."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matrix product."""


class PromptLearningConfig(_Section):
    """method: prefix (P-Tuning v2), ptuning (prompt encoder) and prompt (soft prompt tuning)."""
    num_virtual_tokens: int = Field(20, gt=0)
    """Length of the learned prefix / prompt."""
    prefix_projection: bool = False
    """prefix: reparameterize the prefix through a two-layer MLP (P-Tuning v2's projection)."""
    encoder_hidden_size: int = Field(512, gt=0)
    """Hidden size of the MLP of prefix_projection and of the ptuning prompt encoder."""
    init_text: str | None = None
    """prompt: initialise the soft prompt from the embeddings of this text (else randomly)."""


class IA3Settings(_Section):
    target_modules: list[str] | None = None
    """Modules whose activations IA3 rescales (None: PEFT's choice for the architecture)."""
    feedforward_modules: list[str] | None = None
    """Which of them are feed-forward (scaled on their input rather than output)."""


class TrainConfig(_Section):
    output_dir: str = "outputs/run"
    """Where the adapter or model, tokenizer, config.yaml, metrics.jsonl and reports are written."""
    num_train_epochs: float = Field(3.0, gt=0)
    """Passes over the training data (fractions allowed)."""
    max_steps: int = -1
    """Optimizer steps; > 0 overrides num_train_epochs."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_restarts", "polynomial", "inverse_sqrt"] = "cosine"
    """Learning-rate schedule after warm-up (transformers' get_scheduler)."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Warm-up as a share of all steps (warmup_steps wins when set)."""
    warmup_steps: int = Field(0, ge=0)
    """Warm-up steps (linear from 0 to learning_rate)."""
    per_device_train_batch_size: int = Field(8, gt=0)
    """Examples per micro-batch on each device (without packing; a packed micro-batch is one row of
    data.packing_length tokens, so on a GPU, where packing is on by default, a step holds as many whole examples as
    fit)."""
    per_device_eval_batch_size: int = Field(8, gt=0)
    """Examples per batch when measuring eval loss."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step; the loss is averaged over all their label tokens."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norm weights)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """0 disables clipping."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = "adamw_torch"
    """AdamW (torch), 8-bit AdamW or paged 8-bit AdamW (bitsandbytes, CUDA), Adafactor, or SGD with momentum 0.9."""
    seed: int = 42
    """Seed for initialisation, data order, dropout and the validation split."""
    logging_steps: int = Field(10, gt=0)
    """Log the training loss (metrics.jsonl, progress bar) every N optimizer steps."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_steps: int = Field(0, ge=0)
    """Write a resumable checkpoint every N optimizer steps (0: none)."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted. Checkpoints are removed when the run finishes."""
    eval_on_start: bool = True
    """Evaluate the untrained model first, so every run shows its starting point."""
    overwrite_output_dir: bool = False
    """Allow training into an output_dir that holds a finished run (or checkpoints of an unfinished one)."""
    bf16: bool | None = None
    """bfloat16 mixed precision. None: on with a CUDA GPU that supports it (Ampere and newer), off on a CPU."""
    fp16: bool = False
    """float16 mixed precision with loss scaling (GPU only)."""
    master_weights: Literal["optimizer", "model"] | None = None
    """Where full and freeze fine-tuning keep fp32 weights under bf16 mixed precision. optimizer: the model holds bf16
    weights, so its forward and backward passes run in bf16 throughout (as FSDP's and DeepSpeed's bf16 training do),
    and the optimizer updates fp32 copies with gradients summed in fp32, written back into the model after each step;
    the saved model is bf16. model: the model's own weights are the master weights (fp32 with model.dtype auto), cast
    to bf16 at each use by autocast (transformers' Trainer's mixed precision); the saved model is fp32. None:
    optimizer with bf16 on one GPU without DeepSpeed or FSDP and model.dtype auto or bfloat16, model otherwise
    (1B on an H100: 61.0k vs 55.8k tokens/s at 27.0 vs 30.1 GiB; weitiao.train.master_weights)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    checkpoint_every: int = Field(1, ge=1)
    """With gradient_checkpointing: recompute every Nth decoder layer only (2 keeps the activations of half the
    layers: more memory than 1, less recomputation)."""
    logits_chunk_budget: int | None = Field(None, ge=1)
    """With Liger's fused linear + cross-entropy (GPU runs of stage sft or pt): how many times the hidden states' size
    the output layer's logits may take at once. Liger (0.8.5) computes them a chunk of tokens at a time, chunks of
    next_power_of_2(ceil(tokens / ceil(vocabulary / (budget x hidden size)))) tokens, the tokens being the row's
    scored positions with train.scored_positions. 32: a 1B Llama's 8k-token row (128k vocabulary, hidden size 2,048)
    in 4,096-token chunks, 1 GiB of bf16 logits at once; 8: 1,024-token chunks, 256 MiB. None: 8 with
    gradient_checkpointing, where that chunk is the step's peak (1B LoRA at 8k on an H100: 3.52 vs 4.02 GiB at
    61.7k vs 62.3k tokens/s; eager layers 3.38 vs 3.63 GiB), 32 otherwise, where the layers' activations dwarf it
    (1B on an H200: compiled LoRA 76.6k vs 73.7k tokens/s at 32 vs 8, eager full fine-tuning 56.1k vs 55.1k).
    Liger's own default, 1, cuts that row into 256-token chunks, and under full fine-tuning each chunk reads and
    writes the whole fp32 gradient of the output weight (2 GB for a 128k x 2k head)."""
    offload_checkpoints: bool | None = None
    """With gradient_checkpointing on a GPU: keep each checkpointed layer's input in pinned CPU memory until its
    backward pass (unsloth's "unsloth" checkpointing): 2 bytes x hidden size per token per layer less GPU memory
    (0.5 GiB for a 1B model at 8k tokens, 2 GiB for 8B), copied out on a side stream and back one layer ahead of
    the backward pass. One GPU; with torch_compile
    each layer's forward is compiled and the checkpoint around it stays eager. None: on with gradient_checkpointing
    in eager layers on one CUDA GPU (H200: as fast as plain checkpointing or faster on average in four calls, e.g.
    1B LoRA 46.1k vs 40.3k tokens/s at 3.6 vs 4.1 GiB, 8B QLoRA 6.5 vs 7.0 GiB), off otherwise (compiled layers ran
    10% slower offloaded)."""
    torch_compile: bool = False
    """Compile each decoder layer with torch.compile (inductor; accelerate's regional compilation): the first steps
    are slow. Liger then keeps only its fused linear + cross-entropy; inductor fuses RMSNorm, SwiGLU and RoPE itself."""
    scored_positions: bool | None = None
    """Stage sft on packed rows with Liger's fused loss: send only the positions whose next token has a label
    through the output layer and the loss (not the prompt, example-boundary and padding positions, whose logits
    the loss discards; 35% of bench/train_speed.py's tokens), for Llama, Mistral, Mixtral, Qwen2/3, Phi-3, GLM-4 and
    SmolLM3 models with liger-kernel >= 0.8.5. The same loss and gradients (tests/gpu/test_cuda.py). None: on where
    it applies in eager layers (1B on an H100: LoRA 78.7k vs 76.5k tokens/s, full fine-tuning 56.1k vs 54.3k at
    0.5 GiB less, checkpointed LoRA 56.6k vs 55.4k), off with torch_compile unless set (the labels' varying length
    reaches the compiled layers); elsewhere it does nothing."""
    tf32: bool = True
    """Let float32 matrix products use TF32 tensor cores on NVIDIA GPUs (Ampere and newer)."""
    liger: bool | None = None
    """Liger's fused kernels (linear + cross-entropy without materialised logits, RMSNorm, SwiGLU, RoPE; where the
    norm weights are frozen, RMSNorm's backward kernel runs one program per row: 32 instead of 68 us a call on an
    H100). None: on with a CUDA GPU when liger-kernel is installed and supports the model."""
    fused_lora: bool = True
    """LoRA: add each layer's low-rank update inside the base layer's matrix product (one epilogue instead of PEFT's
    separate product, scale and add over the layer's output), and in the backward pass the adapter's share of the
    input gradient inside the base product's (no second gradient and add); the adapter weights are read from bf16
    copies rewritten together once per optimizer step, not cast per call. Same parameters and adapter files.
    Applies to plain LoRA (not DoRA, not quantized bases) in eager layers (with torch_compile, inductor fuses PEFT's
    own forward as well) under ddp and zero2 (zero3 and fsdp gather weights per module and keep PEFT's forward)."""
    cuda_graphs: bool | None = None
    """Replay each decoder layer's kernels from CUDA graphs, two per layer around eager attention
    (weitiao.train.cuda_graphs), so the GPU does not wait for the host to launch them one by one; with
    gradient_checkpointing, each checkpointed layer's forward and backward, all layers sharing one layer's graph memory
    (weitiao.train.checkpoint_graphs). Runs on fused LoRA layers (method lora with fused_lora; no DoRA, lora.dropout 0)
    and on full and freeze fine-tuning's bf16 weights with master_weights optimizer (without gradient_checkpointing),
    stage sft or pt, packed rows on varlen attention, eager layers, one CUDA GPU, Llama, Qwen2 and Qwen3 models. The
    same losses and gradients as without (tests/gpu/test_cuda.py). None: on where it runs: the same speed in every
    process (1B LoRA on H200s: 90.9k-91.5k tokens/s at 12.52 GiB), where eager layers ran 91.8k-92.6k at 12.86 GiB on
    fast hosts and 65.6k-87.3k on hosts that pace them; with checkpointing 62.2k at 4.02 GiB on an H100, where eager
    checkpointed layers ran 62.1k at 3.63 GiB on a fast host (run85) and 10% slower on one that paced them (run83)
    (docs/performance.md); full fine-tuning of 1B on an H100 66.7k at 25.16 GiB, where eager layers ran 67.2k at
    27.03 GiB (run96); true where it cannot run is an error that says why. If the capture fails, training goes on
    with eager layers and says so."""
    distributed: Literal["ddp", "zero2", "zero3", "zero3_offload", "fsdp"] = "ddp"
    """How several processes (weitiao train --gpus N, or torchrun / accelerate launch) share the work: ddp (a
    full copy of the model per GPU), zero2 (DeepSpeed ZeRO-2: optimizer states and gradients sharded), zero3
    (parameters sharded too), zero3_offload (ZeRO-3 with optimizer states and parameters in CPU memory), fsdp
    (PyTorch FSDP2, fully sharded, one unit per decoder layer). The sharded engines need GPUs: on a CPU the
    processes run plain DDP. Under zero3 Liger's fused linear + cross-entropy is off (the logits are materialised)."""
    deepspeed: str | None = None
    """Path to a DeepSpeed JSON config of your own; used instead of the one weitiao writes for zero2/zero3."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab", "trackio"]] = Field(default_factory=list)
    """Experiment trackers that get the loss curve, learning rate, throughput and eval metrics (accelerate's own
    trackers; pip install 'weitiao[track]' for the first three). tensorboard writes event files to OUTPUT_DIR/runs;
    wandb follows WANDB_MODE (offline works without network; files in OUTPUT_DIR/wandb) and WANDB_PROJECT (default
    weitiao); mlflow follows MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME (a local folder: file:///PATH with
    MLFLOW_ALLOW_FILE_STORE=true). The config is logged as the run's hyper-parameters."""
    neftune_noise_alpha: float | None = Field(None, gt=0)
    """NEFTune (stage sft): uniform noise on the input embeddings while training, alpha / sqrt(L d) at most for an
    example of L tokens (each example of a packed row its own L), none on padding or at evaluation. The paper used
    5 to 15; None: no noise."""
    cpu_threads: int | None = Field(None, gt=0)
    """torch threads when training on a CPU. None: measured at the start (1, half or all of the available cores,
    whichever multiplies matrices fastest right now; on a shared 2-core machine one thread ran 4-7x faster than
    two), or OMP_NUM_THREADS when that is set. settings.json records the count and how it was chosen."""
    dataloader_num_workers: int | None = Field(None, ge=0)
    """Worker processes that read and collate the next batches while the GPU trains. None: 2 with a CUDA GPU (the
    training thread then only launches GPU work: +23% tokens/s for eager 1B LoRA, 1.03x compiled, H200) unless the
    data streams (each worker would read the whole stream), 0 on a CPU, where workers compete with training for
    the cores."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("offload_checkpoints moves the inputs that gradient checkpointing keeps; set "
                             "gradient_checkpointing: true as well")
        return self


PAIR_STAGES = ("dpo", "rm")
"""Stages that read preference pairs (a prompt, a chosen and a rejected reply)."""
PREFERENCE_STAGES = ("dpo", "kto")
"""Stages that train the policy on preferences (weitiao.train.preference)."""
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}


class PreferenceConfig(_Section):
    """Stages dpo and kto: how preferences train the policy (TRL's names and defaults)."""
    loss: Literal["sigmoid", "ipo", "orpo", "simpo"] = "sigmoid"
    """Stage dpo: sigmoid (DPO), ipo (IPO: squared loss on length-averaged log-ratios), orpo (ORPO: the chosen
    reply's NLL plus an odds-ratio term; no reference model), simpo (SimPO: length-averaged log-probs with a target
    margin; no reference model)."""
    beta: float | None = Field(None, gt=0)
    """Strength of the preference term: DPO/IPO/KTO's KL weight, ORPO's lambda, SimPO's reward scale. None: 0.1
    (2.0 for simpo), resolved at load so config.yaml records it."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """sigmoid: the assumed share of wrongly labelled pairs (conservative DPO); 0 is plain DPO."""
    simpo_gamma_beta_ratio: float = Field(0.5, ge=0)
    """simpo: the target reward margin gamma as a multiple of beta."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the loss of desirable (label true) examples."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the loss of undesirable (label false) examples."""
    precompute_reference: bool = False
    """Stage dpo: compute the reference model's log-probs of every pair once before training instead of at each
    step (no reference forward per step; with full or freeze no second copy of the model). Always on when
    model.adapter continues an adapter: the reference is then that adapter's model. Without it a LoRA-family run's
    reference is the base with the adapter switched off, and full or freeze keep a frozen copy."""

    @property
    def needs_reference(self) -> bool:
        return self.loss in ("sigmoid", "ipo")


# Benchmarks that read local files (eval.benchmarks[].path); weitiao.eval.benchmarks knows their layouts.
CSV_BENCHMARK_TASKS = ("mmlu", "ceval", "cmmlu")
TRUTHFULQA_TASKS = ("truthfulqa_mc1", "truthfulqa_mc2")
MINIMAL_PAIR_TASKS = ("blimp",)
LOCAL_BENCHMARK_TASKS = (*CSV_BENCHMARK_TASKS, *TRUTHFULQA_TASKS, *MINIMAL_PAIR_TASKS)
_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BenchmarkConfig(_Section):
    """A multiple-choice benchmark run through lm-evaluation-harness on the base and the tuned model."""
    task: str
    """With `path`: mmlu, ceval, cmmlu (folders of CSV files), truthfulqa_mc1 or truthfulqa_mc2 (an
    mc_task.json), blimp (minimal pairs: JSON Lines of sentence_good/sentence_bad, one file per phenomenon).
    Without `path`: any lm-eval task or group name, whose data lm-eval gets from the Hub."""
    path: str | None = None
    """Local files of the benchmark: a folder for mmlu/ceval/cmmlu, a JSON file for truthfulqa_mc1/mc2, a folder
    of <phenomenon>.jsonl files (or one such file) for blimp."""
    subjects: list[str] | None = None
    """Score only these subjects of a local mmlu/ceval/cmmlu folder (file names without the split suffix, e.g.
    [global_facts, astronomy]) or these phenomena of a blimp folder. None: all of them."""
    name: str | None = None
    """Prefix of this benchmark's metrics in the report (default: task), e.g. mmlu -> mmlu/acc."""
    num_fewshot: int | None = Field(None, ge=0)
    """Solved examples before each question (from the dev split of local folders). None: the task's own
    default, which is 0 for local files."""
    limit: int | None = Field(None, gt=0)
    """Score only the first N questions of each subject (for speed)."""
    split: str | None = None
    """Split of a local folder to score (default: test; val for ceval, whose test split has no answers)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"task": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> BenchmarkConfig:
        """What can be checked without reading files."""
        if not _BENCHMARK_NAME.match(self.metric_prefix):
            raise ValueError(f"benchmark name '{self.metric_prefix}' may hold only letters, digits, '_', '.', '-'")
        if self.path is None:
            if self.split is not None or self.subjects is not None:
                raise ValueError(f"{self.task}: `split` and `subjects` apply to local folders (set `path`)")
            return self
        if self.task not in LOCAL_BENCHMARK_TASKS:
            raise ValueError(f"task '{self.task}' cannot read local files; with `path`, task is one of "
                             f"{', '.join(LOCAL_BENCHMARK_TASKS)} (without `path`, any lm-eval task name)")
        if self.subjects is not None and self.task not in (*CSV_BENCHMARK_TASKS, *MINIMAL_PAIR_TASKS):
            raise ValueError(f"{self.task}: `subjects` applies to mmlu, ceval, cmmlu and blimp folders")
        if self.task in MINIMAL_PAIR_TASKS and (self.num_fewshot or self.split is not None):
            raise ValueError(f"{self.task}: minimal pairs are scored without few-shot examples or splits")
        if self.task in TRUTHFULQA_TASKS:
            if self.num_fewshot:
                raise ValueError(f"{self.task}: num_fewshot must be 0; its prompt already holds six solved "
                                 "questions and mc_task.json has no few-shot split")
            if self.split is not None:
                raise ValueError(f"{self.task}: `split` applies to folders; mc_task.json has one split")
        return self

    @property
    def metric_prefix(self) -> str:
        return self.name or self.task


class EvalConfig(_Section):
    """What `weitiao eval` and the end of `weitiao train` measure, for the base and the tuned model."""
    compare: bool = True
    """After training, evaluate base and tuned side by side on the eval split and write report.md/json/png."""
    generation: bool = True
    """Generate replies for the eval split and score them (exact match, ROUGE, BLEU-4); loss is always measured."""
    max_examples: int = Field(200, gt=0)
    """Generation and choice metrics use at most this many eval examples (the first ones)."""
    extractor: Literal["none", "last_number", "gsm8k", "json", "label", "regex", "sql"] = "none"
    """How exact match reads an answer: whole reply, last number, GSM8K '#### N', JSON value, label word, regex,
    or SQL (case and whitespace normalised, a markdown code fence and the final ';' dropped)."""
    regex: str | None = None
    """Pattern for extractor: regex; its first group is the answer."""
    labels: list[str] = Field(default_factory=list)
    """Label words for extractor: label (the first one found in the reply is the answer)."""
    choices: list[str] = Field(default_factory=list)
    """Constrained choice for classification, e.g. [neg, pos]: each choice is scored by its log-likelihood as the
    reply to the eval prompt (chat template and end of turn included, as trained) and the most likely one is the
    prediction. Reports choice accuracy, macro F1 and a confusion matrix. Every eval reference must be a choice."""
    sql_database: str | None = None
    """Text-to-SQL: a SQLite file on which the generated and the reference SQL are both run (read-only) and their
    result sets compared (execution match; row order counts only when the reference has ORDER BY). Relative to
    the config file."""
    sql_timeout: float = Field(5.0, gt=0)
    """Seconds one query may run on sql_database; a slower prediction counts as wrong."""
    max_new_tokens: int = Field(256, gt=0)
    """Longest generated reply."""
    batch_size: int = Field(16, gt=0)
    """Prompts per batch, for generation and for benchmark scoring; (prompt, choice) pairs per batch for choices.
    Generation decodes at least this many replies at once (64 on a GPU, where the engine batches continuously)."""
    do_sample: bool = False
    """Sample instead of greedy decoding (with temperature and top_p)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with do_sample)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (with do_sample)."""
    num_samples: int = Field(5, ge=0)
    """Prompts shown in the report with the base answer, the tuned answer and the reference."""
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    """Multiple-choice benchmarks (lm-evaluation-harness) scored for both models; see docs/eval.md."""

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.extractor == "regex" and not self.regex:
            raise ValueError("extractor: regex needs eval.regex (a pattern with one group)")
        if self.extractor == "label" and not self.labels:
            raise ValueError("extractor: label needs eval.labels, e.g. [neg, pos]")
        if self.choices and (len(set(self.choices)) != len(self.choices) or len(self.choices) < 2
                             or not all(choice.strip() for choice in self.choices)):
            raise ValueError("eval.choices must be two or more different, non-empty answers, e.g. [neg, pos]")
        if self.sql_database and not self.generation:
            raise ValueError("eval.sql_database scores generated SQL: it needs eval.generation: true")
        prefixes = [benchmark.metric_prefix for benchmark in self.benchmarks]
        repeated = sorted({prefix for prefix in prefixes if prefixes.count(prefix) > 1})
        if repeated:
            raise ValueError(f"two benchmarks are named {', '.join(repeated)}; give one of them a `name`")
        return self


class CleanConfig(_Section):
    """Options of `weitiao data clean`: each rule removes records, and every removed record is written to the side
    file OUT.removed.jsonl with the rule that removed it."""
    exact_dedup: bool = True
    """Remove a record whose normalised text (Unicode NFKC, case-folded, whitespace collapsed) equals an earlier
    one's."""
    near_dedup: bool = True
    """Remove a record that is a near duplicate of an earlier kept one (MinHash LSH over character n-grams)."""
    near_dup_threshold: float = Field(0.85, gt=0, le=1)
    """Jaccard similarity of the character n-gram sets (estimated by MinHash) from which two records are near
    duplicates."""
    dedup_on: Literal["conversation", "prompt", "response"] = "conversation"
    """What is compared for duplicates: the whole conversation, the prompt only (one reply per prompt is kept), or
    the last reply only."""
    shingle_size: int = Field(5, gt=0)
    """Characters per n-gram for near duplicates (characters, not words, so Chinese needs no segmenter)."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations: more is a more accurate similarity estimate, and slower."""
    truncated: bool = True
    """Remove a record whose last reply looks cut off: an unclosed ``` code fence, or a last character that cannot
    end a text (a comma, colon, semicolon, an opening bracket or quote)."""
    min_response_chars: int = Field(1, ge=1)
    """Remove a record with a reply shorter than this (characters after removing zero-width characters and outer
    whitespace, so a reply of only U+200B counts as empty)."""
    min_prompt_chars: int = Field(0, ge=0)
    """Remove a record whose last prompt is shorter than this, in characters."""
    max_chars: int | None = Field(None, gt=0)
    """Remove a record whose conversation is longer than this, in characters (None: no limit)."""
    truncated_sentence: bool = False
    """Also remove a record whose last reply ends inside a sentence: its last line is prose of 15 characters or
    more that ends in a letter (no closing punctuation, digit, bracket or quote). Catches replies cut at a token
    limit, and also legitimate replies that end without punctuation (a title, a list item), so it is off unless
    asked for."""
    refusal: bool = True
    """Remove a record whose last reply is a short refusal instead of an answer: within its first 150 characters
    an apology or an AI self-reference ("I'm sorry", "As an AI", "抱歉", "作为一个AI语言模型") together with a
    refusal ("I can't", "unable to", "无法", "不能"), in a reply of at most 400 characters."""
    filler: bool = True
    """Remove a record whose last reply is only an acknowledgement ("OK", "Sure.", "好的。", "是的") or a
    placeholder ("Done.", "...", "略", "嗯"): kept where the prompt asks a yes/no question or contains the word
    ("reply OK if you understand"). "None", "N/A" and "无" are never removed (answers to extraction tasks)."""
    boilerplate_records: int | None = Field(10, ge=2)
    """Remove a record whose last reply has a line of 30 characters or more (normalised as for duplicates) that the
    last replies of at least this many records share: a site footer, disclaimer or signature pasted into a dump
    (None: off)."""
    language: Literal["any", "zh", "en", "auto"] = "any"
    """Keep only replies in this language. The share of a language is counted in units (each CJK character is
    one unit, each run of other letters one word), in the replies with fenced code blocks removed; replies with no
    letters are kept. `auto`, for mixed-language data: each reply in the language of the prompt before it (a
    prompt at least 60% CJK answered by a reply at least 80% Latin-script words, or a prompt at least 90% Latin
    words answered by a reply at least half CJK); prompts that ask for a translation or name a language, and
    replies that look like code, are not checked, nor English replies to a Chinese prompt that quotes English text
    or ends with it after a colon (its input: 用“shimmer”造句)."""
    language_share: float = Field(0.5, gt=0, le=1)
    """Share of units that must be in `language` (CJK characters for zh, Latin-script words for en)."""
    model: str | None = None
    """Also score the records that pass every other rule with this model ('default', a folder, a .gguf file or a
    hub id: the model you will fine-tune), as `data select` scores them (two forward passes per record, cached and
    shared with `data select`), for two rules no text rule can apply: `mismatched`, a prompt that does not make the
    reply more likely (IFD, the loss of the reply after the prompt / the loss of the reply alone, at or above
    `mismatch_ifd`, or far above the IFD of similar prompts' records: `mismatch_outlier`; a reply that belongs to
    another prompt, a one-word or off-topic reply), and `truncated`, a reply that stops where the model does not
    expect it to (`end_probability`) or before the final line the replies to similar prompts share
    (`ending_share`). None: off."""
    mismatch_ifd: float = Field(1.0, gt=0)
    """IFD from which a record is removed as mismatched (with `model`)."""
    end_probability: float = Field(0.005, ge=0, lt=1)
    """With `model`: remove as truncated a record whose last reply ends in a letter or a digit (not in punctuation,
    a bracket or a symbol), is 20 characters or longer, and stops where the model, having read the prompt and the
    reply, gives less than this probability to its ending there or starting a new line (the end-of-turn token or a
    token that begins with a newline: a list item or a line of a poem may end without punctuation, a word cut in
    two may not): a reply cut off mid-word or mid-sentence, however short its last line. A conversation longer than
    `max_length` is read from its last `max_length` tokens for this (one more pass over those records). 0: off."""
    neighbours: int = Field(40, ge=0)
    """With `model`: how many records with the nearest prompts each record is compared with by the two rules
    below (cosine similarity of the model's mean hidden state over the prompt, from the scoring pass itself: no
    extra pass); they apply when more than this many records are scored. 0: both off."""
    mismatch_outlier: float = Field(4.0, gt=0)
    """With `model` and `neighbours`: also remove as mismatched a record whose IFD lies this many median absolute
    deviations (at least 0.02) above the median IFD of its neighbours: a reply the prompt helps far less than
    similar prompts help theirs (a shuffled pair, a plausible reply to a similar question), where IFD stays
    under `mismatch_ifd`."""
    ending_share: float = Field(0.9, gt=0, le=1)
    """With `model` and `neighbours`: remove as truncated a last reply that ends in a letter or a digit, where at
    least this share of its neighbours' last replies end with a last line that starts with the same word and
    this one does not (GSM8K's '#### 42', 'The answer is: 42'): a reply cut off before the final line its kind
    always has."""
    template: ScoringTemplate = "auto"
    """Prompt template `model` scores with, as data.template in training."""
    max_length: int = Field(1024, gt=0)
    """Longest sequence `model` scores, in tokens, as data.max_length in training."""


class SelectConfig(_Section):
    """Options of `weitiao data select`: which examples of a dataset to train on (see docs/data-selection.md)."""
    method: Literal["ifd", "kcenter", "ifd+kcenter", "quality", "perplexity", "random"] = "ifd"
    """ifd: the highest Instruction-Following Difficulty below ifd_max; kcenter: k-center greedy on embeddings (the
    most diverse set); ifd+kcenter: k-center clusters, then the highest IFD within each; quality: the highest score
    of a judge prompt or a classifier (`scorer`); perplexity: by response perplexity (`perplexity_keep`); random."""
    ratio: float | None = Field(None, gt=0, le=1)
    """Share of the examples to keep (set ratio or count)."""
    count: int | None = Field(None, gt=0)
    """Number of examples to keep (set ratio or count)."""
    model: str = "default"
    """The model that scores (the base model you will fine-tune): 'default', a folder, a .gguf file or a hub id."""
    template: ScoringTemplate = "auto"
    """Prompt template, as data.template in training: the scores are only meaningful with the template you train
    with. auto (the tokenizer's chat template), alpaca, qa, dolly or chatml."""
    max_length: int = Field(1024, gt=0)
    """Longest scored sequence in tokens, as data.max_length in training (longer ones are cut on the right)."""
    batch_size: int = Field(8, gt=0)
    """Sequences per forward pass."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the scoring model. auto: bfloat16 on a GPU that supports it, float32 otherwise."""
    ifd_max: float = Field(1.0, gt=0)
    """ifd, ifd+kcenter: discard examples with IFD at or above this (at 1 the instruction does not make the
    response any easier to predict)."""
    max_perplexity: float | None = Field(None, gt=1)
    """Any method: first discard examples whose response perplexity (given the prompt) is above this."""
    perplexity_keep: Literal["low", "middle", "high"] = "low"
    """perplexity: keep the lowest-perplexity responses, those around the median, or the highest."""
    clusters: int | None = Field(None, gt=0)
    """ifd+kcenter: number of k-center clusters (default: a tenth of the budget). Each cluster gets at least one
    example and a share of the budget proportional to its size."""
    embedding_model: str | None = None
    """kcenter, ifd+kcenter: a local encoder folder (e.g. a sentence-transformers model) whose mean-pooled last
    hidden states embed the prompts. None: the scoring model's own hidden states."""
    scorer: str = "judge"
    """quality: judge (a causal LM answers `judge_prompt`; the score is the expected rating under its next-token
    probabilities over the ratings 1-5) or classifier (a sequence-classification / reward model). A folder instead
    (a reward-model run of stage rm) means classifier with that folder as scorer_model."""
    scorer_model: str | None = None
    """quality: the judge or classifier model (a folder, .gguf or hub id). None: `model`."""
    judge_prompt: str = ("Rate the quality of the response to the instruction below on a scale of 1 to 5 (5: "
                         "correct, helpful and complete; 1: wrong or useless). Answer with one digit.\n\n"
                         "Instruction:\n{prompt}\n\nResponse:\n{response}")
    """quality, judge: the user turn sent to the judge; {prompt} is the last prompt, {response} the reply."""
    classifier_label: int | None = None
    """quality, classifier: the score is the probability of this label (None: the last label); a model with one
    output (a reward model) is scored by that output."""
    seed: int = 42
    """Seed of random selection and of the first k-center point."""
    report: bool = False
    """Also measure the selection on this data: hold out `report_heldout` of the examples (never selected), select
    from the rest, draw `report_random_subsets` random subsets of the same size, mark the fault-like records with
    `data clean`'s rules, train a small LoRA probe on each subset and compare their held-out response loss with the
    base model's (OUT.report.md; see docs/data-selection.md)."""
    report_heldout: float = Field(0.1, gt=0, lt=1)
    """report: share of the examples held out for the comparison."""
    report_random_subsets: int = Field(3, ge=1)
    """report: how many random subsets of the same size (seeds `seed`, `seed`+1, ...) the selection is compared
    with. One random draw is itself lucky or unlucky by a few thousandths of loss; the spread of several tells a
    real gain (several of their standard deviations) from noise."""
    cache: bool = True
    """Cache scores per example, keyed by the model's files and the exact tokens scored (so by the template,
    max_length and the text too): a rerun, another method or an edited copy of the data rescore only what changed."""

    @model_validator(mode="before")
    @classmethod
    def _scorer_folder(cls, value: Any) -> Any:
        scorer = value.get("scorer") if isinstance(value, dict) else None
        if isinstance(scorer, str) and scorer not in ("judge", "classifier") and Path(scorer).is_dir():
            return {**value, "scorer": "classifier", "scorer_model": scorer}
        return value

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        if value not in ("judge", "classifier"):
            raise ValueError(f"'{value}' is neither judge, classifier nor a folder (a reward model run)")
        return value

    @model_validator(mode="after")
    def _check(self) -> SelectConfig:
        if (self.ratio is None) == (self.count is None):
            raise ValueError("set exactly one of ratio (a share, e.g. 0.1) and count (a number of examples)")
        if "{prompt}" not in self.judge_prompt or "{response}" not in self.judge_prompt:
            raise ValueError("judge_prompt must contain {prompt} and {response}")
        return self


class Config(_Section):
    stage: Literal["sft", "pt", "dpo", "kto", "rm"] = "sft"
    """sft: supervised fine-tuning on conversations; pt: continued pre-training on plain text; dpo: preference
    pairs (DPO, IPO, ORPO or SimPO: pref.loss); kto: binary feedback (a conversation and a boolean label); rm: a
    reward model (a sequence-classification head trained on pairs)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: str = "lora"
    """One of weitiao.methods.METHODS: lora (a LoRA adapter; DoRA and rsLoRA are switches in `lora`), qlora (LoRA
    on a 4-/8-bit base, `quantization`, CUDA only), full (every weight), freeze (the last layers, `freeze`), prefix
    (P-Tuning v2), ptuning, prompt (learned virtual tokens, `prompt_learning`), ia3 (activation scales, `ia3`)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    prompt_learning: PromptLearningConfig = Field(default_factory=PromptLearningConfig)
    ia3: IA3Settings = Field(default_factory=IA3Settings)
    pref: PreferenceConfig = Field(default_factory=PreferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; choose one of {', '.join(METHODS)}")
        return value

    @property
    def method_spec(self):
        """The registry entry of `method` (weitiao.methods.Method)."""
        return METHODS[self.method]

    @model_validator(mode="after")
    def _check(self) -> Config:
        method = self.method_spec
        if self.stage == "pt" and self.data.train_on == "responses":
            self.data.train_on = "all"
        self._check_preference_stage()
        if self.data.packing and not method.packable:
            raise ValueError(f"data.packing cannot be used with method {self.method}: its virtual tokens would be "
                             "shared by every example of a packed row; set data.packing: false")
        if method.quantized_base and self.train.distributed in ("zero3", "zero3_offload", "fsdp"):
            raise ValueError(f"method {self.method} cannot shard its 4-/8-bit base with {self.train.distributed}; "
                             "use distributed: ddp or zero2 (each GPU holds the small quantized base)")
        if self.train.deepspeed and self.train.distributed not in ("zero2", "zero3", "zero3_offload"):
            raise ValueError("train.deepspeed is a DeepSpeed config: set distributed to zero2, zero3 or "
                             "zero3_offload as well")
        if self.data.streaming:
            if self.stage != "pt":
                raise ValueError("data.streaming is for stage: pt (continued pre-training on plain text)")
            if self.train.max_steps <= 0:
                raise ValueError("data.streaming needs train.max_steps: the length of a stream is not known in advance")
            if self.data.val_size and not self.data.eval:
                raise ValueError("data.val_size cannot hold records out of a stream; give held-out files in data.eval")
        if self.model.adapter is not None and not method.continues_adapter:
            methods = [name for name, entry in METHODS.items() if entry.continues_adapter]
            raise ValueError(f"model.adapter continues a LoRA adapter, so method must be {' or '.join(methods)}, not "
                             f"'{self.method}'")
        if self.train.neftune_noise_alpha is not None and self.stage != "sft":
            raise ValueError(f"train.neftune_noise_alpha is for stage sft (instruction tuning), not {self.stage}")
        if self.lora.loraplus_lr_ratio is not None and method.section != "lora":
            raise ValueError(f"lora.loraplus_lr_ratio speeds up LoRA's B matrices; method '{self.method}' has none "
                             "(use method: lora or qlora)")
        if self.train.master_weights is not None and method.trains != "base":
            raise ValueError(f"train.master_weights is for methods that train the base weights (full, freeze); "
                             f"method '{self.method}' trains {method.trains.replace('_', ' ')}")
        if self.train.master_weights == "optimizer" and self.model.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"train.master_weights: optimizer keeps bf16 weights in the model; model.dtype is "
                             f"{self.model.dtype}: set it to auto or bfloat16, or master_weights: model")
        if self.quantization.bits is not None and not method.quantized_base:
            raise ValueError(f"quantization is set but method is '{self.method}': a quantized base trains only "
                             "through an adapter; use method: qlora (full fine-tuning of 4-/8-bit weights is not "
                             "possible)")
        return self

    def _check_preference_stage(self) -> None:
        if self.pref.beta is None:
            self.pref.beta = DEFAULT_BETA[self.pref.loss]
        if self.stage not in (*PAIR_STAGES, *PREFERENCE_STAGES):
            return
        if not self.method_spec.packable:
            raise ValueError(f"stage {self.stage} cannot train method {self.method}: its virtual tokens bypass the "
                             "forward that scores replies; use lora, qlora, ia3, full or freeze")
        if self.train.distributed in ("zero3", "zero3_offload", "fsdp"):
            raise ValueError(f"stage {self.stage} runs on distributed: ddp or zero2 (dpo and kto read the output "
                             "head's weights, which zero3 and fsdp shard; rm has not been tested there)")
        if self.stage in ("rm", "kto"):
            if self.data.packing:
                raise ValueError(f"stage {self.stage} trains on padded batches (rm scores each sequence at its last "
                                 "token; kto pairs the prompts and replies of a batch anew): set data.packing: false")
            self.data.packing = False
        if self.stage == "kto" and self.pref.precompute_reference:
            raise ValueError("pref.precompute_reference is for stage dpo (KTO's KL estimate pairs prompts and "
                             "replies anew in every batch)")
        if self.stage == "kto" and self.model.adapter is not None:
            raise ValueError("stage kto cannot continue an adapter (its reference would be the adapter's model); "
                             "merge it first (weitiao merge) and train on the merged model")


# ---------------------------------------------------------------------------------------------
# Loading: YAML file + overrides, with readable errors.


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class behind an annotation such as `LoraConfig` or `CustomTemplate | None`."""
    candidates = (annotation,) + typing.get_args(annotation)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None and typing.get_origin(field.annotation) is not list:  # a list is one value
            paths.extend(_leaf_paths(section, prefix + (name,)))
        else:
            paths.append(prefix + (name,))
    return paths


def _resolve_key(key: str) -> tuple[str | int, ...]:
    """'train.learning_rate', or a unique leaf name such as 'learning_rate'; '--model X' sets the model path;
    'data.train.0.path' a key of the first item of a list (the item is validated with the config)."""
    parts = tuple(key.replace("-", "_").split("."))
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is not None and index > 0:
        return (*_resolve_key(".".join(parts[:index])), int(parts[index]), *parts[index + 1:])
    if parts == ("model",):
        return ("model", "name_or_path")
    leaves = _leaf_paths(Config)
    if parts in leaves:
        return parts
    matches = [leaf for leaf in leaves if leaf[-len(parts):] == parts]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override '{key}' is ambiguous: " + ", ".join(".".join(m) for m in matches))
    names = [".".join(leaf) for leaf in leaves]
    hint = difflib.get_close_matches(key, names + [leaf[-1] for leaf in leaves], n=1)
    raise ConfigError(f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--train.learning_rate', '1e-4', '--method=full'] -> nested dict. Values are parsed as YAML."""
    result: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        i += 1
        node = result
        path = _resolve_key(key)
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value) if value != "" else ""
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{where}{key}.")
        elif isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            merged[key] = _merge_items(f"{where}{key}", merged.get(key), value)
        else:
            merged[key] = value
    return merged


def _merge_items(key: str, items: Any, extra: dict[int, Any]) -> list[Any]:
    """--data.train.0.path X: the overrides of list items, by index, merged into the items the config has."""
    items = list(items) if isinstance(items, list) else [items] if items is not None else []
    for index, value in extra.items():
        if index >= len(items):
            raise ConfigError(f"override --{key}.{index}...: {key} has {len(items)} item(s)")
        if isinstance(value, dict) and not isinstance(items[index], dict):
            raise ConfigError(f"override --{key}.{index}...: item {index} of {key} is '{items[index]}', not a mapping;"
                              f" give the whole item: --{key}.{index} '{{...}}'")
        items[index] = _merge(items[index], value, f"{key}.{index}.") if isinstance(value, dict) else value
    return items


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section: type[BaseModel] | None = Config
            for part in item["loc"][:-1]:
                if isinstance(part, int):  # an index into a list of sections
                    continue
                field = section.model_fields.get(str(part)) if section else None
                section = _section_type(field.annotation) if field else None
            known = list(section.model_fields) if section else []
            hint = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            message = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        lines.append(f"{loc or '(top level)'}: {message}")
    return f"invalid config {source}: " + "; ".join(lines)


def section_from_dict(section: type[_SectionType], raw: dict[str, Any], source: str = "") -> _SectionType:
    """Validate one config section (e.g. SelectConfig from command-line options), with readable errors."""
    try:
        return section.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def config_from_dict(raw: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config (relative data paths resolve against the file's folder) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "(overrides)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
        raw = _resolve_paths(raw, path.parent)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = _merge(raw, extra)
    return config_from_dict(raw, source)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data, benchmark and database paths in a config file are relative to that file, so examples run from any
    directory."""
    evaluation = raw.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("sql_database"), str):
        candidate = base / evaluation["sql_database"]
        if not Path(evaluation["sql_database"]).is_absolute() and candidate.exists():
            raw = {**raw, "eval": {**evaluation, "sql_database": str(candidate)}}
            evaluation = raw["eval"]
    if isinstance(evaluation, dict) and isinstance(evaluation.get("benchmarks"), list):
        benchmarks = []
        for item in evaluation["benchmarks"]:
            if isinstance(item, dict) and isinstance(item.get("path"), str) and (base / item["path"]).exists():
                item = {**item, "path": str(base / item["path"])}  # an absolute path stays as it is
            benchmarks.append(item)
        raw = {**raw, "eval": {**evaluation, "benchmarks": benchmarks}}
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    data = dict(data)
    for split in ("train", "eval"):
        sources = data.get(split)
        if sources is None:
            continue
        listed = sources if isinstance(sources, list) else [sources]
        resolved = []
        for source in listed:
            if isinstance(source, str):
                source = {"path": source}
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                candidate = base / source["path"]
                if not Path(source["path"]).is_absolute() and (candidate.exists() or any(base.glob(source["path"]))):
                    source = {**source, "path": str(candidate)}
            resolved.append(source)
        data[split] = resolved
    return {**raw, "data": data}


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
