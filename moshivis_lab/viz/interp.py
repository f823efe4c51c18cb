"""Pure plots of the interpretability analyses: gates, cross-attention maps, attributions.

Every function takes plain data (arrays, tensors, the dataclasses of ``moshivis_lab.interp``)
and returns a ``plotly.graph_objects.Figure``; nothing is shown by side effect.

- gates: ``gate_heatmap_figure`` (layer x time), ``gate_trace_figure`` (the last-10-layer mean
  over time, turns and image relevance shaded), ``switch_profile_figure`` (the gate around topic
  switches), ``intervention_figure`` (what forcing the gates changed);
- cross-attention: ``attention_overlay_figure`` (an image under its upsampled attention, the
  ground-truth box drawn), ``attention_grid_figure`` (questions x layers),
  ``pointing_game_figure`` (hit rate per layer beside the random-peak baseline);
- attribution: ``attribution_figure`` (integrated gradients on pixels / image tokens beside the
  attention map, on the image), ``audio_attribution_figure`` (attribution per user-audio step).

Maps on the patch grid are stretched to the image with ``interp.attention.upsample`` (the encoder
squares images without keeping their aspect ratio, so patch ``n`` covers
``ImageEncoder.token_box(n, width, height)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moshivis_lab.interp.attention import upsample
from moshivis_lab.viz.style import finish
from moshivis_lab.viz.style import rgb_array as _rgb

_IMAGE_TALK = "rgba(44, 160, 44, 0.15)"  # relevance 1
_UNRELATED = "rgba(214, 39, 40, 0.10)"  # relevance 0
_TURN_COLOURS = {"user": "rgba(31, 119, 180, 0.10)", "assistant": "rgba(255, 127, 14, 0.10)"}


# ---------------------------------------------------------------------- helpers


def _np(x: Any) -> np.ndarray:
    """A numpy copy of an array-like (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _grid(weights: Any, what: str = "weights") -> np.ndarray:
    """A non-empty finite 2-D float array."""
    w = _np(weights).astype(np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return w


def _box_shape(
    fig: go.Figure,
    box: Sequence[float],
    row: int | None = None,
    col: int | None = None,
    colour: str = "#00ff66",
    name: str = "box",
) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_shape(
        type="rect",
        x0=x0 - 0.5,
        y0=y0 - 0.5,
        x1=x1 - 0.5,
        y1=y1 - 0.5,
        line={"color": colour, "width": 2},
        name=name,
        **kw,
    )


def _check_box(box: Any) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    b = tuple(float(v) for v in box)
    if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
    return b  # type: ignore[return-value]


# ---------------------------------------------------------------------- gates


def gate_heatmap_figure(
    gates: Any,
    *,
    tokens: Sequence[str] | None = None,
    step: int | None = None,
    title: str | None = None,
    layer_labels: Sequence[str] | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Gate value per cross-attention layer (rows) and model step (columns), as a heatmap.

    ``gates``: array-like ``[layers, time]`` (one sample of ``MoshiVisOutput.gates`` or a
    ``GateTrace.gates``); ``tokens``: one label per step shown on hover (e.g. the decoded text
    token); ``step``: draw a vertical marker at that step; ``layer_labels``: row names (default
    ``layer 0..``); ``zmax``: top of the colour axis (default the largest gate, bottom 0).
    """
    g = _grid(gates, "gates")
    n_layers, t = g.shape
    labels = (
        list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(n_layers)]
    )
    if len(labels) != n_layers:
        raise ValueError(f"{len(labels)} layer labels for {n_layers} gate rows")
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"{len(tokens)} tokens for {t} gate columns")
    if step is not None and not 0 <= int(step) < t:
        raise ValueError(f"step must be in [0, {t}), got {step}")
    custom = None
    hover = "%{y} · step %{x}<br>gate %{z:.4f}<extra></extra>"
    if tokens is not None:
        custom = np.array([[str(s) for s in tokens]] * n_layers, dtype=object)
        hover = "%{y} · step %{x} (%{customdata})<br>gate %{z:.4f}<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=g,
            y=labels,
            customdata=custom,
            colorscale="Magma",
            zmin=0.0,
            zmax=max(float(g.max()), 1e-6) if zmax is None else float(zmax),
            colorbar={"title": "gate"},
            hovertemplate=hover,
            name="gates",
        )
    )
    if step is not None:
        fig.add_vline(x=int(step), line={"color": "#00e5ff", "width": 2}, name="step")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title="model step")
    return finish(fig, height=120 + 22 * n_layers, title=title)


def _spans(labels: np.ndarray) -> list[tuple[int, int, Any]]:
    """Runs ``(start, end_exclusive, value)`` of equal consecutive labels."""
    out: list[tuple[int, int, Any]] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((start, i, labels[start]))
            start = i
    return out


def gate_trace_figure(
    score: Any,
    *,
    relevance: Any = None,
    turns: Sequence[Any] | None = None,
    layer_gates: Any = None,
    title: str | None = None,
    label: str = "gate (mean of last layers)",
) -> go.Figure:
    """The gate score over time (the paper's last-10-layer mean), image talk shaded.

    ``score [T]``; ``relevance [T]`` (1 image talk shaded green, 0 unrelated shaded red, -1 none);
    ``turns``: ``Turn``-like objects (``start``, ``end``, ``speaker``) drawn as labelled bands on
    top; ``layer_gates [layers, T]``: thin per-layer lines behind the mean.
    """
    s = _np(score).astype(np.float64).ravel()
    if s.size == 0:
        raise ValueError("score is empty")
    t = np.arange(len(s))
    fig = go.Figure()
    if layer_gates is not None:
        lg = _grid(layer_gates, "layer_gates")
        if lg.shape[1] != len(s):
            raise ValueError(f"layer_gates has {lg.shape[1]} steps, score {len(s)}")
        for i, row in enumerate(lg):
            fig.add_trace(
                go.Scatter(
                    x=t,
                    y=row,
                    mode="lines",
                    line={"width": 0.7, "color": "rgba(120,120,120,0.5)"},
                    name=f"layer row {i}",
                    showlegend=i == 0,
                    legendgroup="layers",
                )
            )
    fig.add_trace(
        go.Scatter(x=t, y=s, mode="lines", name=label, line={"color": "#1f77b4", "width": 2})
    )
    if relevance is not None:
        rel = _np(relevance).astype(np.int64).ravel()
        if len(rel) != len(s):
            raise ValueError(f"relevance has {len(rel)} steps, score {len(s)}")
        for a, b, v in _spans(rel):
            if v < 0:
                continue
            fig.add_vrect(
                x0=a - 0.5,
                x1=b - 0.5,
                fillcolor=_IMAGE_TALK if v == 1 else _UNRELATED,
                line_width=0,
                layer="below",
            )
        for _v, name, colour in (
            (1, "about the image", _IMAGE_TALK),
            (0, "unrelated talk", _UNRELATED),
        ):
            fig.add_trace(
                go.Scatter(
                    x=[None],
                    y=[None],
                    mode="markers",
                    name=name,
                    marker={"symbol": "square", "size": 12, "color": colour.replace("0.1", "0.5")},
                )
            )
    for turn in turns or ():
        start, end, who = int(turn.start), int(turn.end), str(turn.speaker)
        fig.add_vrect(
            x0=start - 0.5,
            x1=end - 0.5,
            y0=0.92,
            y1=1.0,
            fillcolor=_TURN_COLOURS.get(who, "rgba(0,0,0,0.1)"),
            line_width=0.5,
            annotation_text=who[:1].upper(),
            annotation_position="top left",
        )
    fig.update_xaxes(title="model step")
    fig.update_yaxes(title="gate", rangemode="tozero")
    return finish(fig, height=320, title=title)


def intervention_figure(result: Any, *, title: str | None = None) -> go.Figure:
    """What forcing the gates changed: per condition, the share of generated tokens that differ
    from the unchanged model (text, and audio codes when present).

    ``result``: an ``interp.gates.InterventionResult`` (or anything with ``conditions`` and per
    condition ``text_changed`` / ``audio_changed`` lists of fractions).
    """
    names = list(result.conditions)
    if not names:
        raise ValueError("the intervention result holds no conditions")
    fig = go.Figure()
    for field, name, colour in (
        ("text_changed", "text tokens changed", "#1f77b4"),
        ("audio_changed", "audio codes changed", "#ff7f0e"),
    ):
        vals = [getattr(result.conditions[n], field, None) for n in names]
        if all(v is None for v in vals):
            continue
        means = [float(np.mean(v)) if v is not None and len(v) else np.nan for v in vals]
        fig.add_trace(go.Bar(x=names, y=means, name=name, marker_color=colour))
    fig.update_yaxes(title="share of tokens changed vs. the unchanged model", range=[0, 1])
    return finish(fig, height=340, title=title, barmode="group")


# ---------------------------------------------------------------------- attention


def attention_overlay_figure(
    image: Any,
    weights: Any,
    *,
    box: Sequence[float] | None = None,
    title: str | None = None,
    opacity: float = 0.55,
    mode: str = "bilinear",
    peak: bool = True,
) -> go.Figure:
    """An image under a translucent heatmap of attention (or attribution) over its patches.

    ``image``: PIL image or ``HxWx3`` uint8 array; ``weights``: 2-D array over the patch grid
    (any size, e.g. ``[side, side]``), upsampled to the image (``upsample``); ``box``: the
    ground-truth ``(x0, y0, x1, y1)`` pixel box (x1/y1 exclusive), drawn as a rectangle;
    ``peak``: mark the centre of the highest-weight patch.
    """
    img = _rgb(image)
    w = _grid(weights)
    b = _check_box(box)
    h, wd = img.shape[:2]
    up = upsample(w, h, wd, mode)
    fig = go.Figure(go.Image(z=img, name="image", hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=up,
            colorscale="Hot",
            reversescale=False,
            opacity=opacity,
            zmin=float(w.min()),
            zmax=float(w.max()) if w.max() > w.min() else float(w.min()) + 1e-9,
            colorbar={"title": "weight"},
            hovertemplate="x %{x}, y %{y}<br>weight %{z:.4g}<extra></extra>",
            name="weights",
        )
    )
    if peak:
        r, c = np.unravel_index(int(np.argmax(w)), w.shape)
        fig.add_trace(
            go.Scatter(
                x=[(c + 0.5) * wd / w.shape[1] - 0.5],
                y=[(r + 0.5) * h / w.shape[0] - 0.5],
                mode="markers",
                marker={"symbol": "x", "size": 12, "color": "#00e5ff", "line": {"width": 2}},
                name="peak",
                showlegend=False,
            )
        )
    if b is not None:
        _box_shape(fig, b)
    fig.update_xaxes(showticklabels=False, range=[-0.5, wd - 0.5], constrain="domain")
    fig.update_yaxes(
        showticklabels=False, range=[h - 0.5, -0.5], scaleanchor="x", constrain="domain"
    )
    return finish(fig, height=420, title=title)


def attention_grid_figure(
    images: Sequence[Any],
    grids: Any,
    *,
    boxes: Sequence[Sequence[float] | None] | None = None,
    row_labels: Sequence[str] | None = None,
    layer_labels: Sequence[str] | None = None,
    title: str | None = None,
    opacity: float = 0.55,
) -> go.Figure:
    """A grid of attention overlays: one row per question, one column per layer.

    ``images``: one image per row (PIL or ``HxWx3`` uint8); ``grids [rows, layers, h, w]``:
    attention (or attribution) on the patch grid; ``boxes``: per row the ground-truth box or
    None; ``row_labels`` (e.g. the questions) and ``layer_labels`` (default ``layer 0..``). A
    ``interp.attention.QuestionMaps`` unpacks into these arguments.
    """
    g = _np(grids).astype(np.float64)
    if g.ndim != 4 or 0 in g.shape:
        raise ValueError(f"grids must be a non-empty [rows, layers, h, w] array, got {g.shape}")
    n_rows, n_cols = g.shape[:2]
    if len(images) != n_rows:
        raise ValueError(f"{len(images)} images for {n_rows} rows of grids")
    bx = list(boxes) if boxes is not None else [None] * n_rows
    if len(bx) != n_rows:
        raise ValueError(f"{len(bx)} boxes for {n_rows} rows")
    cols = list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(n_cols)]
    if len(cols) != n_cols:
        raise ValueError(f"{len(cols)} layer labels for {n_cols} layers")
    rows = list(row_labels) if row_labels is not None else [f"#{i}" for i in range(n_rows)]
    if len(rows) != n_rows:
        raise ValueError(f"{len(rows)} row labels for {n_rows} rows")
    titles = [f"{cols[c]}" if r == 0 else "" for r in range(n_rows) for c in range(n_cols)]
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=titles,
        horizontal_spacing=0.01,
        vertical_spacing=0.04,
    )
    for r in range(n_rows):
        img = _rgb(images[r])
        h, w = img.shape[:2]
        b = _check_box(bx[r])
        for c in range(n_cols):
            up = upsample(g[r, c], h, w)
            fig.add_trace(go.Image(z=img, hoverinfo="skip"), row=r + 1, col=c + 1)
            fig.add_trace(
                go.Heatmap(
                    z=up,
                    colorscale="Hot",
                    opacity=opacity,
                    showscale=False,
                    zmin=float(g[r, c].min()),
                    zmax=float(g[r, c].max()) + 1e-12,
                    hovertemplate=f"{rows[r][:40]} · {cols[c]}<br>%{{z:.3g}}<extra></extra>",
                ),
                row=r + 1,
                col=c + 1,
            )
            if b is not None:
                _box_shape(fig, b, row=r + 1, col=c + 1)
        fig.update_yaxes(title_text=rows[r][:28], title_font={"size": 9}, row=r + 1, col=1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return finish(fig, height=60 + 150 * n_rows, title=title)


def pointing_game_figure(
    per_layer: Any,
    baseline: float,
    *,
    all_layers: float | None = None,
    other_object: Any = None,
    title: str | None = None,
) -> go.Figure:
    """Pointing-game hit rate per layer (bars) beside the random-peak baseline (dashed line).

    ``per_layer``: ``{layer: rate}`` (e.g. ``PointingResult.per_layer``) or a sequence;
    ``all_layers``: the rate of the layer-averaged map (an extra bar); ``other_object``: per-layer
    rate of peaks on another object of the scene (a second series).
    """
    if isinstance(per_layer, dict):
        labels = [f"layer {k}" for k in per_layer]
        vals = [float(v) for v in per_layer.values()]
    else:
        vals = [float(v) for v in _np(per_layer).ravel()]
        labels = [f"layer {i}" for i in range(len(vals))]
    if not vals:
        raise ValueError("per_layer is empty")
    if not 0.0 <= float(baseline) <= 1.0:
        raise ValueError(f"baseline must be a share in [0, 1], got {baseline}")
    if all_layers is not None:
        labels.append("all layers")
        vals.append(float(all_layers))
    fig = go.Figure(
        go.Bar(x=labels, y=vals, name="peak on the object asked about", marker_color="#2ca02c")
    )
    if other_object is not None:
        ov = (
            list(other_object.values())
            if isinstance(other_object, dict)
            else list(_np(other_object).ravel())
        )
        fig.add_trace(
            go.Bar(
                x=labels[: len(ov)],
                y=[float(v) for v in ov],
                name="peak on another object",
                marker_color="#d62728",
            )
        )
    fig.add_hline(
        y=float(baseline),
        line={"dash": "dash", "color": "black"},
        annotation_text=f"random peak {baseline:.1%}",
        annotation_position="top left",
    )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            name="random-peak baseline",
            line={"dash": "dash", "color": "black"},
        )
    )
    fig.update_yaxes(title="share of questions", range=[0, 1])
    return finish(fig, height=340, title=title, barmode="group")


def attribution_figure(
    image: Any,
    maps: dict[str, Any],
    *,
    box: Sequence[float] | None = None,
    title: str | None = None,
    opacity: float = 0.55,
) -> go.Figure:
    """An image beside overlays of several maps on its patch grid (e.g. ``{"attention": grid,
    "IG image tokens": map, "IG pixels": map}``), the object box drawn on each."""
    img = _rgb(image)
    if not maps:
        raise ValueError("give at least one map")
    grids = {k: _grid(v, k) for k, v in maps.items()}
    b = _check_box(box)
    h, w = img.shape[:2]
    n = len(grids) + 1
    fig = make_subplots(rows=1, cols=n, subplot_titles=["image", *grids], horizontal_spacing=0.02)
    fig.add_trace(go.Image(z=img, name="image"), row=1, col=1)
    if b is not None:
        _box_shape(fig, b, row=1, col=1)
    for c, (name, g) in enumerate(grids.items(), start=2):
        fig.add_trace(go.Image(z=img, hoverinfo="skip"), row=1, col=c)
        fig.add_trace(
            go.Heatmap(
                z=upsample(g, h, w),
                colorscale="Hot",
                opacity=opacity,
                showscale=False,
                zmin=float(g.min()),
                zmax=float(g.max()) + 1e-12,
                name=name,
                hovertemplate=f"{name}<br>%{{z:.3g}}<extra></extra>",
            ),
            row=1,
            col=c,
        )
        if b is not None:
            _box_shape(fig, b, row=1, col=c)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    return finish(fig, height=300, title=title)


def audio_attribution_figure(
    per_step: Any,
    *,
    turns: Sequence[Any] | None = None,
    target_step: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Attribution to the user's audio per model step (bars), user turns shaded, the step of
    the attributed token marked."""
    v = _np(per_step).astype(np.float64).ravel()
    if v.size == 0:
        raise ValueError("per_step is empty")
    colours = np.where(v >= 0, "#1f77b4", "#d62728")
    fig = go.Figure(go.Bar(x=np.arange(len(v)), y=v, marker_color=colours, name="attribution"))
    for t in turns or ():
        fig.add_vrect(
            x0=int(t.start) - 0.5,
            x1=int(t.end) - 0.5,
            fillcolor=_TURN_COLOURS.get(str(t.speaker), "rgba(0,0,0,0.1)"),
            line_width=0,
            layer="below",
            annotation_text=str(t.speaker),
            annotation_position="top left",
        )
    if target_step is not None:
        fig.add_vline(x=int(target_step), line={"color": "black", "dash": "dot"})
    fig.update_xaxes(title="model step (reads user frame step - 1)")
    fig.update_yaxes(title="IG attribution")
    return finish(fig, height=300, title=title)


def switch_profile_figure(profile: Any, *, title: str | None = None) -> go.Figure:
    """Mean gate score around topic switches (``interp.gates.SwitchProfile``)."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=profile.offsets,
            y=profile.into_image,
            mode="lines+markers",
            name=f"unrelated → image ({profile.n_into})",
            line={"color": "#2ca02c"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=profile.offsets,
            y=profile.out_of_image,
            mode="lines+markers",
            name=f"image → unrelated ({profile.n_out})",
            line={"color": "#d62728"},
        )
    )
    fig.add_vline(x=0, line={"color": "black", "dash": "dot"})
    fig.update_xaxes(title="steps from the topic switch")
    fig.update_yaxes(title="gate score", rangemode="tozero")
    return finish(fig, height=320, title=title)
