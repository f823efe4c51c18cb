"""Pure plots of MoshiVis' two new parts: the frozen image encoder and the trained adapters.

Every function takes plain data (arrays, tensors, the dicts the library writes as JSON) and returns
a ``plotly.graph_objects.Figure``; nothing is shown by side effect and nothing is read from disk.

- the image encoder: ``preprocess_figure`` (an image and what SigLIP sees), ``token_map_figure``
  (the token grid), ``vision_curves_figure`` and ``retrieval_figure`` (the tiny SigLIP's
  pretraining metrics and its retrieval report beside chance);
- the adapters: ``parameter_counts_figure`` (counts per adapter group, tiny vs real, log scale),
  ``gates_figure`` (gate per layer and position), ``mix_figure`` (one mixed batch),
  ``adapter_curves_figure`` (training losses, speech vs speechless text loss) and
  ``eval_summary_figure`` (accuracy per question type by text and by speech, chance marked).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moshivis_lab.config import ZERO_TOKEN
from moshivis_lab.viz.style import finish
from moshivis_lab.viz.style import rgb_array as _rgb

ADAPTER_LOSS_PARTS = ("loss", "text_loss", "audio_loss")
TEXT_LOSS_PARTS = ("speech_text_loss", "speechless_text_loss")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
# Position states of a mixed batch (``mix_figure``) and their colours.
MIX_STATES = ("padding", "text only (audio rows = zero token)", "text + audio")
_MIX_COLOURS = ("#e6e6e6", "#ff7f0e", "#1f77b4")
RELEVANCE_STATES = ("padding (-1)", "unrelated talk (0)", "about the image (1)")
_RELEVANCE_COLOURS = ("#e6e6e6", "#d62728", "#2ca02c")


# ---------------------------------------------------------------------- helpers


def _np(x: Any) -> np.ndarray:
    """A numpy copy of an array-like (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _discrete_scale(colours: Sequence[str]) -> list[list[Any]]:
    """A colourscale giving integer ``k`` (with ``zmin=-0.5, zmax=n-0.5``) colour ``k``."""
    n = len(colours)
    scale: list[list[Any]] = []
    for k, c in enumerate(colours):
        scale += [[k / n, c], [(k + 1) / n, c]]
    return scale


def _domain_bar(fig: go.Figure, row: int) -> dict[str, float]:
    """Colour-bar position (y, len) next to subplot row ``row`` of a one-column figure."""
    key = "yaxis" if row == 1 else f"yaxis{row}"
    lo, hi = fig.layout[key].domain
    return {"y": (lo + hi) / 2, "len": (hi - lo) * 0.95}


def _segments(centres: Sequence[float], half: float, ys: Sequence[float | None]) -> tuple:
    """x/y lists drawing a short horizontal segment at each ``(centre, y)`` (None: skipped)."""
    xs: list[float | None] = []
    out: list[float | None] = []
    for c, y in zip(centres, ys, strict=True):
        if y is None or not _finite(y):
            continue
        xs += [c - half, c + half, None]
        out += [y, y, None]
    return xs, out


def _level_ticks(
    centres: Sequence[float], half: float, ys: Sequence[float | None], name: str, show: bool
) -> go.Scatter:
    """Black horizontal ticks at ``ys`` over bars centred at ``centres`` (chance, majority)."""
    xs, out = _segments(centres, half, ys)
    return go.Scatter(
        x=xs,
        y=out,
        mode="lines",
        name=name,
        legendgroup=name,
        showlegend=show,
        line={"color": "black", "width": 3},
        hoverinfo="skip",
    )


def _metric_rows(metrics: Sequence[Any]) -> list[dict]:
    return [m for m in metrics if isinstance(m, dict) and "step" in m and "split" in m]


def _curve(rows: list[dict], split: str, key: str, positive: bool) -> tuple[list, list]:
    """Sorted ``(steps, values)`` of ``key`` on ``split`` (non-finite dropped; with
    ``positive`` also values <= 0, which mean "no such positions in that batch")."""
    pts = sorted(
        (int(m["step"]), float(m[key]))
        for m in rows
        if m["split"] == split and _finite(m.get(key)) and (m[key] > 0 or not positive)
    )
    if not pts:
        return [], []
    steps, values = zip(*pts, strict=True)
    return list(steps), list(values)


# ---------------------------------------------------------------------- the image encoder


def preprocess_figure(
    original: Any, seen: Any, pixel_values: Any = None, title: str | None = None
) -> go.Figure:
    """An image beside what the encoder sees, and the histogram of the normalised pixels.

    ``original``: the image as stored (PIL or ``HxWx3`` uint8); ``seen``: the square,
    resized input brought back to RGB (``unnormalise(preprocess(...))[0]``); ``pixel_values``
    (optional, any shape): the normalised values the tower reads, drawn as a histogram.
    """
    a, b = _rgb(original, "original"), _rgb(seen, "seen")
    cols = 3 if pixel_values is not None else 2
    titles = [
        f"original · {a.shape[1]}x{a.shape[0]} px",
        f"what the encoder sees · {b.shape[1]}x{b.shape[0]} px",
    ]
    if pixel_values is not None:
        titles.append("normalised pixel values")
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, horizontal_spacing=0.06)
    fig.add_trace(go.Image(z=a, name="original"), row=1, col=1)
    fig.add_trace(go.Image(z=b, name="encoder input"), row=1, col=2)
    for c in (1, 2):
        fig.update_xaxes(visible=False, row=1, col=c)
        fig.update_yaxes(visible=False, row=1, col=c)
    if pixel_values is not None:
        v = _np(pixel_values).astype(np.float64).ravel()
        if v.size == 0:
            raise ValueError("pixel_values is empty")
        fig.add_trace(
            go.Histogram(x=v, nbinsx=60, marker_color=_PALETTE[0], name="pixel values"),
            row=1,
            col=3,
        )
        fig.update_xaxes(title_text="(x - mean) / std", row=1, col=3)
        fig.update_yaxes(title_text="count", row=1, col=3)
    return finish(fig, height=340, title=title, showlegend=False)


