"""The fused LoRA update (a subclass of PEFT's LoRA Linear) gives PEFT's losses and gradients, follows adapter
switches, leaves other variants to PEFT, and is gone from the trained model."""

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.train.test_sft import make_config
from weitiao.train import run
from weitiao.train.fused_lora import FusedLoraLinear, fuse_lora_updates


def fused_layers(model) -> int:
    return sum(isinstance(module, FusedLoraLinear) for module in model.modules())


def _lora_model(tiny_model_dir, dropout: float = 0.0, **options):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                      init_lora_weights=False, **options))  # B random: the update is not zero
    return model


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < rtol, f"{name}: relative error {error:.2e}"


def _loss_and_gradients(model, seed: int = 0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 500, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_update_gives_peft_loss_and_gradients(dropout, tiny_model_dir):
    model = _lora_model(tiny_model_dir, dropout).train()
    loss, grads = _loss_and_gradients(model)
    assert fuse_lora_updates(model, enabled=True) == 14  # 7 linear layers x 2 decoder layers
    torch.use_deterministic_algorithms(True)  # new tensors start as NaN: the outputs begun empty must not read them
    try:
        fused_loss, fused_grads = _loss_and_gradients(model)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == fused_grads.keys() and any("lora_B" in name for name in grads)
    for name in grads:  # to float32 rounding: the grouped products sum in another order than PEFT's
        assert_close_in_norm(fused_grads[name], grads[name], 1e-5, name)
    assert fused_layers(model) == 14
    assert fuse_lora_updates(model, enabled=False) == 14
    assert fused_layers(model) == 0


def test_layers_reading_one_input_are_computed_together(monkeypatch, tiny_model_dir):
    """q/k/v and gate/up: one product call for each group; a call on another input, or on the same tensor changed in
    place, computes its own output (PEFT's)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from weitiao.train import fused_lora

    model = _lora_model(tiny_model_dir).train()
    fuse_lora_updates(model, enabled=True)
    calls = []
    products = fused_lora._LoraProducts.apply
    monkeypatch.setattr(fused_lora._LoraProducts, "apply",  # after 7 arguments, each layer's A and B
                        lambda *a: calls.append((len(a) - 7) // 2) or products(*a))
    _loss_and_gradients(model)
    assert sorted(calls) == [1, 1, 1, 1, 2, 2, 3, 3]  # per decoder layer: q/k/v, o, gate/up, down

    attention = model.base_model.model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    assert q.shared_input is k.shared_input is v.shared_input is not None
    x, other = torch.randn(2, 5, q.in_features), torch.randn(2, 5, q.in_features)

    def output_and_calls(layer, inputs):
        calls.clear()
        return layer(inputs), len(calls)

    q(x)
    taken, computed = output_and_calls(k, x)  # q's call computed it
    assert computed == 0
    torch.testing.assert_close(taken, LoraLinear.forward(k, x), rtol=1e-5, atol=1e-6)
    own, computed = output_and_calls(v, other)
    assert computed == 1
    torch.testing.assert_close(own, LoraLinear.forward(v, other), rtol=1e-5, atol=1e-6)
    q(x)
    x.mul_(2)
    own, computed = output_and_calls(k, x)
    assert computed == 1
    torch.testing.assert_close(own, LoraLinear.forward(k, x), rtol=1e-5, atol=1e-6)
    fuse_lora_updates(model, enabled=False)
    assert all("shared_input" not in layer.__dict__ for layer in (q, k, v))


def test_adapter_copies_are_written_together_once_per_optimizer_step(tiny_model_dir):
    """Under bf16 autocast the adapter weights are read from bf16 copies: no cast per call, every copy of the model
    rewritten in one multi-tensor copy after an optimizer step (also one that writes the weights without moving their
    version counters, as bitsandbytes' does) or after an in-place write that moves them; the outputs are PEFT's for
    the new weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from weitiao.train.fused_lora import watch_optimizer

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.cast = [], set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            if func.overloadpacket.__name__ == "_to_copy":
                self.cast.add(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    class DataWriter(torch.optim.SGD):  # writes through .data: the parameters' version counters stay
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for parameter in group["params"]:
                    parameter.data.add_(parameter.grad, alpha=-group["lr"])

    model = _lora_model(tiny_model_dir).train()
    ids = torch.randint(0, 500, (2, 12))

    def loss_and_ops():
        with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        return loss, ops

    peft_loss, peft_ops = loss_and_ops()
    fuse_lora_updates(model, enabled=True)
    loss, ops = loss_and_ops()
    assert ops.names.count("_foreach_copy_") == 8  # each group's copies written at first use
    assert ops.names.count("cat") == peft_ops.names.count("cat")  # RoPE's only: no A stacked per call
    torch.testing.assert_close(loss, peft_loss, rtol=1e-2, atol=0)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {p.data_ptr() for p in trained} <= peft_ops.cast  # PEFT casts A and B in each call
    loss, ops = loss_and_ops()
    assert ops.names.count("_foreach_copy_") == 0 and not {p.data_ptr() for p in trained} & ops.cast

    optimizer = DataWriter(trained, lr=0.5)
    watch_optimizer(model, optimizer)
    for writer in (optimizer.step, lambda: torch._foreach_add_(trained, 0.05)):
        loss.backward()
        with torch.no_grad():
            writer()
        optimizer.zero_grad()
        before = loss.detach()
        loss, ops = loss_and_ops()
        assert abs(loss.item() - before.item()) > 0.05  # the weights moved enough for stale copies to show
        with torch.autocast("cpu", dtype=torch.bfloat16):  # PEFT's forward on a copy of the weights
            reference = copy.deepcopy(model)
            fuse_lora_updates(reference, enabled=False)
            peft_loss = reference(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss, peft_loss, rtol=1e-2, atol=0)
        assert ops.names.count("_foreach_copy_") == 1


def test_grouped_layers_with_base_biases_and_ranks_of_their_own():
    """Qwen2's q/k/v carry a bias; with a rank per layer the grouped rank-r product splits unevenly."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                            rank_pattern={"k_proj": 2, "up_proj": 6})).train()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    loss, grads = _loss_and_gradients(model)
    fuse_lora_updates(model, enabled=True)
    assert model.base_model.model.model.layers[0].self_attn.k_proj.shared_input is not None
    fused_loss, fused_grads = _loss_and_gradients(model)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        assert_close_in_norm(fused_grads[name], grads[name], 1e-5, name)


def test_a_layer_whose_output_is_unused_gives_the_same_gradients_without_its_product(monkeypatch, tiny_model_dir):
    """Under outputs_unused a fused layer's forward computes only its rank-r product (no product over the input with
    the base weight) and its backward pass gives the gradients of the full call; grouped layers (q/k/v) are left as
    they are, and after the context the layer computes its output again."""
    from weitiao.train import fused_lora
    from weitiao.train.fused_lora import outputs_unused

    model = _lora_model(tiny_model_dir).train()
    fuse_lora_updates(model, enabled=True)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    grouped = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(1)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    grad_out = torch.randn(3, 5, layer.out_features)
    trained = [x, *(p for p in layer.parameters() if p.requires_grad)]
    inputs_of_products = []
    addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: inputs_of_products.append(a[1].shape) or addmm(*a, **k))

    def forward_products_and_gradients() -> tuple[list, tuple[torch.Tensor, ...]]:
        inputs_of_products.clear()
        out = layer(x)
        products = list(inputs_of_products)
        return products, torch.autograd.grad(out, trained, grad_out)

    full_products, expected = forward_products_and_gradients()
    with outputs_unused([layer, grouped]):
        assert layer.output_unused and not grouped.output_unused
        products, actual = forward_products_and_gradients()
    assert (15, layer.in_features) in full_products and (15, layer.in_features) not in products
    for name, got, want in zip(("x", "A", "B"), actual, expected):
        assert_close_in_norm(got, want, 1e-6, name)
    assert not layer.output_unused
    torch.testing.assert_close(layer(x), fused_lora.LoraLinear.forward(layer, x), rtol=1e-5, atol=1e-6)


def test_fused_lora_update_follows_adapter_switches_and_leaves_dora_alone(tiny_model_dir):
    model = _lora_model(tiny_model_dir).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        fuse_lora_updates(model, enabled=True)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # PEFT's own forward takes over: the base model's output
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tuned, base, atol=1e-3)
    dora = _lora_model(tiny_model_dir, use_dora=True)
    reference, _ = _loss_and_gradients(dora)
    assert fuse_lora_updates(dora, enabled=True) == 14  # switched, but DoRA layers fall through to PEFT's forward
    loss, _ = _loss_and_gradients(dora)
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_fused_lora_training_follows_peft_step_by_step(tmp_path, tiny_model_dir):
    runs = [run(make_config(tmp_path / str(fused), tiny_model_dir, train__max_steps=4, train__fused_lora=fused))
            for fused in (False, True)]
    losses = [[json.loads(line)["loss"] for line in (Path(r.output_dir) / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for r in runs]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert runs[1].eval_loss < runs[1].eval_loss_before
    assert fused_layers(runs[1].model) == 0  # PEFT's code after training


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_backward_gives_peft_gradients_with_a_base_bias(autocast):
    """The input's gradient of both paths in one buffer (backward epilogue), a frozen base bias, the input's own
    gradient checked, and under bf16 autocast the same dtypes and values as PEFT's path."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(48, 40, bias=True)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 5, 48)
    grad_out = torch.randn(3, 5, 40)

    def forward_backward():
        source = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(source)
        out.backward(grad_out.to(out.dtype))
        grads = {"x": source.grad, **{n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}}
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = forward_backward()
    assert fuse_lora_updates(layer, enabled=True) == 1
    fused_out, fused_grads = forward_backward()
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    assert fused_out.dtype == out.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(fused_out, out, **tolerance)
    assert fused_grads.keys() == grads.keys() and len(grads) == 3  # x, lora_A, lora_B (base frozen)
    for name in grads:
        assert fused_grads[name].dtype == grads[name].dtype, name
        torch.testing.assert_close(fused_grads[name], grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("config_name, offload", [("LlamaConfig", False), ("LlamaConfig", True),
                                                  ("Qwen2Config", False), ("Qwen3Config", True)])
def test_checkpointed_layers_recompute_without_the_last_product(config_name, offload):
    """Eager checkpointed layers (torch's checkpoint, or the offloaded one) of each LAST_PRODUCT_FEEDS_THE_OUTPUT model
    give the loss and LoRA gradients of layers without checkpointing, with down_proj's output left unwritten in the
    backward pass's recomputation and only there."""
    import transformers

    from tests.train.test_cuda_graphs import _loss_and_gradients, _model, assert_same_loss_and_gradients
    from weitiao.train.fused_lora import LAST_PRODUCT_FEEDS_THE_OUTPUT, recompute_without_last_products
    from weitiao.train.methods import decoder_layers
    from weitiao.train.offload import offload_checkpointed_layers

    config_class = getattr(transformers, config_name)
    unchecked = _loss_and_gradients(_model(config_class))
    model = _model(config_class)
    assert model.config.model_type in LAST_PRODUCT_FEEDS_THE_OUTPUT
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = decoder_layers(model)[1]
    if offload:
        offload_checkpointed_layers(layers)
    recompute_without_last_products(layers, model.config.model_type)
    unused = []
    for layer in layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: unused.append(module.output_unused))
    checked = _loss_and_gradients(model)
    assert unused == [False] * len(layers) + [True] * len(layers)  # the forward pass, then the recomputations
    assert_same_loss_and_gradients(checked, unchecked, rtol=1e-4, atol=1e-6)
    functions = [layer._gradient_checkpointing_func for layer in layers]
    recompute_without_last_products(layers, "gemma2")  # its layers normalise the MLP's output: left as they are
    assert [layer._gradient_checkpointing_func for layer in layers] == functions
