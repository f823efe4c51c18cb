"""The frozen image encoder: transformers' ``SiglipVisionModel`` behind one small wrapper.

``ImageEncoder`` takes images in any form ``preprocess`` accepts (or ready ``pixel_values``) and
returns the tower's ``last_hidden_state`` tokens ``[B, N, D]`` (``N = grid_side ** 2``). It is
frozen by default: every parameter has ``requires_grad=False`` and the module stays in eval
mode even when a parent calls ``.train()``.

Where weights come from (never downloaded here):

- ``ImageEncoder.from_config(cfg)``: random weights (``device="meta"`` for shapes and counts);
- ``ImageEncoder.from_pretrained(dir)``: a local HF directory (``SiglipVisionModel`` or
  ``SiglipModel``, read with ``local_files_only=True``; or a PaliGemma directory, whose
  ``vision_tower`` is picked out of its safetensors);
- ``ImageEncoder.from_moshivis_checkpoint(file)``: the released MoshiVis ``model.safetensors``,
  whose encoder tensors are ``image_prefix.enc.model.<name>`` with ``<name>`` the SigLIP vision
  transformer's own names (``embeddings.patch_embedding.weight``,
  ``encoder.layers.{i}.self_attn.q_proj.weight``, ``...mlp.fc1.bias``, ``post_layernorm.weight``;
  no pooling head): kyutai-labs/moshivis wraps the SigLIP vision transformer as ``enc.model``
  of its ``image_prefix`` module, and its Rust server reads the same file with candle's SigLIP
  ``VisionModel`` at ``image_prefix.enc.model``. A ``vision_model.`` level after the prefix
  (how transformers < 5 names a ``SiglipVisionModel``'s tensors) is accepted too. Only those
  tensors are read from the (large) file;
- ``ImageEncoder.load(dir)``: what ``ImageEncoder.save(dir)`` wrote (the tiny tower).

A checkpoint is checked completely before anything is copied: one error lists every missing,
unexpected and mis-shaped tensor, and the target is left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moshivis_lab.artefacts import atomic_path, read_json, write_json
from moshivis_lab.vision.config import VisionConfig
from moshivis_lab.vision.preprocess import WHITE, Images, preprocess

MOSHIVIS_PREFIX = "image_prefix.enc.model."
# Where PaliGemma checkpoints keep the SigLIP tower (older and newer transformers layouts).
PALIGEMMA_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.")
TOWER_FILE = "vision_tower.safetensors"
CONFIG_FILE = "vision_config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
_MAX_LISTED = 12
# transformers < 5 nests the tower one level deeper (``vision_model.embeddings...``).
_NESTED = "vision_model."


def _canonical(name: str) -> str:
    """A vision-tower tensor name without transformers' optional ``vision_model.`` nesting."""
    return name[len(_NESTED) :] if name.startswith(_NESTED) else name


def _listing(names: list[str], what: str) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} {what}: {shown}{more}"


def check_tower_shapes(
    found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]], source: str
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
        for names, what in ((missing, "missing"), (unexpected, "unexpected"), (bad, "mis-shaped"))
        if names
    ]
    if problems:
        raise ValueError(
            f"{source} does not fit this vision tower ({'; '.join(problems)}). Nothing was loaded; "
            "check the VisionConfig (layers, widths, image and patch size) matches the checkpoint."
        )


def _safetensors_files(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{p}: no .safetensors file in this directory")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint file here")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{p}: pickle checkpoints are refused (loading them can run arbitrary code); "
            "convert it to .safetensors where you trust it"
        )
    return [p]