TOKEN_MEASURES = ("distance", "norm", "pc1")


def token_map(tokens: Any, measure: str = "distance") -> np.ndarray:
    """One number per token of one image, on the square patch grid ``[side, side]``.

    ``tokens``: ``[N, D]`` (or ``[1, N, D]``) encoder outputs, ``N`` a square. ``measure``:
    ``"distance"``: L2 distance from the image's mean token (patches unlike the background
    stand out); ``"norm"``: the L2 norm (nearly flat after SigLIP's final LayerNorm);
    ``"pc1"``: the projection on the tokens' first principal component (sign arbitrary).
    """
    t = _np(tokens).astype(np.float64)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or 0 in t.shape:
        raise ValueError(f"tokens must be [N, D] (or [1, N, D]), got shape {t.shape}")
    side = math.isqrt(t.shape[0])
    if side * side != t.shape[0]:
        raise ValueError(f"{t.shape[0]} tokens do not fill a square grid")
    if measure == "norm":
        v = np.linalg.norm(t, axis=1)
    elif measure == "distance":
        v = np.linalg.norm(t - t.mean(axis=0), axis=1)
    elif measure == "pc1":
        c = t - t.mean(axis=0)
        v = c @ np.linalg.svd(c, full_matrices=False)[2][0]
    else:
        raise ValueError(f"measure must be one of {TOKEN_MEASURES}, got {measure!r}")
    return v.reshape(side, side)


