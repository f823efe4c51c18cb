"""Vision latency overhead per streaming step against the number of image tokens.

The tiny MoshiVis (``LMConfig.tiny`` + the paper's adapters in every layer; random weights: the
cost does not depend on them) runs 80 ms streaming steps at batch 1 with the image's K/V computed
once per session (``encode_image``) and cached, as MoshiVis does, for image-token counts 0 (no
image: the base step), 16, 64, 256, 1024. Cases are interleaved within each repeat so that a
busy machine slows them alike. On a shared machine other jobs only ever add time, so the headline
``ratio`` is best-of-repeats over best-of-repeats (the least disturbed runs); the paired
per-repeat ratios give the spread (median, min, max).

Paper (DESIGN.md): vision adds about 7 ms to a ~48 ms step with 1024 image tokens, a ratio of
about 55 / 48 = 1.15, within the 80 ms real-time budget.

``measure_latency(cfg)`` writes ``data/<preset>/figures/latency.json`` and reuses it when present.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshivis_lab.artefacts import read_json, write_json

TOKENS = (0, 16, 64, 256, 1024)
PAPER_BASE_MS = 48.0  # DESIGN.md: a Moshi step is ~48 ms ...
PAPER_VISION_MS = 7.0  # ... and vision adds ~7 ms with 1024 image tokens (K/V cached)
PAPER_TOKENS = 1024
PAPER_RATIO = (PAPER_BASE_MS + PAPER_VISION_MS) / PAPER_BASE_MS
BUDGET_MS = 80.0  # one Mimi frame: the real-time budget of a step


def latency_path(cfg: Any) -> Path:
    """``data/<preset>/figures/latency.json``."""
    return Path(cfg.data_dir) / cfg.name / "figures" / "latency.json"


def _model() -> Any:
    from moshivis_lab.config import LMConfig, MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis
    from moshivis_lab.vision import VisionConfig

    torch.manual_seed(0)
    dim = VisionConfig.tiny().hidden_size
    return MoshiVis(MoshiVisConfig.tiny(LMConfig.tiny(), image_dim=dim)).eval(), dim


def measure_latency(
    cfg: Any = None,
    *,
    tokens: tuple[int, ...] = TOKENS,
    repeats: int = 7,
    steps: int = 16,
    warm: int = 3,
    threads: int | None = 1,
    path: str | Path | None = None,
    reuse: bool = True,
) -> dict[str, Any]:
    """Per-step time (ms) of the tiny MoshiVis with ``n`` cached image tokens for each ``n`` in
    ``tokens`` (0 = no image), and the paired ratio to the no-image step; written as JSON.

    With ``cfg`` (or ``path``) the result is saved to ``latency_path(cfg)`` and read back next
    time when it holds the same ``tokens`` (``reuse=False`` measures again). ``threads``: torch
    threads while measuring (1: steady on a shared machine; None: leave as is).
    """
    if path is None and cfg is not None:
        path = latency_path(cfg)
    if reuse and path is not None and Path(path).exists():
        old = read_json(path)
        if tuple(old.get("tokens", ())) == tuple(tokens):
            return old
    if 0 not in tokens:
        tokens = (0, *tokens)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        model, dim = _model()
        lm = model.cfg.lm
        user = torch.randint(
            0, lm.card, (1, model.n_user), generator=torch.Generator().manual_seed(0)
        )
        gen = torch.Generator().manual_seed(1)
        images = {n: torch.randn(1, n, dim, generator=gen) for n in tokens if n > 0}

        def run(n: int) -> float:
            with torch.inference_mode(), model.streaming(1, seed=0):
                kv = model.encode_image(images[n]) if n else None
                for _ in range(warm):
                    model.step(user, kv)
                t0 = time.perf_counter()
                for _ in range(steps):
                    model.step(user, kv)
                return (time.perf_counter() - t0) / steps

        times: dict[int, list[float]] = {n: [] for n in tokens}
        for r in range(repeats):
            order = list(tokens) if r % 2 == 0 else list(reversed(tokens))
            for n in order:
                times[n].append(run(n))
    finally:
        torch.set_num_threads(before)
    base = np.array(times[0])
    rows = []
    for n in tokens:
        t = np.array(times[n])
        ratio = t / base
        rows.append(
            {
                "image_tokens": n,
                "step_ms_median": float(np.median(t) * 1e3),
                "step_ms_min": float(t.min() * 1e3),
                "ratio": float(t.min() / base.min()),
                "ratio_median": float(np.median(ratio)),
                "ratio_min": float(ratio.min()),
                "ratio_max": float(ratio.max()),
            }
        )
    out = {
        "model": {
            "dim": lm.dim,
            "layers": lm.num_layers,
            "xa_layers": len(model.cfg.layers),
            "image_dim": dim,
            "weights": "random (cost does not depend on them)",
        },
        "kv": "image K/V computed once per session and cached",
        "tokens": list(tokens),
        "repeats": repeats,
        "steps": steps,
        "warm": warm,
        "threads": threads or before,
        "rows": rows,
        "paper": {
            "base_ms": PAPER_BASE_MS,
            "vision_ms": PAPER_VISION_MS,
            "image_tokens": PAPER_TOKENS,
            "ratio": PAPER_RATIO,
            "budget_ms": BUDGET_MS,
            "source": "DESIGN.md (MoshiVis paper): ~7 ms over a ~48 ms step, 1024 tokens",
        },
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if path is not None:
        write_json(path, out)
    return out