def _prefixed_shapes(
    files: list[Path], prefixes: Sequence[str], ignore: Sequence[str] = ()
) -> tuple[str, dict[str, tuple[Path, str, tuple[int, ...]]]]:
    """The first of ``prefixes`` found in ``files`` and, per canonical tower name under it,
    (file, key, shape). Names starting with one of ``ignore`` (after the prefix) are skipped."""
    found: dict[str, dict[str, tuple[Path, str, tuple[int, ...]]]] = {p: {} for p in prefixes}
    tops: set[str] = set()
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type
            with open(f, "rb") as fh:
                head = fh.read(2)
            if head == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle
                raise ValueError(
                    f"{f}: a pickle checkpoint under a .safetensors name is refused (loading it "
                    "can run arbitrary code); convert it to .safetensors where you trust it"
                ) from e
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from e
        with handle as h:
            for k in h.keys():
                tops.add(".".join(k.split(".")[:3]))
                p = next((p for p in prefixes if k.startswith(p)), None)
                if p is None:
                    continue
                name = _canonical(k[len(p) :])
                if not name.startswith(tuple(ignore)):
                    found[p][name] = (f, k, tuple(h.get_slice(k).get_shape()))
    for p in prefixes:
        if found[p]:
            return p, found[p]
    raise ValueError(
        f"{', '.join(str(f) for f in files)}: no tensor name starts with "
        f"{' or '.join(repr(p) for p in prefixes)}; names there start with "
        f"{sorted(tops)[:_MAX_LISTED]}. Pass prefix= the image encoder's key prefix."
    )