def token_map_figure(
    image: Any, tokens: Any, measure: str = "distance", title: str | None = None
) -> go.Figure:
    """The encoder's input image with its patch grid, beside one number per token on that grid.

    ``image``: the square input (``HxWx3`` uint8 or PIL); ``tokens``: that image's ``[N, D]``
    encoder outputs (row-major on the patch grid, row 0 at the top), summarised per token by
    ``measure`` (see ``token_map``).
    """
    img = _rgb(image, "image")
    v = token_map(tokens, measure)
    side = v.shape[0]
    h, w = img.shape[:2]
    label = {
        "distance": "distance from the mean token",
        "norm": "token L2 norm",
        "pc1": "first principal component",
    }[measure]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.08,
        subplot_titles=(
            f"input {w}x{h} px, {side}x{side} patches",
            f"{side * side} tokens: {label}",
        ),
    )
    fig.add_trace(go.Image(z=img, name="input"), row=1, col=1)
    for k in range(1, side):
        for kind, pos in (("v", k * w / side), ("h", k * h / side)):
            fig.add_shape(
                type="line",
                x0=pos if kind == "v" else 0,
                x1=pos if kind == "v" else w,
                y0=0 if kind == "v" else pos,
                y1=h if kind == "v" else pos,
                line={"color": "white", "width": 0.5},
                opacity=0.6,
                row=1,
                col=1,
            )
    idx = np.arange(side * side).reshape(side, side)
    fig.add_trace(
        go.Heatmap(
            z=v,
            customdata=idx,
            colorscale="Viridis",
            colorbar={"title": measure},
            hovertemplate="token %{customdata} (row %{y}, col %{x})<br>%{z:.3g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x2", constrain="domain", row=1, col=2)
    fig.update_xaxes(title_text="patch column", constrain="domain", row=1, col=2)
    return finish(fig, height=380, title=title)


def vision_curves_figure(metrics: Sequence[dict]) -> go.Figure:
    """The tiny SigLIP's pretraining: train sigmoid loss (log y) and val retrieval beside chance.

    ``metrics``: the lines of ``vision_dir(cfg)/metrics.jsonl`` (train lines carry ``loss``, val
    lines ``caption_top1`` / ``caption_chance_top1`` ..., and ``word_*`` where words exist).
    """
    rows = _metric_rows(metrics)
    steps, loss = _curve(rows, "train", "loss", positive=True)
    if not steps:
        raise ValueError(
            "metrics has no train record with a positive 'loss' (empty metrics.jsonl?)"
        )
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("sigmoid loss (train)", "image-to-text retrieval (val)"),
    )
    fig.add_trace(
        go.Scatter(x=steps, y=loss, mode="lines", name="train loss", line={"color": "black"}),
        row=1,
        col=1,
    )
    k = 0
    for probe in ("caption", "word"):
        for top in ("top1", "top5"):
            s, acc = _curve(rows, "val", f"{probe}_{top}", positive=False)
            if not s:
                continue
            colour = _PALETTE[k % len(_PALETTE)]
            k += 1
            fig.add_trace(
                go.Scatter(
                    x=s,
                    y=acc,
                    mode="lines+markers",
                    name=f"{probe} {top}",
                    legendgroup=f"{probe}_{top}",
                    line={"color": colour},
                ),
                row=1,
                col=2,
            )
            cs, chance = _curve(rows, "val", f"{probe}_chance_{top}", positive=False)
            if cs:
                fig.add_trace(
                    go.Scatter(
                        x=cs,
                        y=chance,
                        mode="lines",
                        name=f"{probe} {top} chance",
                        legendgroup=f"{probe}_{top}",
                        line={"color": colour, "dash": "dot", "width": 1},
                    ),
                    row=1,
                    col=2,
                )
    fig.update_yaxes(type="log", title_text="loss", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=2)
    fig.update_xaxes(title_text="step")
    return finish(fig, height=380, title="tiny SigLIP pretraining")


