"""weitiao export: a GGUF file that transformers' own GGUF reader loads back to the same model, tokenizer, chat
template and end-of-reply id; an Ollama Modelfile; vLLM / SGLang folders and commands; a model card; --check."""

import shlex
from pathlib import Path

import pytest
import torch

from weitiao.errors import WeitiaoError
from weitiao.serve.export import SGLANG_OPTIONS, VLLM_OPTIONS, check_export, export_run

PROMPTS = ["Extract the person's details: Ana, 30, a baker in Porto.", "Summarise: the meeting moved to Friday."]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer) -> Path:
    """A weitiao LoRA run on a tiny Llama whose weights vary enough (std 0.05) for greedy tokens to differ, with
    query and key weights large enough (std 0.5) for attention to depend on them: a wrong row order of q or k in the
    file then changes the logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    folder = tmp_path_factory.mktemp("export-run")
    model_dir = make_tiny_model(folder / "model", tokenizer, hidden_size=64, weight_std=0.05)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= 10
        layer.self_attn.k_proj.weight.data *= 10
    model.save_pretrained(model_dir)
    result = run(make_config(folder, str(model_dir), train__max_steps=3))
    return Path(result.output_dir)


def merged_model(run: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from weitiao.serve.merge import merge_adapter

    return AutoModelForCausalLM.from_pretrained(merge_adapter(run, tmp_path / "merged"), dtype=torch.float32)


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.masked_fill(batch["attention_mask"][..., None] == 0, 0)


@pytest.mark.parametrize("quant, tolerance", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_loads_back_in_transformers_with_the_same_logits_template_and_eos(quant, tolerance, trained_run,
                                                                               tmp_path, tokenizer):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weitiao.models import load_tokenizer

    export = export_run(trained_run, "gguf", tmp_path / "gguf" / f"model-{quant}.gguf", quant=quant)
    loaded = AutoModelForCausalLM.from_pretrained(export.path.parent, gguf_file=export.path.name, dtype=torch.float32)
    merged = merged_model(trained_run, tmp_path)
    weights = merged.state_dict()
    for name, weight in loaded.state_dict().items():  # every tensor, q and k rows in transformers' order again
        difference = ((weight - weights[name]).norm() / weights[name].norm()).item()
        assert difference < tolerance / 2, f"{name}: relative difference {difference:.2e}"
    reference, exported = logits_of(merged, tokenizer), logits_of(loaded, tokenizer)
    error = ((exported - reference).norm() / reference.norm()).item()
    print(f"{quant}: relative logit error {error:.2e}")
    assert error < tolerance
    agree = (exported.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree > (0.999 if quant == "f16" else 0.9)

    gguf_tokenizer = AutoTokenizer.from_pretrained(export.path.parent, gguf_file=export.path.name)
    assert gguf_tokenizer(PROMPTS[0])["input_ids"] == tokenizer(PROMPTS[0])["input_ids"]
    run_tokenizer = load_tokenizer(str(trained_run))
    assert gguf_tokenizer.chat_template == run_tokenizer.chat_template
    fields = gguf.GGUFReader(export.path).fields
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert eos == run_tokenizer.convert_tokens_to_ids("<|im_end|>")  # the ChatML reply's end, not <|im_start|>
    assert int(fields["general.file_type"].parts[-1][0]) == int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))


def test_modelfile_names_the_file_template_and_stops(trained_run, tmp_path):
    export = export_run(trained_run, "gguf", tmp_path / "out" / "m.gguf", quant="q8_0", name="extract")
    modelfile = export.files[0].read_text()
    assert export.files[0] == tmp_path / "out" / "Modelfile"
    assert "FROM ./m.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and '<|im_start|>assistant\n"""' in modelfile
    assert export.command == ["ollama", "create", "extract", "-f", str(export.files[0])]


