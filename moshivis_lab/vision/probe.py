"""What the frozen image encoder's tokens say about the world's objects: linear probes per cell.

The world draws every object inside one cell of a 3 x 3 grid, so the tokens whose centres fall in
that cell are the encoder's description of it. For each attribute the scene graph knows (an
object's colour, shape and size; the rendered word, over the cells it covers) a logistic
regression reads the mean of those tokens and is scored on images it was not fitted on, beside
the majority-class rate. A high probe accuracy says the information is in the tokens, so the
adapters could pick it up; a probe near the majority rate says no adapter can answer questions
that need it (the tiny encoder, for instance, keeps colour but hardly shape: see
``probe_encoder``'s report).

``cell_features`` does the pooling for any token grid (the tiny 9 x 9 grid puts exactly 3 x 3
tokens in a cell; other grids assign each token by its centre). ``attribute_probes`` fits and
scores; ``probe_encoder`` runs it on a split's cached image tokens and writes
``vision/probes.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshivis_lab.artefacts import write_json
from moshivis_lab.config import LabConfig

ATTRIBUTES = ("colour", "shape", "size", "word")
GRID = 3  # the world's cells per side


def cell_index(grid_side: int) -> np.ndarray:
    """``[grid_side ** 2]`` cell number (``row * 3 + col`` of the world's 3 x 3 grid) of each
    token, by the token's centre."""
    if grid_side < 1:
        raise ValueError(f"grid_side must be >= 1, got {grid_side}")
    centre = (np.arange(grid_side) + 0.5) / grid_side
    rc = np.minimum((centre * GRID).astype(int), GRID - 1)
    return (rc[:, None] * GRID + rc[None, :]).reshape(-1)


def cell_features(tokens: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mean token of each world cell: ``[N, T, D]`` tokens (T a square number) -> ``[N, 9, D]``."""
    x = tokens.float().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if x.ndim != 3:
        raise ValueError(f"tokens must be [images, tokens, dim], got shape {tuple(x.shape)}")
    side = round(x.shape[1] ** 0.5)
    if side * side != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens per image do not form a square grid")
    cells = cell_index(side)
    if len(set(cells.tolist())) < GRID * GRID:
        raise ValueError(f"a {side} x {side} token grid is too coarse for the 3 x 3 world cells")
    return np.stack([x[:, cells == c].mean(axis=1) for c in range(GRID * GRID)], axis=1)


def _samples(feats: np.ndarray, scenes: Sequence[Any]) -> dict[str, tuple[list, list, list]]:
    """Per attribute: (features, labels, image row) of every object (or rendered word)."""
    out: dict[str, tuple[list, list, list]] = {a: ([], [], []) for a in ATTRIBUTES}
    for n, sc in enumerate(scenes):
        for o in sc.objects:
            f = feats[n, o.cell[0] * GRID + o.cell[1]]
            for a in ("colour", "shape", "size"):
                out[a][0].append(f)
                out[a][1].append(getattr(o, a))
                out[a][2].append(n)
        if getattr(sc, "word", None) and getattr(sc, "word_cells", None):
            cells = [r * GRID + c for r, c in sc.word_cells]
            out["word"][0].append(feats[n, cells].mean(axis=0))
            out["word"][1].append(sc.word)
            out["word"][2].append(n)
    return out


def attribute_probes(
    tokens: torch.Tensor | np.ndarray,
    scenes: Sequence[Any],
    *,
    test_fraction: float = 0.2,
    max_iter: int = 2000,
) -> dict[str, dict[str, Any]]:
    """Held-out accuracy of a logistic-regression probe per attribute, beside the majority rate.

    ``tokens[n]`` are the encoder's tokens of ``scenes[n]``'s image. The last ``test_fraction``
    of the images are held out (every object of an image on the same side). An attribute with
    fewer than two classes or no held-out sample is reported with ``accuracy = None`` and why.
    """
    from sklearn.linear_model import LogisticRegression

    if len(scenes) != len(tokens):
        raise ValueError(f"{len(tokens)} token rows for {len(scenes)} scenes")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    feats = cell_features(tokens)
    cut = int(round(len(scenes) * (1.0 - test_fraction)))
    report: dict[str, dict[str, Any]] = {}
    for attr, (xs, ys, rows) in _samples(feats, scenes).items():
        x, y, r = np.asarray(xs), np.asarray(ys), np.asarray(rows)
        tr = r < cut
        entry: dict[str, Any] = {
            "classes": int(len(set(ys))),
            "n_train": int(tr.sum()),
            "n_test": int((~tr).sum()),
        }
        if entry["classes"] < 2 or not tr.any() or tr.all() or len(set(y[tr].tolist())) < 2:
            report[attr] = {**entry, "accuracy": None, "why": "too few samples or classes"}
            continue
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        clf = LogisticRegression(max_iter=max_iter).fit((x[tr] - mu) / sd, y[tr])
        values, counts = np.unique(y[tr], return_counts=True)
        majority = values[int(np.argmax(counts))]
        entry["accuracy"] = float(clf.score((x[~tr] - mu) / sd, y[~tr]))
        entry["majority"] = float(np.mean(y[~tr] == majority))
        entry["chance"] = 1.0 / entry["classes"]
        report[attr] = entry
    return report


def probes_path(cfg: LabConfig) -> Path:
    """Where ``probe_encoder`` writes its report."""
    return cfg.data_dir / cfg.name / "vision" / "probes.json"


def probe_encoder(
    cfg: LabConfig,
    encoder: Any = None,
    *,
    split: str = "train",
    out_path: str | Path | None = None,
    cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe the (frozen, pretrained) image encoder on a split's scenes; write the JSON report.

    With ``cache`` the split's image tokens come from (or go to) the ``image_tokens`` cache the
    adapter trainer uses: the same encoder makes the same table, so nothing is encoded twice.
    ``encoder`` defaults to ``load_vision_encoder(cfg)``.
    """
    from moshivis_lab.train.image_tokens import encode_images, image_path, image_table
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.generate import load_scenes

    if encoder is None:
        encoder = load_vision_encoder(cfg)
    scenes = sorted(load_scenes(cfg)[split], key=lambda s: s.id)
    if not scenes:
        raise ValueError(f"split {split!r} has no scenes to probe")
    ids = [s.id for s in scenes]
    if cache:
        tokens = image_table(cfg, ids, encoder, split, progress)
    else:
        tokens = encode_images(encoder, [image_path(cfg, i) for i in ids], progress=progress)
    report = {
        "split": split,
        "images": len(scenes),
        "tokens": list(tokens.shape[1:]),
        "probes": attribute_probes(tokens, scenes),
    }
    write_json(Path(out_path) if out_path is not None else probes_path(cfg), report)
    return report