def read_tower_state(
    path: str | os.PathLike[str],
    expected: Mapping[str, Sequence[int]],
    prefixes: Sequence[str],
    dtype: torch.dtype | None = None,
    ignore: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Read only the vision-tower tensors of a safetensors file (or a directory of shards),
    stripped of their prefix and checked against ``expected`` names and shapes first.

    ``prefixes``: candidate key prefixes, the first present is used. ``ignore``: name
    prefixes (after the key prefix) to skip, e.g. ``("head.",)`` to drop a pooling head."""
    files = _safetensors_files(path)
    prefix, found = _prefixed_shapes(files, prefixes, ignore)
    check_tower_shapes({k: v[2] for k, v in found.items()}, expected, f"{path} [{prefix}*]")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (f, key, _) in found.items():
        by_file.setdefault(f, []).append((name, key))
    for f, items in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name, key in items:
                t = h.get_tensor(key)
                if not t.is_floating_point():
                    raise ValueError(
                        f"{f}: tensor {key} has dtype {t.dtype}, expected floats. Nothing was loaded."
                    )
                if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
                    raise ValueError(
                        f"{f}: tensor {key} holds NaN or inf (saved from a diverged run?). "
                        "Nothing was loaded."
                    )
                state[name] = t if dtype is None else t.to(dtype)
    return state


class ImageEncoder(nn.Module):
    """A SigLIP vision tower returning ``last_hidden_state`` tokens ``[B, N, D]``; frozen by default."""

    def __init__(self, config: VisionConfig, model: nn.Module | None = None, frozen: bool = True):
        super().__init__()
        from transformers import SiglipVisionModel

        self.config = config
        self.model = model if model is not None else SiglipVisionModel(config.to_hf())
        got = self.model.config
        if (got.hidden_size, got.image_size, got.patch_size, got.num_hidden_layers) != (
            config.hidden_size,
            config.image_size,
            config.patch_size,
            config.num_layers,
        ):
            raise ValueError(
                "the SigLIP model does not match the VisionConfig: model (hidden, image, patch, "
                f"layers) = {(got.hidden_size, got.image_size, got.patch_size, got.num_hidden_layers)}"
                f", config = {(config.hidden_size, config.image_size, config.patch_size, config.num_layers)}"
            )
        self._frozen = False
        if frozen:
            self.freeze()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: VisionConfig,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        frozen: bool = True,
    ) -> ImageEncoder:
        """Random weights; ``device="meta"`` builds shapes only (no memory, no weights needed)."""
        from transformers import SiglipVisionModel

        with torch.device(device or "cpu"):
            model = SiglipVisionModel(config.to_hf())
        if dtype is not None:
            model = model.to(dtype)
        return cls(config, model, frozen=frozen)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        frozen: bool = True,
    ) -> ImageEncoder:
        """A local HF directory: ``SiglipVisionModel`` / ``SiglipModel`` (``from_pretrained(...,
        local_files_only=True)``) or PaliGemma (its vision tower). The pooling head, if any, is
        dropped: MoshiVis uses the tokens. ``preprocessor_config.json``'s mean/std/resample
        are used when present."""
        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"{p}: no config.json; pass a local HF model directory (for example a download of "
                "google/siglip-so400m-patch14-384 or google/paligemma2-3b-pt-448)"
            )
        raw = read_json(p / "config.json")
        pre = (
            read_json(p / "preprocessor_config.json")
            if (p / "preprocessor_config.json").exists()
            else None
        )
        model_type = raw.get("model_type")
        if model_type in ("siglip_vision_model", "siglip"):
            from transformers import SiglipVisionConfig, SiglipVisionModel

            hf_cfg = SiglipVisionConfig.from_pretrained(p, local_files_only=True)
            config = VisionConfig.from_hf(hf_cfg, name=p.name, preprocessor=pre).replace(
                use_head=False
            )
            with torch.device(device):
                model = SiglipVisionModel(config.to_hf())
            expected = {_canonical(k): tuple(v.shape) for k, v in model.state_dict().items()}
            prefixes = ("vision_model.",) if model_type == "siglip" else ("",)
            state = read_tower_state(p, expected, prefixes, dtype=dtype, ignore=("head.",))
        elif model_type == "paligemma":
            config = VisionConfig.from_hf(raw["vision_config"], name=p.name, preprocessor=pre)
            config = config.replace(use_head=False)
            from transformers import SiglipVisionModel

            with torch.device(device):
                model = SiglipVisionModel(config.to_hf())
            expected = {_canonical(k): tuple(v.shape) for k, v in model.state_dict().items()}
            state = read_tower_state(
                p, expected, PALIGEMMA_PREFIXES, dtype=dtype, ignore=("head.",)
            )
        else:
            raise ValueError(
                f"{p}: model_type {model_type!r} is not a SigLIP vision tower; expected "
                "'siglip_vision_model', 'siglip' or 'paligemma'"
            )
        enc = cls(config, model.to(dtype), frozen=frozen)
        enc._load_canonical(state)
        return enc

    @classmethod
    def from_moshivis_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: VisionConfig | None = None,
        *,
        prefix: str = MOSHIVIS_PREFIX,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        frozen: bool = True,
    ) -> ImageEncoder:
        """The image encoder of a released MoshiVis ``model.safetensors`` (keys
        ``image_prefix.enc.model.*``); ``config`` defaults to ``siglip_gemma2_448``."""
        config = config or VisionConfig.siglip_gemma2_448()
        expected = tower_shapes(config)
        state = read_tower_state(path, expected, (prefix,), dtype=dtype)
        enc = cls.from_config(config, device=device, dtype=dtype, frozen=frozen)
        enc._load_canonical(state)
        return enc

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        frozen: bool = True,
    ) -> ImageEncoder:
        """Read what ``save`` wrote: ``vision_config.json`` + ``vision_tower.safetensors``."""
        d = Path(directory)
        path = d / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no vision config here; is {d} an encoder saved by ImageEncoder.save?"
            )
        config = VisionConfig.from_dict(path.read_text(encoding="utf-8"), str(path))
        state = read_tower_state(d / TOWER_FILE, tower_shapes(config), ("",), dtype=dtype)
        enc = cls.from_config(config, device=device, dtype=dtype, frozen=frozen)
        enc._load_canonical(state)
        return enc

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``vision_config.json`` and ``vision_tower.safetensors`` (atomically) in ``directory``."""
        d = Path(directory)
        state = {
            _canonical(k): v.detach().to("cpu").contiguous()
            for k, v in self.model.state_dict().items()
        }
        with atomic_path(d / TOWER_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "moshivis_lab": "vision_tower"})
        write_json(d / CONFIG_FILE, self.config.to_dict())
        return d

    def moshivis_state_dict(self, prefix: str = MOSHIVIS_PREFIX) -> dict[str, torch.Tensor]:
        """The tower's tensors named as in a released MoshiVis checkpoint (``prefix + name``)."""
        return {prefix + _canonical(k): v for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_moshivis_weights(
        self, path: str | os.PathLike[str], prefix: str = MOSHIVIS_PREFIX
    ) -> ImageEncoder:
        """Copy the encoder tensors of a MoshiVis checkpoint into this encoder, in place; every
        name and shape is checked first, so on any error this encoder is untouched."""
        ref = next(self.model.parameters())
        state = read_tower_state(path, tower_shapes(self.config), (prefix,), dtype=ref.dtype)
        self._load_canonical(state)
        return self

    @torch.no_grad()
    def _load_canonical(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        names = {_canonical(k): k for k in own}
        check_tower_shapes(
            {k: tuple(v.shape) for k, v in state.items()},
            {c: tuple(own[k].shape) for c, k in names.items()},
            "the state",
        )
        ref = next(self.model.parameters())
        self.model.load_state_dict(
            {names[c]: t.to(ref.device, ref.dtype) for c, t in state.items()}, strict=True
        )

    # ------------------------------------------------------------------ freezing

    @property
    def frozen(self) -> bool:
        """Whether the encoder is frozen (no gradients to its weights, always in eval mode)."""
        return self._frozen

    def freeze(self) -> ImageEncoder:
        """``requires_grad=False`` everywhere and eval mode (kept through ``.train()``)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.train(False)

    def unfreeze(self) -> ImageEncoder:
        """Make every weight trainable again (for fine-tuning experiments)."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> ImageEncoder:
        """Like ``nn.Module.train``, except that a frozen encoder stays in eval mode."""
        return super().train(mode and not self._frozen)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of weights (only the trainable ones with ``trainable_only``)."""
        return sum(
            p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only
        )

    # ------------------------------------------------------------------ tokens and pixels

    @property
    def image_size(self) -> int:
        """Side of the square images the tower reads (``VisionConfig.pixels``)."""
        return self.config.pixels

    @property
    def hidden_size(self) -> int:
        """Width D of each output token."""
        return self.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """Tokens N per image (``grid_side ** 2``)."""
        return self.config.num_tokens

    def token_grid_side(self) -> int:
        """Tokens per side of the token grid: token ``i`` is row ``i // side``, column ``i % side``."""
        return self.config.grid_side

    def token_box(
        self, index: int, width: int | None = None, height: int | None = None
    ) -> tuple[float, float, float, float]:
        """Pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) that token ``index`` covers in an
        original image of ``width x height`` (default: the encoder's square input)."""
        side = self.config.grid_side
        if not 0 <= index < side * side:
            raise ValueError(f"token index must be in [0, {side * side}), got {index}")
        px, patch = self.config.pixels, self.config.patch_size
        sx, sy = float(width or px) / px, float(height or px) / px
        r, c = divmod(index, side)
        return (c * patch * sx, r * patch * sy, (c + 1) * patch * sx, (r + 1) * patch * sy)

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` tokens -> ``[B, side, side, D]`` (row-major, as the patches were cut)."""
        side = self.config.grid_side
        if tokens.ndim != 3 or tokens.shape[1] != side * side:
            raise ValueError(f"expected [B, {side * side}, D] tokens, got {tuple(tokens.shape)}")
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2])

    # ------------------------------------------------------------------ running

    def preprocess(self, images: Images, background: Sequence[int] = WHITE) -> torch.Tensor:
        """Images -> ``pixel_values`` ``[B, 3, S, S]`` for this encoder (see ``preprocess``)."""
        return preprocess(images, self.config, background=background)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, 3, S, S]`` (float, normalised by ``preprocess``) -> tokens ``[B, N, D]``."""
        s = self.config.pixels
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(
                f"pixel_values must be [B, 3, {s}, {s}], got {tuple(pixel_values.shape)}; "
                "prepare images with encoder.preprocess(images) (or call encoder.encode(images))"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be normalised floats, got a {pixel_values.dtype} tensor; "
                "pass 0..255 images to encoder.encode(images), which converts them"
            )
        if pixel_values.device.type != "meta" and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values hold NaN or infinite values; clean them first")
        ref = next(self.model.parameters())
        out = self.model(
            pixel_values=pixel_values.to(ref.device, ref.dtype),
            interpolate_pos_encoding=self.config.interpolates,
        )
        return out.last_hidden_state

    def encode(
        self, images: Images | torch.Tensor, background: Sequence[int] = WHITE
    ) -> torch.Tensor:
        """Any images (or a tensor) -> tokens ``[B, N, D]``; no autograd graph is kept when the
        encoder is frozen. A tensor is taken as ``preprocess`` would make it: a uint8 one
        (``[B, 3, S, S]``, ``[B, S, S, 3]`` or one image without B) as 0..255 pixels, converted;
        a float one as normalised ``pixel_values [B, 3, S, S]``, refused when its values lie
        outside what ``preprocess`` can produce (0..255 or 0..1 pixels passed as floats)."""
        if isinstance(images, torch.Tensor):
            pv = self._tensor_pixels(images)
        else:
            pv = self.preprocess(images, background)
        if self._frozen:
            with torch.no_grad():
                return self(pv)
        return self(pv)

    def _tensor_pixels(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor given to ``encode`` as checked ``pixel_values`` (see ``encode``)."""
        c = self.config
        if t.dtype == torch.uint8:
            x = t.unsqueeze(0) if t.ndim == 3 else t
            if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
                x = x.permute(0, 2, 3, 1)  # [B, 3, H, W] -> [B, H, W, 3]
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(
                    f"a uint8 image tensor must be [B, 3, H, W] or [B, H, W, 3], got {tuple(t.shape)}"
                )
            return self.preprocess(list(x.cpu().numpy()))
        if not t.is_floating_point():
            raise TypeError(
                f"got a {t.dtype} tensor; pass uint8 pixels (0..255) or normalised float "
                "pixel_values from encoder.preprocess"
            )
        if t.ndim == 4 and t.shape[1] == 3 and bool(torch.isfinite(t).all()):
            m = torch.as_tensor(c.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            sd = torch.as_tensor(c.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            tol = 1e-3
            x = t.detach().float().cpu()
            lo, hi = (0.0 - m) / sd - tol, (1.0 - m) / sd + tol
            if bool((x < lo).any() or (x > hi).any()):
                raise ValueError(
                    f"float pixel_values must be normalised as preprocess does ((x - mean) / std "
                    f"with mean {tuple(c.image_mean)}, std {tuple(c.image_std)}), got values "
                    f"{float(x.min()):.3g}..{float(x.max()):.3g}; pass raw images (PIL, numpy, "
                    "uint8 tensors) to encode() or normalise with encoder.preprocess"
                )
        return t

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"name={c.name!r}, image_size={c.image_size}, input={c.pixels}, patch={c.patch_size}, "
            f"tokens={c.num_tokens}x{c.hidden_size}, layers={c.num_layers}, frozen={self._frozen}"
        )


def tower_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes of the tower ``config`` describes (built on meta)."""
    from transformers import SiglipVisionModel

    with torch.device("meta"):
        model = SiglipVisionModel(config.to_hf())
    return {_canonical(k): tuple(v.shape) for k, v in model.state_dict().items()}


def count_parameters(config: VisionConfig) -> int:
    """Weights of the tower ``config`` describes (built on the meta device: no memory used)."""
    return ImageEncoder.from_config(config, device="meta").num_parameters()


def describe(config: VisionConfig) -> dict[str, Any]:
    """Token count, width and parameter count of a tower (for reports and notebooks)."""
    return {
        "name": config.name,
        "image_size": config.image_size,
        "input_size": config.pixels,
        "patch_size": config.patch_size,
        "grid_side": config.grid_side,
        "tokens": config.num_tokens,
        "hidden_size": config.hidden_size,
        "layers": config.num_layers,
        "parameters": count_parameters(config),
    }
