"""`weitiao export RUN --to gguf|hf|vllm|sglang`: a trained run in the form another server loads.

- gguf: the merged model as one GGUF file for llama.cpp and Ollama, written with the `gguf` library (its writer,
  tensor-name maps, quantizers and special-vocabulary reader; llama.cpp's q/k row order for Llama), carrying the
  tokenizer, the chat template the run trained with and its end-of-reply id as EOS; an Ollama `Modelfile` beside it.
- hf: the merged model as a plain transformers folder with a model card (README.md) holding the run's report.
- vllm / sglang: that folder, or with `--adapter` the base plus the LoRA adapter as it is, and the exact command
  to serve it, printed and written to the folder's README.md.

`--check` loads what was written back (the GGUF through transformers' own GGUF reader, with the tokenizer and chat
template found in the file) and runs the run's evaluation on it, next to the run's reported numbers.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weitiao.errors import WeitiaoError

if TYPE_CHECKING:  # imported where used: `weitiao --help` builds its parser from this module's constants
    import numpy as np

    from weitiao.runs import RunFolder

TARGETS = ("gguf", "hf", "vllm", "sglang")
# --quant: the GGML type of 2-D weights (norms and biases stay F32). K-quants (q4_k_m ...) are not offered: the gguf
# library can read them but not write them; llama.cpp's llama-quantize turns an f16 export into any of them.
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")
# transformers model_type -> llama.cpp architecture; Llama-style q/k rows are reordered for llama.cpp's RoPE.
GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
ROTARY_REORDERED = ("llama", "mistral")
# The vLLM / SGLang options the commands use, as documented (docs.vllm.ai "vllm serve" and "LoRA Adapters";
# docs.sglang.io "Server Arguments" and "LoRA Serving": --lora-paths NAME=PATH); tests check the commands against them.
VLLM_OPTIONS = ("--served-model-name", "--max-model-len", "--chat-template", "--generation-config", "--enable-lora",
                "--lora-modules", "--max-lora-rank")
SGLANG_OPTIONS = ("--model-path", "--served-model-name", "--context-length", "--chat-template", "--enable-lora",
                  "--lora-paths", "--max-lora-rank")


@dataclass
class Export:
    """What an export wrote: the artifact (file or folder), the serve command if any, other files, and the adapter
    folder when base and adapter are served unmerged."""
    target: str
    path: Path
    command: list[str] | None = None
    files: list[Path] = field(default_factory=list)
    adapter: Path | None = None


def export_run(run_dir: str | Path, to: str, out: str | Path, quant: str = "f16", adapter: bool = False,
               name: str | None = None) -> Export:
    """Export the run in `run_dir` to `out` (a .gguf file for gguf, a new folder otherwise)."""
    from weitiao.runs import RunFolder

    run = RunFolder(run_dir)
    run.check_trained()
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise WeitiaoError(f"--out {out} already exists; choose a new path")
    name = name or run.path.resolve().name
    if to == "gguf":
        return _export_gguf(run, out, quant, name)
    if adapter:
        if to not in ("vllm", "sglang") or not run.holds_adapter:
            raise WeitiaoError("--adapter serves base + LoRA adapter unmerged: it applies to --to vllm/sglang and an "
                               "adapter run")
        return _serve_adapter(run, out, to, name)
    folder = _merged_folder(run, out)
    if to == "hf":
        card = folder / "README.md"
        card.write_text(model_card(run, name), encoding="utf-8")
        return Export("hf", folder, files=[card])
    return _serve_merged(folder, to, name)


def _merged_folder(run: RunFolder, out: Path) -> Path:
    """The run's model as one transformers folder at `out`: the adapter merged into its base, or a full model."""
    from weitiao.serve.merge import merge_adapter  # torch and PEFT: imported when a merge runs

    if run.holds_adapter:
        return merge_adapter(run.path, out, dtype="fp32")
    shutil.copytree(run.path, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints", "*.png", "metrics.jsonl", "report.*"))
    return out


# -- GGUF ------------------------------------------------------------------------------------------


def _export_gguf(run: RunFolder, out: Path, quant: str, name: str) -> Export:
    from transformers import AutoConfig

    if quant not in GGUF_QUANTS:
        raise WeitiaoError(f"--quant {quant} is not one of {', '.join(GGUF_QUANTS)} (K-quants such as q4_k_m: export "
                           "f16, then run llama.cpp's llama-quantize on the file)")
    if out.suffix != ".gguf":
        raise WeitiaoError(f"--out {out} for --to gguf is a file name ending in .gguf, e.g. {out}.gguf")
    with tempfile.TemporaryDirectory(prefix="weitiao-export-") as scratch:
        folder = _merged_folder(run, Path(scratch) / "merged") if run.holds_adapter else run.path
        eos = _end_of_reply_ids(run, AutoConfig.from_pretrained(folder).eos_token_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(folder, out, quant, eos, pre_tokenizer=_pre_tokenizer(run), name=name)
    modelfile = out.with_name("Modelfile")
    modelfile.write_text(ollama_modelfile(out, folder_tokenizer(run), run.stop_strings()), encoding="utf-8")
    return Export("gguf", out, command=["ollama", "create", name, "-f", str(modelfile)], files=[modelfile])


def write_gguf(folder: Path, out: Path, quant: str, eos_ids: list[int], pre_tokenizer: str = "default",
               name: str = "model") -> Path:
    """Write the transformers model in `folder` as a GGUF file with 2-D weights in `quant`."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in GGUF_ARCHS:
        raise WeitiaoError(f"GGUF export covers {', '.join(GGUF_ARCHS)} models; this one is {config.model_type}: "
                           "export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise WeitiaoError(f"this model uses {rope['rope_type']} RoPE scaling, which the GGUF export does not write; "
                           "export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHS[config.model_type])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = getattr(gguf.GGMLQuantizationType, quant.upper())
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32}.get(quant) or
                         getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    _add_tokenizer(writer, folder, tokenizer, config.vocab_size, eos_ids, pre_tokenizer)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd as the output matrix when no output tensor is present
        data = tensor.numpy()
        if config.model_type in ROTARY_REORDERED and key.endswith(("q_proj.weight", "k_proj.weight")):
            data = _llama_cpp_rotary_order(data, heads if key.endswith("q_proj.weight") else kv_heads)
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise WeitiaoError(f"no GGUF name for tensor {key} of a {config.model_type} model")
        _add_tensor(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _llama_cpp_rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp rotates interleaved pairs of each head's rows, transformers the two halves: reorder the rows
    (convert_hf_to_gguf.py's LlamaModel.permute; transformers' GGUF reader undoes it)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_tensor(writer, name: str, data: np.ndarray, qtype) -> None:
    """1-D tensors (norms, biases) in F32; 2-D ones in `qtype`, or F16 where their rows do not fill whole blocks."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == types.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    if qtype not in (types.F16, types.BF16) and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = types.F16
    if qtype == types.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, eos_ids: list[int], pre_tokenizer: str) -> None:
    """A byte-level BPE vocabulary (gpt2 style: Llama 3, Qwen, SmolLM) with its merges, special ids and template."""
    import gguf

    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_type != "BPE":
        raise WeitiaoError(f"GGUF export writes byte-level BPE tokenizers; this one is {model_type} (SentencePiece "
                           "style): export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        types.append(gguf.TokenType.NORMAL if index not in added else
                     gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # The reply ends at the template's end-of-turn token: EOS in the file, so llama.cpp and Ollama stop there.
    special.special_token_ids["eos"] = eos_ids[0]
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    if len(eos_ids) > 1:
        writer.add_eot_token_id(eos_ids[1])


def _end_of_reply_ids(run: RunFolder, fallback: Any = None) -> list[int]:
    """The run's end-of-reply ids (its generation_config.json, else `fallback`), its template's end-of-turn token
    first."""
    tokenizer = folder_tokenizer(run)
    ids = run.eos_token_ids(tokenizer, fallback)
    stops = [tokenizer.convert_tokens_to_ids(stop) for stop in run.stop_strings()
             if stop in tokenizer.get_vocab()]
    return [*[i for i in stops if i in ids], *[i for i in ids if i not in stops]] or [tokenizer.eos_token_id]


def _pre_tokenizer(run: RunFolder) -> str:
    """llama.cpp's name for the pre-tokenizer: kept from the base model's GGUF file when the base came as one
    (the default model does), else 'default' (llama.cpp then splits text as GPT-2 does and says so)."""
    import gguf

    from weitiao.models import DEFAULT_MODEL, default_gguf

    try:
        base = run.base_model() if run.holds_adapter else (run.raw_config().get("model") or {}).get("name_or_path")
    except WeitiaoError:
        return "default"
    source = default_gguf() if base == DEFAULT_MODEL else Path(str(base)) if str(base).endswith(".gguf") else None
    if source is None or not source.is_file():
        return "default"
    field_ = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else "default"


def folder_tokenizer(run: RunFolder):
    from weitiao.models import load_tokenizer

    return load_tokenizer(str(run.path)) if run.has_tokenizer else load_tokenizer(run.base_model())


def ollama_modelfile(gguf_file: Path, tokenizer, stops: list[str]) -> str:
    """An Ollama Modelfile: the file, the chat template in Ollama's Go syntax for ChatML templates (the run's own
    template is in the GGUF metadata; others must be written by hand, which the file says), and the stop tokens."""
    lines = [f"# ollama create NAME -f {gguf_file.with_name('Modelfile')}", f"FROM ./{gguf_file.name}"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                             add_generation_prompt=True)
    if "<|im_start|>" in rendered:
        default_system = rendered.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0] \
            if rendered.startswith("<|im_start|>system\n") else ""
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
        lines.append('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                     '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}'
                     '<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n"""')
    else:
        lines.append("# The chat template is not ChatML: write its TEMPLATE in Ollama's Go syntax from the one in "
                     "the GGUF metadata (tokenizer.chat_template).")
    end_of_turn = [tokenizer.eos_token] if tokenizer.eos_token else []
    for stop in dict.fromkeys([*stops, *end_of_turn]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


# -- vLLM and SGLang -------------------------------------------------------------------------------


def _serve_merged(folder: Path, to: str, name: str) -> Export:
    command = serve_command(to, str(folder.resolve()), name, _context_length(folder), folder / "chat_template.jinja")
    return Export(to, folder, command, [_write_serve_readme(folder, to, command)])


def _serve_adapter(run: RunFolder, out: Path, to: str, name: str) -> Export:
    """Base + adapter unmerged: the adapter folder copied beside a note; the base as the run names it."""
    from weitiao.models import resolve_model

    adapter = out / name
    shutil.copytree(run.path, adapter, ignore=shutil.ignore_patterns("checkpoints", "*.png", "metrics.jsonl"))
    base = resolve_model(run.base_model())
    rank = json.loads((run.path / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)
    command = serve_command(to, str(Path(base).resolve()) if Path(base).exists() else base, "base",
                            _context_length(Path(base)) if Path(base).exists() else None,
                            adapter / "chat_template.jinja", lora=(name, str(adapter.resolve()), int(rank)))
    return Export(to, out, command, [_write_serve_readme(out, to, command)], adapter=adapter)


def serve_command(to: str, model: str, name: str, context: int | None, template: Path,
                  lora: tuple[str, str, int] | None = None) -> list[str]:
    """`vllm serve ...` or `python -m sglang.launch_server ...` for a model folder (and a LoRA adapter)."""
    chat_template = [str(template.resolve())] if template.is_file() else []
    if to == "vllm":
        command = ["vllm", "serve", model, "--served-model-name", name, "--generation-config", "auto"]
        command += ["--max-model-len", str(context)] if context else []
        command += ["--chat-template", *chat_template] if chat_template else []
        if lora:
            command += ["--enable-lora", "--lora-modules", f"{lora[0]}={lora[1]}", "--max-lora-rank", str(lora[2])]
        return command
    command = ["python", "-m", "sglang.launch_server", "--model-path", model, "--served-model-name", name]
    command += ["--context-length", str(context)] if context else []
    command += ["--chat-template", *chat_template] if chat_template else []
    if lora:
        command += ["--enable-lora", "--lora-paths", f"{lora[0]}={lora[1]}", "--max-lora-rank", str(lora[2])]
    return command


def _context_length(folder: Path) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)


def _write_serve_readme(folder: Path, to: str, command: list[str]) -> Path:
    server = {"vllm": "vLLM", "sglang": "SGLang"}[to]
    path = folder / "README.md"
    path.write_text(f"# Serve with {server}\n\n```bash\n{shlex.join(command)}\n```\n\nAn OpenAI-compatible API on port "
                    f"{8000 if to == 'vllm' else 30000}; the chat template is the one the run trained with, and "
                    "generation_config.json ends a reply at its end-of-turn token.\n", encoding="utf-8")
    return path


# -- model card ------------------------------------------------------------------------------------


def model_card(run: RunFolder, name: str) -> str:
    """A Hugging Face model card: what was trained, on what data, with the run's before/after numbers."""
    from weitiao.models import DEFAULT_MODEL

    raw = run.raw_config()
    base = (raw.get("model") or {}).get("name_or_path", "unknown")
    base = "SmolLM2-135M-Instruct (weitiao's default model)" if base == DEFAULT_MODEL else f"`{base}`"
    data = raw.get("data") or {}
    train = [source if isinstance(source, str) else source.get("path") for source in
             (data.get("train") if isinstance(data.get("train"), list) else [data.get("train")]) if source]
    lines = ["---", "library_name: transformers", "tags: [weitiao, fine-tuned]", "---", "", f"# {name}", "",
             f"Fine-tuned from {base} with weitiao (stage {raw.get('stage', 'sft')}, method "
             f"{raw.get('method', 'lora')}), adapter merged into the weights.", "",
             f"Training data: {', '.join(f'`{path}`' for path in train) or 'see config.yaml'}.", ""]
    report: dict[str, Any] | None = run.report()
    if report and report.get("metrics"):
        lines += ["| metric | base | tuned |", "|---|---:|---:|"]
        for metric, values in report["metrics"].items():
            if isinstance(values, dict) and "base" in values and "tuned" in values:
                lines.append(f"| {metric} | {_number(values['base'])} | {_number(values['tuned'])} |")
        lines.append("")
    lines.append("The run's config is in `config.yaml`; the chat template it trained with is in the tokenizer.")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- --check ---------------------------------------------------------------------------------------


def check_export(export: Export, run_dir: str | Path, max_examples: int | None = None) -> dict[str, Any]:
    """Load what `export` wrote as its server would read it and evaluate it on the run's eval split; returns the
    metrics next to the run's reported ones, and whether the chat template and end-of-reply id survived."""
    import torch
    from transformers import AutoModelForCausalLM

    from weitiao.data.dataset import build_datasets
    from weitiao.eval.compare import evaluate_model
    from weitiao.models import load_tokenizer, resolve_model
    from weitiao.runs import RunFolder

    run = RunFolder(run_dir)
    config = run.config([f"--eval.max_examples={max_examples}"] if max_examples else None)
    if export.target == "gguf":  # read as weitiao reads any GGUF file: transformers' reader, tokenizer from the file
        folder = Path(resolve_model(str(export.path)))
    else:
        folder = export.adapter or export.path
    tokenizer = load_tokenizer(str(folder))
    if export.adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    trained = folder_tokenizer(run)
    eos = model.generation_config.eos_token_id
    _, eval_set, _ = build_datasets(config.data, tokenizer, config.stage, config.train.seed)
    if eval_set is None or len(eval_set) == 0:
        raise WeitiaoError("--check needs the run's evaluation data (data.eval or data.val_size in its config)")
    result = evaluate_model(model, tokenizer, eval_set, config, f"exported {export.target}")
    reported = {name: values["tuned"] for name, values in ((run.report() or {}).get("metrics") or {}).items()}
    if "loss" not in reported and (run.path / RunFolder.RESULT).is_file():  # no report: the run's final eval loss
        reported["loss"] = run.result().get("eval_loss")
    return {"chat_template_kept": tokenizer.chat_template == trained.chat_template,
            "eos_token_ids": eos, "expected_eos_token_id": _end_of_reply_ids(run)[0],
            "metrics": {name: {"run": reported.get(name), "exported": value}
                        for name, value in result["metrics"].items()}}
