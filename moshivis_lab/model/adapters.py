"""MoshiVis' adapters, the only weights that train: image prefix, cross-attention, gates.

Read top to bottom:

- ``ImagePrefix``: image-encoder tokens ``[B, N, image_dim]`` -> ``proj_xa`` (Linear with bias)
  -> ``norm_xa`` (RMSNorm) -> ``[B, N, dim]``. The image tokens are only a cross-attention
  source: nothing is inserted into the token stream.
- ``CrossAttention``: the Q/K/V/out projections (no bias, no RoPE, no mask on the image side)
  under the reference code's names: ``in_proj_weight`` ``[3 dim, dim]`` (rows Q, K, V) and
  ``out_proj.weight``. With ``sharing="kv"`` the shared module holds only
  ``in_proj_weight_kv`` ``[2 dim, dim]`` and every layer its own ``in_proj_weight_q`` and
  ``out_proj``.
- ``ImageKV``: the image's keys and values, computed **once per image** (``MoshiVis.encode_image``)
  and reused by every layer and every step. One (k, v) pair per K/V group: one group when K/V
  are shared, one per cross-attention layer when they are not.
- ``XAGate``: ``g = sigmoid(W2 ReLU(W1 y) + gate_bias)`` per token and channel (``alpha`` is the
  ``Sequential(Linear, ReLU, Linear)``, so the weights are ``gate.alpha.0.weight`` and
  ``gate.alpha.2.weight``), or Flamingo's scalar ``g = tanh(alpha)``.
- ``GatedCrossAttention``: what goes into ``TransformerLayer.cross_attention`` of a temporal
  layer: ``x + g * CrossAttn(q = norm_cross(x), kv = image)``. A shared module (projections or
  gate) is handed to each layer's module explicitly and owned by ``MoshiVis``: it is not
  registered under the layer, so it is counted and saved once.

Hook points of one layer's adapter (names as seen from ``MoshiVis``/``MoshiLM``):
``temporal.layers.{i}.cross_attention.hook_q`` ``[B, T, heads, head_dim]``, ``...hook_pattern``
``[B, heads, T, N]`` (hooking it, or ``eager=True``, takes the explicit-softmax path),
``...hook_attn`` (``y``, the cross-attention output before the gate, ``[B, T, dim]``),
``...hook_gate`` (``g`` after overrides, ``[B, T, dim]`` also for scalar gates),
``...hook_out`` (``g * y``, the update added to the residual stream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moshivis_lab.config import XA_GATINGS
from moshivis_lab.model.hooks import HookPoint
from moshivis_lab.model.layers import RMSNorm, attend


def _trunc_normal_(weight: torch.Tensor) -> None:
    """The LM's init rule: truncated normal, ``std = 1/sqrt(fan_in)``, cut at 3 std."""
    std = 1.0 / math.sqrt(weight.shape[-1])
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)


