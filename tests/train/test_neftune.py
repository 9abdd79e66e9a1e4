"""NEFTune: noise of the paper's size per example, none on padding or outside training."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.train.test_sft import make_config
from weitiao.config import load_config
from weitiao.errors import ConfigError
from weitiao.train import run
from weitiao.train.neftune import add_noisy_embeddings, example_lengths


def test_example_lengths_of_packed_and_padded_rows():
    lengths, real = example_lengths(torch.Size([1, 8]), torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), None, "cpu")
    assert lengths.tolist() == [[3, 3, 3, 5, 5, 5, 5, 5]] and real.tolist() == [[1] * 8]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    lengths, real = example_lengths(torch.Size([2, 4]), None, mask, "cpu")
    assert lengths.tolist() == [[3] * 4, [2] * 4] and real.tolist() == mask.tolist()
    lengths, _ = example_lengths(torch.Size([2, 4]), torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]), None, "cpu")
    assert lengths.tolist() == [[4] * 4, [2] * 4]


def noise_of(model, **inputs) -> torch.Tensor:
    """What the embeddings' hooks added to the embedding rows of `inputs`."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0] - torch.nn.functional.embedding(inputs["input_ids"], model.get_input_embeddings().weight)


def test_noise_is_alpha_over_root_length_times_dim_per_example(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_noisy_embeddings(model, alpha=5.0)
    dim = model.config.hidden_size
    model.train()
    ids = torch.randint(5, 100, (1, 8))
    noise = noise_of(model, input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    short, long = 5.0 / (3 * dim) ** 0.5, 5.0 / (5 * dim) ** 0.5
    assert noise[0, :3].abs().max() <= short and noise[0, :3].abs().max() > 0.9 * short  # 3 x dim draws
    assert noise[0, 3:].abs().max() <= long and noise[0, 3:].abs().max() > 0.9 * long
    padded = noise_of(model, input_ids=ids.repeat(2, 1), attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
    assert padded[1, 6:].abs().max() == 0 and padded[1, :6].abs().max() <= 5.0 / (6 * dim) ** 0.5
    model.eval()
    assert noise_of(model, input_ids=ids).abs().max() == 0


def test_an_sft_run_with_neftune_trains_differently_and_evaluates_without_noise(tmp_path, tiny_model_dir):
    plain = run(make_config(tmp_path / "plain", tiny_model_dir, train__max_steps=3))
    noisy = run(make_config(tmp_path / "noisy", tiny_model_dir, train__max_steps=3, train__neftune_noise_alpha=15.0))
    assert noisy.eval_loss < noisy.eval_loss_before
    assert noisy.eval_loss_before == pytest.approx(plain.eval_loss_before, abs=1e-6)  # no noise when evaluating
    assert noisy.eval_loss != pytest.approx(plain.eval_loss, abs=1e-6)


def test_neftune_is_for_sft():
    with pytest.raises(ConfigError, match="train.neftune_noise_alpha is for stage sft"):
        load_config(None, ["--stage", "dpo", "--train.neftune_noise_alpha", "5"])
