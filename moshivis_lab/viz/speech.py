"""Pure plots of the speech LM: token grids with their delays, training curves.

Every function takes plain data and returns a ``plotly.graph_objects.Figure``; nothing is shown
by side effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moshivis_lab.viz.style import finish

LOSS_PARTS = ("loss", "text_loss", "audio_loss", "semantic_loss", "acoustic_loss")
_INITIAL_Z = -0.25  # where initial-token cells sit on the colour axis (drawn black)
_COLOURSCALE = [
    [0.0, "black"],
    [0.199, "black"],
    [0.2, "#440154"],
    [0.45, "#31688e"],
    [0.7, "#35b779"],
    [1.0, "#fde725"],
]
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def grid_row_labels(n_rows: int, dep_q: int = 8) -> list[str]:
    """Row names of a token grid: ``text``, ``moshi cb0..``, then ``user cb0..``."""
    if n_rows < 1 or dep_q < 0 or dep_q > n_rows - 1:
        raise ValueError(f"need n_rows >= 1 and 0 <= dep_q <= n_rows - 1, got {n_rows}, {dep_q}")
    moshi = [f"moshi cb{i}" for i in range(dep_q)]
    user = [f"user cb{i}" for i in range(n_rows - 1 - dep_q)]
    return ["text", *moshi, *user]


def _grid_z(grid: np.ndarray, initial: Sequence[int] | None) -> np.ndarray:
    """Colour values: each row's tokens scaled to [0, 1], -1 blank (NaN), initial tokens below 0."""
    z = np.full(grid.shape, np.nan, dtype=np.float64)
    for k, row in enumerate(grid):
        valid = row >= 0
        if initial is not None:
            valid &= row != initial[k]
        top = float(row[valid].max()) if valid.any() else 0.0
        z[k, valid] = row[valid] / max(top, 1.0)
        if initial is not None:
            z[k, row == initial[k]] = _INITIAL_Z
    return z


def _check_grid(
    grid: np.ndarray, row_labels: Sequence[str] | None, initial: Sequence[int] | None
) -> tuple[np.ndarray, list[str]]:
    """Validate a ``[K, T]`` integer grid and its row labels / initial tokens."""
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] < 1:
        raise ValueError(f"grid must be a non-empty [K, T] array, got shape {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"grid must hold integer tokens, got dtype {g.dtype}")
    labels = list(row_labels) if row_labels is not None else [f"row {k}" for k in range(len(g))]
    if len(labels) != g.shape[0]:
        raise ValueError(f"{len(labels)} row labels for a grid of {g.shape[0]} rows")
    if initial is not None and len(initial) != g.shape[0]:
        raise ValueError(f"{len(initial)} initial tokens for a grid of {g.shape[0]} rows")
    return g.astype(np.int64), labels


def _heatmap(
    g: np.ndarray, labels: list[str], initial: Sequence[int] | None, show_scale: bool
) -> go.Heatmap:
    """One token-grid heatmap trace (row 0 on top; hover shows the raw token id)."""
    return go.Heatmap(
        z=_grid_z(g, initial),
        x=np.arange(g.shape[1]),
        y=labels,
        customdata=g,
        hovertemplate="%{y} · frame %{x}<br>token %{customdata}<extra></extra>",
        colorscale=_COLOURSCALE,
        zmin=_INITIAL_Z,
        zmax=1.0,
        showscale=show_scale,
        colorbar={"title": "token / row max", "tickvals": [0, 0.5, 1]} if show_scale else None,
    )


def token_grid_figure(
    grid: np.ndarray,
    title: str,
    row_labels: Sequence[str] | None = None,
    initial: Sequence[int] | None = None,
) -> go.Figure:
    """Heatmap of a token grid ``[K, T]`` (frames across, rows down; -1 blank, initial black)."""
    g, labels = _check_grid(grid, row_labels, initial)
    fig = go.Figure(_heatmap(g, labels, initial, True))
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9})
    return finish(fig, height=120 + 18 * g.shape[0], title=title, xaxis_title="frame (12.5 Hz)")


def delayed_vs_aligned_figure(
    aligned: np.ndarray,
    delayed: np.ndarray,
    row_labels: Sequence[str] | None = None,
    initial: Sequence[int] | None = None,
    delays: Sequence[int] | None = None,
) -> go.Figure:
    """Two stacked heatmaps on one frame axis: the aligned grid and the same grid after delays."""
    a, labels = _check_grid(aligned, row_labels, None)
    d, _ = _check_grid(delayed, labels, initial)
    if a.shape != d.shape:
        raise ValueError(f"aligned {a.shape} and delayed {d.shape} grids differ in shape")
    if delays is not None:
        if len(delays) != a.shape[0]:
            raise ValueError(f"{len(delays)} delays for a grid of {a.shape[0]} rows")
        labels = [f"{lbl} (+{int(dl)})" for lbl, dl in zip(labels, delays, strict=True)]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=(
            "aligned: every row on the same clock",
            "delayed: what the model reads (black = initial token)",
        ),
    )
    fig.add_trace(_heatmap(a, labels, None, True), row=1, col=1)
    fig.add_trace(_heatmap(d, labels, initial, False), row=2, col=1)
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9})
    fig.update_xaxes(title_text="frame (12.5 Hz)", row=2, col=1)
    finish(fig, height=200 + 36 * a.shape[0])
    return fig


def training_curves_figure(metrics: Sequence[dict], parts: Sequence[str] = LOSS_PARTS) -> go.Figure:
    """Loss parts against step: train as lines, val as dashed lines with markers (log y)."""
    rows = [m for m in metrics if isinstance(m, dict) and "step" in m and "split" in m]
    if not rows:
        raise ValueError("metrics has no records with 'step' and 'split' (empty metrics.jsonl?)")
    if not parts:
        raise ValueError("parts must name at least one loss key")
    fig = go.Figure()
    for i, part in enumerate(parts):
        colour = _PALETTE[i % len(_PALETTE)]
        for split, dash, mode in (("train", "solid", "lines"), ("val", "dash", "lines+markers")):
            pts = sorted(
                (int(m["step"]), float(m[part]))
                for m in rows
                if m["split"] == split and m.get(part) is not None
            )
            if not pts:
                continue
            steps, values = zip(*pts, strict=True)
            fig.add_trace(
                go.Scatter(
                    x=list(steps),
                    y=list(values),
                    mode=mode,
                    name=f"{split} {part}",
                    legendgroup=part,
                    line={"color": colour, "dash": dash, "width": 2 if part == "loss" else 1.2},
                )
            )
    if not fig.data:
        raise ValueError(f"no record carries any of the loss parts {list(parts)}")
    return finish(
        fig,
        height=420,
        title="speech-LM pretraining",
        xaxis_title="step",
        yaxis_title="cross-entropy (nats)",
        yaxis_type="log",
    )