def retrieval_figure(vision_report: Mapping[str, Any]) -> go.Figure:
    """Top-1 / top-5 retrieval per split (bars) with the chance level of each (black ticks).

    ``vision_report``: ``report.json`` of ``pretrain_vision`` (its ``retrieval`` maps a split to
    probes ``caption`` / ``word`` with ``top1``, ``top5``, ``chance_top1``, ``chance_top5``), or
    that ``retrieval`` dict itself. One panel per probe.
    """
    ret = vision_report.get("retrieval", vision_report)
    if not isinstance(ret, Mapping) or not ret:
        raise ValueError("no retrieval results: pass pretrain_vision's report (a finished run)")
    splits = [s for s, v in ret.items() if isinstance(v, Mapping)]
    probes = [p for p in ("caption", "word") if any(p in ret[s] for s in splits)]
    probes += sorted({p for s in splits for p in ret[s]} - set(probes))
    if not probes:
        raise ValueError(f"retrieval has no probe results (splits {list(ret)})")
    fig = make_subplots(
        rows=1,
        cols=len(probes),
        horizontal_spacing=0.08,
        subplot_titles=[f"{p} retrieval" for p in probes],
    )
    width = 0.38
    for c, probe in enumerate(probes, start=1):
        have = [s for s in splits if isinstance(ret[s].get(probe), Mapping)]
        for j, top in enumerate(("top1", "top5")):
            xs = [i + (j - 0.5) * width for i in range(len(have))]
            ys = [ret[s][probe].get(top) for s in have]
            ns = [ret[s][probe].get("n_candidates", "?") for s in have]
            fig.add_trace(
                go.Bar(
                    x=xs,
                    y=ys,
                    width=width * 0.95,
                    name=top,
                    legendgroup=top,
                    showlegend=c == 1,
                    marker_color=_PALETTE[j],
                    customdata=ns,
                    hovertemplate=f"{top}: %{{y:.3f}} (of %{{customdata}} texts)<extra></extra>",
                ),
                row=1,
                col=c,
            )
            chance = [ret[s][probe].get(f"chance_{top}") for s in have]
            fig.add_trace(
                _level_ticks(xs, width / 2, chance, "chance", c == 1 and j == 0), row=1, col=c
            )
        fig.update_xaxes(
            tickvals=list(range(len(have))),
            ticktext=have,
            range=[-0.6, len(have) - 0.4],
            row=1,
            col=c,
        )
    fig.update_yaxes(range=[0, 1.02])
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    return finish(fig, height=360, title="tiny SigLIP: image-to-text retrieval beside chance")


def probe_figure(probe_report: Mapping[str, Any]) -> go.Figure:
    """Held-out linear-probe accuracy per object attribute (bars) beside the majority rate
    (black ticks): what the frozen image tokens of a cell say about the object drawn in it.

    ``probe_report``: ``vision.probe.probe_encoder``'s report, or its ``probes`` dict. An
    attribute without an accuracy (too few samples) is left out.
    """
    probes = probe_report.get("probes", probe_report)
    have = [
        a for a, p in probes.items() if isinstance(p, Mapping) and p.get("accuracy") is not None
    ]
    if not have:
        raise ValueError("no probe accuracies: pass vision.probe.probe_encoder's report")
    xs = list(range(len(have)))
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=xs,
            y=[probes[a]["accuracy"] for a in have],
            width=0.6,
            name="probe accuracy (held-out images)",
            marker_color=_PALETTE[0],
            customdata=[[probes[a].get("classes"), probes[a].get("n_test")] for a in have],
            hovertemplate=(
                "%{y:.3f} over %{customdata[0]} classes, %{customdata[1]} held-out<extra></extra>"
            ),
        )
    )
    majority = [probes[a].get("majority") for a in have]
    fig.add_trace(_level_ticks(xs, 0.3, majority, "majority class", True))
    fig.update_xaxes(tickvals=xs, ticktext=have, range=[-0.6, len(have) - 0.4])
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy")
    return finish(fig, height=340, title="what the frozen image tokens encode (linear probes)")


# ---------------------------------------------------------------------- the adapters


