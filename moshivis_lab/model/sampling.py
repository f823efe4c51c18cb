"""Token sampling: greedy at temperature 0, otherwise top-k sampling from a seeded generator."""

from __future__ import annotations

import torch


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids ``[...]`` from logits ``[..., V]``: argmax if ``temperature <= 0``, else sample.

    ``top_k > 0`` restricts sampling to the k most likely tokens; draws use ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    indices = None
    if 0 < top_k < flat.shape[-1]:
        flat, indices = flat.topk(top_k, dim=-1, sorted=False)
    probs = (flat / temperature).softmax(dim=-1)
    # One categorical draw per row: argmax of p_i / E_i with E_i ~ Exp(1) picks i with prob. p_i.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = (probs / race).argmax(dim=-1, keepdim=True)
    tokens = choice if indices is None else indices.gather(-1, choice)
    return tokens.view(logits.shape[:-1])