def test_vllm_and_sglang_folders_and_commands(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = export_run(trained_run, "vllm", tmp_path / "vllm", name="extract")
    AutoModelForCausalLM.from_pretrained(merged.path)  # a plain transformers folder
    assert (merged.path / "chat_template.jinja").is_file() and (merged.path / "generation_config.json").is_file()
    assert merged.command[:3] == ["vllm", "serve", str(merged.path.resolve())]
    assert merged.command[merged.command.index("--served-model-name") + 1] == "extract"
    assert shlex.join(merged.command) in (merged.path / "README.md").read_text()

    adapter = export_run(trained_run, "vllm", tmp_path / "vllm-lora", adapter=True, name="extract")
    modules = adapter.command[adapter.command.index("--lora-modules") + 1]
    name, path = modules.split("=", 1)
    assert name == "extract" and (Path(path) / "adapter_config.json").is_file()
    assert adapter.command[adapter.command.index("--max-lora-rank") + 1] == "4"
    assert check_export(adapter, trained_run, max_examples=1)["metrics"]["loss"]["exported"] == pytest.approx(
        check_export(merged, trained_run, max_examples=1)["metrics"]["loss"]["exported"], abs=1e-4)

    sglang = export_run(trained_run, "sglang", tmp_path / "sglang", adapter=True, name="extract")
    assert sglang.command[:3] == ["python", "-m", "sglang.launch_server"]
    for command, documented in ((merged.command, VLLM_OPTIONS), (adapter.command, VLLM_OPTIONS),
                                (sglang.command, SGLANG_OPTIONS)):
        assert {word for word in command if word.startswith("--")} <= set(documented)


def test_hf_export_is_a_model_folder_with_a_model_card(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    export = export_run(trained_run, "hf", tmp_path / "hf", name="extract")
    AutoModelForCausalLM.from_pretrained(export.path)
    card = (export.path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "# extract" in card and "train.jsonl" in card


def test_check_reloads_the_gguf_and_measures_the_runs_loss(trained_run, tmp_path):
    from weitiao.runs import RunFolder

    export = export_run(trained_run, "gguf", tmp_path / "c" / "m.gguf", quant="f16")
    checked = check_export(export, trained_run, max_examples=2)
    assert checked["chat_template_kept"]
    assert checked["eos_token_ids"] in (checked["expected_eos_token_id"], [checked["expected_eos_token_id"]])
    loss = checked["metrics"]["loss"]
    assert loss["run"] == pytest.approx(RunFolder(trained_run).result()["eval_loss"])
    assert loss["exported"] == pytest.approx(loss["run"], abs=2e-3)


def test_export_command_prints_the_serve_command_and_the_check(trained_run, tmp_path, capsys):
    from weitiao.cli import main

    out = tmp_path / "cli" / "m.gguf"
    arguments = ["export", str(trained_run), "--to", "gguf", "--out", str(out), "--check", "--check-examples", "2"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert f"exported gguf: {out}" in printed and f"ollama create out -f {out.with_name('Modelfile')}" in printed
    assert "chat template kept: yes" in printed
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("loss ")] == ["loss"]


def test_export_refuses_what_it_cannot_write(trained_run, tmp_path):
    with pytest.raises(WeitiaoError, match="llama-quantize"):
        export_run(trained_run, "gguf", tmp_path / "a.gguf", quant="q4_k_m")
    with pytest.raises(WeitiaoError, match="ending in .gguf"):
        export_run(trained_run, "gguf", tmp_path / "model", quant="f16")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(WeitiaoError, match="already exists"):
        export_run(trained_run, "hf", tmp_path / "taken")
    with pytest.raises(WeitiaoError, match="--adapter"):
        export_run(trained_run, "hf", tmp_path / "hf-adapter", adapter=True)


@pytest.mark.slow
def test_default_model_adapter_exports_with_the_same_greedy_replies(default_model_dir, tmp_path):
    """The real default model (SmolLM2-135M-Instruct) with a LoRA adapter, the pre-tokenizer name kept from the
    GGUF the default model came as. f16: the same greedy replies as base + adapter. q8_0: logits within 5%
    (measured 3.4-3.5%) and the same next token at most positions (measured 89-94%); its greedy replies may part
    where two tokens nearly tie (seen: 26.98 vs 26.72 unquantized, 26.61 vs 26.63 in q8_0, a reply's first token)."""
    import gguf
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_lora_adapter
    from weitiao.models import default_gguf, load_tokenizer

    adapter = make_lora_adapter(tmp_path / "adapter", Path(default_model_dir))
    (adapter / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "default"}}))
    tokenizer = load_tokenizer(str(adapter))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir), str(adapter)).eval()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
             for question in ("What is the capital of France?", "Name three colours.", "Write a haiku about rain.")]
    for quant in ("f16", "q8_0"):
        export = export_run(adapter, "gguf", tmp_path / quant / f"smollm-{quant}.gguf", quant=quant)
        pre = gguf.GGUFReader(export.path).fields["tokenizer.ggml.pre"]
        original = gguf.GGUFReader(default_gguf()).fields["tokenizer.ggml.pre"]
        assert bytes(pre.parts[-1]) == bytes(original.parts[-1]) == b"smollm"
        loaded = AutoModelForCausalLM.from_pretrained(export.path.parent, gguf_file=export.path.name,
                                                      dtype=torch.float32)
        for text in chats:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                reference, exported = tuned(ids).logits, loaded(ids).logits
            error = ((exported - reference).norm() / reference.norm()).item()
            agree = (exported.argmax(-1) == reference.argmax(-1)).float().mean().item()
            print(f"{quant}: relative logit error {error:.2e}, same next token at {agree:.1%} of positions")
            if quant == "f16":
                replies = [model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
                           for model in (tuned, loaded)]
                assert replies[0] == replies[1]
            else:
                assert error < 0.05 and agree > 0.85


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_read_back_tensor_for_tensor(model_type, tmp_path, tokenizer):
    """write_gguf on a tiny model of each other architecture it names: transformers' GGUF reader gives back every
    tensor (Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's Llama layout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from weitiao.serve.export import write_gguf

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, tie_word_embeddings=model_type != "mistral",
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for parameter in model.parameters():  # visible biases and norms, not the initial zeros and ones
        if parameter.dim() == 1:
            parameter.data.normal_(0.5, 0.2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = write_gguf(tmp_path / "model", tmp_path / "model.gguf", "f16", [tokenizer.eos_token_id])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    weights = model.state_dict()
    for name, weight in loaded.state_dict().items():
        difference = ((weight - weights[name]).norm() / weights[name].norm()).item()
        assert difference < 1e-3, f"{name}: relative difference {difference:.2e}"