@dataclass(frozen=True, eq=False)
class ImageKV:
    """Keys and values of one batch of images, shared by all layers and all steps.

    ``keys[g]`` / ``values[g]``: ``[B, heads, N, head_dim]`` for K/V group ``g`` (one group with
    shared K/V; one per cross-attention layer, in layer order, with ``sharing="none"``). A batch
    of 1 is broadcast over the LM's batch. Build it with ``MoshiVis.encode_image``.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "values", tuple(self.values))
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(
                f"ImageKV needs as many key as value tensors (>= 1), got "
                f"{len(self.keys)} and {len(self.values)}"
            )
        shape = tuple(self.keys[0].shape)
        for k, v in zip(self.keys, self.values, strict=True):
            if k.dim() != 4 or tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(
                    "ImageKV keys and values must all be [B, heads, N, head_dim] of one shape, "
                    f"got {[tuple(t.shape) for t in self.keys + self.values]}"
                )

    @property
    def num_groups(self) -> int:
        """Number of K/V groups."""
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        """Images in the batch."""
        return self.keys[0].shape[0]

    @property
    def num_heads(self) -> int:
        """Attention heads."""
        return self.keys[0].shape[1]

    @property
    def num_tokens(self) -> int:
        """Image tokens ``N``."""
        return self.keys[0].shape[2]

    @property
    def head_dim(self) -> int:
        """Width of one head."""
        return self.keys[0].shape[3]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ImageKV:
        """A copy on another device and/or dtype."""
        return ImageKV(
            tuple(k.to(device=device, dtype=dtype) for k in self.keys),
            tuple(v.to(device=device, dtype=dtype) for v in self.values),
        )

    def detach(self) -> ImageKV:
        """A copy cut from the autograd graph (for streaming after a training forward)."""
        return ImageKV(tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values))


@dataclass(eq=False)
class XACall:
    """What one LM call hands every adapter (``MoshiVis`` builds it; pass it as ``image_kv``).

    ``start``: model steps before this one get no update (training forward); ``active``: whether
    this streaming step is past ``xa_start``; ``eager``: take the explicit-softmax attention path.
    Each adapter writes its channel-mean gate ``[B, T]`` into ``gates[layer]``; with
    ``lazy_gates`` it leaves its full gate ``[B, T, dim]`` in ``gate_values[layer]`` instead, for
    the caller to average only if asked (streaming: ``MoshiVis.last_gates``). ``checked``: the
    caller has validated ``image_kv`` against the model, the adapters need not again.
    """

    image_kv: ImageKV
    start: int = 0
    active: bool = True
    eager: bool = False
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    lazy_gates: bool = False
    checked: bool = False
    gate_values: dict[int, torch.Tensor] = field(default_factory=dict)

    def gate_means(self, layers: Sequence[int]) -> torch.Tensor:
        """The channel-mean gates of ``layers`` stacked: ``[B, len(layers), T]``."""
        return torch.stack([self.layer_gate(i) for i in layers], dim=1)

    def layer_gate(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s channel-mean gate ``[B, T]`` (averaged now if it was left lazy)."""
        if layer not in self.gates:
            self.gates[layer] = self.gate_values.pop(layer).mean(dim=-1)
        return self.gates[layer]


def as_call(cross_kv: Any) -> XACall | None:
    """``cross_kv`` as an ``XACall`` (an ``ImageKV`` is wrapped); None stays None."""
    if cross_kv is None or isinstance(cross_kv, XACall):
        return cross_kv
    if isinstance(cross_kv, ImageKV):
        return XACall(cross_kv)
    raise ValueError(
        f"image_kv must be an ImageKV from MoshiVis.encode_image (or None), "
        f"got {type(cross_kv).__name__}"
    )


