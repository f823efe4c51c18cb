"""MoshiVis checkpoints in the released (kyutai-labs/moshivis PyTorch) layout, read strictly.

The released ``model.safetensors`` of moshika-vis is the state dict of the reference
``MoshiVis`` module plus the image prefix. Names (checked against the reference code and its
checkpoint-conversion script):

- the temporal transformer ("Helium") under ``llm.``: ``llm.text_emb.weight``,
  ``llm.out_norm.alpha``, ``llm.text_linear.weight``, ``llm.transformer.layers.{i}.self_attn.
  in_proj_weight`` / ``.out_proj.weight`` (merged projections), ``.norm1.alpha``,
  ``.norm2.alpha``, ``.gating.linear_in.weight`` / ``.linear_out.weight``;
- audio embeddings ``audio_emb.{k}.weight`` and heads ``audio_linears.{k}.weight`` (moshi's
  ``emb.{k}`` / ``linears.{k}``); the depformer under moshi's names at the top level
  (``depformer_in.{k}``, ``depformer_emb.{k}``, ``depformer_text_emb``, ``depformer.layers.{l}.
  self_attn.in_proj_weight`` merged over codebook steps, ``depformer.layers.{l}.gating.{k}.*``);
- adapters: ``llm.transformer.layers.{i}.norm_cross.alpha`` ``[1, 1, dim]``,
  ``llm.transformer.layers.{i}.cross_attention.gate.alpha.0.weight`` ``[dim/8, dim]`` and
  ``.gate.alpha.2.weight`` ``[dim, dim/8]``, and the shared projections stored ONCE, under the
  first cross-attention layer: ``llm.transformer.layers.0.cross_attention.mha.in_proj_weight``
  ``[3 dim, dim]`` and ``...mha.out_proj.weight``;
- ``image_prefix.proj_xa.weight`` / ``.bias``, ``image_prefix.norm_xa.alpha``;
- ``image_prefix.enc.*`` (the SigLIP encoder): **not read here** (the vision loader reads them);
  they are skipped, listed by ``encoder_keys(path)`` and returned by ``load_moshivis_weights``.

Other settings follow the same rule: without sharing every layer stores its own ``mha.*``; with
``sharing="kv"`` the shared ``mha.in_proj_weight_kv`` sits under the first layer and each layer
stores ``mha.in_proj_weight_q`` and ``mha.out_proj.weight`` (the reference code's names for split
projections); a shared gate sits under the first layer's ``cross_attention.gate``, with
``cross_attention.per_layer_alpha`` per layer.

Only safetensors are read, never pickles. Everything is checked before anything is copied: one
error lists every missing, unexpected and mis-shaped tensor, and the model is left untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis_lab.artefacts import atomic_path
from moshivis_lab.config import MoshiVisConfig, XAConfig, from_stored
from moshivis_lab.model.checkpoint import (
    _listing,
    _open,
    _released_shapes,
    check_shapes,
    check_values,
    to_module_layout,
    to_released,
)
from moshivis_lab.model.moshivis import MoshiVis

CONFIG_KEY = "moshivis_lab.moshivis_config"
ENCODER_PREFIX = "image_prefix.enc."
_LLM = ("text_emb.", "transformer.", "out_norm.", "text_linear.")
_ADAPTER = re.compile(r"^lm\.transformer\.layers\.(\d+)\.cross_attention\.(.*)$")


# ---------------------------------------------------------------------- names


def backbone_to_released(name: str) -> str:
    """A ``MoshiLM`` (moshi) key -> the released MoshiVis key (``llm.``, ``audio_emb``...)."""
    if name.startswith(_LLM):
        return "llm." + name
    if name.startswith("emb."):
        return "audio_emb." + name[len("emb.") :]
    if name.startswith("linears."):
        return "audio_linears." + name[len("linears.") :]
    return name


def backbone_from_released(name: str) -> str:
    """Inverse of ``backbone_to_released``."""
    if name.startswith("llm."):
        return name[len("llm.") :]
    if name.startswith("audio_emb."):
        return "emb." + name[len("audio_emb.") :]
    if name.startswith("audio_linears."):
        return "linears." + name[len("audio_linears.") :]
    return name


def adapter_key_map(model: MoshiVis) -> dict[str, str]:
    """Every adapter key of ``model.state_dict()`` -> its released name."""
    first = model.cfg.layers[0]
    out: dict[str, str] = {}
    for name in model.state_dict():
        if name.startswith("image_prefix."):
            out[name] = name
        elif name.startswith("shared_xa."):
            rest = name[len("shared_xa.") :]
            out[name] = f"llm.transformer.layers.{first}.cross_attention.mha.{rest}"
        elif name.startswith("shared_gate."):
            rest = name[len("shared_gate.") :]
            out[name] = f"llm.transformer.layers.{first}.cross_attention.gate.{rest}"
        elif m := _ADAPTER.match(name):
            i, rest = m[1], m[2]
            if rest.startswith("norm_cross."):
                out[name] = f"llm.transformer.layers.{i}.{rest}"
            else:
                out[name] = f"llm.transformer.layers.{i}.cross_attention.{rest}"
    assert len(set(out.values())) == len(out), "adapter names collide"
    return out


def shared_aliases(model: MoshiVis) -> dict[str, str]:
    """Released names a shared tensor may also have under the other cross-attention layers ->
    its stored name (under the first). kyuteye_pt's shared modules sit in every layer, so a
    state dict saved from it can hold the copies; its loader needs the shared gate in every
    layer (``save_moshivis(..., layout="kyuteye")`` writes them)."""
    first, out = model.cfg.layers[0], {}
    stored = [
        v for k, v in adapter_key_map(model).items() if k.startswith(("shared_xa.", "shared_gate."))
    ]
    head = f"llm.transformer.layers.{first}.cross_attention."
    for name in stored:
        rest = name[len(head) :]
        for i in model.cfg.layers[1:]:
            out[f"llm.transformer.layers.{i}.cross_attention.{rest}"] = name
    return out


def _split(model: MoshiVis) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s state: the LM's backbone (MoshiLM names) and the adapters (module names)."""
    adapters = set(adapter_key_map(model))
    backbone, rest = {}, {}
    for k, v in model.state_dict().items():
        if k in adapters:
            rest[k] = v
        else:
            assert k.startswith("lm."), k
            backbone[k[len("lm.") :]] = v
    return backbone, rest


