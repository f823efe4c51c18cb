"""Moshi checkpoints: read and write ``model.safetensors`` in the released layout, safely.

The released file stores each attention's projections merged, as moshi's loader expects:
``{transformer,depformer}.layers.{i}.self_attn.in_proj_weight`` ``[n * 3 dim, dim]`` and
``...self_attn.out_proj.weight`` ``[n * dim, dim]``, where ``n`` is the number of per-step weight
sets (1 in the temporal transformer, ``dep_q`` in the depformer; step ``w`` is rows
``w * 3 dim : (w + 1) * 3 dim``). The module layout (``in_projs.{w}.weight``, what
``MoshiLM.state_dict()`` and moshi's ``LMModel.state_dict()`` return) is accepted too.

Only safetensors are read (weights, no code). Pickle checkpoints (``.pt``, ``.bin``...) are
refused. A checkpoint is checked completely before anything is copied: one error lists every
missing, unexpected and mis-shaped tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis_lab.artefacts import atomic_path
from moshivis_lab.config import LMConfig, from_stored
from moshivis_lab.model.lm import MoshiLM

CONFIG_KEY = "moshivis_lab.lm_config"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
_SPLIT = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)\.weight$")
_MERGED = {"in_projs": "in_proj_weight", "out_projs": "out_proj.weight"}
_MAX_LISTED = 12


def count_parameters(cfg: LMConfig) -> int:
    """Number of parameters of ``MoshiLM(cfg)`` (built on the meta device: no memory used)."""
    with torch.device("meta"):
        return MoshiLM(cfg).num_parameters()


def to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module layout -> released layout: per-step ``in_projs``/``out_projs`` merged by rows."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        m = _SPLIT.match(name)
        if m is None:
            out[name] = t
        else:
            groups.setdefault(f"{m[1]}.{_MERGED[m[2]]}", {})[int(m[3])] = t
    for name, parts in groups.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def _released_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``to_released`` applied to tensors of the given shapes."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        m = _SPLIT.match(name)
        if m is None:
            out[name] = shape
        else:
            key = f"{m[1]}.{_MERGED[m[2]]}"
            rows = out[key][0] if key in out else 0
            out[key] = (rows + shape[0], *shape[1:])
    return out


def to_module_layout(state: Mapping[str, torch.Tensor], model: MoshiLM) -> dict[str, torch.Tensor]:
    """Released layout -> ``model``'s own names (merged projections split per step)."""
    expected = model.state_dict(keep_vars=False)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = re.match(r"^(.*\.self_attn)\.(in_proj_weight|out_proj\.weight)$", name)
        if m is None:
            out[name] = t
            continue
        kind = "in_projs" if m[2] == "in_proj_weight" else "out_projs"
        n = sum(1 for k in expected if k.startswith(f"{m[1]}.{kind}."))
        for i, part in enumerate(t.chunk(n, dim=0)):
            out[f"{m[1]}.{kind}.{i}.weight"] = part.clone() if n > 1 else part
    return out