def parameter_counts_figure(
    counts_by_name: Mapping[str, Mapping[str, int]], groups: Sequence[str] | None = None
) -> go.Figure:
    """Parameter counts per group (x), one bar per model (e.g. tiny vs the real 7B), log y.

    ``counts_by_name``: model name -> ``{group: count}`` (``count_adapter_parameters`` output);
    ``groups``: which groups, in order (default: every group, in order of first appearance).
    Zero counts have no bar (log scale) but keep their label.
    """
    if not counts_by_name:
        raise ValueError("counts_by_name is empty: give at least one model's counts")
    if groups is None:
        groups = list(dict.fromkeys(g for c in counts_by_name.values() for g in c))
    if not groups:
        raise ValueError("no groups to plot")
    fig = go.Figure()
    for k, (name, counts) in enumerate(counts_by_name.items()):
        values = []
        for g in groups:
            v = counts.get(g)
            if v is not None and (not isinstance(v, int | np.integer) or v < 0):
                raise ValueError(f"{name}: count of {g!r} must be an integer >= 0, got {v!r}")
            values.append(None if not v else int(v))
        fig.add_trace(
            go.Bar(
                x=list(groups),
                y=values,
                name=name,
                marker_color=_PALETTE[k % len(_PALETTE)],
                text=["" if v is None else f"{v:,}" for v in values],
                textposition="outside",
                textfont={"size": 9},
                hovertemplate="%{x}: %{y:,}<extra>" + name + "</extra>",
            )
        )
    return finish(
        fig,
        height=420,
        title="adapter parameters by group",
        barmode="group",
        yaxis_type="log",
        yaxis_title="parameters (log)",
    )


