"""Checkpointed layers on CUDA graphs (weitiao.train.checkpoint_graphs), checked on the CPU with each piece run
again where its graph would replay: the model's loss and LoRA gradients with and without offloading, gradients added
over micro-batches, only the layers' inputs kept by the forward pass. The graphs themselves run in
tests/gpu/test_cuda.py."""

import weakref

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config

from tests.train.test_cuda_graphs import (LENGTHS, _loss_and_gradients, _model, _packed_row,
                                          assert_same_loss_and_gradients)
from weitiao.train import checkpoint_graphs
from weitiao.train.attention import varlen_attention_forward
from weitiao.train.checkpoint_graphs import CheckpointGraphs, _Buffers
from weitiao.train.methods import decoder_layers
from weitiao.train.offload import OffloadedCheckpoint, OffloadedSavedTensors, offload_checkpointed_layers


def _checkpointed(config_class, offload: bool):
    model = _model(config_class)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings: as weitiao.train.methods does
    if offload:
        offload_checkpointed_layers(decoder_layers(model)[1])
    return model


def _replaying(monkeypatch) -> list[int]:
    """CheckpointGraphs replaying on the CPU: its units recorded by running each piece once, and run again at each
    replay. Returns the forwards that decided to replay."""
    decided = []

    def record(piece):
        def replay():  # what the piece saves for its own backward stays inside it, as in a graph's memory
            with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
                piece()
        replay()
        return replay

    def replays(self, args, call):
        if self.units is None:
            self.buffers = _Buffers(self.pieces[0][0], args[0], call["position_embeddings"])
            self.units = self._units(record=record)
        decided.append(args[0].shape)
        return True

    monkeypatch.setattr(CheckpointGraphs, "_replays", replays)
    return decided


@pytest.mark.parametrize("config_class, offload", [(LlamaConfig, True), (LlamaConfig, False), (Qwen3Config, True)])
def test_replayed_checkpointed_layers_give_the_models_loss_and_gradients(config_class, offload, monkeypatch):
    unchecked = _loss_and_gradients(_model(config_class))
    model = _checkpointed(config_class, offload)
    layers = decoder_layers(model)[1]
    own_functions = [layer._gradient_checkpointing_func for layer in layers]
    assert isinstance(own_functions[0], OffloadedCheckpoint) == offload
    decided = _replaying(monkeypatch)
    graphs = CheckpointGraphs(layers)
    replayed = _loss_and_gradients(model)
    assert len(decided) == 1  # decided once per forward, at the first layer
    assert_same_loss_and_gradients(replayed, unchecked, rtol=1e-4, atol=1e-6)
    graphs.remove()
    assert [layer._gradient_checkpointing_func for layer in layers] == own_functions


def test_gradients_of_several_micro_batches_add_up(monkeypatch):
    """The weights' gradients are added to .grad after each layer's backward replay: two backward passes without
    zeroing give twice one pass's gradients (a replay's buffer taken as .grad would be rewritten by the next)."""
    model = _checkpointed(LlamaConfig, offload=True)
    _replaying(monkeypatch)
    CheckpointGraphs(decoder_layers(model)[1])
    _, once = _loss_and_gradients(model)
    for _ in range(2):
        model(**_packed_row(), use_cache=False).loss.backward()
    for name, gradient in once.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, 2 * gradient, msg=name)


def test_the_forward_pass_keeps_only_the_layers_inputs(monkeypatch):
    """Saved for the backward pass (through the offloading hooks, which see every tensor saved inside a checkpointed
    layer): each layer's input and nothing else, as torch's reentrant checkpoint keeps."""
    saved = []
    pack = OffloadedSavedTensors._pack
    monkeypatch.setattr(OffloadedSavedTensors, "_pack", lambda self, t: saved.append(tuple(t.shape)) or pack(self, t))
    model = _checkpointed(LlamaConfig, offload=True)
    row = _packed_row()
    model(**row, use_cache=False)
    checkpointed, saved[:] = saved[:], []
    _replaying(monkeypatch)
    CheckpointGraphs(decoder_layers(model)[1])
    model(**row, use_cache=False)
    assert saved == checkpointed == [(1, sum(LENGTHS), 64)] * 2  # two layers