class CrossAttention(nn.Module):
    """Projections of a cross-attention: Q (with ``out_proj``) and/or K/V, the reference names.

    ``query`` and ``key_value`` both: ``in_proj_weight`` ``[3 dim, dim]`` (rows Q, K, V) and
    ``out_proj`` (the shared module of the paper). Only ``key_value``: ``in_proj_weight_kv``
    ``[2 dim, dim]``. Only ``query``: ``in_proj_weight_q`` ``[dim, dim]`` and ``out_proj``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        query: bool = True,
        key_value: bool = True,
        zero_out: bool = False,
    ):
        super().__init__()
        if not (query or key_value):
            raise ValueError("a CrossAttention needs query and/or key_value projections")
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide dim {dim}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.has_query, self.has_kv = query, key_value
        self.zero_out = zero_out
        rows = (dim if query else 0) + (2 * dim if key_value else 0)
        weight = nn.Parameter(torch.empty(rows, dim))
        if query and key_value:
            self.in_proj_weight = weight
        elif key_value:
            self.in_proj_weight_kv = weight
        else:
            self.in_proj_weight_q = weight
        self.out_proj = nn.Linear(dim, dim, bias=False) if query else None
        if key_value:
            self.hook_k = HookPoint()
            self.hook_v = HookPoint()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The LM's init: truncated normal with ``std = 1/sqrt(dim)``; ``out_proj`` zero with
        ``zero_out`` (the output ``y`` then starts at exactly 0)."""
        for p in self.parameters():
            _trunc_normal_(p)
        if self.zero_out and self.out_proj is not None:
            self.out_proj.weight.zero_()

    def _weight(self) -> torch.Tensor:
        if self.has_query and self.has_kv:
            return self.in_proj_weight
        return self.in_proj_weight_kv if self.has_kv else self.in_proj_weight_q

    def q_weight(self) -> torch.Tensor:
        """The query projection ``[dim, dim]`` (a view, no copy)."""
        if not self.has_query:
            raise RuntimeError("this CrossAttention holds only the K/V projection")
        return self._weight()[: self.dim]

    def kv_weight(self) -> torch.Tensor:
        """The key and value projections stacked ``[2 dim, dim]`` (a view, no copy)."""
        if not self.has_kv:
            raise RuntimeError("this CrossAttention holds only the Q/out projections")
        w = self._weight()
        return w[self.dim :] if self.has_query else w

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the projected image tokens ``[B, N, dim]`` -> two
        ``[B, heads, N, head_dim]`` (hooks ``hook_k``/``hook_v`` see ``[B, N, heads, hd]``)."""
        b, n, _ = source.shape
        kv = F.linear(source, self.kv_weight()).view(b, n, 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)
        k, v = self.hook_k(k), self.hook_v(v)
        return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def extra_repr(self) -> str:
        """Which projections this module holds."""
        if self.has_query:
            parts = "Q/K/V/out" if self.has_kv else "Q/out"
        else:
            parts = "K/V"
        zero = ", out_proj zero-init" if self.zero_out and self.has_query else ""
        return f"dim={self.dim}, heads={self.num_heads}, projections={parts}{zero}"


class XAGate(nn.Module):
    """The gate on the cross-attention output ``y``.

    ``"conditional_sigmoid"``: ``sigmoid(alpha(y) + bias)``, ``alpha = Sequential(Linear(dim,
    dim/8), ReLU, Linear(dim/8, dim))`` without biases, one value per token and channel.
    ``"tanh_scalar"``: ``tanh(alpha)`` with one scalar ``alpha`` ``[1, 1, 1]`` starting at 0.
    """

    def __init__(self, gating: str, dim: int, bias: float = -4.0) -> None:
        super().__init__()
        if gating not in XA_GATINGS or gating == "none":
            raise ValueError(
                f"XAGate gating must be 'conditional_sigmoid' or 'tanh_scalar', got {gating!r}"
            )
        self.gating, self.bias = gating, float(bias)
        self.alpha: nn.Module | nn.Parameter
        if gating == "conditional_sigmoid":
            hidden = dim // 8
            self.alpha = nn.Sequential(
                nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False)
            )
        else:
            self.alpha = nn.Parameter(torch.zeros(1, 1, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MLP weights: the LM's truncated normal; the scalar: 0 (so ``tanh`` starts closed)."""
        if isinstance(self.alpha, nn.Parameter):
            self.alpha.zero_()
        else:
            for p in self.alpha.parameters():
                _trunc_normal_(p)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Gate values, ``[B, T, dim]`` (conditional) or ``[1, 1, 1]`` (scalar)."""
        if isinstance(self.alpha, nn.Parameter):
            return torch.tanh(self.alpha).to(y.dtype)
        return torch.sigmoid(self.alpha(y) + self.bias)

    def extra_repr(self) -> str:
        """Gate kind and bias."""
        return f"{self.gating!r}, bias={self.bias}" if self.gating != "tanh_scalar" else "'tanh'"


def pool_token_grid(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, N, C]`` tokens of a square grid followed by the mean of each ``k x k`` block (blocks
    at the right and bottom edges may be smaller): ``[B, N + ceil(side / k) ** 2, C]``."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"pool_tokens needs a square grid of image tokens, got {n}; set XAConfig.pool_tokens=0"
        )
    grid = tokens.transpose(1, 2).reshape(b, c, side, side)
    pooled = F.avg_pool2d(grid, k, stride=k, ceil_mode=True, count_include_pad=False)
    return torch.cat([tokens, pooled.flatten(2).transpose(1, 2)], dim=1)


class ImagePrefix(nn.Module):
    """Encoder tokens ``[B, N, image_dim]`` -> ``norm_xa(proj_xa(x))`` ``[B, N, dim]`` (with
    ``pool > 0``, the ``pool x pool`` block means appended to the tokens first); ``norm`` and
    ``fp32`` are ``norm_xa``'s ``RMSNorm`` kind and compute dtype."""

    def __init__(
        self,
        image_dim: int,
        dim: int,
        eps: float,
        pool: int = 0,
        norm: str = "mean_square",
        fp32: bool = True,
    ) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.pool = pool
        self.proj_xa = nn.Linear(image_dim, dim, bias=True)
        self.norm_xa = RMSNorm(dim, eps, norm, fp32)
        self.hook_out = HookPoint()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal ``std = 1/sqrt(image_dim)``, zero bias, unit norm scale."""
        _trunc_normal_(self.proj_xa.weight)
        self.proj_xa.bias.zero_()
        self.norm_xa.alpha.fill_(1.0)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Project and normalise; the result is the cross-attention source."""
        if self.pool:
            image_tokens = pool_token_grid(image_tokens, self.pool)
        return self.hook_out(self.norm_xa(self.proj_xa(image_tokens)))