def gates_figure(
    gates: Any,
    relevance: Any = None,
    layer_labels: Sequence[str] | None = None,
    title: str | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Gate value (mean over channels) per cross-attention layer and position, as a heatmap;
    with ``relevance [T]`` (1 image talk, 0 unrelated, -1 padding) a strip below on the same x.

    ``gates``: ``[layers, T]`` (one sample of ``MoshiVisOutput.gates``); ``zmax``: top of the
    colour axis (default: the largest gate; the bottom is 0).
    """
    g = _np(gates).astype(np.float64)
    if g.ndim != 2 or 0 in g.shape:
        raise ValueError(f"gates must be a non-empty [layers, T] array, got shape {g.shape}")
    labels = (
        list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(len(g))]
    )
    if len(labels) != g.shape[0]:
        raise ValueError(f"{len(labels)} layer labels for {g.shape[0]} gate rows")
    rel = None if relevance is None else _np(relevance).astype(np.int64).ravel()
    if rel is not None and rel.shape[0] != g.shape[1]:
        raise ValueError(f"relevance has {rel.shape[0]} positions, gates {g.shape[1]}")
    rows = 1 if rel is None else 2
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.8, 0.2] if rows == 2 else [1.0],
    )
    fig.add_trace(
        go.Heatmap(
            z=g,
            y=labels,
            colorscale="Magma",
            zmin=0.0,
            zmax=max(float(np.nanmax(g)), 1e-6) if zmax is None else float(zmax),
            colorbar={"title": "gate", **_domain_bar(fig, 1)},
            hovertemplate="%{y} · position %{x}<br>gate %{z:.4f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    if rel is not None:
        fig.add_trace(
            go.Heatmap(
                z=np.clip(rel, -1, 1)[None] + 1,
                y=["relevance"],
                colorscale=_discrete_scale(_RELEVANCE_COLOURS),
                zmin=-0.5,
                zmax=2.5,
                showscale=False,
                customdata=rel[None],
                hovertemplate="position %{x}: relevance %{customdata}<extra></extra>",
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="position", row=rows, col=1)
    return finish(fig, height=180 + 22 * g.shape[0] + (60 if rel is not None else 0), title=title)


def mix_figure(batch: Any, max_positions: int | None = None) -> go.Figure:
    """One mixed batch as a picture, a row per sample (labelled speech or speechless).

    Three panels on one position axis: what each position holds (padding / text with the
    audio rows at the zero token / text and audio), the text-loss weight, and the relevance
    row (1 about the image, 0 glued unrelated chit-chat, -1 padding: the gates' ground truth,
    never in the loss). ``batch``: anything with ``codes [B, 17, T]``, ``text_weight [B, T]``,
    ``relevance [B, T]`` and ``is_speech [B]`` (a ``mix.Batch``).
    """
    codes = _np(batch.codes).astype(np.int64)
    weight = _np(batch.text_weight).astype(np.float64)
    rel = _np(batch.relevance).astype(np.int64)
    speech = _np(batch.is_speech).astype(bool).ravel()
    if codes.ndim != 3 or codes.shape[1] < 2 or 0 in codes.shape:
        raise ValueError(f"codes must be a non-empty [B, K, T] array, got shape {codes.shape}")
    b, _, t = codes.shape
    if weight.shape != (b, t) or rel.shape != (b, t) or speech.shape != (b,):
        raise ValueError(
            f"text_weight {weight.shape} and relevance {rel.shape} must be [B, T] = {(b, t)} and "
            f"is_speech {speech.shape} [B]"
        )
    if max_positions is not None:
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        t = min(t, max_positions)
        codes, weight, rel = codes[:, :, :t], weight[:, :t], rel[:, :t]
    audio = (codes[:, 1:] != ZERO_TOKEN).any(axis=1)
    text = codes[:, 0] != ZERO_TOKEN
    state = np.where(audio, 2, np.where(text, 1, 0))
    labels = [f"{i} · {'speech' if s else 'speechless'}" for i, s in enumerate(speech)]
    glued = int(sum(((r == 0).any() and (r == 1).any()) for r in rel))
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        subplot_titles=(
            "what each position holds",
            "text-loss weight",
            "image relevance (gate ground truth, not in the loss)",
        ),
    )
    fig.add_trace(
        go.Heatmap(
            z=state,
            y=labels,
            colorscale=_discrete_scale(_MIX_COLOURS),
            zmin=-0.5,
            zmax=2.5,
            customdata=np.asarray(MIX_STATES, dtype=object)[state],
            hovertemplate="%{y} · position %{x}<br>%{customdata}<extra></extra>",
            colorbar={
                "tickvals": [0, 1, 2],
                "ticktext": ["padding", "text only", "text + audio"],
                **_domain_bar(fig, 1),
            },
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=weight,
            y=labels,
            colorscale="Greys",
            zmin=0.0,
            zmax=max(1.0, float(weight.max())),
            hovertemplate="%{y} · position %{x}<br>weight %{z:.2f}<extra></extra>",
            colorbar={"title": "weight", **_domain_bar(fig, 2)},
        ),
        row=2,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=np.clip(rel, -1, 1) + 1,
            y=labels,
            colorscale=_discrete_scale(_RELEVANCE_COLOURS),
            zmin=-0.5,
            zmax=2.5,
            customdata=rel,
            hovertemplate="%{y} · position %{x}<br>relevance %{customdata}<extra></extra>",
            colorbar={
                "tickvals": [0, 1, 2],
                "ticktext": ["padding", "unrelated", "image"],
                **_domain_bar(fig, 3),
            },
        ),
        row=3,
        col=1,
    )
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9})
    fig.update_xaxes(title_text="position (frame for speech, token for speechless)", row=3, col=1)
    n_speech = int(speech.sum())
    return finish(
        fig,
        height=220 + 3 * max(60, 20 * b),
        title=(
            f"a mixed batch of {b}: {n_speech} speech, {b - n_speech} speechless, "
            f"{glued} with unrelated chit-chat glued on"
        ),
    )


def adapter_curves_figure(metrics: Sequence[dict]) -> go.Figure:
    """Adapter training: loss parts (left) and the text loss of speech vs speechless samples
    (right), train as lines, val dashed with markers, log y.

    ``metrics``: the lines of ``adapters_dir(cfg, run)/metrics.jsonl``. Values <= 0 are left
    out (a batch without speech samples logs 0 for the audio and speech text losses).
    """
    rows = _metric_rows(metrics)
    if not rows:
        raise ValueError("metrics has no records with 'step' and 'split' (empty metrics.jsonl?)")
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("loss parts", "text loss: speech vs speechless samples"),
    )
    k = 0
    for col, parts in ((1, ADAPTER_LOSS_PARTS), (2, TEXT_LOSS_PARTS)):
        for part in parts:
            colour = _PALETTE[k % len(_PALETTE)]
            k += 1
            for split, dash, mode in (
                ("train", "solid", "lines"),
                ("val", "dash", "lines+markers"),
            ):
                steps, values = _curve(rows, split, part, positive=True)
                if not steps:
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=steps,
                        y=values,
                        mode=mode,
                        name=f"{split} {part}",
                        legendgroup=part,
                        line={"color": colour, "dash": dash, "width": 2 if part == "loss" else 1.2},
                    ),
                    row=1,
                    col=col,
                )
    if not fig.data:
        raise ValueError(
            f"no record carries any of {list(ADAPTER_LOSS_PARTS + TEXT_LOSS_PARTS)} above 0"
        )
    fig.update_yaxes(type="log", title_text="cross-entropy (nats)", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="step")
    return finish(fig, height=400, title="adapter training (only the adapters learn)")


def eval_summary_figure(report: Mapping[str, Any], split: str = "test") -> go.Figure:
    """Accuracy per question type on ``split``, with text prompts and with spoken prompts
    (bars), and each type's chance levels (uniform: dotted, majority answer: solid tick) and,
    where the report has it, the referent-blind baseline (red dashes, ``referent_blind``).

    ``report``: ``evaluate_moshivis``'s report. The last group, ``vqa_all``, pools the VQA types
    (it has no single chance level).
    """
    if split not in report or not isinstance(report[split], Mapping):
        have = [k for k, v in report.items() if isinstance(v, Mapping) and "text_prompts" in v]
        raise ValueError(f"the report has no split {split!r}; it has {have}")
    res = report[split]
    series = [
        (name, res[key])
        for name, key in (("text prompts", "text_prompts"), ("spoken prompts", "spoken_prompts"))
        if isinstance(res.get(key), Mapping)
    ]
    if not series:
        raise ValueError(f"split {split!r} has neither text_prompts nor spoken_prompts results")
    types = sorted({t for _, acc in series for t in acc if t != "vqa_all"})
    if any("vqa_all" in acc for _, acc in series):
        types.append("vqa_all")
    chance = report.get("chance", {})
    width = 0.8 / len(series)
    fig = go.Figure()
    for j, (name, acc) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(types))]
        ys = [acc.get(t, {}).get("accuracy") for t in types]
        ns = [acc.get(t, {}).get("n", 0) for t in types]
        fig.add_trace(
            go.Bar(
                x=xs,
                y=[y if _finite(y) else None for y in ys],
                width=width * 0.95,
                name=name,
                marker_color=_PALETTE[j],
                text=[f"{y:.2f}" if _finite(y) else "" for y in ys],
                textposition="outside",
                textfont={"size": 9},
                customdata=np.stack([np.asarray(types, dtype=object), ns], axis=1),
                hovertemplate="%{customdata[0]}: %{y:.3f} (n=%{customdata[1]})<extra>"
                + name
                + "</extra>",
            )
        )
    blind = res.get("referent_blind") or {}
    levels = [
        ("chance (uniform)", chance, "uniform", {"color": "black", "dash": "dot", "width": 2}),
        ("chance (majority)", chance, "majority", {"color": "black", "width": 3}),
        (
            "referent-blind (sees the scene, not the asked object)",
            blind,
            "accuracy",
            {"color": "#d62728", "width": 3, "dash": "dash"},
        ),
    ]
    for name, table, key, line in levels:
        cx, cy = _segments(
            list(range(len(types))), 0.45, [table.get(t, {}).get(key) for t in types]
        )
        if cx:
            fig.add_trace(
                go.Scatter(x=cx, y=cy, mode="lines", name=name, line=line, hoverinfo="skip")
            )
    f1 = res.get("caption_attribute_f1")
    extra = f" · caption attribute F1 {f1:.2f}" if _finite(f1) else ""
    fig.update_xaxes(
        tickvals=list(range(len(types))),
        ticktext=types,
        tickangle=-30,
        range=[-0.6, len(types) - 0.4],
    )
    return finish(
        fig,
        height=420,
        title=f"{split}: accuracy per question type{extra}",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
    )
