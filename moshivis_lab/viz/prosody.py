"""Pure plots of prosody: F0 contours and distributions, energy, and the one-number summaries.

Every function takes plain data (``audio.prosody.Prosody`` objects, arrays, the summary dict of
``interp.prosody``) and returns a ``plotly.graph_objects.Figure``; nothing is shown by side
effect.

- ``f0_contours_figure``: F0 of several renditions overlaid (each shifted so that its speech
  starts at 0 s);
- ``f0_distribution_figure``: the voiced F0 values of each rendition as violins;
- ``energy_figure``: RMS level (dBFS) overlaid;
- ``prosody_pair_figure``: two renditions, F0 above energy, on one time axis;
- ``prosody_summary_figure`` / ``prosody_table_figure``: F0 median ratio, contour correlation,
  speaking rate and pauses per condition (bars / a table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moshivis_lab.viz.style import finish

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
METHOD_DASH = {"pyin": "solid", "crepe": "dot"}
SUMMARY_METRICS = (
    ("f0_median_ratio", "F0 median ratio (gen / ref)", 1.0),
    ("contour_correlation", "F0 contour correlation", 1.0),
    ("speaking_rate", "speaking rate (words/s)", None),
    ("pause_count", "pauses per reply", None),
)


def _check_prosodies(prosodies: Mapping[str, Any], what: str = "prosodies") -> dict[str, Any]:
    if not isinstance(prosodies, Mapping) or not prosodies:
        raise ValueError(f"{what} must be a non-empty mapping name -> Prosody")
    for name, p in prosodies.items():
        for attr in ("times", "f0", "energy", "speech"):
            if not hasattr(p, attr):
                raise ValueError(
                    f"{what}[{name!r}] is not a Prosody (no {attr!r}); see audio.prosody"
                )
    return dict(prosodies)


def _onset(p: Any) -> float:
    """Time of the first speech frame (0 when there is none)."""
    idx = np.nonzero(np.asarray(p.speech))[0]
    return float(p.times[idx[0]]) if idx.size else 0.0


def f0_contours_figure(
    prosodies: Mapping[str, Any],
    *,
    title: str | None = None,
    align: bool = True,
    semitones: bool = False,
) -> go.Figure:
    """F0 contours overlaid, one line per rendition (gaps where unvoiced).

    ``prosodies``: ``{name: Prosody}``; ``align``: shift each so that its speech starts at 0 s
    (renditions of the same words rarely start at the same moment); ``semitones``: F0 in
    semitones around each rendition's own median (compares shapes, not levels).
    """
    ps = _check_prosodies(prosodies)
    fig = go.Figure()
    for k, (name, p) in enumerate(ps.items()):
        f0 = np.asarray(p.f0, dtype=np.float64)
        if semitones:
            med = np.nanmedian(f0) if np.isfinite(f0).any() else np.nan
            f0 = 12.0 * np.log2(f0 / med)
        t = np.asarray(p.times) - (_onset(p) if align else 0.0)
        fig.add_trace(
            go.Scatter(
                x=t,
                y=f0,
                mode="lines",
                name=name,
                connectgaps=False,
                line={"color": PALETTE[k % len(PALETTE)], "width": 2},
            )
        )
    x = "seconds from speech onset" if align else "seconds"
    y = "F0 (semitones re median)" if semitones else "F0 (Hz)"
    return finish(fig, height=320, title=title, xaxis_title=x, yaxis_title=y)


def f0_distribution_figure(
    f0s: Mapping[str, Any], *, title: str | None = None, semitones: bool = False
) -> go.Figure:
    """The voiced F0 values of each rendition (a ``Prosody`` or a 1-D array of Hz) as violins
    with their box; ``semitones``: relative to the first rendition's median."""
    if not isinstance(f0s, Mapping) or not f0s:
        raise ValueError("f0s must be a non-empty mapping name -> Prosody or F0 array (Hz)")
    values: dict[str, np.ndarray] = {}
    for name, v in f0s.items():
        if hasattr(v, "f0") and hasattr(v, "voiced"):
            a = np.asarray(v.f0, dtype=np.float64)[np.asarray(v.voiced, dtype=bool)]
        else:
            a = np.asarray(v, dtype=np.float64).ravel()
        values[name] = a[np.isfinite(a) & (a > 0)]
    first = next((a for a in values.values() if a.size), None)
    ref = float(np.median(first)) if first is not None else 1.0
    fig = go.Figure()
    for k, (name, a) in enumerate(values.items()):
        y = 12.0 * np.log2(a / ref) if semitones else a
        fig.add_trace(
            go.Violin(
                y=y,
                name=f"{name} (n={a.size})",
                box_visible=True,
                meanline_visible=False,
                points=False,
                line_color=PALETTE[k % len(PALETTE)],
                spanmode="hard",
            )
        )
    y_title = "F0 (semitones re first median)" if semitones else "F0 (Hz)"
    return finish(fig, height=340, title=title, yaxis_title=y_title, showlegend=False)


def energy_figure(
    prosodies: Mapping[str, Any], *, title: str | None = None, align: bool = True
) -> go.Figure:
    """RMS energy (dBFS) overlaid, one line per rendition (``align`` as ``f0_contours_figure``)."""
    ps = _check_prosodies(prosodies)
    fig = go.Figure()
    for k, (name, p) in enumerate(ps.items()):
        t = np.asarray(p.times) - (_onset(p) if align else 0.0)
        fig.add_trace(
            go.Scatter(
                x=t,
                y=np.asarray(p.energy, dtype=np.float64),
                mode="lines",
                name=name,
                line={"color": PALETTE[k % len(PALETTE)], "width": 1.5},
            )
        )
    x = "seconds from speech onset" if align else "seconds"
    return finish(fig, height=280, title=title, xaxis_title=x, yaxis_title="energy (dBFS)")


