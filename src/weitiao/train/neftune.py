"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while training, add
uniform noise to the input embeddings, in [-m, m] with m = alpha / sqrt(L * d) for an example of L tokens in d
dimensions, and none on padding, as the paper's code does. transformers' hook takes L as the whole batch's padded
length; here every example has its own L: a padded row's real tokens, or in a packed row each example's tokens
(its position ids restart at 0), so packing does not shrink the noise."""

from __future__ import annotations

from typing import Any

import torch


def add_noisy_embeddings(model: torch.nn.Module, alpha: float) -> None:
    """Noise on `model`'s input embeddings in training mode (evaluation and generation see none). The model's
    forward is watched for the position ids and attention mask that say where each example starts and ends."""
    batch: dict[str, Any] = {}

    def remember(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        batch["position_ids"], batch["attention_mask"] = kwargs.get("position_ids"), kwargs.get("attention_mask")

    def add_noise(module: torch.nn.Module, inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        lengths, real = example_lengths(embeddings.shape[:2], batch.get("position_ids"),
                                        batch.get("attention_mask"), embeddings.device)
        bound = alpha / torch.sqrt(lengths * embeddings.shape[-1])
        noise = torch.empty_like(embeddings).uniform_(-1, 1)
        return embeddings + noise * (bound * real).unsqueeze(-1).to(embeddings.dtype)

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(add_noise)


def example_lengths(shape: torch.Size, position_ids: torch.Tensor | None, attention_mask: Any,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the length of the example each token belongs to, 1 for real tokens and 0 for padding), both (batch, seq)
    floats. A 2-D attention mask marks padded rows; else position ids mark the examples of packed rows; else each
    row is one example. Computed on the device, without waiting for it."""
    rows, length = shape
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = attention_mask.to(device=device, dtype=torch.float32)
        return real.sum(-1, keepdim=True).clamp(min=1).expand(rows, length), real
    real = torch.ones(rows, length, device=device)
    if position_ids is None:
        return torch.full((rows, length), float(length), device=device), real
    starts = (position_ids.to(device) == 0).long()
    starts[:, 0] = 1  # a row always starts an example
    example = starts.cumsum(-1) - 1 + torch.arange(rows, device=device).unsqueeze(-1) * length
    counts = torch.zeros(rows * length, device=device).scatter_add_(0, example.flatten(), real.flatten())
    return counts[example], real
