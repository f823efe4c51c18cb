"""Building blocks of the Moshi LM: RMSNorm, RoPE, attention with a KV cache, gated FFN, layer.

One ``TransformerLayer`` class serves both transformers. The temporal one ("Helium") has one set
of weights, RoPE and a causal window of ``context`` steps. The depformer has no positional
embedding and, with ``weights_per_step``, a separate set of weights for every codebook step
``k`` ("multi-linear"): its sequence axis is the codebook axis, so step ``k`` uses weights ``k``.

Parameter names and shapes follow ``moshi.modules.transformer`` so state dicts load strictly:
``self_attn.in_projs.{w}.weight`` ``[3 dim, dim]``, ``self_attn.out_projs.{w}.weight``,
``norm1.alpha`` / ``norm2.alpha`` ``[1, 1, dim]``, ``gating.linear_in.weight``
``[2 hidden, dim]`` / ``gating.linear_out.weight`` (``gating.{w}.`` with per-step weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moshivis_lab.config import NORM_KINDS
from moshivis_lab.model.hooks import HookPoint

Rope = torch.Tensor  # complex64 rotations [T, head_dim // 2]: cos + i sin of the angles


class RMSNorm(nn.Module):
    """``x / sqrt(s(x) + eps) * alpha`` over the last axis; ``alpha`` is ``[1, 1, dim]``.

    ``kind="mean_square"``: ``s(x) = mean(x^2)`` (moshi's and the MLX/Rust ports' norm);
    ``kind="variance"``: ``s(x) = var(x)``, unbiased, as kyuteye_pt's ``RMSNorm(use_var=True)``.
    ``fp32``: compute in float32 (else in the input's dtype, as kyuteye's ``norm_xa``).
    """

    def __init__(self, dim: int, eps: float, kind: str = "mean_square", fp32: bool = True) -> None:
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"RMSNorm kind must be one of {NORM_KINDS}, got {kind!r}")
        self.eps, self.kind, self.fp32 = eps, kind, fp32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last axis."""
        # Casts and reshapes only when needed: each is a dispatch, and a streaming step runs
        # ~50 norms at batch 1 (the arithmetic is the same either way).
        xf = x if not self.fp32 or x.dtype == torch.float32 else x.float()
        if self.kind == "variance":
            s = xf.var(dim=-1, keepdim=True)
        else:
            s = xf.pow(2).mean(dim=-1, keepdim=True)
        r = torch.rsqrt(s + self.eps)
        alpha = self.alpha if x.dim() == 3 else self.alpha.reshape(-1)
        if alpha.dtype != xf.dtype:
            alpha = alpha.to(xf.dtype)
        y = xf * (alpha * r)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def rope_rotations(positions: torch.Tensor, head_dim: int, max_period: float) -> Rope:
    """Unit complex numbers ``exp(i * position * max_period^(-2j / head_dim))``, ``[T, hd / 2]``."""
    j = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(j * (-2.0 * math.log(max_period) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: Rope) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2j], x[2j+1])`` of ``x [B, T, ..., hd]`` by ``rot [T, hd/2]``.

    Each pair is read as the complex number ``x[2j] + i x[2j+1]`` and multiplied by its
    rotation (float32 math), which is RoPE's rotation by ``position * frequency_j``.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rot = rot.view(rot.shape[0], *([1] * (x.dim() - 3)), rot.shape[1])
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def ffn_hidden_size(dim: int, dim_feedforward: int) -> int:
    """Width of the gated FFN's hidden layer (moshi's rule: 21/8 dim for a 4x FFN, else 2/3)."""
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


def step_weight(linears: Sequence[nn.Module], step: int | None = None) -> torch.Tensor:
    """The weight to use: ``[out, in]`` for one module or streaming step ``step``, else all of
    them stacked ``[S, out, in]`` (``weights_per_step``: position k uses weights k)."""
    if len(linears) == 1:
        return linears[0].weight
    if step is not None:
        return linears[step].weight
    return torch.stack([m.weight for m in linears])


def apply_linears(
    linears: Sequence[nn.Module], x: torch.Tensor, step: int | None = None
) -> torch.Tensor:
    """``x`` through one module (called, so wrappers such as peft's LoRA take part) or, with
    per-step weights, through step ``step``'s module or all steps at once (``step_linear``)."""
    if len(linears) == 1:
        return linears[0](x)
    if step is not None:
        return linears[step](x)
    return step_linear(x, step_weight(linears))


def step_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (no bias); a stacked weight ``[S, out, in]`` maps position k of axis 1
    of ``x [N, S, in]`` with ``weight[k]``."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    if x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"per-step weights need {weight.shape[0]} steps on axis 1, got {x.shape[1]}"
        )
    return torch.einsum("nsi,soi->nso", x, weight)


