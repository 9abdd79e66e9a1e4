"""GPU paths, run on a CUDA machine (skipped elsewhere): varlen and flex-attention packing, Liger kernels,
compiled layers, the fused LoRA update, offloaded checkpoints, QLoRA, 8-bit optimizers. CI has no GPU; these run
through the device tool; their output is kept in bench/results/logs (run9-gpu-tests-h200.log: all of them then;
run14-varlen-gpu-tests-h200.log: the varlen ones; the end of run15-fused-lora-and-chunks-1b.log: the fused LoRA one,
in an earlier form that also fused in compiled layers; run31-offload-h200.log: the offload one;
run35-gpu-preference-h200.log: the preference stages, after run32's had found a stride-0 sequence index that the
loader could not pin; cuda-graphs/run77-gputest.log and run78-gputest.log: the CUDA graph tests and the runs that
have graphs on by default) and quoted in docs/performance.md and docs/alignment.md."""

import copy
import gc
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _examples():
    torch.manual_seed(0)
    examples = []
    for length in (37, 120, 65, 300, 9):
        ids = torch.randint(5, 1000, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return examples


def _loss_and_grads(model_dir, batch, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention,
                                                 dtype=torch.float32).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "num_tokens"}
    loss = model(**batch, use_cache=False, num_items_in_batch=1).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_flex_attention_packing_equals_padded_batches(tiny_model_dir):
    from weitiao.data.collate import PadCollator
    from weitiao.data.packing import PackedCollator

    examples = _examples()
    padded_loss, padded_grads = _loss_and_grads(tiny_model_dir, PadCollator(0)(examples), "sdpa")
    packed_loss, packed_grads = _loss_and_grads(tiny_model_dir, PackedCollator(0, 1024)(examples), "flex_attention")
    print(f"fp32 summed loss: padded {padded_loss.item():.6f} packed(flex) {packed_loss.item():.6f}")
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-3)
    worst = max(((packed_grads[n] - g).norm() / g.norm()).item() for n, g in padded_grads.items() if g.norm() > 0)
    print(f"largest relative gradient difference: {worst:.2e}")
    assert worst < 1e-3


def test_varlen_flash_attention_packing_equals_padded_batches(tiny_model_dir):
    """FlashAttention runs in bf16: fp32 weights under bf16 autocast (as in full fine-tuning; RoPE leaves q and k in
    fp32 there), padded batches on sdpa under the same autocast."""
    from weitiao.data.collate import PadCollator
    from weitiao.data.packing import PackedCollator
    from weitiao.train.attention import VARLEN, register_varlen_attention

    register_varlen_attention()
    examples = _examples()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded_loss, padded_grads = _loss_and_grads(tiny_model_dir, PadCollator(0)(examples), "sdpa")
        packed_loss, packed_grads = _loss_and_grads(tiny_model_dir, PackedCollator(0, 1024, boundaries=True)(examples),
                                                    VARLEN)
    print(f"bf16 summed loss: padded {padded_loss.item():.4f} packed(varlen) {packed_loss.item():.4f}")
    torch.testing.assert_close(packed_loss, padded_loss, rtol=2e-3, atol=1e-2)
    worst = max(((packed_grads[n] - g).norm() / g.norm()).item() for n, g in padded_grads.items() if g.norm() > 0)
    print(f"largest relative gradient difference: {worst:.2e}")
    assert worst < 3e-2


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn-4")
def test_flash_attention_4_gives_the_outputs_and_gradients_of_torch_varlen():
    """model.varlen_kernel flash_attn_4 on one packed row (examples of 1 to 700 tokens, grouped-query heads): each
    kernel's bf16 output and q/k/v gradients lie as close to an fp32 per-example reference as the other's."""
    from weitiao.train.attention import FLASH_ATTN_4, TORCH_FLASH, has_flash_attn_4, varlen_attention_forward

    if not has_flash_attn_4(torch.device("cuda")):
        pytest.skip("flash-attn-4's backward needs compute capability 9.0 or later")
    generator = torch.Generator("cuda").manual_seed(0)
    lengths = [700, 1, 129, 64, 300, 2, 500, 352]
    boundaries = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q, k, v = (torch.randn(1, h, total, dim, device="cuda", generator=generator) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, total, heads, dim, device="cuda", generator=generator)

    def attention(kernel: str | None, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if kernel is None:  # fp32 reference, example by example
            flat = [t.transpose(1, 2).reshape(total, t.shape[1], dim) for t in inputs]
            out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in flat), is_causal=True, enable_gqa=True).transpose(0, 1)
                for a, b in zip(boundaries[:-1].tolist(), boundaries[1:].tolist())]).view(1, total, heads, dim)
        else:
            out, _ = varlen_attention_forward(torch.nn.Module(), *inputs, None, scaling=dim ** -0.5, kernel=kernel,
                                              cu_seq_lens_q=boundaries, max_length_q=max(lengths))
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]

    reference = attention(None, torch.float32)
    errors = {kernel: [((a - b).norm() / b.norm()).item() for a, b in zip(attention(kernel, torch.bfloat16), reference)]
              for kernel in (TORCH_FLASH, FLASH_ATTN_4)}
    print("relative error against fp32 (out, dq, dk, dv): " +
          "; ".join(f"{kernel} " + ", ".join(f"{e:.2e}" for e in errs) for kernel, errs in errors.items()))
    for fa2, fa4 in zip(errors[TORCH_FLASH], errors[FLASH_ATTN_4]):
        assert fa4 < max(2 * fa2, 1e-2)


