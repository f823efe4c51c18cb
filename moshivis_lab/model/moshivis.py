"""MoshiVis = a Moshi LM + an image prefix + gated cross-attention adapters in its temporal layers.

::

    model = MoshiVis(MoshiVisConfig.tiny(lm.cfg, image_dim=192), lm)   # installs the adapters
    counts = freeze_for_adapters(model)          # only the adapters train
    kv = model.encode_image(image_tokens)        # [B, N, image_dim] -> ImageKV, once per image
    out = model(codes, image_kv=kv)              # LMOutput fields + gates [B, layers, T]
    loss = model.loss(codes, out)["loss"]
    with torch.no_grad(), model.streaming(1):
        kv = model.encode_image(image_tokens[:1])
        text, audio = model.step(user_codes, kv) # honours xa_start; model.last_gates [B, layers]

The image K/V are computed once per image (``encode_image``) and reused by every layer and every
streaming step. The depformer has no cross-attention. With every gate forced to 0
(``gate_override(0.0)``) the outputs equal the base LM's bit for bit.

Hook names are the LM's (``hook_embed``, ``temporal.layers.{i}...``) plus
``image_prefix.hook_out`` (projected image tokens ``[B, N, dim]``), the K/V hooks of the module
that holds the K/V projection (``shared_xa.hook_k`` / ``hook_v`` ``[B, N, heads, head_dim]``
when shared, else ``temporal.layers.{i}.cross_attention.mha.hook_k``) and, per layer,
``temporal.layers.{i}.cross_attention.{hook_q, hook_pattern, hook_attn, hook_gate, hook_out}``
(see ``moshivis_lab.model.adapters``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moshivis_lab.config import MoshiVisConfig, XAConfig
from moshivis_lab.model import hooks as _hooks
from moshivis_lab.model.adapters import (
    CrossAttention,
    GatedCrossAttention,
    ImageKV,
    ImagePrefix,
    XACall,
    XAGate,
    check_override,
    select_layers,
)
from moshivis_lab.model.lm import LMOutput, MoshiLM, StreamingState


@dataclass
class MoshiVisOutput(LMOutput):
    """``LMOutput`` (so ``MoshiLM.loss`` takes it) plus the gates.

    ``gates [B, len(xa_layers), T]``: per cross-attention layer, the gate averaged over channels
    at each model step (0 where no cross-attention happened). Kept in the graph (usable in a
    loss); the per-channel gates are at the ``...cross_attention.hook_gate`` hooks.
    """

    gates: torch.Tensor
    xa_layers: tuple[int, ...]
    num_layers: int | None = None  # temporal layers of the LM (None: len(xa_layers))
    gate_readout: str = "lab"

    def gate_score(self, last: int = 10) -> torch.Tensor:
        """The reported gate value ``[B, T]`` (``reported_gate`` with the model's readout)."""
        return reported_gate(
            self.gates, self.xa_layers, self.num_layers, self.gate_readout, last=last
        )


def reported_gate(
    gates: Any,
    xa_layers: Sequence[int],
    num_layers: int | None = None,
    readout: str = "lab",
    last: int = 10,
) -> Any:
    """One gate value per step from per-layer gates ``[..., len(xa_layers), T]`` (tensor or array).

    ``"lab"``: the mean over the last ``last`` cross-attention layers. ``"kyuteye"``
    (kyuteye_pt's ``Transformer.forward``): the sum over the cross-attention layers whose index
    is among the last ``last`` of ``num_layers`` temporal layers, divided by
    ``min(last, num_layers)``; the gates must then be recorded raw (``XAConfig.gate_readout``).
    """
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    if gates.shape[-2] != len(xa_layers):
        raise ValueError(f"gates hold {gates.shape[-2]} layers for xa_layers {tuple(xa_layers)}")
    if readout == "lab":
        return gates[..., -last:, :].mean(-2)
    if readout != "kyuteye":
        raise ValueError(f"readout must be 'lab' or 'kyuteye', got {readout!r}")
    n = len(xa_layers) if num_layers is None else int(num_layers)
    keep = [j for j, i in enumerate(xa_layers) if i >= n - last]
    total = gates[..., keep, :].sum(-2) if keep else gates[..., :1, :].sum(-2) * 0
    return total / min(last, n)


class MoshiVis(_hooks.HookedModel, nn.Module):
    """A MoshiLM given sight: ``image_prefix``, shared cross-attention, per-layer adapters.

    ``lm``: an existing ``MoshiLM`` whose config equals ``cfg.lm`` (its layers receive the
    adapters, in place), or None to build a fresh one. New modules are created on ``lm``'s
    device and dtype. Modules: ``image_prefix`` (``ImagePrefix``), ``shared_xa`` (the shared
    ``CrossAttention``: Q/K/V/out with ``sharing="qkv"``, K/V only with ``"kv"``, None with
    ``"none"``), ``shared_gate`` (with ``gate_shared``), ``lm`` (adapters at
    ``lm.transformer.layers[i].cross_attention``).
    """

    hook_aliases = {"lm.transformer.": "temporal.", "lm.": ""}

    def __init__(self, cfg: MoshiVisConfig, lm: MoshiLM | None = None) -> None:
        super().__init__()
        if lm is None:
            lm = MoshiLM(cfg.lm)
        elif lm.cfg != cfg.lm:
            raise ValueError(
                "lm.cfg differs from cfg.lm: build the config from the LM, e.g. "
                "MoshiVisConfig(lm=lm.cfg, xa=...) or MoshiVisConfig.tiny(lm.cfg, image_dim)"
            )
        taken = [i for i, layer in enumerate(lm.transformer.layers) if layer.cross_attention]
        if taken:
            raise ValueError(
                f"temporal layers {taken} of this LM already hold a cross_attention module; "
                "wrap a LM without adapters"
            )
        self.cfg = cfg
        xa, d, eps = cfg.xa, cfg.lm.dim, cfg.lm.norm_eps
        heads = cfg.xa_heads
        zero_out = xa.out_proj_init == "zero"
        factory = {"device": lm.device, "dtype": lm.dtype}
        # Registered before ``lm`` so that hook names come in forward order.
        self.image_prefix = ImagePrefix(
            xa.image_dim,
            d,
            eps if xa.norm_xa_eps is None else xa.norm_xa_eps,
            xa.pool_tokens,
            norm=xa.norm_xa,
            fp32=xa.norm_xa_fp32,
        ).to(**factory)
        self.shared_xa: CrossAttention | None = None
        if xa.sharing != "none":
            self.shared_xa = CrossAttention(
                d, heads, query=xa.sharing == "qkv", zero_out=zero_out
            ).to(**factory)
        self.shared_gate: XAGate | None = None
        if xa.gate_shared:
            self.shared_gate = XAGate(xa.gating, d, xa.gate_bias).to(**factory)
        self.lm = lm
        for n, i in enumerate(cfg.layers):
            if xa.sharing == "qkv":
                assert self.shared_xa is not None
                mha, group = self.shared_xa, 0
            elif xa.sharing == "kv":
                mha, group = CrossAttention(d, heads, key_value=False, zero_out=zero_out), 0
            else:
                mha, group = CrossAttention(d, heads, zero_out=zero_out), n
            if xa.gate_shared:
                gate = self.shared_gate
            else:
                gate = None if xa.gating == "none" else XAGate(xa.gating, d, xa.gate_bias)
            adapter = GatedCrossAttention(
                i,
                d,
                heads,
                eps,
                mha,
                gate,
                mha_shared=xa.sharing == "qkv",
                gate_shared=xa.gate_shared,
                kv_group=group,
                per_layer_alpha=xa.gate_shared and xa.sharing == "qkv",
                record_raw=xa.gate_readout == "kyuteye",
            )
            lm.transformer.layers[i].cross_attention = adapter.to(**factory)
        self._last_gates: torch.Tensor | None = None
        self._pending_gates: XACall | int | None = None  # last step's gates, not yet averaged
        self.hook_points()  # write the hook names onto the hook points

    @classmethod
    def from_lm(cls, lm: MoshiLM, xa: XAConfig) -> MoshiVis:
        """Wrap an existing LM (its layers receive the adapters in place)."""
        return cls(MoshiVisConfig(lm=lm.cfg, xa=xa), lm)

    # ------------------------------------------------------------------ basics

    @property
    def adapters(self) -> list[GatedCrossAttention]:
        """The per-layer adapters, in layer order."""
        out = []
        for i in self.cfg.layers:
            module = self.lm.transformer.layers[i].cross_attention
            assert isinstance(module, GatedCrossAttention)
            out.append(module)
        return out

    @property
    def kv_sources(self) -> list[CrossAttention]:
        """The modules holding K/V projections, in K/V-group order."""
        if self.shared_xa is not None:
            return [self.shared_xa]
        return [a.attention for a in self.adapters]

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.lm.dtype

    @property
    def n_user(self) -> int:
        """Audio rows that come from the user."""
        return self.lm.n_user

    def num_parameters(self) -> int:
        """All parameters (LM + adapters), each shared one counted once."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ image

    def _check_image_tokens(self, image_tokens: Any) -> torch.Tensor:
        want = self.cfg.xa.image_dim
        if not isinstance(image_tokens, torch.Tensor) or not image_tokens.is_floating_point():
            raise ValueError(
                f"image_tokens must be a float tensor [B, N, {want}] (image-encoder outputs)"
            )
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != want or image_tokens.shape[1] < 1:
            raise ValueError(
                f"image_tokens must have shape [B, N>0, image_dim={want}], "
                f"got {tuple(image_tokens.shape)}"
            )
        return image_tokens.to(device=self.device, dtype=self.dtype)

    def encode_image(self, image_tokens: torch.Tensor) -> ImageKV:
        """Image-encoder tokens ``[B, N, image_dim]`` -> their keys/values for every layer.

        Runs ``image_prefix`` and each K/V projection once (one group when K/V are shared).
        Gradients flow (training); wrap in ``torch.no_grad()`` for inference.
        """
        source = self.image_prefix(self._check_image_tokens(image_tokens))
        pairs = [m.project_kv(source) for m in self.kv_sources]
        return ImageKV(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))

    def _check_image_kv(self, image_kv: Any, batch_size: int | None) -> ImageKV:
        if not isinstance(image_kv, ImageKV):
            raise ValueError(
                f"image_kv must be an ImageKV from encode_image, got {type(image_kv).__name__}"
            )
        groups = len(self.kv_sources)
        heads = self.cfg.xa_heads
        if image_kv.num_groups != groups or image_kv.num_heads != heads:
            raise ValueError(
                f"image_kv has {image_kv.num_groups} K/V group(s) x {image_kv.num_heads} heads; "
                f"this model needs {groups} x {heads} (sharing={self.cfg.xa.sharing!r}): "
                "encode the image with this model"
            )
        if batch_size is not None and image_kv.batch_size not in (1, batch_size):
            raise ValueError(
                f"image_kv holds {image_kv.batch_size} images for a batch of {batch_size}"
            )
        return image_kv

    # ------------------------------------------------------------------ training forward

    def forward(
        self,
        codes: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        *,
        image_kv: ImageKV | None = None,
        xa_start: int = 0,
        eager: bool = False,
    ) -> MoshiVisOutput:
        """Teacher-forced logits of ``codes [B, K, T]`` seeing an image, plus the gates.

        Give ``image_tokens [B or 1, N, image_dim]`` (encoded here, once) or a ready
        ``image_kv``; neither = the base LM (gates 0). ``xa_start``: model steps before it get
        no cross-attention (to reproduce a streaming run; training uses 0). ``eager``: explicit
        softmax attention (equal outputs to the fused path).
        """
        if image_tokens is not None and image_kv is not None:
            raise ValueError("give image_tokens or image_kv, not both")
        if xa_start < 0:
            raise ValueError(f"xa_start must be >= 0, got {xa_start}")
        batch = codes.shape[0] if isinstance(codes, torch.Tensor) and codes.dim() == 3 else None
        if image_tokens is not None:
            image_kv = self.encode_image(image_tokens)
        layers = self.cfg.layers
        if image_kv is None:
            out = self.lm(codes)
            b, t = out.text_logits.shape[0], out.text_logits.shape[2]
            gates = out.text_logits.new_zeros(b, len(layers), t)
        else:
            call = XACall(self._check_image_kv(image_kv, batch), start=xa_start, eager=eager)
            out = self.lm(codes, image_kv=call)
            gates = torch.stack([call.gates[i] for i in layers], dim=1)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(LMOutput)}
        return MoshiVisOutput(
            **fields,
            gates=gates,
            xa_layers=layers,
            num_layers=self.cfg.lm.num_layers,
            gate_readout=self.cfg.xa.gate_readout,
        )

    def loss(self, codes: torch.Tensor, output: LMOutput) -> dict[str, torch.Tensor]:
        """The LM's weighted text + audio loss (see ``MoshiLM.loss``)."""
        return self.lm.loss(codes, output)

    # ------------------------------------------------------------------ streaming

    @contextlib.contextmanager
    def streaming(self, batch_size: int, **kwargs: Any) -> Iterator[StreamingState]:
        """The LM's streaming session (same arguments as ``MoshiLM.streaming``)."""
        with self.lm.streaming(batch_size, **kwargs) as state:
            self._last_gates = self._pending_gates = None
            yield state

    @property
    def is_streaming(self) -> bool:
        """Whether a ``streaming`` block is open."""
        return self.lm.is_streaming

    @property
    def streaming_state(self) -> StreamingState | None:
        """The open streaming session, if any."""
        return self.lm.streaming_state

    @property
    def last_gates(self) -> torch.Tensor | None:
        """Channel-mean gate per cross-attention layer of the last ``step``, ``[B, layers]``
        (0 before ``xa_start`` or without an image). Averaged on first read, not in ``step``."""
        pending, self._pending_gates = self._pending_gates, None
        if pending is not None:
            if isinstance(pending, XACall):
                with torch.inference_mode():
                    gates = pending.gate_means(self.cfg.layers)[:, :, 0]
            else:
                gates = torch.zeros(pending, len(self.cfg.layers), device=self.device)
            self._last_gates = gates
        return self._last_gates

    def step(
        self, user_codes: torch.Tensor, image_kv: ImageKV | None = None, *, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One 80 ms step (see ``MoshiLM.step``), cross-attending to ``image_kv`` from step
        ``cfg.xa.xa_start`` on (earlier steps skip the adapters, as the released demos do).

        Returns ``(text_token [B], audio_codes [B, dep_q])``; the gates are in ``last_gates``.
        """
        st = self.lm.streaming_state
        if st is None:
            raise RuntimeError("step() needs a streaming session: `with model.streaming(B): ...`")
        self._last_gates = None
        if image_kv is None:
            out = self.lm.step(user_codes)
            self._pending_gates = st.batch_size  # zeros, made if read
        else:
            kv = self._check_image_kv(image_kv, st.batch_size)
            call = XACall(
                kv,
                active=st.offset >= self.cfg.xa.xa_start,
                eager=eager,
                lazy_gates=True,
                checked=True,
            )
            out = self.lm.step(user_codes, image_kv=call)
            self._pending_gates = call
        return out

    # ------------------------------------------------------------------ interventions

    @contextlib.contextmanager
    def gate_override(
        self,
        value: float | None = None,
        *,
        scale: float | None = None,
        layers: int | Sequence[int] | None = None,
    ) -> Iterator[MoshiVis]:
        """Force the gates inside a ``with`` block: ``value`` sets ``g`` (0 = the base model,
        1 = ungated), ``scale`` multiplies it. ``layers``: temporal layer indices (None = all
        cross-attention layers). Restored on exit, also after an exception."""
        override = check_override(value, scale)
        chosen = set(select_layers(self.cfg.layers, layers))
        targets = [a for a in self.adapters if a.layer_index in chosen]
        before = [a.gate_override for a in targets]
        try:
            for a in targets:
                a.gate_override = override
            yield self
        finally:
            for a, b in zip(targets, before, strict=True):
                a.gate_override = b

    # ------------------------------------------------------------------ hooks


# ---------------------------------------------------------------------- training helpers

ADAPTER_GROUPS = ("proj_xa", "norm_xa", "attention", "gates", "norm_cross")


def adapter_parameter_groups(model: MoshiVis) -> dict[str, list[nn.Parameter]]:
    """The adapters' parameters by group (each shared parameter once).

    ``proj_xa`` and ``norm_xa`` (the image prefix), ``attention`` (shared and per-layer
    cross-attention projections), ``gates`` (gate MLPs or scalars, ``per_layer_alpha``),
    ``norm_cross``.
    """
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in ADAPTER_GROUPS}
    seen: set[int] = set()

    def add(group: str, module: nn.Module | None) -> None:
        if module is None:
            return
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                groups[group].append(p)

    add("proj_xa", model.image_prefix.proj_xa)
    add("norm_xa", model.image_prefix.norm_xa)
    add("attention", model.shared_xa)
    add("gates", model.shared_gate)
    for a in model.adapters:
        add("attention", a.attention)
        add("gates", a.gate_module)
        if a.per_layer_alpha is not None and id(a.per_layer_alpha) not in seen:
            seen.add(id(a.per_layer_alpha))
            groups["gates"].append(a.per_layer_alpha)
        add("norm_cross", a.norm_cross)
    return groups


def adapter_parameters(model: MoshiVis) -> list[nn.Parameter]:
    """All adapter parameters (for the optimizer), each once."""
    return [p for ps in adapter_parameter_groups(model).values() for p in ps]


def count_adapter_parameters(model: MoshiVis) -> dict[str, int]:
    """Adapter parameter counts per group and ``total`` (works on the meta device)."""
    counts = {g: sum(p.numel() for p in ps) for g, ps in adapter_parameter_groups(model).items()}
    counts["total"] = sum(counts.values())
    return counts


def freeze_for_adapters(model: MoshiVis, verbose: bool = False) -> dict[str, int]:
    """Freeze everything, check that nothing trains, then unfreeze exactly the adapters.

    Returns the trainable counts per group, ``total`` and ``frozen`` (the LM); ``verbose``
    prints them. Raises RuntimeError if the trainable set is not exactly the adapters.
    """
    model.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable:
        raise RuntimeError(f"{trainable} parameters still trainable after freezing everything")
    for p in adapter_parameters(model):
        p.requires_grad_(True)
    counts = count_adapter_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != counts["total"]:
        raise RuntimeError(
            f"{trainable} trainable parameters after unfreezing, expected the adapters' "
            f"{counts['total']}"
        )
    counts["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if verbose:
        width = max(len(k) for k in counts)
        for k, v in counts.items():
            print(f"{k:<{width}}  {v:>15,}")
    return counts
