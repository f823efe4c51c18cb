"""The image encoder room: a frozen SigLIP vision tower, its preprocessing, and the tiny SigLIP
pretrained here with the sigmoid loss on the world's image-caption pairs.

- ``VisionConfig``: the tower and its preprocessing (presets ``tiny`` and
  ``siglip_gemma2_448``, the PaliGemma2 SigLIP-So400m tower MoshiVis uses);
- ``preprocess``: any image(s) -> ``pixel_values`` (square bicubic resize, [0, 1], mean/std 0.5);
- ``ImageEncoder``: the frozen tower -> tokens ``[B, N, D]``; readers for local HF directories,
  the released MoshiVis checkpoint (``image_prefix.enc.model.*``) and the tiny tower;
- ``pretrain_vision`` / ``load_vision_encoder``: the tiny SigLIP, trained here.
"""

from moshivis_lab.vision.config import VisionConfig
from moshivis_lab.vision.encoder import (
    MOSHIVIS_PREFIX,
    ImageEncoder,
    count_parameters,
    describe,
    read_tower_state,
)
from moshivis_lab.vision.preprocess import preprocess, to_rgb, unnormalise
from moshivis_lab.vision.pretrain import (
    VisionPretrainConfig,
    load_vision_encoder,
    pretrain_vision,
    vision_dir,
)

__all__ = [
    "MOSHIVIS_PREFIX",
    "ImageEncoder",
    "VisionConfig",
    "VisionPretrainConfig",
    "count_parameters",
    "describe",
    "load_vision_encoder",
    "preprocess",
    "pretrain_vision",
    "read_tower_state",
    "to_rgb",
    "unnormalise",
    "vision_dir",
]
