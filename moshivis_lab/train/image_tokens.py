"""Image tokens of a split, computed once by the frozen encoder and cached on disk.

The encoder is frozen during adapter training, so its ``last_hidden_state`` per image is a
constant: computing it once per split (fp16 safetensors, keyed by the encoder's weights) makes
every later training step, evaluation and ablation skip the vision tower entirely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moshivis_lab.artefacts import atomic_path, config_hash, read_json, write_json
from moshivis_lab.config import LabConfig
from moshivis_lab.world.generate import world_paths


def image_path(cfg: LabConfig, image_id: str) -> Path:
    """The PNG of a world image id such as ``train_00012``."""
    split = image_id.rsplit("_", 1)[0]
    p = world_paths(cfg, split)["images"] / f"{image_id}.png"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing; build the world with `moshivis-lab data`")
    return p


def encoder_key(encoder: Any) -> str:
    """A short hash of the encoder's weights and config (cheap: a few sums per tensor)."""
    sig = []
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().float()
        sig.append((name, tuple(t.shape), round(float(t.sum()), 4), round(float(t.abs().sum()), 4)))
    return config_hash(sig)


@torch.inference_mode()
def encode_images(
    encoder: Any, paths: list[Path], batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """``[N, tokens, dim]`` float32 image tokens of ``paths`` by ``encoder`` (on its device)."""
    out = []
    for s in tqdm(range(0, len(paths), batch_size), disable=not progress, desc="encode images"):
        # paths go to the encoder as they are: it opens them (clear errors for damaged files)
        # and converts every mode as the rest of the lab does (alpha over white, 16-bit scaled)
        out.append(encoder.encode(list(paths[s : s + batch_size])).float().cpu())
    if not out:
        raise ValueError("no images to encode")
    return torch.cat(out)


def image_table(
    cfg: LabConfig,
    image_ids: list[str],
    encoder: Any,
    name: str,
    progress: bool = True,
) -> torch.Tensor:
    """Image tokens ``[len(image_ids), tokens, dim]`` (float32), cached as ``image_tokens/{name}``.

    The cache is reused only when the image list and the encoder weights are the same; otherwise
    it is recomputed and replaced atomically.
    """
    d = cfg.data_dir / cfg.name / "image_tokens"
    key = config_hash(list(image_ids), encoder_key(encoder))
    tensor_path, info_path = d / f"{name}.safetensors", d / f"{name}.json"
    if tensor_path.exists() and info_path.exists() and read_json(info_path).get("key") == key:
        return load_file(tensor_path)["tokens"].float()
    paths = [image_path(cfg, i) for i in image_ids]
    tokens = encode_images(encoder, paths, progress=progress)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(tensor_path) as tmp:
        save_file({"tokens": tokens.half().contiguous()}, str(tmp))
    write_json(info_path, {"key": key, "n": len(image_ids), "shape": list(tokens.shape)})
    return tokens.half().float()


IMAGE_TOKEN_SOURCES = ("encoder", "oracle")


def split_tokens(
    cfg: LabConfig,
    image_ids: list[str],
    encoder: Any,
    name: str,
    progress: bool = True,
    source: str = "encoder",
) -> torch.Tensor:
    """Image tokens of ``image_ids`` from ``source``: the frozen encoder (``image_table``, cached)
    or the scene-graph oracle (``vision.oracle``, an ablation: what a perfect encoder would give)."""
    if source == "encoder":
        return image_table(cfg, image_ids, encoder, name, progress)
    if source == "oracle":
        from moshivis_lab.vision.oracle import oracle_table

        return oracle_table(cfg, image_ids, encoder)
    raise ValueError(f"image token source must be one of {IMAGE_TOKEN_SOURCES}, got {source!r}")
