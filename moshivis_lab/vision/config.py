"""``VisionConfig``: the frozen image encoder (a SigLIP vision tower) and its preprocessing.

Two presets:

- ``VisionConfig.siglip_gemma2_448()``: the PaliGemma2 SigLIP-So400m tower MoshiVis uses, at
  448 px with 14 px patches -> a 32 x 32 grid = 1024 tokens of width 1152 (27 layers, 16 heads,
  MLP 4304, ``gelu_pytorch_tanh``, LayerNorm eps 1e-6, no pooling head: PaliGemma drops it).
- ``VisionConfig.tiny()``: the small SigLIP pretrained here on the world's images (126 px,
  14 px patches -> 9 x 9 = 81 tokens of width 160: each cell of the world's 3 x 3 grid is
  exactly 3 x 3 tokens).

Preprocessing (the paper's): the image is squared by a bicubic resize to ``image_size``, scaled
to [0, 1] and normalised with mean 0.5 and std 0.5 per channel (so pixels land in [-1, 1]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moshivis_lab.config import _check, _check_types, _positive, from_stored

# PIL resampling filters by name (the paper squares images with a bicubic resize).
RESAMPLE_NAMES: tuple[str, ...] = ("bicubic", "bilinear", "lanczos", "nearest")
# PIL's integer codes, as HF ``preprocessor_config.json`` files write them.
_PIL_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower (transformers' ``SiglipVisionModel``) and how images are prepared.

    The tower's output is ``last_hidden_state`` ``[B, num_tokens, hidden_size]`` with
    ``num_tokens = grid_side ** 2`` and ``grid_side = image_size // patch_size``; token
    ``r * grid_side + c`` covers pixels ``[r*patch, (r+1)*patch) x [c*patch, (c+1)*patch)`` of
    the resized image. ``input_size``: the side images are resized to (None: ``image_size``, the
    tower's native size); any other size makes the tower interpolate its position embeddings, as
    kyuteye_pt does (its moshika-vis config reads 512 px on the 448 px tower: 36 x 36 tokens).
    """

    name: str = "tiny"
    image_size: int = 126
    patch_size: int = 14
    hidden_size: int = 160
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 640
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    use_head: bool = False  # PaliGemma (and MoshiVis) use the tokens, not the pooled head
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    input_size: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        _positive(
            self,
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "layer_norm_eps",
            "num_channels",
        )
        n = "VisionConfig"
        _check(
            self.image_size % self.patch_size == 0,
            n,
            "patch_size",
            f"must divide image_size {self.image_size}, got {self.patch_size} "
            f"(the token grid must be whole: try {self._divisor_hint()})",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            n,
            "num_heads",
            f"must divide hidden_size {self.hidden_size}, got {self.num_heads}",
        )
        from transformers.activations import ACT2FN

        _check(
            self.hidden_act in ACT2FN,
            n,
            "hidden_act",
            f"unknown activation {self.hidden_act!r}; choose one of transformers' ACT2FN "
            "(SigLIP uses 'gelu_pytorch_tanh')",
        )
        for field_name in ("image_mean", "image_std"):
            v = getattr(self, field_name)
            _check(
                len(v) == self.num_channels,
                n,
                field_name,
                f"needs one value per channel ({self.num_channels}), got {v!r}",
            )
        _check(
            all(s > 0 for s in self.image_std),
            n,
            "image_std",
            f"must be > 0, got {self.image_std!r}",
        )
        _check(
            self.resample in RESAMPLE_NAMES,
            n,
            "resample",
            f"must be one of {RESAMPLE_NAMES}, got {self.resample!r}",
        )
        _check(self.num_channels == 3, n, "num_channels", "SigLIP reads RGB: must be 3")
        _check(
            self.input_size is None or self.input_size >= self.patch_size,
            n,
            "input_size",
            f"must be >= patch_size {self.patch_size} (or None: image_size), got {self.input_size!r}",
        )

    def _divisor_hint(self) -> str:
        divs = [p for p in range(2, min(self.image_size, 33)) if self.image_size % p == 0]
        return ", ".join(str(p) for p in divs[-4:]) or "another image_size"

    # ------------------------------------------------------------------ derived

    @property
    def pixels(self) -> int:
        """Side of the square images fed to the tower (``input_size``, else ``image_size``)."""
        return self.image_size if self.input_size is None else self.input_size

    @property
    def interpolates(self) -> bool:
        """Whether the tower must interpolate its position embeddings (``pixels != image_size``)."""
        return self.pixels != self.image_size

    @property
    def grid_side(self) -> int:
        """Tokens per side of the square token grid (``pixels // patch_size``)."""
        return self.pixels // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image (``grid_side ** 2``)."""
        return self.grid_side**2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> VisionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ transformers

    def to_hf(self) -> Any:
        """The matching ``transformers.SiglipVisionConfig``."""
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_channels=self.num_channels,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=0.0,
            vision_use_head=self.use_head,
        )

    @classmethod
    def from_hf(
        cls,
        hf_config: Any,
        *,
        name: str = "hf",
        preprocessor: dict[str, Any] | None = None,
    ) -> VisionConfig:
        """Read a ``SiglipVisionConfig`` (or a ``SiglipConfig`` / PaliGemma config holding one).

        ``preprocessor``: an HF ``preprocessor_config.json`` dict; its ``image_mean``,
        ``image_std`` and ``resample`` replace the SigLIP defaults when present.
        """
        vc = getattr(hf_config, "vision_config", None) or hf_config
        if isinstance(vc, dict):
            from transformers import SiglipVisionConfig

            vc = SiglipVisionConfig.from_dict(vc)
        size, patch = vc.image_size, vc.patch_size
        if isinstance(size, list | tuple) or isinstance(patch, list | tuple):
            sizes = {*(size if isinstance(size, list | tuple) else [size])}
            patches = {*(patch if isinstance(patch, list | tuple) else [patch])}
            if len(sizes) != 1 or len(patches) != 1:
                raise ValueError(
                    f"only square SigLIP towers are supported, got image_size={size!r}, "
                    f"patch_size={patch!r}"
                )
            size, patch = sizes.pop(), patches.pop()
        kw: dict[str, Any] = {}
        if preprocessor:
            if "image_mean" in preprocessor:
                kw["image_mean"] = tuple(preprocessor["image_mean"])
            if "image_std" in preprocessor:
                kw["image_std"] = tuple(preprocessor["image_std"])
            code = preprocessor.get("resample")
            if code is not None:
                if int(code) not in _PIL_RESAMPLE_CODES:
                    raise ValueError(
                        f"preprocessor resample code {code!r} is not one of "
                        f"{_PIL_RESAMPLE_CODES} (PIL's codes)"
                    )
                kw["resample"] = _PIL_RESAMPLE_CODES[int(code)]
        return cls(
            name=name,
            image_size=int(size),
            patch_size=int(patch),
            hidden_size=int(vc.hidden_size),
            num_layers=int(vc.num_hidden_layers),
            num_heads=int(vc.num_attention_heads),
            intermediate_size=int(vc.intermediate_size),
            hidden_act=str(vc.hidden_act),
            layer_norm_eps=float(vc.layer_norm_eps),
            num_channels=int(vc.num_channels),
            use_head=bool(getattr(vc, "vision_use_head", True)),
            **kw,
        )

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``from_dict`` reads it back)."""
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "VisionConfig.from_dict") -> VisionConfig:
        """Rebuild a config from ``to_dict`` output (a stored one: ``config.from_stored``'s
        policy, unknown fields dropped with a warning naming ``source``)."""
        return from_stored(cls, d, source)

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(cls) -> VisionConfig:
        """The small SigLIP pretrained here: 126 px, patch 14 -> 81 tokens x 160, 3 layers.

        The 9 x 9 token grid puts exactly 3 x 3 tokens in each cell of the world's 3 x 3 grid
        (maps of tokens read back as cells). A token covers 25 px of a 224 px scene; rendered
        words (font 22-44 px, nearly always 44) are ~25 px tall at 126 px, two token rows.
        Measured on the tiny world (300 steps, 2 busy CPU cores): 8 px patches at 112 px (196
        tokens) reached the same retrieval as 14 px patches at 112 px (64 tokens) in 2.7x the
        time, and neither learnt to tell the rendered words apart in that budget.
        """
        return cls()

    @classmethod
    def moshika_vis(cls) -> VisionConfig:
        """The tower as kyuteye_pt's ``configs/moshika-vis.yaml`` runs it: 448 px weights read at
        512 px (1296 tokens; its server and web client send 448 px images instead)."""
        return dataclasses.replace(cls.siglip_gemma2_448(), input_size=512)

    @classmethod
    def siglip_gemma2_448(cls) -> VisionConfig:
        """PaliGemma2's SigLIP-So400m tower at 448 px: 1024 tokens x 1152, 27 layers, no head."""
        return cls(
            name="siglip_gemma2_448",
            image_size=448,
            patch_size=14,
            hidden_size=1152,
            num_layers=27,
            num_heads=16,
            intermediate_size=4304,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            use_head=False,
        )