def to_released_state(model: MoshiVis, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s weights under the released names (see the module docstring)."""
    backbone, adapters = _split(model)
    names = adapter_key_map(model)
    out = {names[k]: v for k, v in adapters.items()}
    if not adapters_only:
        out.update({backbone_to_released(k): v for k, v in to_released(backbone).items()})
    return out


def released_shapes(model: MoshiVis, adapters_only: bool = False) -> dict[str, tuple[int, ...]]:
    """The names and shapes a released-layout file for ``model`` holds (no data touched)."""
    backbone, adapters = _split(model)
    names = adapter_key_map(model)
    out = {names[k]: tuple(v.shape) for k, v in adapters.items()}
    if not adapters_only:
        shapes = _released_shapes({k: tuple(v.shape) for k, v in backbone.items()})
        out.update({backbone_to_released(k): s for k, s in shapes.items()})
    return out


# ---------------------------------------------------------------------- reading


def encoder_keys(path: str | os.PathLike[str]) -> list[str]:
    """The image-encoder tensors (``image_prefix.enc.*``) a checkpoint holds, for the encoder
    loader (this module skips them)."""
    _, shapes, _ = _open(path)
    return sorted(k for k in shapes if k.startswith(ENCODER_PREFIX))


def read_moshivis_config(path: str | os.PathLike[str]) -> MoshiVisConfig | None:
    """The ``MoshiVisConfig`` stored by ``save_moshivis``/``save_adapters`` (None for others)."""
    _, _, meta = _open(path)
    if CONFIG_KEY not in meta:
        return None
    return from_stored(MoshiVisConfig, meta[CONFIG_KEY], f"{path} (metadata {CONFIG_KEY})")


def _read(
    path: str | os.PathLike[str], model: MoshiVis, adapters_only: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checked tensors of ``path`` under ``model.state_dict()`` names, and the skipped encoder
    keys. Raises one ValueError listing every problem; reads no data before the check."""
    path, shapes, _ = _open(path)
    skipped = sorted(k for k in shapes if k.startswith(ENCODER_PREFIX))
    found = {k: s for k, s in shapes.items() if not k.startswith(ENCODER_PREFIX)}
    aliases = {k: v for k, v in shared_aliases(model).items() if k in found}
    expected = released_shapes(model, adapters_only)
    expected.update({k: expected[v] for k, v in aliases.items()})
    check_shapes(found, expected, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in found}
    check_values(state, str(path))
    differ = [k for k, v in aliases.items() if not torch.equal(state[k], state[v])]
    if differ:
        raise ValueError(
            f"{path}: {_listing(differ, 'tensor')} differ from the first layer's shared ones "
            f"({aliases[differ[0]]}): this checkpoint does not share them; build the model with "
            "XAConfig(sharing='none') or gate_shared=False. Nothing was loaded."
        )
    for k in aliases:
        del state[k]
    back = {v: k for k, v in adapter_key_map(model).items()}
    out = {back[k]: t for k, t in state.items() if k in back}
    if not adapters_only:
        backbone = {backbone_from_released(k): t for k, t in state.items() if k not in back}
        out.update({"lm." + k: t for k, t in to_module_layout(backbone, model.lm).items()})
    return out, skipped


@torch.no_grad()
def load_moshivis_weights(model: MoshiVis, path: str | os.PathLike[str]) -> list[str]:
    """Copy a released-layout checkpoint into ``model`` in place (untouched on any error).

    Returns the skipped image-encoder keys (``image_prefix.enc.*``).
    """
    state, skipped = _read(path, model, adapters_only=False)
    ref = model.image_prefix.proj_xa.weight
    model.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()}, strict=True)
    return skipped