def prosody_pair_figure(
    a: Any,
    b: Any,
    *,
    names: Sequence[str] = ("reference", "generated"),
    title: str | None = None,
    align: bool = True,
) -> go.Figure:
    """Two renditions on one time axis: F0 contours (top) and energy (bottom) overlaid."""
    if len(names) != 2:
        raise ValueError(f"names must hold two labels, got {list(names)}")
    if names[0] == names[1]:
        names = (f"{names[0]} (1)", f"{names[1]} (2)")
    ps = _check_prosodies({names[0]: a, names[1]: b}, "renditions")
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        subplot_titles=("F0", "energy"),
    )
    for k, (name, p) in enumerate(ps.items()):
        t = np.asarray(p.times) - (_onset(p) if align else 0.0)
        colour = PALETTE[k]
        fig.add_trace(
            go.Scatter(
                x=t,
                y=np.asarray(p.f0, dtype=np.float64),
                mode="lines",
                name=name,
                legendgroup=name,
                connectgaps=False,
                line={"color": colour, "width": 2},
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=t,
                y=np.asarray(p.energy, dtype=np.float64),
                mode="lines",
                name=name,
                legendgroup=name,
                showlegend=False,
                line={"color": colour, "width": 1.2},
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(title_text="F0 (Hz)", row=1, col=1)
    fig.update_yaxes(title_text="dBFS", row=2, col=1)
    fig.update_xaxes(title_text="seconds from speech onset" if align else "seconds", row=2, col=1)
    return finish(fig, height=460, title=title)


def _summary_rows(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> tuple[list[str], list[str]]:
    if not isinstance(summary, Mapping) or not summary:
        raise ValueError("summary must be a non-empty {condition: {method: {metric: value}}}")
    conditions = list(summary)
    methods: list[str] = []
    for per in summary.values():
        if not isinstance(per, Mapping):
            raise ValueError("summary must be {condition: {method: {metric: value}}}")
        methods += [m for m in per if m not in methods]
    return conditions, methods


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if np.isfinite(v) else float("nan")


def prosody_summary_figure(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    metrics: Sequence[tuple[str, str, float | None]] = SUMMARY_METRICS,
    title: str | None = None,
) -> go.Figure:
    """One panel per metric, one bar per condition and F0 tracker (``interp.prosody``'s
    ``summary``); a dotted line marks the ideal (1) and black diamonds the reference's value
    where the summary has a ``ref_`` twin (speaking rate, pauses)."""
    conditions, methods = _summary_rows(summary)
    fig = make_subplots(
        rows=1, cols=len(metrics), subplot_titles=[label for _, label, _ in metrics]
    )
    for col, (key, _label, ideal) in enumerate(metrics, start=1):
        for k, m in enumerate(methods):
            ys = [_num(summary[c].get(m, {}).get(key)) for c in conditions]
            fig.add_trace(
                go.Bar(
                    x=conditions,
                    y=ys,
                    name=m,
                    legendgroup=m,
                    showlegend=col == 1,
                    marker_color=PALETTE[k % len(PALETTE)],
                    hovertemplate=f"%{{x}} · {m}<br>{key} %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        ref = [_num(summary[c].get(methods[0], {}).get(f"ref_{key}")) for c in conditions]
        if any(np.isfinite(ref)):
            fig.add_trace(
                go.Scatter(
                    x=conditions,
                    y=ref,
                    mode="markers",
                    name="TTS reference",
                    legendgroup="ref",
                    showlegend=col == 3,
                    marker={"symbol": "diamond", "color": "black", "size": 9},
                ),
                row=1,
                col=col,
            )
        if ideal is not None:
            fig.add_hline(y=ideal, line={"dash": "dot", "color": "grey"}, row=1, col=col)
    fig.update_xaxes(tickangle=-40)
    return finish(fig, height=380, title=title, barmode="group")


TABLE_COLUMNS = (
    ("f0_median_ratio", "F0 ratio"),
    ("contour_correlation", "contour r"),
    ("f0_median_hz", "F0 Hz"),
    ("ref_f0_median_hz", "ref F0 Hz"),
    ("f0_vs_before", "F0 vs before"),
    ("speaking_rate", "words/s"),
    ("ref_speaking_rate", "ref words/s"),
    ("pause_count", "pauses"),
    ("ref_pause_count", "ref pauses"),
    ("pause_total_s", "pause s"),
    ("n", "n"),
)


def prosody_table_figure(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    method: str | None = None,
    columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
    title: str | None = None,
) -> go.Figure:
    """The summary as a table: one row per condition (and F0 tracker unless ``method`` picks
    one)."""
    conditions, methods = _summary_rows(summary)
    if method is not None:
        if method not in methods:
            raise ValueError(f"no {method!r} in the summary; it has {methods}")
        methods = [method]
    rows = [(c, m) for c in conditions for m in methods if m in summary[c]]
    cells: list[list[str]] = [[c for c, _ in rows], [m for _, m in rows]]
    for key, _ in columns:
        col = []
        for c, m in rows:
            v = _num(summary[c][m].get(key))
            col.append("—" if not np.isfinite(v) else (f"{v:.0f}" if key == "n" else f"{v:.3g}"))
        cells.append(col)
    fig = go.Figure(
        go.Table(
            header={"values": ["condition", "F0 method", *[label for _, label in columns]]},
            cells={"values": cells},
        )
    )
    return finish(fig, height=80 + 28 * len(rows), title=title)


__all__ = [
    "energy_figure",
    "f0_contours_figure",
    "f0_distribution_figure",
    "prosody_pair_figure",
    "prosody_summary_figure",
    "prosody_table_figure",
]
