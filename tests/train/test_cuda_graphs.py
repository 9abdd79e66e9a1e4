"""The layer pieces that CUDA graphs replay (weitiao.train.cuda_graphs), checked on the CPU with the pieces run
eagerly in place of their graphs: for Llama, Qwen2 and Qwen3 they give the model's own loss and gradients on packed
rows over fused LoRA layers, and over trained base weights with their fp32 copies. The graphs themselves run in
tests/gpu/test_cuda.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from weitiao.train.attention import PACKED_VARLEN, register_varlen_attention
from weitiao.train.cuda_graphs import GRAPHED_MODEL_TYPES, LayerGraphs, _first_error
from weitiao.train.fused_lora import fuse_lora_updates
from weitiao.train.methods import decoder_layers

LENGTHS = (5, 11, 8)  # three examples packed in one row


def _model(config_class, **lora_options):
    from peft import LoraConfig, get_peft_model

    register_varlen_attention()
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="varlen")
    base.set_attn_implementation(PACKED_VARLEN)
    model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": "all-linear",
                                               "init_lora_weights": False, **lora_options}))  # B random: not zero
    assert fuse_lora_updates(model, enabled=True) > 0
    return model.train()


def _packed_row() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, sum(LENGTHS)))
    boundaries = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, labels=ids, position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None],
                cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=max(LENGTHS),
                max_length_k=max(LENGTHS))


def _loss_and_gradients(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**_packed_row(), use_cache=False).loss
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), gradients


def assert_same_loss_and_gradients(actual: tuple, expected: tuple, rtol: float, atol: float) -> None:
    """Two (loss, gradients) of _loss_and_gradients: the same loss to rtol, every LoRA gradient to rtol and atol."""
    (loss, gradients), (expected_loss, expected_gradients) = actual, expected
    torch.testing.assert_close(loss, expected_loss, rtol=min(rtol, 1e-6), atol=0)
    assert gradients.keys() == expected_gradients.keys() and any("lora_B" in name for name in gradients)
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, Qwen3Config])
def test_the_two_pieces_around_attention_give_the_models_loss_and_gradients(config_class, monkeypatch):
    model = _model(config_class)
    assert model.config.model_type in GRAPHED_MODEL_TYPES
    loss, gradients = _loss_and_gradients(model)
    layers = decoder_layers(model)[1]
    graphs = LayerGraphs(layers)
    decided = []
    monkeypatch.setattr(LayerGraphs, "_replays", lambda self, layer, *rest: decided.append(layer) or True)
    graphs.graphed = graphs.pieces  # the pieces run eagerly where their graphs would replay
    pieces = _loss_and_gradients(model)
    assert decided == [layers[0]]  # decided once per forward, at the first layer
    assert_same_loss_and_gradients(pieces, (loss, gradients), rtol=1e-4, atol=1e-6)
    graphs.remove()
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_without_a_gpu_the_layers_run_their_own_forward():
    model = _model(LlamaConfig)
    own = _loss_and_gradients(model)
    graphs = LayerGraphs(decoder_layers(model)[1])
    with_graphs = _loss_and_gradients(model)
    assert (graphs.graphed, graphs.failed, graphs.replaying) == (None, False, False)
    assert_same_loss_and_gradients(with_graphs, own, rtol=0, atol=0)


@pytest.mark.parametrize("layers_to_transform", [None, [1]])
def test_capture_arguments_need_gradients_where_the_real_ones_will(layers_to_transform):
    """make_graphed_callables captures a gradient for exactly the arguments that need one: the first layer's input
    needs none (the embeddings are frozen), nor, where the first layer has no adapter, its attention output."""
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _model(LlamaConfig, layers_to_transform=layers_to_transform, target_modules=every_linear)
    graphs = LayerGraphs(decoder_layers(model)[1])
    hidden = torch.randn(1, sum(LENGTHS), 64)
    cos, sin = model.base_model.model.model.rotary_emb(hidden, torch.arange(sum(LENGTHS))[None])
    samples = graphs._sample_arguments(hidden, (cos, sin))
    assert len(samples) == 4  # two pieces a layer
    (first_input, *_), (first_attention, first_residual), (second_input, *_), (second_attention, _) = samples
    assert first_residual is first_input and first_input.shape == hidden.shape
    assert first_attention.shape == (1, sum(LENGTHS), 4 * 16)
    first_layer_trains = layers_to_transform is None
    assert [first_input.requires_grad, first_attention.requires_grad, second_input.requires_grad,
            second_attention.requires_grad] == [False, first_layer_trains, first_layer_trains, True]


def test_the_adapter_copies_are_rewritten_after_an_in_place_update():
    model = _model(LlamaConfig)
    _loss_and_gradients(model)  # the copies are made at the first call (fp32 ones here, without autocast)
    layer = next(module for module in model.modules() if hasattr(module, "adapter_copies"))
    copies = layer.adapter_copies
    group = next(iter(copies._groups.values()))
    weight = group.weights[0]
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer's in-place step
    assert not torch.equal(group.targets[0], weight)
    copies.refresh()
    assert torch.equal(group.targets[0], weight)


def test_a_failed_capture_is_reported_by_the_error_that_started_it():
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as error:
        first = _first_error(error)
    assert str(first) == "operation not permitted when stream is capturing"


class _Replayed:
    """Stands in for a piece's CUDA graphs on the CPU, as make_graphed_callables returns them: the piece runs, and its
    backward pass returns the gradients of its inputs and weights in buffers of its own, which the next backward
    pass overwrites (a graph's static outputs)."""

    def __init__(self, piece: torch.nn.Module) -> None:
        self.piece = piece
        self.weights = [weight for weight in piece.parameters() if weight.requires_grad]
        self.buffers: list[torch.Tensor] | None = None

    def __call__(self, *inputs: torch.Tensor):
        outputs = _Replay.apply(self, len(inputs), *inputs, *self.weights)
        return outputs[0] if len(outputs) == 1 else outputs


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, replayed: _Replayed, count: int, *arguments: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [argument.detach().requires_grad_(argument.requires_grad) for argument in arguments[:count]]
        with torch.enable_grad():
            outputs = replayed.piece(*inputs)
        ctx.replayed, ctx.inputs = replayed, inputs
        ctx.outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return tuple(output.detach() for output in ctx.outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        replayed = ctx.replayed
        targets = [tensor for tensor in ctx.inputs if tensor.requires_grad] + replayed.weights
        computed = torch.autograd.grad(ctx.outputs, targets, grad_outputs, allow_unused=True)
        if replayed.buffers is None:
            replayed.buffers = [torch.empty_like(target) for target in targets]
        for buffer, gradient in zip(replayed.buffers, computed):
            buffer.copy_(gradient) if gradient is not None else buffer.zero_()
        returned = iter(buffer.detach() for buffer in replayed.buffers)
        return (None, None, *[next(returned) if tensor.requires_grad else None for tensor in ctx.inputs],
                *[next(returned) for _ in replayed.weights])


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen3Config])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_base_weights_trained_through_replayed_pieces_get_the_eager_gradients(config_class, accumulation,
                                                                              monkeypatch):
    """Full fine-tuning through the pieces, with their gradients returned in buffers that the next backward pass
    overwrites (as the graphs' are): the model's bf16 gradients after one backward pass (what MasterAdamW reads),
    and the fp32 copies' sums of two, which MasterWeights' hooks take before the next replay. (Summed on the model
    instead, the second pass would find its buffer already in .grad and count itself twice: this test fails so.)"""
    from weitiao.train.master_weights import MasterWeights

    register_varlen_attention()
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    # bf16 weights, as master_weights optimizer has them (the hooks' fp32 sums are copies of their gradients).
    model = AutoModelForCausalLM.from_config(config, attn_implementation="varlen").to(torch.bfloat16).train()
    model.set_attn_implementation(PACKED_VARLEN)
    masters = MasterWeights(model, fp32_gradients=accumulation > 1)
    rows = [_packed_row() for _ in range(accumulation)]
    for index, row in enumerate(rows):
        row["input_ids"] = row["labels"] = (row["input_ids"] + 37 * index) % 300  # a different row each time

    def gradients() -> dict[str, torch.Tensor]:
        for row in rows:
            model(**row, use_cache=False).loss.backward()
        found = {name: holder.grad.float() for name, holder in zip(masters.names, masters.gradient_holders)}
        for holder in (*masters.masters, *masters.weights):
            holder.grad = None
        return found

    eager = gradients()
    graphs = LayerGraphs(decoder_layers(model)[1])
    monkeypatch.setattr(LayerGraphs, "_replays", lambda *_: True)
    graphs.graphed = [(_Replayed(before), _Replayed(after)) for before, after in graphs.pieces]
    replayed = gradients()
    assert any("input_layernorm" in name for name in eager) and eager.keys() == replayed.keys()
    for name, gradient in eager.items():
        torch.testing.assert_close(replayed[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