def _kept_attention_on_the_cpu(monkeypatch) -> list[int]:
    """FlashAttention's forward keeping its log-sum-exp and its backward from them, as a CPU runs them: the
    per-example attention, whose log-sum-exp stands in as any tensor made from the output; the backward checks that
    it gets that output and that tensor back, and differentiates the attention again. Returns the backward calls."""
    backward_calls = []

    def forward(query, key, value, scaling, **kwargs):
        output = varlen_attention_forward(None, query, key, value, None, scaling=scaling, **kwargs)[0]
        output = output.reshape(-1, *output.shape[2:])
        return output, output.float().logsumexp(-1)

    def backward(grad_output, query, key, value, output, lse, scaling, **kwargs):
        backward_calls.append(len(backward_calls))
        query, key, value = (tensor.detach().requires_grad_() for tensor in (query, key, value))
        with torch.enable_grad():
            again = varlen_attention_forward(None, query, key, value, None, scaling=scaling, **kwargs)[0]
        assert torch.equal(again.reshape_as(output), output) and torch.equal(lse, output.float().logsumexp(-1))
        return torch.autograd.grad(again, (query, key, value), grad_output.view_as(again))

    monkeypatch.setattr(checkpoint_graphs, "varlen_forward_keeping", forward)
    monkeypatch.setattr(checkpoint_graphs, "varlen_backward_from_kept", backward)
    return backward_calls


def test_kept_attention_gives_the_models_loss_and_gradients_and_is_saved_beside_the_input(monkeypatch):
    """keep_attention: each layer saves its input, attention's output and its log-sum-exp (through the offloading
    hooks), and its backward replay takes attention's gradients from them, giving the model's loss and gradients."""
    saved = []
    pack = OffloadedSavedTensors._pack
    monkeypatch.setattr(OffloadedSavedTensors, "_pack", lambda self, t: saved.append(tuple(t.shape)) or pack(self, t))
    unchecked = _loss_and_gradients(_model(LlamaConfig))
    model = _checkpointed(LlamaConfig, offload=True)
    backward_calls = _kept_attention_on_the_cpu(monkeypatch)
    _replaying(monkeypatch)
    CheckpointGraphs(decoder_layers(model)[1], keep_attention=True)
    saved.clear()
    replayed = _loss_and_gradients(model)
    assert_same_loss_and_gradients(replayed, unchecked, rtol=1e-4, atol=1e-6)
    tokens = sum(LENGTHS)
    assert saved == [(1, tokens, 64), (tokens, 4, 16), (tokens, 4)] * 2  # two layers: input, output, log-sum-exp
    assert len(backward_calls) == 2


def test_taking_back_a_layers_saved_tensors_fetches_all_that_the_layer_before_saved():
    """The offloading hooks copy back ahead what the entry before saved (a layer's input and kept attention), and
    nothing of the entries before that (GPU memory), whatever the order the layer takes its own back in."""
    fetched = []

    class Copy:
        def __init__(self, name, entry, before):
            self.name, self.entry, self.saved_before = name, entry, before and weakref.ref(before)

        def take(self):
            return torch.zeros(1)

        def fetch_ahead(self, stream):  # as HostCopy's: a second call does nothing
            if self.name not in fetched:
                fetched.append(self.name)

    copies, before = [], None
    for entry in (1, 2, 3):
        for name in ("input", "output", "lse"):
            before = Copy(f"{name} {entry}", entry, before)
            copies.append(before)
    hooks = OffloadedSavedTensors()
    for copy in copies[6:]:  # the last layer takes its own back first
        hooks._unpack(copy)
    assert sorted(fetched) == ["input 2", "lse 2", "output 2"]
    hooks._unpack(copies[4])
    assert sorted(fetched[3:]) == ["input 1", "lse 1", "output 1"]


def test_without_a_gpu_the_layers_run_their_own_checkpoint():
    model = _checkpointed(LlamaConfig, offload=True)
    own = _loss_and_gradients(model)
    graphs = CheckpointGraphs(decoder_layers(model)[1])
    with_graphs = _loss_and_gradients(model)
    assert (graphs.units, graphs.failed, graphs.replaying) == (None, False, False)
    assert_same_loss_and_gradients(with_graphs, own, rtol=0, atol=0)
