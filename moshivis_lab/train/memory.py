"""How much memory adapter training needs, estimated on the meta device (no weights, no GPU).

The real recipe: a frozen Moshi 7B in bf16, 206M trainable adapter parameters kept in fp32 with
their gradients and AdamW's two moments, a bf16 autocast forward. Static memory is counted from
the parameters; activation memory is *measured*: the training forward (embeddings, temporal
layers with their adapters, text head, depformer, the two cross-entropies) runs on meta tensors
in bf16 under a ``saved_tensors_hooks`` that adds up what autograd keeps for backward (each
storage once, parameters excluded). Frozen linears save no input, so the frozen LM costs less
than a trained one. Attention is counted as a fused (flash) kernel saves it, ``O(T)``: on the
meta device PyTorch would otherwise pick the math path and its ``T x T`` probabilities.

Activations are affine in the batch: besides the per-sample part there is a fixed one, the
depformer's frozen per-step weights that ``step_weight`` stacks for one batched matmul and autograd
keeps for backward (about 1.2 GiB in bf16 for Moshi 7B).

With ``checkpointing=True`` each temporal layer (with its adapter) is assumed wrapped in
``torch.utils.checkpoint``: it keeps only its input ``[B, T, dim]``, and one layer's
activations exist at a time during backward.

::

    est = estimate_training_memory(batch=4, seq=750)            # MoshiVisConfig.moshika_vis()
    est.total_gib, est.fits(80)
    largest_batch(seq=750, budget_gib=80, checkpointing=True)

Not counted: the CUDA context and allocator fragmentation (``overhead_gib``, 2 GiB by default,
is added as a margin), data loading, and the frozen image encoder (image tokens are cached).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """One estimate: bytes by kind for a ``batch x seq`` training step (see the module doc)."""

    batch: int
    seq: int
    image_tokens: int
    checkpointing: bool
    frozen_params: int
    trainable_params: int
    frozen_weights: int  # bytes, frozen dtype
    trainable_weights: int  # bytes, fp32 master weights
    gradients: int  # bytes, fp32, trainable only
    optimizer: int  # bytes, AdamW exp_avg + exp_avg_sq in fp32
    autocast_copies: int  # bytes, bf16 copies of the trainable weights kept for backward
    activations: int  # bytes saved for backward at the peak
    transient: int  # bytes of the largest gradient buffers alive next to them
    overhead: int  # bytes, CUDA context + allocator margin
    per_layer_activations: int  # bytes, one temporal layer + adapter (no checkpointing)
    details: dict[str, int] = field(default_factory=dict)

    @property
    def static(self) -> int:
        """Bytes that do not depend on the batch: weights, gradients, optimizer state."""
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Estimated peak bytes of one training step."""
        return (
            self.static + self.autocast_copies + self.activations + self.transient + self.overhead
        )

    @property
    def total_gib(self) -> float:
        """``total`` in GiB."""
        return self.total / GIB

    @property
    def activation_bytes_per_token(self) -> float:
        """Saved activations per (sample, model step) token."""
        return self.activations / (self.batch * self.seq)

    def fits(self, budget_gib: float = 80.0) -> bool:
        """Whether the estimate stays within ``budget_gib`` of device memory."""
        return self.total <= budget_gib * GIB

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (bytes as GiB) for JSON reports."""
        out: dict[str, Any] = {
            "batch": self.batch,
            "seq": self.seq,
            "image_tokens": self.image_tokens,
            "checkpointing": self.checkpointing,
            "frozen_params": self.frozen_params,
            "trainable_params": self.trainable_params,
        }
        for k in (
            "frozen_weights",
            "trainable_weights",
            "gradients",
            "optimizer",
            "autocast_copies",
            "activations",
            "transient",
            "overhead",
            "per_layer_activations",
            "static",
            "total",
        ):
            out[f"{k}_gib"] = round(getattr(self, k) / GIB, 3)
        out["activation_mib_per_token"] = round(self.activation_bytes_per_token / 2**20, 4)
        return out


# ---------------------------------------------------------------------- counting saved tensors


class _SavedBytes:
    """A ``saved_tensors_hooks`` pack hook adding up distinct non-parameter storages."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.total = 0
        self.largest = 0
        self.bucket = "outside"
        self.buckets: dict[str, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s._cdata
        if key not in self.seen and key not in self.exclude:
            self.seen.add(key)
            n = s.nbytes()
            self.total += n
            self.largest = max(self.largest, n)
            self.buckets[self.bucket] = self.buckets.get(self.bucket, 0) + n
        return t


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """SDPA as a fused kernel saves for backward (out + logsumexp), also on the meta device."""
    if kw.get("attn_mask") is not None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    causal = bool(kw.get("is_causal", False))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[0]


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Route the model's attention through ``_flash_sdpa`` (only inside ``model.layers``)."""
    from moshivis_lab.model import layers

    shim = types.SimpleNamespace(
        **{k: getattr(F, k) for k in dir(F) if not k.startswith("__")},
    )
    shim.scaled_dot_product_attention = _flash_sdpa
    before = layers.F
    layers.F = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        layers.F = before


def _meta_model(cfg: Any, dtype: torch.dtype) -> Any:
    from moshivis_lab.model.moshivis import MoshiVis, freeze_for_adapters

    with torch.device("meta"):
        model = MoshiVis(cfg)
    model.to(dtype)
    freeze_for_adapters(model)
    return model.train()


def _training_forward(
    model: Any, batch: int, seq: int, image_tokens: int, counter: _SavedBytes
) -> torch.Tensor:
    """``MoshiVis.forward`` + ``MoshiLM.loss`` on meta tensors, without the data checks (they
    read values); every position holds speech, so the depformer runs (the costly case)."""
    from moshivis_lab.model.adapters import XACall
    from moshivis_lab.model.layers import rope_rotations
    from moshivis_lab.model.lm import delay_codes, undelay

    lm = model.lm
    cfg = lm.cfg
    dev = torch.device("meta")
    k = cfg.num_codebooks
    codes = torch.empty(batch, k, seq, dtype=torch.long, device=dev)
    tokens = torch.empty(batch, image_tokens, model.cfg.xa.image_dim, dtype=model.dtype, device=dev)
    kv = model.encode_image(tokens)
    initial = lm.initial_tokens(dev)
    delayed = delay_codes(codes, cfg.delays, initial)
    inputs = torch.cat([initial[None, :, None].expand(batch, k, 1), delayed[:, :, :-1]], dim=2)
    table, offsets = lm._embedding_tables()
    x = lm._embed(inputs.transpose(1, 2).reshape(batch * seq, k), table, offsets)
    x = x.view(batch, seq, cfg.dim)
    rope = rope_rotations(torch.arange(seq, device=dev), cfg.dim // cfg.num_heads, cfg.max_period)
    call = XACall(kv)
    for i, layer in enumerate(lm.transformer.layers):
        counter.bucket = f"layer{i}"
        x = layer(x, rope=rope, cross_kv=call)
    counter.bucket = "head"
    h = lm.out_norm(x)
    text_logits = lm.text_linear(h)
    text, _ = undelay(text_logits[:, None], cfg.delays[:1], float("nan"))
    q = cfg.dep_q
    audio_logits = lm._depformer_forward(h, delayed)
    audio, _ = undelay(audio_logits.transpose(1, 2), cfg.delays[1 : 1 + q], float("nan"))
    target = torch.empty(batch * seq, dtype=torch.long, device=dev)
    text_loss = F.cross_entropy(text.reshape(-1, cfg.text_card).float(), target)
    atarget = torch.empty(batch * q * seq, dtype=torch.long, device=dev)
    audio_loss = F.cross_entropy(audio.reshape(-1, cfg.card).float(), atarget)
    return text_loss + audio_loss


def _measure(cfg: Any, batch: int, seq: int, image_tokens: int, dtype: torch.dtype) -> dict:
    model = _meta_model(cfg, dtype)
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedBytes(exclude)
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        _training_forward(model, batch, seq, image_tokens, counter)
    layers = [v for b, v in counter.buckets.items() if b.startswith("layer")]
    return {
        "total": counter.total,
        "largest": counter.largest,
        "layers": layers,
        "buckets": dict(counter.buckets),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "layer_input": batch * seq * cfg.lm.dim * torch.finfo(dtype).bits // 8,
    }


def estimate_training_memory(
    cfg: Any = None,
    *,
    batch: int = 1,
    seq: int = 750,
    image_tokens: int = 1024,
    checkpointing: bool = False,
    frozen_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.bfloat16,
    trainable_bytes: int = 4,
    adam_states: int = 2,
    overhead_gib: float = 2.0,
) -> MemoryEstimate:
    """Peak memory of one adapter-training step of ``cfg`` (default: the released MoshiVis).

    ``batch`` samples of ``seq`` model steps (80 ms each: 750 = one minute), ``image_tokens``
    per image. Frozen weights in ``frozen_dtype``; trainable ones as fp32 masters
    (``trainable_bytes``) with fp32 gradients and ``adam_states`` fp32 moments; activations in
    ``compute_dtype`` (autocast), plus a ``compute_dtype`` copy of each trainable weight that
    autocast keeps for backward. Runs on the meta device: seconds, no memory.
    """
    from moshivis_lab.config import MoshiVisConfig

    cfg = cfg or MoshiVisConfig.moshika_vis()
    if batch < 1 or seq < 2 or image_tokens < 1:
        raise ValueError(
            f"need batch >= 1, seq >= 2, image_tokens >= 1; got {batch}, {seq}, {image_tokens}"
        )
    m = _measure(cfg, batch, seq, image_tokens, compute_dtype)
    fb = torch.finfo(frozen_dtype).bits // 8
    cb = torch.finfo(compute_dtype).bits // 8
    per_layer = max(m["layers"]) if m["layers"] else 0
    acts = m["total"]
    if checkpointing:
        acts = acts - sum(m["layers"]) + len(m["layers"]) * m["layer_input"] + per_layer
    trainable = m["trainable"]
    copies = trainable * cb if cb < trainable_bytes else 0
    return MemoryEstimate(
        batch=batch,
        seq=seq,
        image_tokens=image_tokens,
        checkpointing=checkpointing,
        frozen_params=m["frozen"],
        trainable_params=trainable,
        frozen_weights=m["frozen"] * fb,
        trainable_weights=trainable * trainable_bytes,
        gradients=trainable * 4,
        optimizer=trainable * 4 * adam_states,
        autocast_copies=copies,
        activations=acts,
        transient=2 * m["largest"],
        overhead=int(overhead_gib * GIB),
        per_layer_activations=per_layer,
        details={k: int(v) for k, v in m["buckets"].items()},
    )


def largest_batch(
    cfg: Any = None,
    *,
    seq: int = 750,
    budget_gib: float = 80.0,
    checkpointing: bool = False,
    limit: int = 4096,
    **kw: Any,
) -> tuple[int, MemoryEstimate | None]:
    """The largest batch whose estimate fits ``budget_gib`` (0 and None when even 1 does not).

    Activations grow linearly in the batch, so batches 1 and 2 fix the line; the answer is then
    checked with a full estimate.
    """
    one = estimate_training_memory(cfg, batch=1, seq=seq, checkpointing=checkpointing, **kw)
    if not one.fits(budget_gib):
        return 0, None
    two = estimate_training_memory(cfg, batch=2, seq=seq, checkpointing=checkpointing, **kw)
    slope = max(1, two.total - one.total)
    b = min(limit, 1 + int((budget_gib * GIB - one.total) // slope))
    est = estimate_training_memory(cfg, batch=b, seq=seq, checkpointing=checkpointing, **kw)
    while b > 1 and not est.fits(budget_gib):
        b -= 1
        est = estimate_training_memory(cfg, batch=b, seq=seq, checkpointing=checkpointing, **kw)
    return b, est


@contextlib.contextmanager
def checkpoint_temporal_layers(model: Any, enabled: bool = True) -> Iterator[Any]:
    """Inside the block, each temporal layer (with its adapter) of a ``MoshiVis`` or ``MoshiLM``
    runs under ``torch.utils.checkpoint`` in training forwards (streaming and no-grad calls are
    unchanged): the activation checkpointing that ``estimate_training_memory`` assumes.
    Gradients are those of the plain forward; the forward runs twice."""
    from torch.utils.checkpoint import checkpoint

    lm = getattr(model, "lm", model)
    layers = list(lm.transformer.layers) if enabled else []
    for layer in layers:
        plain = layer.forward

        def wrapped(
            x: torch.Tensor,
            rope: Any = None,
            cache: Any = None,
            pos: int = 0,
            cross_kv: Any = None,
            _plain: Any = plain,
        ) -> torch.Tensor:
            if cache is not None or not torch.is_grad_enabled():
                return _plain(x, rope, cache, pos, cross_kv)
            return checkpoint(_plain, x, rope, cache, pos, cross_kv, use_reentrant=False)

        layer.forward = wrapped
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def measured_saved_bytes(model: Any, codes: torch.Tensor, image_tokens: torch.Tensor) -> int:
    """Bytes autograd saves for one real ``MoshiVis`` training forward + loss (any device).

    The same counting as the estimate, on real tensors: to check the meta-device numbers
    against a forward that ran (``tests``/``benchmarks`` compare them at the tiny shape).
    """
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedBytes(exclude)
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = model(codes, image_tokens=image_tokens)
        model.loss(codes, out)
    return counter.total


__all__ = [
    "MemoryEstimate",
    "checkpoint_temporal_layers",
    "estimate_training_memory",
    "largest_batch",
    "measured_saved_bytes",
]