@dataclass
class KVCache:
    """Preallocated keys and values ``[B, heads, capacity, head_dim]``, used as a ring."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return self.k.shape[2]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    pattern_hook: HookPoint,
    eager: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention ``[B, H, Tq, hd]``; eager when the pattern is hooked or asked.

    ``causal``: query i sees keys j <= i (and i - j < ``window`` when a window is set); Tq == Tk.
    The eager path (explicit float32 softmax, pattern passed through ``pattern_hook``) is taken
    when ``eager`` is True or a hook is attached to ``pattern_hook``.
    """
    eager = eager or pattern_hook.active
    t_q, t_k = q.shape[-2], k.shape[-2]
    allowed = None
    if causal and (eager or (window is not None and t_k > window)):
        delta = torch.arange(t_q, device=q.device)[:, None] - torch.arange(t_k, device=q.device)
        allowed = delta >= 0
        if window is not None:
            allowed &= delta < window
    if eager:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = pattern_hook(scores.softmax(dim=-1))
        return torch.matmul(pattern.to(v.dtype), v)
    if allowed is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and t_q > 1)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, optional RoPE, window, KV cache and per-step weights."""

    def __init__(
        self, dim: int, num_heads: int, n_weights: int = 1, context: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        # Lists even for one weight: these are moshi's names (``in_projs.0.weight``).
        self.in_projs = nn.ModuleList(
            [nn.Linear(dim, 3 * dim, bias=False) for _ in range(n_weights)]
        )
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(n_weights)])
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        """Attend over ``x [B, T, dim]``; with a cache, ``x`` is the single step at ``pos``.

        Streaming writes the step's key/value to slot ``pos % capacity`` and attends to the
        ``min(pos + 1, capacity)`` filled slots (the last ``capacity`` steps: the window).
        """
        b, t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        step = None if cache is None else pos
        qkv = apply_linears(self.in_projs, x, step).view(b, t, 3, h, hd)
        if rope is not None:
            qk, v = qkv.split([2, 1], dim=2)
            q, k = apply_rope(qk, rope).unbind(2)
            v = v.squeeze(2)
        else:
            q, k, v = qkv.unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if cache is None:
            z = attend(q, k, v, causal=True, window=self.context, pattern_hook=self.hook_pattern)
        else:
            if t != 1:
                raise ValueError(f"streaming takes one step at a time, got {t}")
            slot = pos % cache.capacity
            cache.k[:, :, slot] = k[:, :, 0]
            cache.v[:, :, slot] = v[:, :, 0]
            n = min(pos + 1, cache.capacity)
            z = attend(
                q,
                cache.k[:, :, :n],
                cache.v[:, :, :n],
                causal=False,
                window=None,
                pattern_hook=self.hook_pattern,
            )
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, hd]
        return apply_linears(self.out_projs, z.reshape(b, t, d), step)


class GatedFFN(nn.Module):
    """SiLU-gated FFN weights: ``linear_out(silu(a) * b)`` with ``[a, b] = linear_in(x)``."""

    def __init__(self, dim: int, dim_feedforward: int) -> None:
        super().__init__()
        hidden = ffn_hidden_size(dim, dim_feedforward)
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x += attn(norm1(x))``; [cross-attention slot]; ``x += ffn(norm2(x))``.

    ``n_weights > 1`` gives per-step weights (the depformer's "multi-linear" layout); ``norm``
    is the ``RMSNorm`` kind of both norms.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        eps: float,
        n_weights: int = 1,
        context: int | None = None,
        norm: str = "mean_square",
    ) -> None:
        super().__init__()
        self.n_weights = n_weights
        self.self_attn = SelfAttention(dim, num_heads, n_weights, context)
        self.norm1 = RMSNorm(dim, eps, norm)
        self.norm2 = RMSNorm(dim, eps, norm)
        self.gating: nn.Module
        if n_weights == 1:
            self.gating = GatedFFN(dim, dim_feedforward)
        else:
            self.gating = nn.ModuleList([GatedFFN(dim, dim_feedforward) for _ in range(n_weights)])
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        # Cross-attention slot (MoshiVis). None here: the base model has no cross-attention.
        # A module placed here is called as ``x = cross_attention(x, cross_kv)`` with the
        # residual stream after self-attention ([B, T, dim]) and whatever the caller passed as
        # ``image_kv``; it owns its norm, gate and residual add and returns the new stream.
        # Registered (empty) here so that its hooks are listed between resid_mid and the FFN's.
        self.cross_attention: nn.Module | None
        self.register_module("cross_attention", None)
        self.hook_mlp_hidden = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _ffn(self, x: torch.Tensor, step: int | None) -> torch.Tensor:
        """Gated FFN update ``linear_out(silu(gate) * value)``; ``linear_in`` rows = [gate, value]."""
        if self.n_weights == 1:
            ffns = [self.gating]
        elif step is not None:  # streaming: the weights of codebook step `step` only
            ffns = [self.gating[step]]
        else:
            ffns = list(self.gating)
        if len(ffns) == 1:  # modules called, so wrappers such as peft's LoRA take part
            gate, value = ffns[0].linear_in(x).chunk(2, dim=-1)
            hidden = self.hook_mlp_hidden(F.silu(gate) * value)
            return ffns[0].linear_out(hidden)
        w_in = step_weight([f.linear_in for f in ffns])
        half = w_in.shape[-2] // 2  # two matmuls on row halves: no split copies in backward
        gate = step_linear(x, w_in[..., :half, :])
        value = step_linear(x, w_in[..., half:, :])
        hidden = self.hook_mlp_hidden(F.silu(gate) * value)
        return step_linear(hidden, step_weight([f.linear_out for f in ffns]))

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
        cross_kv: Any = None,
    ) -> torch.Tensor:
        """One layer on ``x [B, T, dim]`` (see ``SelfAttention.forward`` for cache/pos)."""
        x = self.hook_resid_pre(x)
        attn = self.hook_attn_out(self.self_attn(self.norm1(x), rope, cache, pos))
        x = self.hook_resid_mid(x + attn)
        if self.cross_attention is not None:
            x = self.cross_attention(x, cross_kv)
        mlp = self.hook_mlp_out(self._ffn(self.norm2(x), None if cache is None else pos))
        return self.hook_resid_post(x + mlp)


class TransformerStack(nn.Module):
    """A stack of layers (the ``transformer`` / ``depformer`` modules; only ``layers`` inside)."""

    def __init__(self, layers: list[TransformerLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
