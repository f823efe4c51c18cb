"""Named hook points (TransformerLens style): read or replace any inspectable tensor by name.

Every tensor worth looking at passes through a ``HookPoint``, an identity module with a name.
Hooks are plain functions ``fn(tensor, hook) -> tensor | None`` (return a tensor to replace the
value, ``None`` to leave it). They are only ever added inside a context manager, so nothing
leaks from one notebook cell into the next::

    with model.hooks([("temporal.layers.3.hook_resid_post", fn)]):
        out = model(codes)
    out, cache = run_with_cache(model, codes, names_filter=lambda n: "pattern" in n)

Hook names of ``MoshiLM``, in forward order (``i`` a temporal layer, ``l`` a depformer layer).
The temporal transformer's modules live under ``transformer.`` (moshi's state-dict names) but
its hooks are named ``temporal.``; every other hook name is its module path.

- ``hook_embed``: input of the temporal transformer, text + audio embeddings summed
  ``[B, T, dim]``
- ``temporal.layers.{i}.hook_resid_pre``: residual stream entering layer i ``[B, T, dim]``
- ``temporal.layers.{i}.self_attn.hook_q`` / ``hook_k``: queries / keys after RoPE
  ``[B, T, heads, head_dim]``; ``...self_attn.hook_v``: values, same shape
- ``temporal.layers.{i}.self_attn.hook_pattern``: attention probabilities
  ``[B, heads, T_q, T_k]``; hooking it switches that layer to an eager attention path whose
  outputs equal the fused (SDPA) path
- ``temporal.layers.{i}.self_attn.hook_z``: per-head attention output before ``out_proj``
  ``[B, T, heads, head_dim]``
- ``temporal.layers.{i}.hook_attn_out``: the self-attention update added to the residual
- ``temporal.layers.{i}.hook_resid_mid``: residual after self-attention, before the
  cross-attention slot and the FFN
- ``temporal.layers.{i}.hook_mlp_hidden``: gated FFN hidden ``silu(a) * b`` ``[B, T, hidden]``
- ``temporal.layers.{i}.hook_mlp_out``: the FFN update added to the residual
- ``temporal.layers.{i}.hook_resid_post``: residual stream leaving layer i
- ``hook_resid_final``: after ``out_norm``, the temporal output ``h`` fed to the text head and
  the depformer ``[B, T, dim]``
- ``hook_text_logits``: text logits ``[B, T, text_card]``
- ``hook_depformer_in``: depformer input ``depformer_in[k](h) + emb(previous token)``
  ``[B*T, dep_q, depformer_dim]``
- ``depformer.layers.{l}.*``: the same eleven hooks as a temporal layer; the depformer's
  sequence axis is the codebook step k
- ``hook_audio_logits``: audio logits ``[B, T, dep_q, card]``

``MoshiVis`` keeps all of these names and adds ``image_prefix.hook_out``, the K/V hooks
(``shared_xa.hook_k`` / ``hook_v``) and, per temporal layer with an adapter,
``temporal.layers.{i}.cross_attention.{hook_q, hook_pattern, hook_attn, hook_gate, hook_out}``
(listed between ``hook_resid_mid`` and ``hook_mlp_hidden``; see ``moshivis_lab.model.adapters``).

Time axes are the model's own (delayed) steps: position ``s`` of a training forward is the
model's step ``s`` (``LMOutput`` holds logits re-aligned to the caller's grid). In streaming the
same hooks fire once per 80 ms step with ``T = 1``; depformer hooks fire once per codebook step
with a codebook axis of length 1, and attention keys are KV-cache slots (slot = step % context).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[..., Any]  # fn(tensor, hook=HookPoint) -> tensor | None
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """An identity on a named tensor; hooks added to it may read or replace the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # filled in by ``hook_points`` (the hook name, not the module path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` unchanged (hooks run around this call)."""
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Skip nn.Module's call machinery when no hook is attached (the common, fast case)."""
        if not self._forward_hooks and not self._forward_pre_hooks:
            return x
        return super().__call__(x)

    @property
    def active(self) -> bool:
        """Whether any hook is attached."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def add_hook(self, fn: HookFn) -> RemovableHandle:
        """Attach ``fn(tensor, hook=self)``; its non-None return value replaces the tensor."""

        def call(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            return fn(output, hook=module)

        return self.register_forward_hook(call)

    def extra_repr(self) -> str:
        """Show the hook name in ``print(model)``."""
        return repr(self.name)


def hook_name(module_path: str, aliases: dict[str, str]) -> str:
    """The hook name of a module path, with prefix aliases applied (e.g. transformer. -> temporal.)."""
    for prefix, alias in aliases.items():
        if module_path.startswith(prefix):
            return alias + module_path[len(prefix) :]
    return module_path


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """All hook points of ``model`` by hook name (names also written onto each HookPoint)."""
    aliases: dict[str, str] = getattr(model, "hook_aliases", {})
    out: dict[str, HookPoint] = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = hook_name(path, aliases)
            out[module.name] = module
    return out


def select_names(names: Sequence[str], names_filter: NameFilter) -> list[str]:
    """The names picked by a filter: None (all), a name or glob, a list of them, or a predicate."""
    if names_filter is None:
        return list(names)
    if callable(names_filter):
        return [n for n in names if names_filter(n)]
    patterns = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    picked: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = [n for n in names if pat.split(".")[-1] in n][:5]
            hint = f"; similar: {close}" if close else ""
            raise ValueError(
                f"no hook point named {pat!r}{hint} (see model.hook_names() for all names)"
            )
        picked += [n for n in hits if n not in picked]
    return picked


@contextlib.contextmanager
def hooks(
    model: nn.Module, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]]
) -> Iterator[nn.Module]:
    """Attach forward hooks for the duration of a ``with`` block; always removed on exit."""
    points = hook_points(model)
    handles: list[RemovableHandle] = []
    try:
        for name, fn in fwd_hooks:
            for n in select_names(list(points), name):
                handles.append(points[n].add_hook(fn))
        yield model
    finally:
        for h in handles:
            h.remove()


def reset_hooks(model: nn.Module) -> None:
    """Remove every hook from every hook point of ``model`` (a safety net for notebooks)."""
    for point in hook_points(model).values():
        point._forward_hooks.clear()
        point._forward_pre_hooks.clear()


class ActivationCache(dict[str, torch.Tensor]):
    """Detached activations by hook name, as returned by ``run_with_cache``."""

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.items())[:6])
        more = f", ... ({len(self)} in all)" if len(self) > 6 else ""
        return f"ActivationCache({shapes}{more})"


def run_with_cache(
    model: nn.Module,
    *args: Any,
    names_filter: NameFilter = None,
    clone: bool = False,
    **kwargs: Any,
) -> tuple[Any, ActivationCache]:
    """Run ``model(*args, **kwargs)`` and return its output and the hooked tensors, detached.

    ``names_filter``: None (every hook), a name or glob (``"*.hook_pattern"``), a list of them,
    or a predicate on names. ``clone=True`` copies each tensor (detach alone shares memory).
    The caching hooks are removed when the call returns or raises.
    """
    cache = ActivationCache()

    def save(t: torch.Tensor, hook: HookPoint) -> None:
        t = t.detach()
        cache[hook.name] = t.clone() if clone else t

    with hooks(model, [(_as_predicate(model, names_filter), save)]):
        out = model(*args, **kwargs)
    return out, cache


def _as_predicate(model: nn.Module, names_filter: NameFilter) -> Callable[[str], bool]:
    """A predicate over names equivalent to ``names_filter`` (validating explicit names)."""
    picked = set(select_names(list(hook_points(model)), names_filter))
    return picked.__contains__


class HookedModel:
    """The hook API shared by ``MoshiLM`` and ``MoshiVis`` (mixed into an ``nn.Module``)."""

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name, in forward order (see this module's docstring)."""
        return hook_points(self)  # type: ignore[arg-type]

    def hook_names(self) -> list[str]:
        """All hook names, in forward order."""
        return list(self.hook_points())

    def hooks(
        self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]]
    ) -> contextlib.AbstractContextManager[Any]:
        """Context manager attaching ``(name_or_filter, fn)`` forward hooks; removed on exit."""
        return hooks(self, fwd_hooks)  # type: ignore[arg-type]

    def reset_hooks(self) -> None:
        """Remove every hook from every hook point."""
        reset_hooks(self)  # type: ignore[arg-type]

    def run_with_cache(
        self, codes: torch.Tensor, *args: Any, names_filter: NameFilter = None, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """Training forward returning ``(output, cache of detached hooked tensors)``."""
        return run_with_cache(self, codes, *args, names_filter=names_filter, **kwargs)  # type: ignore[arg-type]
