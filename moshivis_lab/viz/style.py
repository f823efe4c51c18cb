"""The house style shared by every plot: one place for titles, sizes and margins."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

MARGIN = {"l": 50, "r": 10, "t": 50, "b": 40}


def finish(fig: go.Figure, *, height: int, title: str | None = None, **layout: Any) -> go.Figure:
    """Apply the house layout (title, height, margins, plus any plotly layout keys) and return ``fig``."""
    fig.update_layout(title=title, height=height, margin=MARGIN, **layout)
    return fig


def rgb_array(image: Any, what: str = "image") -> np.ndarray:
    """A PIL image (any mode, converted as the image encoder does: alpha over white, 16-bit
    scaled) or an ``HxWx3`` uint8 array, as a uint8 ``HxWx3`` array for plotting."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from moshivis_lab.vision.preprocess import pil_to_rgb

        rgb = pil_to_rgb(image)
        if isinstance(rgb, Image.Image):
            return np.asarray(rgb)
        return np.clip(np.round(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)
    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 or 0 in a.shape:
        raise ValueError(
            f"{what} must be a PIL image or a non-empty HxWx3 uint8 array, got "
            f"shape {a.shape} dtype {a.dtype}"
        )
    return a
