"""Pure plots of the data world: scenes with their graphs, token alignment, codec round trips.

Every function takes plain data and returns a ``plotly.graph_objects.Figure``; nothing is shown
by side effect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN
from moshivis_lab.viz.style import finish


def scene_grid(images: Sequence[Image.Image], scenes: Sequence[dict], cols: int = 4) -> go.Figure:
    """Images in a grid, each object's bounding box drawn and labelled from the scene graph."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scene graphs")
    n = len(images)
    rows = max(1, -(-n // cols))
    titles = [s.get("id", "") + (f" · word: {s['word']}" if s.get("word") else "") for s in scenes]
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.06
    )
    for k, (im, sc) in enumerate(zip(images, scenes, strict=True)):
        r, c = k // cols + 1, k % cols + 1
        fig.add_trace(go.Image(z=np.asarray(im.convert("RGB"))), row=r, col=c)
        for o in sc.get("objects", []):
            x0, y0, x1, y1 = o["bbox"]
            fig.add_shape(
                type="rect",
                x0=x0,
                y0=y0,
                x1=x1,
                y1=y1,
                line={"color": "black", "width": 1},
                row=r,
                col=c,
            )
            label = f"{o['size']} {o['colour']} {o['shape']}"
            fig.add_trace(
                go.Scatter(
                    x=[x0],
                    y=[y0],
                    mode="text",
                    text=[label],
                    textposition="top right",
                    textfont={"size": 9},
                    hoverinfo="text",
                    showlegend=False,
                ),
                row=r,
                col=c,
            )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        height=260 * rows, width=260 * cols, margin={"l": 10, "r": 10, "t": 40, "b": 10}
    )
    return fig


def token_label(token: int, piece: str) -> str:
    """How one text-stream token is shown: PAD/EPAD/zero by name, pieces with their text."""
    if token == TEXT_PAD_ID:
        return "·"
    if token == TEXT_EPAD_ID:
        return "EPAD"
    if token == ZERO_TOKEN:
        return "∅"
    return piece


def alignment_figure(
    stereo: np.ndarray,
    sample_rate: int,
    alignments: Sequence,
    text_row: np.ndarray,
    pieces: Sequence[str],
    frame_rate: float = 12.5,
    max_seconds: float | None = None,
) -> go.Figure:
    """Waveforms of both channels, word boundaries, the 80 ms frame grid and the text-stream tokens."""
    stereo = np.atleast_2d(stereo)
    n = (
        stereo.shape[1]
        if max_seconds is None
        else min(stereo.shape[1], int(max_seconds * sample_rate))
    )
    t_end = n / sample_rate
    step = max(1, n // 6000)
    t = np.arange(0, n, step) / sample_rate
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.38, 0.38, 0.24],
        vertical_spacing=0.04,
        subplot_titles=("assistant (channel 0)", "user (channel 1)", "text stream (12.5 Hz)"),
    )
    for ch, name in enumerate(("assistant", "user")[: stereo.shape[0]]):
        fig.add_trace(
            go.Scattergl(x=t, y=stereo[ch, :n:step], mode="lines", line={"width": 0.7}, name=name),
            row=ch + 1,
            col=1,
        )
    for word, (s, e), spk in alignments:
        if s > t_end:
            continue
        row = 1 if spk == "SPEAKER_MAIN" else 2
        fig.add_vrect(
            x0=s,
            x1=min(e, t_end),
            fillcolor="orange" if row == 1 else "teal",
            opacity=0.15,
            line_width=0,
            row=row,
            col=1,
        )
        fig.add_annotation(
            x=s,
            y=1.0,
            yref=f"y{row} domain" if row > 1 else "y domain",
            text=word,
            showarrow=False,
            xanchor="left",
            font={"size": 9},
            row=row,
            col=1,
        )
    frames = np.arange(0, min(len(text_row), int(np.ceil(t_end * frame_rate))))
    for f in frames:
        fig.add_vline(x=f / frame_rate, line={"width": 0.3, "color": "lightgrey"}, row=3, col=1)
    labels = [token_label(int(text_row[f]), pieces[f]) for f in frames]
    kind = ["word" if lbl not in ("·", "EPAD", "∅") else lbl for lbl in labels]
    colours = {"word": "black", "EPAD": "crimson", "·": "lightgrey", "∅": "grey"}
    fig.add_trace(
        go.Scatter(
            x=(frames + 0.5) / frame_rate,
            y=(frames % 2) * 0.6,  # staggered so neighbouring tokens stay readable
            mode="text",
            text=labels,
            textfont={"size": 9, "color": [colours[k] for k in kind]},
            name="tokens",
            hovertext=[f"frame {f}: id {int(text_row[f])}" for f in frames],
            hoverinfo="text",
        ),
        row=3,
        col=1,
    )
    fig.update_yaxes(visible=False, row=3, col=1)
    fig.update_xaxes(title_text="seconds", row=3, col=1)
    finish(fig, height=520, showlegend=False)
    return fig


def f0_figure(
    contours: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "F0 contours"
) -> go.Figure:
    """F0 contours (times, Hz with NaN when unvoiced) overlaid, one line per rendition."""
    fig = go.Figure()
    for name, (times, f0) in contours.items():
        fig.add_trace(go.Scatter(x=times, y=f0, mode="lines", name=name, connectgaps=False))
    return finish(fig, height=320, title=title, xaxis_title="seconds", yaxis_title="F0 (Hz)")


def codes_figure(
    codes: np.ndarray, frame_rate: float = 12.5, title: str = "codec codes"
) -> go.Figure:
    """A codes array [K, T] as a heatmap (codebook x frame)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, T], got shape {codes.shape}")
    fig = go.Figure(
        go.Heatmap(
            z=codes,
            x=np.arange(codes.shape[1]) / frame_rate,
            colorscale="Viridis",
            colorbar={"title": "code"},
        )
    )
    return finish(fig, height=260, title=title, xaxis_title="seconds", yaxis_title="codebook")