GateOverride = tuple[str, float]  # ("value", v): g := v; ("scale", s): g := s * g


class GatedCrossAttention(nn.Module):
    """One temporal layer's adapter: ``x + g * CrossAttn(q = norm_cross(x), kv = image)``.

    ``mha`` holds this layer's query/out projections (and K/V with ``sharing="none"``); ``gate``
    its gate (None for ``gating="none"``: ``g = 1``). With ``mha_shared`` / ``gate_shared`` the
    module is the one shared by all layers: it is kept as a reference, not registered here
    (``MoshiVis`` owns it). ``kv_group`` picks this layer's keys/values in an ``ImageKV``.
    ``per_layer_alpha`` (shared projections and shared gate) adds a per-layer scalar factor
    starting at 1, as the reference code does. ``record_raw``: the gates written to the
    ``XACall`` are kyuteye_pt's (before ``per_layer_alpha``, 0 without a gate; see
    ``XAConfig.gate_readout``); ``hook_gate`` always carries the gate as applied.
    """

    def __init__(
        self,
        layer_index: int,
        dim: int,
        num_heads: int,
        norm_eps: float,
        mha: CrossAttention,
        gate: XAGate | None,
        *,
        mha_shared: bool,
        gate_shared: bool,
        kv_group: int,
        per_layer_alpha: bool = False,
        record_raw: bool = False,
    ) -> None:
        super().__init__()
        if not mha.has_query:
            raise ValueError("the layer's CrossAttention must hold the query/out projections")
        self.layer_index, self.kv_group = layer_index, kv_group
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm_cross = RMSNorm(dim, norm_eps)
        # Shared modules: plain references (a dict is not registered by nn.Module).
        self._shared: dict[str, nn.Module] = {}
        if mha_shared:
            self._shared["mha"] = mha
        else:
            self.mha = mha
        if gate is not None and gate_shared:
            self._shared["gate"] = gate
        else:
            self.gate = gate
        self.per_layer_alpha = nn.Parameter(torch.ones(1, 1, 1)) if per_layer_alpha else None
        self.record_raw = record_raw
        self.gate_override: GateOverride | None = None
        self.hook_q = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_attn = HookPoint()
        self.hook_gate = HookPoint()
        self.hook_out = HookPoint()

    @property
    def attention(self) -> CrossAttention:
        """The projections this layer uses (its own or the shared ones)."""
        mha = self._shared["mha"] if "mha" in self._shared else self._modules["mha"]
        assert isinstance(mha, CrossAttention)
        return mha

    @property
    def gate_module(self) -> XAGate | None:
        """The gate this layer uses (its own, the shared one, or None for ``g = 1``)."""
        gate = self._shared["gate"] if "gate" in self._shared else self._modules.get("gate")
        assert gate is None or isinstance(gate, XAGate)
        return gate

    def _gate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate values broadcastable to ``y``: as applied (after ``per_layer_alpha`` and any
        override) and as recorded (``record_raw``: the gate module's output before
        ``per_layer_alpha``, 0 without a gate, as kyuteye_pt reports it; else as applied)."""
        gate = self.gate_module
        g = y.new_ones(1, 1, 1) if gate is None else gate(y)
        raw = g if gate is not None else y.new_zeros(1, 1, 1)
        if self.per_layer_alpha is not None:
            g = g * self.per_layer_alpha.to(g.dtype)
        if self.gate_override is not None:
            kind, value = self.gate_override
            g = y.new_full((1, 1, 1), value) if kind == "value" else g * value
            raw = g
        return g, (raw if self.record_raw else g)

    def _check_kv(self, kv: ImageKV, batch_size: int) -> None:
        if kv.num_groups <= self.kv_group:
            raise ValueError(
                f"image_kv has {kv.num_groups} K/V group(s); layer {self.layer_index} needs group "
                f"{self.kv_group}: encode the image with this model's encode_image"
            )
        if (kv.num_heads, kv.head_dim) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"image_kv has {kv.num_heads} heads x {kv.head_dim}; layer {self.layer_index} "
                f"expects {self.num_heads} x {self.head_dim}"
            )
        if kv.batch_size not in (1, batch_size):
            raise ValueError(
                f"image_kv holds {kv.batch_size} images for a batch of {batch_size} "
                "(give one image per sample, or one for all)"
            )

    def forward(self, x: torch.Tensor, cross_kv: Any) -> torch.Tensor:
        """The residual stream ``x [B, T, dim]`` after the gated cross-attention update.

        ``cross_kv``: an ``ImageKV``, an ``XACall`` or None (no image: ``x`` is returned as is).
        """
        call = as_call(cross_kv)
        if call is None:
            return x
        b, t, d = x.shape
        if not call.active:  # streaming step before xa_start: the layer is skipped
            call.gates[self.layer_index] = x.new_zeros(b, t)
            return x
        kv = call.image_kv
        if not call.checked:
            self._check_kv(kv, b)
        k, v = kv.keys[self.kv_group], kv.values[self.kv_group]
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        mha = self.attention
        q = F.linear(self.norm_cross(x), mha.q_weight()).view(b, t, self.num_heads, self.head_dim)
        q = self.hook_q(q).transpose(1, 2)
        z = attend(
            q, k, v, causal=False, window=None, pattern_hook=self.hook_pattern, eager=call.eager
        )
        assert mha.out_proj is not None
        y = self.hook_attn(mha.out_proj(z.transpose(1, 2).reshape(b, t, d)))
        g, rec = self._gate(y)
        if call.start > 0:  # training forward reproducing a streaming run's xa_start
            on = torch.arange(t, device=x.device)[None, :, None] >= call.start
            g, rec = g * on.to(g.dtype), rec * on.to(rec.dtype)
        g = self.hook_gate(g if g.shape == y.shape else g.expand_as(y))
        rec = g if not self.record_raw else (rec if rec.shape == y.shape else rec.expand_as(y))
        if call.lazy_gates:  # averaged later, only if someone reads it
            call.gate_values[self.layer_index] = rec
        else:
            call.gates[self.layer_index] = rec.mean(dim=-1)
        return x + self.hook_out(g * y)

    def extra_repr(self) -> str:
        """Layer index and what is shared."""
        shared = ",".join(sorted(self._shared)) or "nothing"
        return f"layer={self.layer_index}, kv_group={self.kv_group}, shared={shared}"


def check_override(value: float | None, scale: float | None) -> GateOverride:
    """The ``(kind, number)`` of a gate override; exactly one of ``value``/``scale`` is given."""
    if (value is None) == (scale is None):
        raise ValueError(
            "give exactly one of value= (force g to it, e.g. 0 or 1) or scale= (multiply g)"
        )
    kind, number = ("value", value) if value is not None else ("scale", scale)
    assert number is not None
    if not math.isfinite(float(number)):
        raise ValueError(f"gate override must be finite, got {number}")
    return kind, float(number)


def select_layers(all_layers: Sequence[int], layers: int | Sequence[int] | None) -> tuple[int, ...]:
    """Validated layer indices (None = all cross-attention layers)."""
    if layers is None:
        return tuple(all_layers)
    chosen = (layers,) if isinstance(layers, int) else tuple(int(i) for i in layers)
    bad = [i for i in chosen if i not in all_layers]
    if bad:
        raise ValueError(
            f"layers {bad} have no cross-attention; cross-attention layers are {tuple(all_layers)}"
        )
    return chosen