def test_flash_attentions_backward_from_its_kept_output_gives_autograds_gradients():
    """varlen_forward_keeping and varlen_backward_from_kept (the checkpointed graphs' attention without a second
    forward pass) give the output and q/k/v gradients that autograd gives through torch's varlen attention, on one
    packed row with grouped-query heads."""
    from weitiao.train.attention import (keeps_attention_output, register_varlen_attention,
                                         varlen_attention_forward, varlen_backward_from_kept, varlen_forward_keeping)

    if not keeps_attention_output():
        pytest.skip("needs torch >= 2.11 (varlen attention's log-sum-exp and backward op)")
    register_varlen_attention()
    generator = torch.Generator("cuda").manual_seed(0)
    lengths = [700, 1, 129, 64, 300, 2, 500, 352]
    boundaries = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q, k, v = (torch.randn(1, h, total, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, total, heads * dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    call = dict(cu_seq_lens_q=boundaries, max_length_q=max(lengths))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = varlen_attention_forward(torch.nn.Module(), *inputs, None, scaling=dim ** -0.5, **call)
    expected = [out.reshape(total, heads, dim), *torch.autograd.grad(out, inputs, grad.view_as(out))]
    kept_output, lse = varlen_forward_keeping(q, k, v, dim ** -0.5, **call)
    actual = [kept_output, *varlen_backward_from_kept(grad, q, k, v, kept_output, lse, dim ** -0.5, **call)]
    errors = {name: ((a.float() - b.float()).norm() / b.float().norm()).item()
              for name, a, b in zip(("output", "dq", "dk", "dv"), actual, expected) if a.shape == b.shape}
    print("relative error against autograd: " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    # The same kernels on the same inputs: equal, but for the order of FlashAttention's atomic additions into dq.
    assert errors["output"] == errors["dk"] == errors["dv"] == 0 and errors["dq"] < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn-4")
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_flash_attention_4_trains_lora_to_the_losses_of_torch_varlen(tmp_path, tokenizer):
    """The same LoRA run on packed rows (CUDA graphs on, the default) with each varlen kernel: the same losses."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.runs import RunFolder
    from weitiao.train import run
    from weitiao.train.attention import has_flash_attn_4

    if not has_flash_attn_4(torch.device("cuda")):
        pytest.skip("flash-attn-4's backward needs compute capability 9.0 or later")
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    options = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                   data__packing=True, data__packing_length=512)
    results = {kernel: run(make_config(tmp_path / kernel, model_dir, model__varlen_kernel=kernel, **options))
               for kernel in ("torch", "flash_attn_4")}
    for kernel, result in results.items():
        assert RunFolder(result.output_dir).settings()["varlen_kernel"] == kernel
    losses = {kernel: result.eval_loss for kernel, result in results.items()}
    print("eval loss: " + ", ".join(f"{kernel} {loss:.5f}" for kernel, loss in losses.items()))
    assert abs(losses["flash_attn_4"] - losses["torch"]) < 1e-2


def test_varlen_model_keeps_the_rows_of_an_unpadded_batch_apart(tiny_model_dir):
    """Evaluation batches of rows cut at max_length carry no mask: FlashAttention must see one sequence per row."""
    from weitiao.data.collate import PadCollator
    from weitiao.train.attention import VARLEN, register_varlen_attention

    register_varlen_attention()
    batch = PadCollator(0)([{"input_ids": e["input_ids"][:9], "labels": e["labels"][:9]} for e in _examples()])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [_loss_and_grads(tiny_model_dir, batch, attention)[0] for attention in ("sdpa", VARLEN)]
    print(f"bf16 summed loss of an unpadded batch: sdpa {losses[0].item():.4f} varlen {losses[1].item():.4f}")
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_liger_and_packing_train_to_the_same_loss(tmp_path, tiny_model_dir):
    from tests.train.test_sft import make_config
    from weitiao.train import run

    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5)
    plain = run(make_config(tmp_path / "a", tiny_model_dir, data__packing=False, train__liger=False, **settings))
    fast = run(make_config(tmp_path / "b", tiny_model_dir, data__packing=False, train__liger=True, **settings))
    print(f"eval loss: plain {plain.eval_loss:.5f}, liger {fast.eval_loss:.5f}")
    assert abs(plain.eval_loss - fast.eval_loss) < 2e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_compiled_layers_with_the_liger_loss_train_to_the_same_loss(tmp_path, tokenizer):
    """train.torch_compile compiles each decoder layer and keeps Liger's fused loss only. The eager run before it
    patched transformers' Llama module for the whole process (RoPE, RMSNorm, MLP); the compiled run must not
    trace those Triton kernels."""
    from transformers.models.llama import modeling_llama

    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import kernels
    from weitiao.train import run

    # Heads of 64 dimensions, as in real models: for the tiny model's heads of 16, inductor's flex-attention lowering
    # found no kernel configuration ("NoValidChoicesError").
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=512)
    eager = run(make_config(tmp_path / "a", model_dir, **settings))
    original = kernels._unpatched[modeling_llama.__name__]
    assert modeling_llama.apply_rotary_pos_emb is not original["apply_rotary_pos_emb"]  # Liger's, process-wide
    compiled = run(make_config(tmp_path / "b", model_dir, train__torch_compile=True, **settings))
    assert modeling_llama.apply_rotary_pos_emb is original["apply_rotary_pos_emb"]
    assert modeling_llama.LlamaRMSNorm is original["LlamaRMSNorm"]
    assert not [type(module).__name__ for module in compiled.model.modules() if "Liger" in type(module).__name__]
    print(f"eval loss: eager {eager.eval_loss:.5f}, compiled {compiled.eval_loss:.5f}")
    assert abs(eager.eval_loss - compiled.eval_loss) < 2e-2


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_plain_peft_reloads_it(bits, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.train.test_sft import make_config
    from weitiao.train import run

    # Liger off: the reload below runs plain transformers kernels, so the comparison is like for like.
    result = run(make_config(tmp_path, tiny_model_dir, method="qlora", quantization__bits=bits, train__max_steps=8,
                             train__optim="paged_adamw_8bit", train__bf16=True, train__liger=False))
    print(f"qlora {bits}-bit: eval loss {result.eval_loss_before:.4f} -> {result.eval_loss:.4f}, "
          f"trainable {result.trainable_params} of {result.total_params}")
    assert result.eval_loss < result.eval_loss_before
    # What a user writes to load the same base: the same quantization settings (NF4, double quantization).
    quantized = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16) if bits == 4 else
                 BitsAndBytesConfig(load_in_8bit=True))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantized, device_map={"": 0},
                                                dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(base, result.output_dir).eval()
    ids = torch.tensor([[1, 500, 600, 700, 800]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits.float(), result.model.eval()(ids).logits.float(),
                                   rtol=0, atol=5e-2)
    assert (Path(result.output_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_varlen_and_flex_attention_train_to_the_same_loss_eager_and_compiled(tmp_path, tokenizer):
    """Packed rows default to variable-length FlashAttention on a GPU, and to flex attention in compiled layers;
    each, compiled or not, trains the same model to the same loss."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=512)
    losses = {}
    runs = {"varlen": {}, "flex": dict(model__attn_implementation="flex_attention"),
            "flex compiled": dict(train__torch_compile=True),
            "varlen compiled": dict(train__torch_compile=True, model__attn_implementation="varlen")}
    for name, options in runs.items():
        result = run(make_config(tmp_path / name.replace(" ", "-"), model_dir, **options, **settings))
        losses[name] = result.eval_loss
        expected = "varlen" if name.startswith("varlen") else "flex_attention"
        assert result.model.config._attn_implementation == expected
    print("eval loss: " + ", ".join(f"{name} {loss:.5f}" for name, loss in losses.items()))
    assert max(losses.values()) - min(losses.values()) < 2e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_fused_lora_update_trains_as_peft(tmp_path, tokenizer):
    """train.fused_lora (LoRA's update inside the base product's epilogue) under bf16 autocast trains to PEFT's own
    loss; compiled layers keep PEFT's forward (inductor fuses it) and reach the same loss."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=512)
    runs = {"eager peft": dict(train__fused_lora=False), "eager fused": {}, "compiled": dict(train__torch_compile=True)}
    losses = {name: run(make_config(tmp_path / name.replace(" ", "-"), model_dir, **options, **settings)).eval_loss
              for name, options in runs.items()}
    print("eval loss: " + ", ".join(f"{name} {loss:.5f}" for name, loss in losses.items()))
    assert abs(losses["eager fused"] - losses["eager peft"]) < 1e-2
    assert abs(losses["compiled"] - losses["eager peft"]) < 2e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_full_fine_tuning_with_master_weights_in_the_optimizer_trains_as_with_them_in_the_model(tmp_path, tokenizer):
    """Full fine-tuning on the GPU defaults (bf16 weights in the model, fp32 copies stepped by MasterAdamW's kernel)
    trains to the loss of fp32 weights in the model under autocast, eager and compiled: with two packed rows per
    optimizer step (two micro-batches, whose gradients are summed in fp32) and with one (one backward pass, whose
    bf16 gradients the kernel reads on the model)."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(method="full", train__max_steps=8, train__learning_rate=1e-3, train__per_device_train_batch_size=1,
                    train__gradient_accumulation_steps=2, data__packing=True, data__packing_length=512)
    one_row = dict(train__gradient_accumulation_steps=1)  # a packed micro-batch is one row: one backward pass a step
    runs = {"fp32 in the model": dict(train__master_weights="model"), "fp32 in the optimizer": {},
            "compiled, in the optimizer": dict(train__torch_compile=True),
            "fp32 in the model, one row a step": dict(train__master_weights="model", **one_row),
            "bf16 gradients, in the optimizer": one_row}
    results = {name: run(make_config(tmp_path / name.replace(" ", "-").replace(",", ""), model_dir,
                                     **{**settings, **options})) for name, options in runs.items()}
    print("eval loss: " + ", ".join(f"{name} {result.eval_loss:.5f} (from {result.eval_loss_before:.5f})"
                                     for name, result in results.items()))
    references = {"fp32 in the optimizer": "fp32 in the model", "compiled, in the optimizer": "fp32 in the model",
                  "bf16 gradients, in the optimizer": "fp32 in the model, one row a step"}
    for name, reference in references.items():
        chosen = json.loads((Path(results[name].output_dir) / "settings.json").read_text())
        assert (chosen["master_weights"], chosen["fused_master_step"]) == ("optimizer", True)
        assert results[name].eval_loss < results[name].eval_loss_before - 1.0
        assert abs(results[name].eval_loss - results[reference].eval_loss) < 0.02 * results[reference].eval_loss


@pytest.mark.parametrize("fp32_gradients", [False, True])
def test_master_adamw_steps_as_torch_fused_adamw_and_writes_the_bf16_weights(fp32_gradients):
    """MasterAdamW's kernel against torch's fused AdamW on fp32 weights given the same gradients and clipping factor:
    tensors larger and smaller than a block, two groups (one decayed), three steps (one weight without a gradient in
    the first); the model's bf16 weights are the fp32 ones rounded to nearest. Gradients read in bf16 on the model
    or as fp32 sums of two micro-batches."""
    from weitiao.train.master_adamw import MasterAdamW
    from weitiao.train.master_weights import MasterWeights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 70), torch.nn.LayerNorm(70), torch.nn.Linear(70, 4099)
                                ).cuda().to(torch.bfloat16)
    masters = MasterWeights(model, fp32_gradients=fp32_gradients)
    reference = [master.detach().clone().requires_grad_() for master in masters.masters]

    def groups(weights):
        decayed = [weight.dim() == 2 for weight in masters.masters]
        return [{"params": [w for w, d in zip(weights, decayed) if d], "weight_decay": 0.1},
                {"params": [w for w, d in zip(weights, decayed) if not d], "weight_decay": 0.0}]

    adam = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    optimizer = MasterAdamW(groups(masters.masters), masters, **adam)
    torch_adamw = torch.optim.AdamW(groups(reference), fused=True, **adam)
    optimizer.grad_scale = torch.tensor(2.0, device="cuda")
    torch_adamw.grad_scale = optimizer.grad_scale
    for step in range(3):
        for _ in range(2 if fp32_gradients else 1):
            model(torch.randn(8, 300, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
        holders = masters.gradient_holders
        assert all(holder.grad is not None for holder in holders)
        if step == 0:  # a weight without a gradient is skipped and counts one step fewer (the norm's bias)
            holders[3].grad = None
        for fp32, holder in zip(reference, holders):
            fp32.grad = None if holder.grad is None else holder.grad.float()
        optimizer.step()
        torch_adamw.step()
        optimizer.zero_grad()
        torch_adamw.zero_grad()
        assert all(weight.grad is None for weight in masters.weights)
    for master, fp32, weight in zip(masters.masters, reference, masters.weights):
        torch.testing.assert_close(master, fp32.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(weight, master.to(torch.bfloat16))
        assert optimizer.state[master]["step"].item() == torch_adamw.state[fp32]["step"].item()
        torch.testing.assert_close(optimizer.state[master]["exp_avg_sq"], torch_adamw.state[fp32]["exp_avg_sq"])

    # A checkpoint's state (the optimizer's and the copies') continues the same: one more step, resumed and not.
    resumed_model = torch.nn.Sequential(torch.nn.Linear(300, 70), torch.nn.LayerNorm(70), torch.nn.Linear(70, 4099)
                                        ).cuda().to(torch.bfloat16)
    resumed_masters = MasterWeights(resumed_model, fp32_gradients=fp32_gradients)
    resumed_masters.load_state_dict(masters.state_dict())
    resumed = MasterAdamW(groups(resumed_masters.masters), resumed_masters, **adam)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if from a file: no shared tensors
    resumed.grad_scale = optimizer.grad_scale
    x = torch.randn(8, 300, device="cuda", dtype=torch.bfloat16)
    for net, opt in ((model, optimizer), (resumed_model, resumed)):
        net(x).float().pow(2).mean().backward()
        opt.step()
    for weight, again in zip(masters.weights + masters.masters, resumed_masters.weights + resumed_masters.masters):
        assert torch.equal(weight, again)


def test_offloaded_checkpoints_leave_the_layer_inputs_in_cpu_memory(monkeypatch, tmp_path, tokenizer):
    """train.offload_checkpoints: after the forward pass the checkpointed layers' inputs are in CPU memory (GPU memory
    lower than plain checkpointing by at least layers x tokens x hidden x 2 bytes) with the same gradients; in the
    backward pass every layer's input but the last one's was copied back ahead of its use; a run trains to the loss of
    one without checkpointing."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run
    from weitiao.train.offload import HostCopy, offload_checkpointed_layers

    taken_ahead = []
    take = HostCopy.take
    monkeypatch.setattr(HostCopy, "take", lambda self: taken_ahead.append(self.fetched is not None) or take(self))
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    ids = torch.randint(5, 1000, (8, 512), device="cuda")

    def forward_and_backward(offload: bool) -> tuple[int, dict[str, torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if offload:
            offload_checkpointed_layers(model.model.layers)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        hidden = model.model(input_ids=ids).last_hidden_state  # the decoder alone: no logits to keep
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        hidden.float().pow(2).mean().backward()
        return kept, {name: p.grad for name, p in model.named_parameters()}

    plain_kept, plain_grads = forward_and_backward(offload=False)
    offload_kept, offload_grads = forward_and_backward(offload=True)
    layer_inputs = 2 * ids.numel() * 256 * 2  # layers x tokens x hidden x bf16 bytes
    print(f"GPU memory kept by the forward pass: plain {plain_kept / 2**20:.1f} MiB, offloaded "
          f"{offload_kept / 2**20:.1f} MiB (layer inputs: {layer_inputs / 2**20:.1f} MiB); "
          f"copied back ahead: {taken_ahead}")
    assert plain_kept - offload_kept >= layer_inputs
    assert taken_ahead == [False, True]  # the last layer first
    for name, grad in plain_grads.items():
        torch.testing.assert_close(offload_grads[name], grad, msg=name)

    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=512)
    plain = run(make_config(tmp_path / "a", model_dir, **settings))
    offloaded = run(make_config(tmp_path / "b", model_dir, train__gradient_checkpointing=True,
                                train__offload_checkpoints=True, **settings))
    print(f"eval loss: no checkpointing {plain.eval_loss:.5f}, offloaded checkpoints {offloaded.eval_loss:.5f}")
    assert abs(plain.eval_loss - offloaded.eval_loss) < 1e-2


def test_offloaded_checkpoints_around_compiled_layers(monkeypatch, tmp_path, tokenizer):
    """train.offload_checkpoints with train.torch_compile: each layer's forward compiled in place, the checkpoint
    around it eager; the layer inputs go to pinned CPU memory, and the run trains to the loss of compiled layers
    with plain checkpointing (accelerate's regional compilation)."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import offload, run

    moved = []
    pack = offload.OffloadedSavedTensors._pack

    def spy(self, tensor):
        packed = pack(self, tensor)
        moved.append(isinstance(packed, offload.HostCopy) and packed.host.is_pinned())
        return packed

    monkeypatch.setattr(offload.OffloadedSavedTensors, "_pack", spy)
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=2048, train__torch_compile=True,
                    train__gradient_checkpointing=True)
    plain = run(make_config(tmp_path / "a", model_dir, train__offload_checkpoints=False, **settings))
    offloaded = run(make_config(tmp_path / "b", model_dir, train__offload_checkpoints=True, **settings))
    print(f"eval loss: compiled + checkpoints {plain.eval_loss:.5f}, compiled + offloaded {offloaded.eval_loss:.5f}; "
          f"peak {plain.gpu_peak_gib:.3f} vs {offloaded.gpu_peak_gib:.3f} GiB")
    assert moved and all(moved)  # every layer input of >= 1 MiB went to pinned memory
    assert abs(plain.eval_loss - offloaded.eval_loss) < 1e-2


def test_preference_stages_on_the_gpu_defaults(tmp_path, tokenizer):
    """dpo on packed pairs (varlen FlashAttention, Liger's layer kernels, the fused LoRA update): reply log-probs of a
    packed row equal those of padded rows, and training ranks the held-out pairs; rm and kto run on padded batches."""
    from tests.conftest import make_tiny_model
    from tests.train.test_preference import encoded_pairs, make_config, pair_rows
    from weitiao.data.collate import PadCollator
    from weitiao.data.packing import PackedCollator
    from weitiao.data.preference import PairCollator
    from weitiao.config import ModelConfig
    from weitiao.eval.pairs import sequence_logps
    from weitiao.models import load_model
    from weitiao.train import run
    from weitiao.train.attention import VARLEN

    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    pairs = encoded_pairs(tokenizer, pair_rows(6))
    padded = PairCollator(PadCollator(tokenizer.pad_token_id))(pairs)
    packed = PairCollator(PackedCollator(tokenizer.pad_token_id, 512, boundaries=True))(pairs)
    model = load_model(ModelConfig(name_or_path=model_dir, attn_implementation=VARLEN), dtype=torch.bfloat16)[0]
    model.cuda().eval()
    with torch.no_grad():
        from_packed = sequence_logps(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()})[0]
        model.set_attn_implementation("sdpa")
        from_padded = sequence_logps(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in padded.items()})[0]
    print(f"reply log-probs packed {from_packed.tolist()[:4]} padded {from_padded.tolist()[:4]}")
    torch.testing.assert_close(from_packed, from_padded, rtol=2e-2, atol=5e-2)

    result = run(make_config(tmp_path / "dpo", model_dir, train__max_steps=10))
    settings = json.loads((Path(result.output_dir) / "settings.json").read_text())
    assert settings["packing"] and settings["attention"] == "varlen_packed_rows" and settings["fused_lora"]
    metrics = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in metrics if "eval_reward_accuracy" in r]
    print(f"dpo on the GPU: eval reward accuracy {evals[0]['eval_reward_accuracy']} -> "
          f"{evals[-1]['eval_reward_accuracy']}, loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for stage in ("rm", "kto"):
        other = run(make_config(tmp_path / stage, model_dir, stage=stage, train__max_steps=4, **(
            {"data__train": str(_feedback(tmp_path)), "data__eval": str(_feedback(tmp_path))} if stage == "kto"
            else {})))
        print(f"{stage} on the GPU: eval loss {other.eval_loss_before:.4f} -> {other.eval_loss:.4f}")
        assert other.eval_loss < other.eval_loss_before


def _feedback(tmp_path):
    from tests.conftest import write_jsonl

    return write_jsonl(tmp_path / "feedback.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{2 * i + i % 2}"}], "label": i % 2 == 0} for i in range(24)])


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_scored_positions_give_the_loss_and_gradients_of_every_position(tmp_path, tokenizer):
    """Liger's fused loss on the positions whose next token has a label (train.scored_positions) gives the loss
    and gradients of the whole row; runs with and without it train to the same losses (H100, run48: summed loss
    3855.389160 both ways, eval loss 9.62627 vs 9.62644)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.data.packing import PackedCollator
    from weitiao.train import kernels, run

    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    kernels.apply_liger(model, fused_cross_entropy=True, layer_kernels=False)
    batch = PackedCollator(0, 512, scored_positions=True)(_examples())
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "num_tokens"}
    results = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # an earlier run in this process may have left TF32 on
    try:
        for inputs in ({k: v for k, v in batch.items() if k not in ("logits_to_keep", "shift_labels")},
                       {**batch, "labels": None}):
            model.zero_grad()
            loss = model(**inputs, use_cache=False, num_items_in_batch=1).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    finally:
        torch.set_float32_matmul_precision(precision)
    (every, every_grads), (scored, scored_grads) = results
    print(f"summed loss: every position {every.item():.6f}, scored positions {scored.item():.6f} "
          f"({batch['logits_to_keep'].numel()} of {batch['input_ids'].shape[1]})")
    torch.testing.assert_close(scored, every, rtol=1e-5, atol=1e-3)
    for name, grad in every_grads.items():
        torch.testing.assert_close(scored_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    kernels.undo_liger_patches()

    settings = dict(train__max_steps=6, train__bf16=True, train__optim="sgd", train__learning_rate=0.5,
                    data__packing=True, data__packing_length=512)
    with_scored = run(make_config(tmp_path / "a", model_dir, train__scored_positions=True, **settings))
    assert json.loads((Path(with_scored.output_dir) / "settings.json").read_text())["scored_positions"]
    without = run(make_config(tmp_path / "b", model_dir, train__scored_positions=False, **settings))
    print(f"eval loss: scored positions {with_scored.eval_loss:.5f}, every position {without.eval_loss:.5f}")
    assert abs(with_scored.eval_loss - without.eval_loss) < 1e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
@pytest.mark.parametrize("columns", [2048, 576])
def test_row_parallel_norm_backward_gives_liger_gradients(columns):
    """A frozen norm weight: Liger's backward kernel launched one program per row gives the input gradient of
    Liger's own launch; a trainable weight keeps Liger's backward (its gradient too)."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    from weitiao.train.kernels import use_row_parallel_norm_backward

    torch.manual_seed(0)
    inputs = torch.randn(4, 1031, columns, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(inputs)
    norm = LigerRMSNorm(columns, eps=1e-5).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    wrapper = torch.nn.Sequential(norm)
    reference = {}
    for trainable in (False, True):
        norm.weight.requires_grad_(trainable)
        x = inputs.clone().requires_grad_(True)
        LigerRMSNormFunction.apply(x, norm.weight, 1e-5, 0.0, "llama", True, None).backward(grad.clone())
        reference[trainable] = (x.grad, norm.weight.grad)
        norm.weight.grad = None
    assert use_row_parallel_norm_backward(wrapper) == 1
    for trainable in (False, True):
        norm.weight.requires_grad_(trainable)
        x = inputs.clone().requires_grad_(True)
        norm(x).backward(grad.clone())
        torch.testing.assert_close(x.grad, reference[trainable][0], rtol=0, atol=0)
        if trainable:
            torch.testing.assert_close(norm.weight.grad, reference[True][1], rtol=0, atol=0)
        else:
            assert norm.weight.grad is None and reference[False][1] is None


def _fused_lora_with_sgd(base):
    """LoRA r8 on all linear layers of `base` (B random: not zero), fused, on the GPU, with SGD at lr 0.5 that
    rewrites the adapter copies after each step."""
    from peft import LoraConfig, get_peft_model

    from weitiao.train.attention import PACKED_VARLEN
    from weitiao.train.fused_lora import fuse_lora_updates, watch_optimizer

    base.set_attn_implementation(PACKED_VARLEN)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False)).cuda().train()
    fuse_lora_updates(model, enabled=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    watch_optimizer(model, optimizer)
    return model, optimizer


def _packed_cuda_row(lengths: list[int]) -> dict:
    """One packed row of random examples of these lengths, with their boundaries and restarting positions."""
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ids = torch.randint(5, 1000, (1, sum(lengths)), device="cuda")
    return dict(input_ids=ids, labels=ids, cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries,
                max_length_q=max(lengths), max_length_k=max(lengths),
                position_ids=torch.cat([torch.arange(n, device="cuda") for n in lengths])[None])


def _assert_graphed_step_matches_eager(step: int, eager: tuple, graphed: tuple) -> None:
    """One step's (loss, LoRA gradients) on graphs against eager layers: the loss to 1e-3, each gradient to 2e-2 in
    norm (bf16 products)."""
    (eager_loss, eager_grads), (graphed_loss, graphed_grads) = eager, graphed
    print(f"step {step}: loss eager {eager_loss:.5f}, graphs {graphed_loss:.5f}")
    assert abs(graphed_loss - eager_loss) < 1e-3 * eager_loss
    for name, grad in eager_grads.items():
        error = ((graphed_grads[name].float() - grad.float()).norm() / grad.float().norm()).item()
        assert error < 2e-2, f"step {step}, {name}: relative error {error:.2e}"


def _graph_spy(monkeypatch) -> list[tuple[bool, bool]]:
    """(replayed, failed) of each run's LayerGraphs or CheckpointGraphs, read when the run gives the layers back."""
    from weitiao.train.checkpoint_graphs import CheckpointGraphs
    from weitiao.train.cuda_graphs import LayerGraphs

    seen = []
    for graphs, captured in ((LayerGraphs, "graphed"), (CheckpointGraphs, "units")):
        monkeypatch.setattr(graphs, "remove", lambda self, remove=graphs.remove, captured=captured: seen.append(
            (getattr(self, captured) is not None, self.failed)) or remove(self))
    return seen


def test_cuda_graphs_give_the_eager_gradients_of_fused_lora_after_optimizer_steps(tokenizer, tmp_path):
    """Layers replayed from CUDA graphs (weitiao.train.cuda_graphs) give the eager layers' loss and LoRA gradients
    at the capture and at replays after SGD steps, where the adapter copies the graphs read must have been rewritten
    (a stale copy would give the first step's gradients again)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_model
    from weitiao.train.attention import VARLEN, register_varlen_attention
    from weitiao.train.cuda_graphs import LayerGraphs

    register_varlen_attention()
    model_dir = make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256)

    def lora_model():
        torch.manual_seed(0)
        return _fused_lora_with_sgd(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                         attn_implementation=VARLEN))

    row = _packed_cuda_row([37, 120, 65, 200, 90])
    eager, eager_optimizer = lora_model()
    graphed, graphed_optimizer = lora_model()
    graphs = LayerGraphs(graphed.base_model.model.model.layers)
    for step in range(3):
        results = []
        for model, optimizer in ((eager, eager_optimizer), (graphed, graphed_optimizer)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**row, use_cache=False).loss
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert graphs.replaying and graphs.graphed is not None and not graphs.failed
        _assert_graphed_step_matches_eager(step, *results)
    graphs.remove()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_graphs_train_lora_to_the_eager_losses_with_gradient_accumulation(monkeypatch, tmp_path, tokenizer,
                                                                              checkpointing):
    """The default GPU run of LoRA on packed rows replays its layers from CUDA graphs (with gradient checkpointing:
    weitiao.train.checkpoint_graphs) and logs the losses of eager layers step by step, with two micro-batches a
    step (whose gradients must add up, not the second twice)."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    seen = _graph_spy(monkeypatch)
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(train__max_steps=6, train__optim="sgd", train__learning_rate=0.5,
                    train__gradient_accumulation_steps=2, data__packing=True, data__packing_length=512,
                    train__gradient_checkpointing=checkpointing)
    losses, chosen = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the capture's own filter goes in front of this one
        for name, graphs in (("eager", False), ("graphs", None)):
            result = run(make_config(tmp_path / name, model_dir, train__cuda_graphs=graphs, **settings))
            records = [json.loads(line)
                       for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
            losses[name] = [record["loss"] for record in records if "loss" in record]
            chosen[name] = json.loads((Path(result.output_dir) / "settings.json").read_text())["cuda_graphs"]
    print(f"losses: {losses}")
    # The graphs' gradient accumulators live on the capture's stream, as measured: no warning about it.
    stream_warnings = [f"{w.filename}:{w.lineno}" for w in caught if "AccumulateGrad node's stream" in str(w.message)]
    assert not stream_warnings, stream_warnings
    assert chosen == {"eager": False, "graphs": True} and seen == [(True, False)]
    assert len(losses["graphs"]) == 6 and losses["graphs"][-1] < losses["graphs"][0] - 0.5
    for eager_loss, graphs_loss in zip(losses["eager"], losses["graphs"]):
        assert abs(graphs_loss - eager_loss) < 5e-3 * eager_loss


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
@pytest.mark.parametrize(("method", "accumulation"), [("full", 1), ("full", 2), ("freeze", 1)])
def test_cuda_graphs_train_base_weights_to_the_eager_losses(monkeypatch, tmp_path, tokenizer, method, accumulation):
    """Full and freeze fine-tuning on the GPU defaults (bf16 weights, fp32 copies stepped by MasterAdamW) replay their
    layers from CUDA graphs and log the eager layers' losses step by step: with one backward pass a step (the
    optimizer reads the bf16 gradients the backward graphs leave on the weights) and with two (each one's gradients
    sent to the fp32 copies before the next replay rewrites them); freeze's frozen layers have no backward graph."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run

    seen = _graph_spy(monkeypatch)
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    settings = dict(method=method, train__max_steps=6, train__learning_rate=1e-3,
                    train__gradient_accumulation_steps=accumulation, data__packing=True, data__packing_length=512)
    losses, chosen = {}, {}
    for name, graphs in (("eager", False), ("graphs", None)):
        result = run(make_config(tmp_path / name, model_dir, train__cuda_graphs=graphs, **settings))
        records = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [record["loss"] for record in records if "loss" in record]
        chosen[name] = json.loads((Path(result.output_dir) / "settings.json").read_text())
    print(f"losses: {losses}")
    assert [chosen[name]["cuda_graphs"] for name in ("eager", "graphs")] == [False, True] and seen == [(True, False)]
    assert chosen["graphs"]["master_weights"] == "optimizer" and chosen["graphs"]["fused_master_step"]
    assert len(losses["graphs"]) == 6 and losses["graphs"][-1] < losses["graphs"][0] - 0.5
    for eager_loss, graphs_loss in zip(losses["eager"], losses["graphs"]):
        assert abs(graphs_loss - eager_loss) < 5e-3 * eager_loss


@pytest.mark.parametrize("keep_attention", [False, True])
def test_checkpointed_layers_on_cuda_graphs_give_the_eager_gradients_in_checkpointing_memory(tokenizer, tmp_path,
                                                                                             keep_attention):
    """Checkpointed layers replayed from CUDA graphs (weitiao.train.checkpoint_graphs) give the loss and LoRA
    gradients of eager checkpointed layers at the capture and after SGD steps (the adapter copies the graphs read
    rewritten), with their inputs offloaded, attention recomputed or its output kept; all
    layers share one layer's graph memory: the step's peak stays below that of graphs without checkpointing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from weitiao.train.attention import VARLEN, register_varlen_attention
    from weitiao.train.checkpoint_graphs import CheckpointGraphs
    from weitiao.train.cuda_graphs import LayerGraphs
    from weitiao.train.offload import offload_checkpointed_layers

    register_varlen_attention()
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)

    def lora_model(checkpointing: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=VARLEN)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
            offload_checkpointed_layers(base.model.layers)
        return _fused_lora_with_sgd(base)

    row = _packed_cuda_row([370, 1200, 650, 1000, 876])

    gc.collect()  # an earlier test's graphs and models, held in reference cycles
    before = torch.cuda.memory_allocated()  # what is still allocated does not count

    def step(model, optimizer) -> tuple[float, dict[str, torch.Tensor], float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**row, use_cache=False).loss
        loss.backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), grads, peak

    eager = lora_model(checkpointing=True)
    graphed = lora_model(checkpointing=True)
    from weitiao.train.attention import keeps_attention_output

    if keep_attention and not keeps_attention_output():
        pytest.skip("needs torch >= 2.11 (varlen attention's log-sum-exp and backward op)")
    graphs = CheckpointGraphs(graphed[0].base_model.model.model.layers, keep_attention=keep_attention)
    peaks = {}
    for index in range(3):
        with torch.no_grad():  # each step from the same weights: bf16 differences do not add up over the steps
            for weight, graphed_weight in zip(eager[0].parameters(), graphed[0].parameters()):
                if weight.requires_grad:
                    graphed_weight.copy_(weight)
        (eager_loss, eager_grads, peaks["eager checkpointed"]), (graphed_loss, graphed_grads, peaks["graphed"]) = (
            step(*eager), step(*graphed))
        assert graphs.replaying and graphs.units is not None and not graphs.failed
        _assert_graphed_step_matches_eager(index, (eager_loss, eager_grads), (graphed_loss, graphed_grads))
    graphs.remove()
    del eager, graphed, graphs
    unchecked = lora_model(checkpointing=False)
    no_checkpoint_graphs = LayerGraphs(unchecked[0].base_model.model.model.layers)
    for _ in range(2):
        peaks["graphs without checkpointing"] = step(*unchecked)[2]
    no_checkpoint_graphs.remove()
    print("peak MiB of a step after the capture: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    assert peaks["graphed"] < peaks["graphs without checkpointing"] - 100


def test_a_failed_cuda_graph_capture_leaves_an_eager_run_and_a_working_generator(monkeypatch, tmp_path, tokenizer,
                                                                                 capsys):
    """A capture that fails (here a host sync inside it) is reported by its first error, the run trains on eager
    layers, and the process's random draws on the GPU still work."""
    from tests.conftest import make_tiny_model
    from tests.train.test_sft import make_config
    from weitiao.train import run
    from weitiao.train.cuda_graphs import BeforeAttention

    seen = _graph_spy(monkeypatch)
    forward = BeforeAttention.forward
    monkeypatch.setattr(BeforeAttention, "forward",  # .item() waits for the GPU: not allowed while capturing
                        lambda self, hidden, cos, sin: (hidden.sum().item(), forward(self, hidden, cos, sin))[1])
    model_dir = str(make_tiny_model(tmp_path / "model", tokenizer, hidden_size=256))
    result = run(make_config(tmp_path / "run", model_dir, train__max_steps=3, data__packing=True,
                             data__packing_length=512, train__cuda_graphs=True))
    printed = capsys.readouterr().out
    assert seen == [(False, True)] and result.eval_loss < result.eval_loss_before
    assert "train.cuda_graphs: capturing the layers failed (" in printed and "eager layers" in printed
    assert torch.rand(4, device="cuda").isfinite().all()
    assert torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5).sum() > 0
