"""Checkpointed layers on CUDA graphs (weitiao.train.checkpoint_graphs), checked on the CPU with each piece run
again where its graph would replay: the model's loss and LoRA gradients with and without offloading, gradients added
over micro-batches, only the layers' inputs kept by the forward pass. The graphs themselves run in
tests/gpu/test_cuda.py."""

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config

from tests.train.test_cuda_graphs import (LENGTHS, _loss_and_gradients, _model, _packed_row,
                                          assert_same_loss_and_gradients)
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


def test_without_a_gpu_the_layers_run_their_own_checkpoint():
    model = _checkpointed(LlamaConfig, offload=True)
    own = _loss_and_gradients(model)
    graphs = CheckpointGraphs(decoder_layers(model)[1])
    with_graphs = _loss_and_gradients(model)
    assert (graphs.units, graphs.failed, graphs.replaying) == (None, False, False)
    assert_same_loss_and_gradients(with_graphs, own, rtol=0, atol=0)
