"""Reading activations: one ``run_with_cache`` for codes or batches, and every hook name documented.

The model files define the hook points (``moshivis_lab.model.hooks``); this module is the
analysis side of them:

- ``run_with_cache(model, codes_or_batch, names_filter, device="cpu")``: one teacher-forced
  forward of a ``MoshiVis`` (or ``MoshiLM``) returning its output and the hooked tensors,
  detached and moved to ``device`` (so a GPU run leaves nothing behind on the GPU). A mixed
  ``Batch`` is accepted with the image-token table of its split;
- ``caching(model, names_filter)``: a ``with`` block recording every call of the chosen hooks,
  for streaming (``model.step`` fires the hooks once per 80 ms step) or several forwards;
- ``HOOK_DOCS`` / ``describe_hooks(model)``: every hook name pattern with its shape and a
  one-line description, in forward order, in one place.

Naming scheme: ``{i}`` is a temporal layer, ``{l}`` a depformer layer. The temporal transformer's
hooks are named ``temporal.layers.{i}...`` (its modules live under ``lm.transformer``), the
adapters' ``temporal.layers.{i}.cross_attention.hook_*``; the image side is
``image_prefix.hook_out`` and the K/V hooks of the module that projects K/V (``shared_xa.hook_k``
when shared, else ``temporal.layers.{i}.cross_attention.mha.hook_k``). Time axes are the model's
own steps: model step ``s`` reads text token ``s - 1`` and predicts text token ``s``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moshivis_lab.model import hooks as _hooks

# Pattern -> (shape, one-line description), in forward order. ``{i}``: temporal layer,
# ``{l}``: depformer layer. B batch, T model steps, N image tokens, H heads, hd head width.
HOOK_DOCS: dict[str, tuple[str, str]] = {
    "image_prefix.hook_out": (
        "[B, N, dim]",
        "image-encoder tokens after proj_xa + norm_xa: the cross-attention source",
    ),
    "shared_xa.hook_k": (
        "[B, N, H, hd]",
        "image keys of the shared K/V projection (once per image)",
    ),
    "shared_xa.hook_v": ("[B, N, H, hd]", "image values of the shared K/V projection"),
    "temporal.layers.{i}.cross_attention.mha.hook_k": (
        "[B, N, H, hd]",
        "image keys of layer i's own K/V projection (sharing='none')",
    ),
    "temporal.layers.{i}.cross_attention.mha.hook_v": (
        "[B, N, H, hd]",
        "image values of layer i's own K/V projection (sharing='none')",
    ),
    "hook_embed": ("[B, T, dim]", "temporal input: text + 16 audio-codebook embeddings summed"),
    "temporal.layers.{i}.hook_resid_pre": ("[B, T, dim]", "residual stream entering layer i"),
    "temporal.layers.{i}.self_attn.hook_q": ("[B, T, H, hd]", "self-attention queries after RoPE"),
    "temporal.layers.{i}.self_attn.hook_k": ("[B, T, H, hd]", "self-attention keys after RoPE"),
    "temporal.layers.{i}.self_attn.hook_v": ("[B, T, H, hd]", "self-attention values"),
    "temporal.layers.{i}.self_attn.hook_pattern": (
        "[B, H, T, T]",
        "causal self-attention probabilities (hooking it takes the equal eager path)",
    ),
    "temporal.layers.{i}.self_attn.hook_z": ("[B, T, H, hd]", "per-head output before out_proj"),
    "temporal.layers.{i}.hook_attn_out": ("[B, T, dim]", "self-attention update to the residual"),
    "temporal.layers.{i}.hook_resid_mid": (
        "[B, T, dim]",
        "residual after self-attention, before the cross-attention and the FFN",
    ),
    "temporal.layers.{i}.cross_attention.hook_q": (
        "[B, T, H, hd]",
        "cross-attention queries from norm_cross(residual)",
    ),
    "temporal.layers.{i}.cross_attention.hook_pattern": (
        "[B, H, T, N]",
        "cross-attention probabilities over the image tokens (rows sum to 1; eager path)",
    ),
    "temporal.layers.{i}.cross_attention.hook_attn": (
        "[B, T, dim]",
        "cross-attention output y before the gate",
    ),
    "temporal.layers.{i}.cross_attention.hook_gate": (
        "[B, T, dim]",
        "gate g per step and channel, after overrides (MoshiVisOutput.gates is its channel mean)",
    ),
    "temporal.layers.{i}.cross_attention.hook_out": (
        "[B, T, dim]",
        "g * y: the image update added to the residual stream",
    ),
    "temporal.layers.{i}.hook_mlp_hidden": ("[B, T, hidden]", "gated FFN hidden silu(a) * b"),
    "temporal.layers.{i}.hook_mlp_out": ("[B, T, dim]", "FFN update added to the residual"),
    "temporal.layers.{i}.hook_resid_post": ("[B, T, dim]", "residual stream leaving layer i"),
    "hook_resid_final": ("[B, T, dim]", "after out_norm: h, fed to the text head and depformer"),
    "hook_text_logits": ("[B, T, text_card]", "text logits per model step (not re-aligned)"),
    "hook_depformer_in": (
        "[B*T, dep_q, dd]",
        "depformer input: depformer_in[k](h) + embedding of the previous codebook's token",
    ),
    "depformer.layers.{l}.hook_resid_pre": ("[B*T, K, dd]", "depformer residual entering layer l"),
    "depformer.layers.{l}.self_attn.hook_q": ("[B*T, K, H, hd]", "depformer queries"),
    "depformer.layers.{l}.self_attn.hook_k": ("[B*T, K, H, hd]", "depformer keys"),
    "depformer.layers.{l}.self_attn.hook_v": ("[B*T, K, H, hd]", "depformer values"),
    "depformer.layers.{l}.self_attn.hook_pattern": (
        "[B*T, H, K, K]",
        "depformer attention over codebooks",
    ),
    "depformer.layers.{l}.self_attn.hook_z": ("[B*T, K, H, hd]", "depformer per-head output"),
    "depformer.layers.{l}.hook_attn_out": ("[B*T, K, dd]", "depformer self-attention update"),
    "depformer.layers.{l}.hook_resid_mid": ("[B*T, K, dd]", "depformer residual after attention"),
    "depformer.layers.{l}.hook_mlp_hidden": ("[B*T, K, hidden]", "depformer FFN hidden"),
    "depformer.layers.{l}.hook_mlp_out": ("[B*T, K, dd]", "depformer FFN update"),
    "depformer.layers.{l}.hook_resid_post": ("[B*T, K, dd]", "depformer residual leaving layer l"),
    "hook_audio_logits": ("[B, T, dep_q, card]", "audio logits per model step and codebook"),
}


@dataclass(frozen=True)
class HookInfo:
    """One hook of a model: its name, the ``HOOK_DOCS`` pattern it matches, shape, meaning."""

    name: str
    pattern: str
    shape: str
    description: str


def _glob(pattern: str) -> str:
    return pattern.replace("{i}", "*").replace("{l}", "*")


def hook_pattern_of(name: str) -> str:
    """The ``HOOK_DOCS`` pattern a hook name matches (``ValueError`` if none does)."""
    for pattern in HOOK_DOCS:
        if fnmatch.fnmatchcase(name, _glob(pattern)) and name.count(".") == pattern.count("."):
            return pattern
    raise ValueError(f"hook name {name!r} matches no pattern of HOOK_DOCS")


def describe_hooks(model: Any, names_filter: _hooks.NameFilter = None) -> list[HookInfo]:
    """Every hook of ``model`` (or those ``names_filter`` picks), in forward order, documented."""
    names = _hooks.select_names(_hook_names(model), names_filter)
    out = []
    for n in names:
        p = hook_pattern_of(n)
        shape, desc = HOOK_DOCS[p]
        out.append(HookInfo(n, p, shape, desc))
    return out


def hooks_table(model: Any | None = None) -> str:
    """A plain-text table of the hook patterns (of ``model``'s hooks when given)."""
    if model is None:
        rows = [(p, s, d) for p, (s, d) in HOOK_DOCS.items()]
    else:
        seen: dict[str, tuple[str, str, str]] = {}
        for h in describe_hooks(model):
            seen.setdefault(h.pattern, (h.pattern, h.shape, h.description))
        rows = list(seen.values())
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{p:<{w0}}  {s:<{w1}}  {d}" for p, s, d in rows)


# ---------------------------------------------------------------------- running


def _hook_names(model: Any) -> list[str]:
    if not isinstance(model, _hooks.HookedModel):
        raise TypeError(
            f"expected a MoshiVis or MoshiLM (a hooked model), got {type(model).__name__}"
        )
    return model.hook_names()


def check_moshivis(model: Any) -> None:
    """TypeError unless ``model`` is a ``MoshiVis``."""
    from moshivis_lab.model.moshivis import MoshiVis

    if not isinstance(model, MoshiVis):
        raise TypeError(
            f"expected a MoshiVis (a Moshi LM with adapters), got {type(model).__name__}; "
            "load one with train.adapters.load_trained(cfg, run) or moshivis_lab.model.load_moshivis(path)"
        )


def as_codes(codes: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Codes ``[B, K, T]`` (or one sample ``[K, T]``, numpy or torch) as a long tensor."""
    t = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.is_floating_point():
        raise ValueError(f"codes must be integer [B, K, T] or [K, T], got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def _inputs(
    model: Any, batch_or_codes: Any, image_tokens: Any, table: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes and image tokens of a call, from codes or a ``mix.Batch`` (+ its split's table)."""
    from moshivis_lab.train.mix import Batch

    if isinstance(batch_or_codes, Batch):
        codes = batch_or_codes.codes
        if image_tokens is None and table is not None:
            image_tokens = torch.as_tensor(table)[batch_or_codes.image_index.cpu()]
    else:
        if table is not None:
            raise ValueError("table= is for a mix.Batch (its image_index rows); pass image_tokens")
        codes = batch_or_codes
    codes = as_codes(codes, model.device)
    if image_tokens is not None:
        image_tokens = torch.as_tensor(image_tokens)
        if image_tokens.dim() == 2:
            image_tokens = image_tokens[None]
        image_tokens = image_tokens.to(model.device)
    return codes, image_tokens


def _moved(t: torch.Tensor, device: torch.device | str | None, clone: bool) -> torch.Tensor:
    t = t.detach()
    if device is not None:
        moved = t.to(device)
        return moved.clone() if clone and moved is t else moved
    return t.clone() if clone else t


def run_with_cache(
    model: Any,
    batch_or_codes: Any,
    names_filter: _hooks.NameFilter = None,
    *,
    image_tokens: Any = None,
    table: Any = None,
    device: torch.device | str | None = "cpu",
    clone: bool = False,
    grad: bool = False,
    **forward_kwargs: Any,
) -> tuple[Any, _hooks.ActivationCache]:
    """One teacher-forced forward and its hooked tensors: ``(output, cache)``.

    ``batch_or_codes``: codes ``[B, K, T]`` / ``[K, T]`` (torch or numpy) or a ``mix.Batch``
    (then ``table``, the image-token table of its split, picks each row's image);
    ``image_tokens [B or 1, N, D]``: the image (None with no table: the model sees no image);
    ``names_filter``: None (all hooks), a name or glob (``"*.cross_attention.hook_pattern"``), a
    list, or a predicate; ``device``: where the cached tensors go (None: where they were made);
    ``grad``: keep autograd on for the forward (the cache is detached anyway); other keyword
    arguments go to ``model.forward`` (``image_kv``, ``xa_start``, ``eager``). The hooks are
    removed when the call returns or raises.
    """
    _hook_names(model)
    codes, img = _inputs(model, batch_or_codes, image_tokens, table)
    if img is not None:
        forward_kwargs["image_tokens"] = img
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        out, cache = _hooks.run_with_cache(
            model, codes, names_filter=names_filter, **forward_kwargs
        )
    moved = _hooks.ActivationCache({k: _moved(v, device, clone) for k, v in cache.items()})
    return out, moved


class StepCache(dict[str, list[torch.Tensor]]):
    """Every call of each cached hook, in call order (``caching``); ``stacked`` joins them."""

    def stacked(self, name: str, dim: int = 1) -> torch.Tensor:
        """The calls of hook ``name`` concatenated along ``dim`` (default: the time axis of
        ``[B, T, ...]`` hooks, which streaming calls with ``T = 1``)."""
        if name not in self:
            raise KeyError(f"hook {name!r} was not cached; cached: {sorted(self)[:8]}")
        return torch.cat(self[name], dim=dim)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {len(v)} calls" for k, v in list(self.items())[:6])
        return f"StepCache({parts}{', ...' if len(self) > 6 else ''})"


@contextlib.contextmanager
def caching(
    model: Any,
    names_filter: _hooks.NameFilter,
    *,
    device: torch.device | str | None = "cpu",
) -> Iterator[StepCache]:
    """Record every call of the chosen hooks inside a ``with`` block (streaming, several calls)::

        with caching(model, "*.cross_attention.hook_gate") as cache, model.streaming(1):
            for frame in ...: model.step(frame, kv)
        g = cache.stacked("temporal.layers.5.cross_attention.hook_gate")  # [1, steps, dim]

    Tensors are detached and moved to ``device``; the hooks are removed on exit.
    """
    names = _hooks.select_names(_hook_names(model), names_filter)
    cache = StepCache()

    def save(t: torch.Tensor, hook: _hooks.HookPoint) -> None:
        cache.setdefault(hook.name, []).append(_moved(t, device, clone=True))

    with model.hooks([(set(names).__contains__, save)]):
        yield cache


# ---------------------------------------------------------------------- inputs


def load_image(cfg: Any, image_id: str) -> Any:
    """The world image ``image_id`` (e.g. ``"test_00003"``) as an RGB PIL image."""
    from PIL import Image

    from moshivis_lab.train.image_tokens import image_path

    with Image.open(image_path(cfg, image_id)) as im:
        return im.convert("RGB")


def image_tokens_for(cfg: Any, image_ids: list[str], encoder: Any = None) -> torch.Tensor:
    """Encoder tokens ``[len(image_ids), N, D]`` (float32, CPU) of world images, computed now
    (no cache: for a handful of images; ``train.image_tokens.image_table`` caches whole splits)."""
    from moshivis_lab.train.image_tokens import encode_images, image_path

    if not image_ids:
        raise ValueError("no image ids given")
    if encoder is None:
        from moshivis_lab.vision.pretrain import load_vision_encoder

        encoder = load_vision_encoder(cfg)
    return encode_images(encoder, [image_path(cfg, i) for i in image_ids], progress=False)