def _pickle_error(path: Path) -> ValueError:
    return ValueError(
        f"{path}: pickle checkpoints are refused (loading them can run arbitrary code). "
        'Convert it to safetensors once, where you trust it, e.g. `python -c "import torch; '
        "from safetensors.torch import save_file; "
        "sd = torch.load('model.pt', map_location='cpu', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"`"
    )


def _listing(names: list[str], what: str) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} {what}: {shown}{more}"


def check_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = sorted(
        f"{k} {list(found[k])} (expected {list(expected[k])})"
        for k in set(found) & set(expected)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = [
        _listing(names, what)
        for names, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (bad, "mis-shaped"),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"{source} does not fit this model ({'; '.join(problems)}). Nothing was loaded."
        )


def _open(path: str | os.PathLike[str]) -> tuple[Path, dict[str, tuple[int, ...]], dict[str, str]]:
    """Validate the file and return its path, tensor shapes and metadata (no data read)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a directory; pass the checkpoint file inside it (e.g. "
            f"{path / 'model.safetensors'})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file here")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle
            raise _pickle_error(path) from e
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    return path, shapes, meta


def check_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing the non-float tensors and the float tensors holding NaN or
    inf (a diverged run's weights would make every output NaN, or worse, only some of them).
    One float64 sum per tensor: NaN and inf propagate through it and it cannot overflow."""
    nonfloat = sorted(k for k, t in state.items() if not t.is_floating_point())
    if nonfloat:
        raise ValueError(
            f"{source}: {_listing(nonfloat, 'non-float tensors')}. Nothing was loaded."
        )
    bad = sorted(
        k
        for k, t in state.items()
        if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64)))
    )
    if bad:
        raise ValueError(
            f"{source}: {_listing(bad, 'tensors holding NaN or inf')} (was it saved from a diverged "
            "run? load an earlier checkpoint). Nothing was loaded."
        )


def _read_checked(path: str | os.PathLike[str], model: MoshiLM) -> dict[str, torch.Tensor]:
    """All tensors of ``path`` in ``model``'s layout, after checking names and shapes."""
    path, shapes, _ = _open(path)
    module_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = any(k.endswith((".in_proj_weight", ".out_proj.weight")) for k in shapes)
    module = any(_SPLIT.match(k) for k in shapes)
    expected = module_shapes if module and not released else _released_shapes(module_shapes)
    check_shapes(shapes, expected, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    check_values(state, str(path))
    return to_module_layout(state, model)


def read_config(path: str | os.PathLike[str]) -> LMConfig | None:
    """The ``LMConfig`` stored in a checkpoint written by ``save_moshi`` (None for others)."""
    _, _, meta = _open(path)
    if CONFIG_KEY not in meta:
        return None
    return from_stored(LMConfig, meta[CONFIG_KEY], f"{path} (metadata {CONFIG_KEY})")


@torch.no_grad()
def load_weights(model: MoshiLM, path: str | os.PathLike[str]) -> MoshiLM:
    """Copy a checkpoint's weights into ``model`` in place; on any error ``model`` is untouched."""
    state = _read_checked(path, model)
    ref = model.text_emb.weight
    model.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()}, strict=True)
    return model


def load_moshi(
    path: str | os.PathLike[str],
    cfg: LMConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MoshiLM:
    """A ``MoshiLM`` with the weights of a local ``model.safetensors`` (released or module layout).

    ``cfg``: the model's config; by default the one ``save_moshi`` stored in the file, else
    ``LMConfig.moshi_7b()`` (the released Moshi). The model is built on the meta device and the
    checked tensors are assigned, so no memory is spent on a throw-away initialisation.
    """
    if cfg is None:
        cfg = read_config(path) or LMConfig.moshi_7b()
    with torch.device("meta"):
        model = MoshiLM(cfg)
    state = _read_checked(path, model)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_moshi(model: MoshiLM, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors, released layout) atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: Moshi checkpoints are written as .safetensors")
    state = {
        k: v.detach().to("cpu").contiguous() for k, v in to_released(model.state_dict()).items()
    }
    meta = {"format": "pt", CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def moshi_lm_kwargs(cfg: Any) -> dict[str, Any]:
    """Kyutai ``moshi.models.lm.LMModel`` kwargs with the architecture of an ``LMConfig``.

    With ``LMConfig.moshi_7b()`` these are the released Moshi settings; the package builds the
    reference model our state-dict names and outputs are checked against.
    """
    return dict(
        delays=list(cfg.delays),
        n_q=cfg.n_q,
        dep_q=cfg.dep_q,
        card=cfg.card,
        text_card=cfg.text_card,
        existing_text_padding_id=cfg.existing_text_padding_id,
        dim=cfg.dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        hidden_scale=cfg.hidden_scale,
        causal=True,
        layer_scale=None,
        context=cfg.context,
        max_period=cfg.max_period,
        gating="silu",
        norm="rms_norm_f32",
        positional_embedding="rope",
        depformer_dim=cfg.depformer_dim,
        depformer_dim_feedforward=cfg.depformer_dim_feedforward,
        depformer_num_heads=cfg.depformer_num_heads,
        depformer_num_layers=cfg.depformer_num_layers,
        depformer_layer_scale=None,
        depformer_multi_linear=cfg.depformer_multi_linear,
        depformer_context=cfg.depformer_context,
        depformer_max_period=cfg.max_period,
        depformer_gating="silu",
        depformer_pos_emb="none",
        depformer_weights_per_step=cfg.depformer_weights_per_step,
    )
