from dataclasses import replace

import pytest
import torch

from tests.train.test_settings import H200, settings
from weitiao.train.core import clipping_in_the_step, set_clipping_factor


def two_steps(clip_in_the_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and Adam's first moment after two fused AdamW steps whose gradients (norms 50 and 0.5) are clipped to
    norm 1."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    factor = clipping_in_the_step(optimizer, settings()) if clip_in_the_step else None
    for size in (50.0, 0.5):
        gradient = torch.randn(6, 4)
        weight.grad = gradient * size / gradient.norm()
        if clip_in_the_step:
            norm = set_clipping_factor(factor, [weight], max_norm=1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_([weight], max_norm=1.0)
        assert norm.item() == pytest.approx(size, rel=1e-5)  # the norm before clipping, as logged
        optimizer.step()
    return weight.detach(), optimizer.state[weight]["exp_avg"]


def test_a_fused_adam_step_clips_the_gradients_as_clip_grad_norm_does():
    expected_weight, expected_moment = two_steps(clip_in_the_step=False)
    weight, moment = two_steps(clip_in_the_step=True)
    torch.testing.assert_close(moment, expected_moment, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-5, atol=1e-7)
    # The first moment holds the clipped gradients: 0.1 x 0.9 + 0.5 of them, not 50 x 0.9 + 0.5.
    assert moment.norm().item() == pytest.approx(0.5, abs=0.45)


def test_clipping_stays_outside_the_step_where_the_step_cannot_take_it():
    weight = torch.nn.Parameter(torch.zeros(2))
    assert clipping_in_the_step(torch.optim.AdamW([weight], foreach=True), settings()) is None
    assert clipping_in_the_step(torch.optim.SGD([weight], lr=0.1), settings()) is None
    fused = torch.optim.AdamW([weight], fused=True)
    assert clipping_in_the_step(fused, settings(train={"distributed": "zero2"})) is None
    assert clipping_in_the_step(fused, settings(replace(H200, bf16=False), train={"fp16": True})) is None
    assert clipping_in_the_step(fused, settings()) is fused.grad_scale


def test_the_clipping_norm_of_bf16_gradients_is_taken_in_fp32():
    """MasterAdamW reads the bf16 gradients on the model: their norm is summed in fp32 (each tensor's norm rounded to
    bf16 would be off by up to 0.4%) and written into the fp32 factor."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (1000, 3000, 7)]
    for weight in weights:
        weight.grad = torch.randn(weight.shape, dtype=torch.bfloat16) * 3
    factor = torch.ones(())
    norm = set_clipping_factor(factor, weights, max_norm=1.0)
    expected = torch.cat([weight.grad.double() for weight in weights]).norm()
    assert norm.dtype == factor.dtype == torch.float32
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert factor.item() == pytest.approx(expected.item() + 1e-6, rel=1e-6)