def load_moshivis(
    path: str | os.PathLike[str],
    cfg: MoshiVisConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MoshiVis:
    """A ``MoshiVis`` with the weights of a local released-layout ``model.safetensors``.

    ``cfg``: by default the one ``save_moshivis`` stored in the file, else
    ``MoshiVisConfig.moshika_vis()`` (the released model). Built on the meta device, then the
    checked tensors are assigned (no throw-away initialisation). The SigLIP encoder tensors in
    the file are skipped (see ``encoder_keys``).
    """
    if cfg is None:
        cfg = read_moshivis_config(path) or MoshiVisConfig.moshika_vis()
    with torch.device("meta"):
        model = MoshiVis(cfg)
    state, _ = _read(path, model, adapters_only=False)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _meta(model: MoshiVis) -> dict[str, str]:
    return {"format": "pt", CONFIG_KEY: json.dumps(model.cfg.to_dict())}


def _write(state: Mapping[str, torch.Tensor], path: Path, meta: dict[str, str]) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: MoshiVis checkpoints are written as .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


SAVE_LAYOUTS = ("lab", "kyuteye")


def save_moshivis(model: MoshiVis, path: str | os.PathLike[str], layout: str = "lab") -> Path:
    """Write LM + adapters in the released layout (config in the metadata), atomically.

    ``layout="kyuteye"`` also writes a shared gate under every cross-attention layer, which
    kyuteye_pt's loader requires (``"lab"``, like the release, stores each shared tensor once;
    both read back here). No encoder weights are written (the encoder is loaded on its own).
    """
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"layout must be one of {SAVE_LAYOUTS}, got {layout!r}")
    state = to_released_state(model)
    if layout == "kyuteye":
        for alias, name in shared_aliases(model).items():
            if ".cross_attention.gate." in alias:
                state[alias] = state[name].clone()
    return _write(state, Path(path), _meta(model))


# ---------------------------------------------------------------------- adapters only


def save_adapters(model: MoshiVis, path: str | os.PathLike[str]) -> Path:
    """Write only the adapters (released names, config in the metadata), atomically."""
    return _write(to_released_state(model, adapters_only=True), Path(path), _meta(model))


# How the adapters compute, not how the run reads them: xa_start and the gate readout may differ.
_XA_ARCH = [
    f.name for f in dataclasses.fields(XAConfig) if f.name not in ("xa_start", "gate_readout")
]


@torch.no_grad()
def load_adapters(model: MoshiVis, path: str | os.PathLike[str]) -> MoshiVis:
    """Copy an adapters-only checkpoint (``save_adapters``) into ``model`` in place.

    Strict: every adapter tensor must be there with its shape, nothing else (encoder keys are
    skipped); when the file records its config, the adapter architecture (every ``XAConfig``
    field but ``xa_start`` and ``gate_readout``) and the LM width must match. On any error ``model`` is untouched.
    """
    stored = read_moshivis_config(path)
    if stored is not None:
        diff = [
            f"{n}: file {getattr(stored.xa, n)!r} vs model {getattr(model.cfg.xa, n)!r}"
            for n in _XA_ARCH
            if getattr(stored.xa, n) != getattr(model.cfg.xa, n)
        ]
        if stored.lm.dim != model.cfg.lm.dim or stored.lm.num_layers != model.cfg.lm.num_layers:
            diff.append(
                f"lm: file dim {stored.lm.dim} x {stored.lm.num_layers} layers vs model "
                f"{model.cfg.lm.dim} x {model.cfg.lm.num_layers}"
            )
        if diff:
            raise ValueError(
                f"{path}: adapters of another architecture ({'; '.join(diff)}). "
                "Build the model with the file's config (read_moshivis_config). Nothing was loaded."
            )
    state, _ = _read(path, model, adapters_only=True)
    ref = model.image_prefix.proj_xa.weight
    full = model.state_dict()
    full.update({k: v.to(ref.device, ref.dtype) for k, v in state.items()})
    model.load_state_dict(full, strict=True)
    return model
