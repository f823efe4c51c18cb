"""The paper's figures, rebuilt from the lab's artefacts, and ``make_figures`` that writes them.

Each ``*_figure`` builder is pure: saved artefacts (dicts read from JSON) or a loaded model in,
a ``plotly`` figure out. ``Sources`` reads the artefacts of one preset lazily and says what to
run when one is missing; ``FIGURES`` maps each figure's name to a function of ``Sources``;
``make_figures`` builds and writes them all (PNG + SVG + HTML), recording per figure the paths,
the seconds and the error instead of stopping at the first missing artefact.

| name | what | from |
|---|---|---|
| ``adapter_architecture`` | the gated cross-attention block + adapter parameters, ours and 7B | ``adapters/<run>/train_report.json``, ``MoshiVisConfig.moshika_vis()`` on ``meta`` |
| ``gates_topic_switch`` | gate score over a speechless image dialogue with chit-chat glued before it | the trained run + the world |
| ``gates_heatmap`` | the same dialogue's gate per layer and step | the trained run + the world |
| ``gate_auroc`` | gate as an image-relevance detector: AUROC per assistant turn / position / all positions, speech and speechless, per layer | ``interp/report.json`` |
| ``attention_grid`` | cross-attention overlays, questions x layers | the trained run + the world |
| ``pointing_attribution`` | pointing game per layer beside baselines; IG vs attention (Spearman) | ``interp/report.json`` |
| ``p_audio_sweep`` | task accuracy (text / spoken prompts) and speech NLL vs p_audio | ``ablations/ablations.json`` |
| ``gating_sharing_table`` | the gating x sharing grid beside the paper's Table 5 | ``ablations/ablations.json`` |
| ``prosody`` | prosody before (g = 0) / after / across the sweep | ``interp/prosody.json`` |
| ``vision_latency`` | step-time ratio vs number of image tokens (K/V cached) | ``figures/latency.json`` (measured) |
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moshivis_lab.viz.style import finish

PAPER_ADAPTER_PARAMETERS = 206_184_448  # DESIGN.md: moshika-vis adapters (released config)
_GREEN, _RED, _BLUE, _ORANGE, _GREY = "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#7f7f7f"
_PURPLE = "#9467bd"


class MissingArtefact(FileNotFoundError):
    """An artefact a figure needs is not built; the message says what to run."""


class FigureDataError(ValueError):
    """The artefact exists but holds nothing to plot (e.g. no reply at smoke size)."""


# ---------------------------------------------------------------------- the artefacts


def _cmd(cfg: Any, what: str) -> str:
    p = cfg.name
    return {
        "train": f"`moshivis-lab train --preset {p}`",
        "eval": f"`moshivis-lab eval --preset {p}`",
        "ablations": f"`moshivis-lab ablate --preset {p}` (or `moshivis-lab reproduce --preset {p} --stage ablations`)",
        "interp": f"`moshivis-lab reproduce --preset {p} --stage interp` (or `interp_report(cfg)`, notebook 06)",
        "prosody": f"`moshivis-lab reproduce --preset {p} --stage prosody` (or `prosody_report(cfg)`, notebook 07)",
        "speech_eval": f"`moshivis-lab reproduce --preset {p} --stage speech_eval`",
        "vision": f"`moshivis-lab pretrain-vision --preset {p}`",
        "data": f"`moshivis-lab data --preset {p}`",
    }[what]


class Sources:
    """The artefacts of one preset and adapter run, read on first use.

    ``json(rel, what)`` reads ``data/<preset>/<rel>`` or raises ``MissingArtefact`` naming the
    command ``what`` that builds it; ``model`` / ``encoder`` / ``tokenizer`` load the trained run
    (``load_trained``) once.
    """

    def __init__(self, cfg: Any, run: str = "main") -> None:
        self.cfg = cfg
        self.run = run
        self.root = Path(cfg.data_dir) / cfg.name
        self._json: dict[str, Any] = {}

    def path(self, rel: str) -> Path:
        return self.root / rel

    def json(self, rel: str, what: str) -> Any:
        from moshivis_lab.artefacts import read_json

        if rel not in self._json:
            p = self.path(rel)
            if not p.exists():
                raise MissingArtefact(f"{p} is missing; run {_cmd(self.cfg, what)}")
            self._json[rel] = read_json(p)
        return self._json[rel]

    def has(self, rel: str) -> bool:
        return self.path(rel).exists()

    @property
    def run_dir(self) -> str:
        return f"adapters/{self.run}"

    @property
    def interp_rel(self) -> str:
        return "interp/report.json" if self.run == "main" else f"interp/report_{self.run}.json"

    @cached_property
    def model(self) -> Any:
        from moshivis_lab.train.adapters import load_trained

        try:
            return load_trained(self.cfg, self.run)
        except FileNotFoundError as e:
            raise MissingArtefact(f"{e}; run {_cmd(self.cfg, 'train')}") from e

    @cached_property
    def encoder(self) -> Any:
        from moshivis_lab.vision.pretrain import load_vision_encoder

        try:
            return load_vision_encoder(self.cfg, device=self.model.device)
        except FileNotFoundError as e:
            raise MissingArtefact(f"{e}; run {_cmd(self.cfg, 'vision')}") from e

    @cached_property
    def tokenizer(self) -> Any:
        from moshivis_lab.world.tokenizer import TextTokenizer

        if not Path(self.cfg.tokenizer_path).exists():
            raise MissingArtefact(
                f"{self.cfg.tokenizer_path} is missing; run {_cmd(self.cfg, 'data')}"
            )
        return TextTokenizer.load(self.cfg.tokenizer_path)


# ---------------------------------------------------------------------- 1. adapters


def adapter_counts_7b() -> dict[str, int]:
    """Adapter parameters per group of the released MoshiVis (Moshi 7B), built on ``meta``."""
    import torch

    from moshivis_lab.config import MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis, count_adapter_parameters

    with torch.device("meta"):
        model = MoshiVis(MoshiVisConfig.moshika_vis())
    return count_adapter_parameters(model)


def _box(fig: go.Figure, x: float, y: float, text: str, colour: str, w: float = 1.7) -> None:
    fig.add_shape(
        type="rect",
        x0=x - w / 2,
        x1=x + w / 2,
        y0=y - 0.32,
        y1=y + 0.32,
        fillcolor=colour,
        line={"color": "#333", "width": 1},
        xref="x",
        yref="y",
    )
    fig.add_annotation(x=x, y=y, text=text, showarrow=False, font={"size": 10}, xref="x", yref="y")


def _arrow(fig: go.Figure, x0: float, y0: float, x1: float, y1: float) -> None:
    fig.add_annotation(
        x=x1,
        y=y1,
        ax=x0,
        ay=y0,
        xref="x",
        yref="y",
        axref="x",
        ayref="y",
        showarrow=True,
        arrowhead=2,
        arrowwidth=1.2,
        text="",
    )


def adapter_figure(counts_by_model: Mapping[str, Mapping[str, int]]) -> go.Figure:
    """Left: the gated cross-attention block MoshiVis adds to every Helium layer (between
    self-attention and FFN). Right: adapter parameters per group, one bar per model (log y).

    ``counts_by_model``: model name -> ``{group: count, "total": ...}``
    (``count_adapter_parameters``); groups ``proj_xa, norm_xa, attention, gates, norm_cross``.
    """
    if not counts_by_model:
        raise ValueError("counts_by_model is empty")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.5, 0.5],
        subplot_titles=("gated cross-attention in each layer", "adapter parameters (log)"),
        horizontal_spacing=0.08,
    )
    shared, per_layer, frozen, image = "#c6dbef", "#fdd0a2", "#e0e0e0", "#c7e9c0"
    # the residual stream, bottom to top
    _box(fig, 0, 0, "x (after self-attention)", frozen)
    _box(fig, 0, 1.2, "norm_cross (per layer)", per_layer)
    _box(fig, 0, 2.4, "CrossAttn q=norm(x), k,v=image<br>(Q/K/V/out shared)", shared, 2.2)
    _box(fig, 1.85, 3.6, "gate g = σ(W2·ReLU(W1·y) − 4)<br>(per layer)", per_layer, 2.5)
    _box(fig, 0, 4.8, "x + g ⊙ y", "#ffffff")
    _box(fig, 0, 6.0, "FFN (frozen)", frozen)
    _box(fig, -2.3, 0.0, "image tokens<br>(SigLIP, frozen)", image, 1.6)
    _box(fig, -2.3, 1.2, "proj_xa + norm_xa", shared, 1.6)
    _box(fig, -2.3, 2.4, "K/V once per image", shared, 1.6)
    for a, b in ((0, 1.2), (1.2, 2.4), (4.8, 6.0)):
        _arrow(fig, 0, a + 0.32, 0, b - 0.32)
    _arrow(fig, 0, 2.72, 0, 4.48)
    _arrow(fig, 0.5, 2.72, 1.3, 3.28)
    _arrow(fig, 1.3, 3.92, 0.6, 4.48)
    _arrow(fig, -2.3, 0.32, -2.3, 0.88)
    _arrow(fig, -2.3, 1.52, -2.3, 2.08)
    _arrow(fig, -1.5, 2.4, -1.1, 2.4)
    fig.add_shape(
        type="path",
        path="M -0.9 0 L -1.2 0 L -1.2 4.8 L -0.9 4.8",
        line={"color": "#555", "dash": "dot"},
        xref="x",
        yref="y",
    )
    fig.add_annotation(
        x=-1.25, y=3.9, text="residual", showarrow=False, textangle=-90, font={"size": 9}
    )
    for name, colour in (("shared by all layers", shared), ("per layer", per_layer)):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"symbol": "square", "size": 12, "color": colour},
                name=name,
            ),
            row=1,
            col=1,
        )
    fig.update_xaxes(visible=False, range=[-3.3, 3.2], row=1, col=1)
    fig.update_yaxes(visible=False, range=[-0.6, 6.6], row=1, col=1)
    groups = ["proj_xa", "norm_xa", "attention", "gates", "norm_cross", "total"]
    palette = [_BLUE, _ORANGE, _GREEN, _RED]
    for k, (name, counts) in enumerate(counts_by_model.items()):
        vals = [counts.get(g) for g in groups]
        fig.add_trace(
            go.Bar(
                x=groups,
                y=[v if v else None for v in vals],
                name=f"{name}: {counts.get('total', 0):,}",
                marker_color=palette[k % len(palette)],
                text=["" if not v else f"{v:,}" for v in vals],
                textposition="outside",
                textfont={"size": 8},
                hovertemplate="%{x}: %{y:,}<extra>" + name + "</extra>",
            ),
            row=1,
            col=2,
        )
    fig.update_yaxes(type="log", title="parameters", row=1, col=2)
    finish(
        fig,
        height=500,
        title="MoshiVis adapters: the block and its parameters",
        barmode="group",
        legend={"orientation": "h", "y": -0.08},
        template="plotly_white",
    )
    return fig.update_layout(margin={"t": 80})


def _adapter_from(src: Sources) -> go.Figure:
    rep = src.json(f"{src.run_dir}/train_report.json", "train")
    ours = {
        k: int(v)
        for k, v in (rep.get("parameters") or {}).items()
        if k not in {"frozen", "trainable", "model_total"}
    }
    if not ours:
        raise FigureDataError(f"{src.run_dir}/train_report.json has no parameter counts")
    big = adapter_counts_7b()
    return adapter_figure({f"ours ({src.cfg.name})": ours, "MoshiVis 7B (meta device)": big})


# ---------------------------------------------------------------------- 2. gates over time


def topic_switch_trace(
    src: Sources, split: str = "val", index: int = 0, kind: str = "speechless"
) -> tuple[Any, Any]:
    """The gate trace of image dialogue ``index`` with chit-chat number ``index`` glued before
    it, ``kind`` ``"speechless"`` (in the text stream, where the tiny model's gate tracks the
    topic: per-turn AUROC 0.93, ``RESULTS.md``) or ``"spoken"``."""
    from moshivis_lab.interp import gates as G
    from moshivis_lab.interp.cache import image_tokens_for

    if kind not in ("speechless", "spoken"):
        raise ValueError(f"kind must be 'speechless' or 'spoken', got {kind!r}")
    build = G.text_dialogue if kind == "speechless" else G.spoken_dialogue
    d = build(src.cfg, split, index, chat=index, chat_first=True)
    image = image_tokens_for(src.cfg, [d.image_id], src.encoder)
    return d, G.gate_trace(src.model, d, image, tokenizer=src.tokenizer)


def gates_topic_switch_figure(dialogue: Any, trace: Any) -> go.Figure:
    """The paper's gate score (mean of the last layers) over a dialogue that switches from
    unrelated chit-chat to talk about the image (marker), image talk shaded green."""
    from moshivis_lab.viz.interp import gate_trace_figure

    last = min(10, len(trace.layers))
    fig = gate_trace_figure(
        trace.score(last),
        relevance=trace.relevance,
        turns=trace.turns,
        layer_gates=trace.gates,
        label=f"gate (mean of last {last} layers)",
        title=f"gate over a {'spoken' if dialogue.speech else 'speechless'} conversation that "
        f"switches topic at step {dialogue.switch} ({dialogue.length} steps)",
    )
    if dialogue.switch is not None:
        fig.add_vline(x=dialogue.switch, line={"color": "black", "dash": "dash"})
    return fig


def gates_heatmap_figure(dialogue: Any, trace: Any) -> go.Figure:
    """Gate per cross-attention layer and step of the same dialogue (marker: the switch)."""
    from moshivis_lab.viz.interp import gate_heatmap_figure

    return gate_heatmap_figure(
        trace.gates,
        tokens=trace.tokens,
        step=dialogue.switch,
        layer_labels=[f"layer {i}" for i in trace.layers],
        title="gate per layer and step (marker: the topic switch)",
    )


# ---------------------------------------------------------------------- 3. gate AUROC


_VIEW_LABELS = {
    "assistant_turns": "per assistant turn",
    "assistant_positions": "per assistant position",
    "all_positions": "all positions",
}


def gate_auroc_figure(
    auroc: Mapping[str, Any], segments: Mapping[str, Any] | None = None
) -> go.Figure:
    """The gate score as an unsupervised image-relevance detector, where the gate acts and not.

    ``auroc``: ``gate_auroc``'s result (``interp/report.json``'s ``gates.relevance_auroc`` or
    ``eval.json``'s ``gates``): left, the AUROC per assistant turn, per assistant position and
    over all positions, for speech, speechless and all samples (reports from before the views
    give only "all positions"); per-layer AUROCs in grey. Right: the mean gate on image and on
    unrelated talk per view. ``segments``: ``gates.segments_by_topic``, optional, adds the
    glued dialogues' turn means. Dashed: 0.5, no signal.
    """
    if auroc.get("auroc") is None:
        raise FigureDataError("the report holds no gate AUROC")
    views = [v for v in _VIEW_LABELS if v != "all_positions" and auroc.get(v)] + ["all_positions"]
    groups = (("all samples", None, _BLUE), ("speech", "speech", _ORANGE),
              ("speechless", "speechless", _PURPLE))  # fmt: skip

    def view_of(kind: str | None, view: str) -> Mapping[str, Any] | None:
        src = auroc if kind is None else auroc.get(kind)
        if not src:
            return None
        if view == "all_positions":
            if kind is None:
                return src.get("all_positions") or {"auroc": src.get("auroc")}
            return src
        return src.get(view)

    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        subplot_titles=("AUROC of the gate for 'about the image'", "mean gate"),
    )
    xs = [_VIEW_LABELS[v] for v in views]
    for name, kind, colour in groups:
        ys = [(view_of(kind, v) or {}).get("auroc") for v in views]
        if all(y is None for y in ys):
            continue
        fig.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                name=name,
                marker_color=colour,
                text=[f"{y:.2f}" if y is not None else "" for y in ys],
                textposition="outside",
                legendgroup="auroc",
            ),
            row=1,
            col=1,
        )
    layers = auroc.get("per_layer") or {}
    if layers:
        fig.add_trace(
            go.Bar(
                x=[f"layer {k}" for k in layers],
                y=list(layers.values()),
                name="one layer (all positions)",
                marker_color=_GREY,
            ),
            row=1,
            col=1,
        )
    fig.add_hline(y=0.5, line={"dash": "dash", "color": "black"}, row=1, col=1)
    fig.update_yaxes(range=[0, 1.1], title="AUROC", row=1, col=1)
    cats, img, unrel = [], [], []
    for v in views:
        d = view_of(None, v) or {}
        if d.get("mean_gate_image") is None and v == "all_positions":
            for kind in ("speech", "speechless"):  # old reports: per kind only
                if auroc.get(kind):
                    cats.append(f"{kind}, all positions")
                    img.append(auroc[kind].get("mean_gate_image"))
                    unrel.append(auroc[kind].get("mean_gate_unrelated"))
            continue
        cats.append(_VIEW_LABELS[v])
        img.append(d.get("mean_gate_image"))
        unrel.append(d.get("mean_gate_unrelated"))
    if segments and "image" in segments and "unrelated" in segments:
        cats.append("turns (glued dialogues)")
        img.append(segments["image"].get("mean"))
        unrel.append(segments["unrelated"].get("mean"))
    for name, ys, colour in (("image talk", img, _GREEN), ("unrelated talk", unrel, _RED)):
        fig.add_trace(go.Bar(x=cats, y=ys, name=name, marker_color=colour), row=1, col=2)
    fig.update_yaxes(title="gate", rangemode="tozero", row=1, col=2)
    return finish(
        fig,
        height=420,
        title="gates as an image-relevance score (paper: higher on image talk; 0.5 = no signal)",
        barmode="group",
    )


# ---------------------------------------------------------------------- 4. attention grid


def attention_grid_items(src: Sources, n: int = 4, split: str = "test") -> list[Any]:
    """``n`` single-object questions, one per question type in turn."""
    from moshivis_lab.interp.attention import pointing_items

    items = pointing_items(src.cfg, split, per_type=max(1, n))
    by_type: dict[str, list[Any]] = {}
    for it in items:
        by_type.setdefault(it.answer_type, []).append(it)
    picked: list[Any] = []
    while len(picked) < min(n, len(items)):
        for rows in by_type.values():
            if rows and len(picked) < n:
                picked.append(rows.pop(0))
    if not picked:
        raise FigureDataError(f"no single-object question in the {split} split")
    return picked


def attention_grid_paper_figure(qm: Any, max_side: int = 112) -> go.Figure:
    """Cross-attention (answer steps, heads averaged) of a few questions, one column per layer;
    green: the object's box; ``qm`` an ``interp.attention.QuestionMaps``. Images larger than
    ``max_side`` pixels are scaled down (with their boxes) to keep the files small."""
    from PIL import Image

    from moshivis_lab.viz.interp import attention_grid_figure

    images, boxes = [], []
    for img, box in zip(qm.images, qm.boxes, strict=True):
        img = np.asarray(img)
        f = min(1.0, max_side / max(img.shape[:2]))  # the overlays are upsampled to the image
        if f < 1.0:
            size = (round(img.shape[1] * f), round(img.shape[0] * f))
            img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
            box = None if box is None else tuple(v * f for v in box)
        images.append(img)
        boxes.append(box)
    fig = attention_grid_figure(
        images,
        qm.grids,
        boxes=boxes,
        row_labels=qm.labels,
        layer_labels=[f"layer {i}" for i in qm.layers],
        title="where MoshiVis looks: questions x layers (green: the object asked about)",
    )
    for tr in fig.data:  # smaller files: float32 maps, images as PNG data URIs
        if tr.type == "heatmap":
            tr.z = np.asarray(tr.z, dtype=np.float32)
        elif tr.type == "image" and tr.z is not None:
            tr.source = _png_uri(np.asarray(tr.z, dtype=np.uint8))
            tr.z = None
    return fig


def _png_uri(rgb: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- 5. pointing + IG


def pointing_attribution_figure(report: Mapping[str, Any]) -> go.Figure:
    """Left: pointing game per layer (peak of the attention on the object asked about; on
    another object) beside the random-peak baseline. Right: rank agreement (Spearman over
    patches) of integrated-gradient attributions with the attention, per layer, and the
    pointing game of the attribution peaks. ``report``: ``interp/report.json``."""
    pg = report.get("pointing_game")
    if not pg or not pg.get("per_layer"):
        raise FigureDataError("the interp report holds no pointing game")
    per = pg["per_layer"]
    labels = [f"layer {k}" for k in per] + ["all layers"]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            f"pointing game, attention ({pg.get('n', '?')} questions)",
            "integrated gradients vs attention",
        ),
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=[*per.values(), pg.get("all_layers")],
            name="attention peak on the object asked about",
            marker_color=_GREEN,
        ),
        row=1,
        col=1,
    )
    other = pg.get("other_object_per_layer")
    if other:
        fig.add_trace(
            go.Bar(
                x=labels[: len(other)],
                y=list(other.values()),
                name="... on another object",
                marker_color=_RED,
            ),
            row=1,
            col=1,
        )
    for key, name, dash in (
        ("baseline_box_area", "random peak (box area)", "dash"),
        ("object_chance", "random peak on some object", "dot"),
    ):
        if pg.get(key) is not None:
            fig.add_trace(
                go.Scatter(
                    x=[labels[0], labels[-1]],
                    y=[pg[key]] * 2,
                    mode="lines",
                    line={"dash": dash, "color": "black"},
                    name=f"{name} {pg[key]:.1%}",
                ),
                row=1,
                col=1,
            )
    fig.update_yaxes(range=[0, 1], title="share of questions", row=1, col=1)
    att = report.get("attribution") or {}
    colours = {"image_tokens": _BLUE, "pixels": _ORANGE}
    for kind in ("image_tokens", "pixels"):
        a = att.get(kind)
        if not a or not a.get("spearman_vs_attention_per_layer"):
            continue
        sp = a["spearman_vs_attention_per_layer"]
        fig.add_trace(
            go.Scatter(
                x=[f"layer {k}" for k in sp] + ["all layers"],
                y=[*sp.values(), a.get("spearman_vs_attention_all_layers")],
                mode="lines+markers",
                name=f"Spearman IG ({kind.replace('_', ' ')}) vs attention",
                line={"color": colours[kind]},
            ),
            row=1,
            col=2,
        )
        if a.get("pointing_game") is not None:
            fig.add_trace(
                go.Bar(
                    x=[f"IG {kind.replace('_', ' ')}"],
                    y=[a["pointing_game"]],
                    name=f"pointing game, IG {kind.replace('_', ' ')} peak",
                    marker_color=colours[kind],
                    opacity=0.5,
                ),
                row=1,
                col=2,
            )
    if att.get("attention_pointing_at_target_step") is not None:
        fig.add_trace(
            go.Bar(
                x=["attention (same step)"],
                y=[att["attention_pointing_at_target_step"]],
                name="pointing game, attention at the IG target step",
                marker_color=_GREEN,
                opacity=0.5,
            ),
            row=1,
            col=2,
        )
    fig.update_yaxes(range=[-0.2, 1], title="Spearman / share", row=1, col=2)
    return finish(
        fig,
        height=440,
        title="does the attention point at the object? attribution against attention",
        barmode="group",
        legend={"orientation": "h", "y": -0.2},
    )


# ---------------------------------------------------------------------- 6-7. ablations


def _rows(ablations: Mapping[str, Any], sweep: str) -> list[dict[str, Any]]:
    rows = [
        r
        for r in ablations.get("rows", [])
        if (r.get("sweep") == "p_audio") == (sweep == "p_audio")
    ]
    if not rows:
        raise FigureDataError(f"ablations.json has no {sweep} rows")
    return rows


def p_audio_sweep_figure(ablations: Mapping[str, Any], chosen: float = 0.25) -> go.Figure:
    """Accuracy with text and spoken prompts (left) and the assistant-audio NLL on unrelated
    chit-chat (right, lower = speech better kept) vs the share of speech samples p_audio.
    ``ablations``: ``ablations/ablations.json``; dotted: the paper's choice (25 %)."""
    rows = sorted(_rows(ablations, "p_audio"), key=lambda r: r["p_audio"])
    x = [100 * r["p_audio"] for r in rows]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("task accuracy (test images)", "assistant audio NLL (unrelated image)"),
    )
    for key, name, colour, dash in (
        ("text_vqa", "VQA, text prompt", _BLUE, "solid"),
        ("spoken_vqa", "VQA, spoken prompt", _ORANGE, "solid"),
        ("text_ocr", "OCR, text prompt", _BLUE, "dot"),
        ("spoken_ocr", "OCR, spoken prompt", _ORANGE, "dot"),
    ):
        ys = [None if r.get(key) is None else 100 * r[key] for r in rows]
        if all(v is None for v in ys):
            continue
        fig.add_trace(
            go.Scatter(
                x=x, y=ys, mode="lines+markers", name=name, line={"color": colour, "dash": dash}
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[r.get("audio_nll_unrelated_image") for r in rows],
            mode="lines+markers",
            name="adapted model",
            line={"color": _RED},
        ),
        row=1,
        col=2,
    )
    base = [r.get("audio_nll_base") for r in rows if r.get("audio_nll_base") is not None]
    if base:
        fig.add_trace(
            go.Scatter(
                x=[x[0], x[-1]],
                y=[float(np.mean(base))] * 2,
                mode="lines",
                line={"dash": "dash", "color": "black"},
                name="base speech LM",
            ),
            row=1,
            col=2,
        )
    for col in (1, 2):
        fig.add_vline(x=100 * chosen, line={"dash": "dot", "color": _GREY}, row=1, col=col)
        fig.update_xaxes(title="p_audio (% speech samples)", row=1, col=col)
    fig.update_yaxes(title="accuracy %", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title="nats per code", row=1, col=2)
    return finish(
        fig,
        height=400,
        title=f"the p_audio sweep ({ablations.get('steps_per_variant', '?')} steps per variant; "
        f"dotted: the paper's 25 %)",
    )


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def gating_sharing_table_figure(ablations: Mapping[str, Any]) -> go.Figure:
    """The gating x sharing grid (and the init sweep, when run) at equal compute, ours beside the
    paper's Table 5 (OCR-VQA accuracy, text / speech prompt). ``ablations``:
    ``ablations/ablations.json``."""
    rows = _rows(ablations, "grid")
    header = [
        "variant",
        "trainable params",
        "VQA text %",
        "VQA spoken %",
        "OCR text %",
        "OCR spoken %",
        "gate AUROC turn / all",
        "audio NLL",
        "paper OCR-VQA text / speech %",
    ]
    cells = [
        [r["name"] for r in rows],
        [
            "-" if r.get("trainable_parameters") is None else f"{r['trainable_parameters']:,}"
            for r in rows
        ],
        [_pct(r.get("text_vqa")) for r in rows],
        [_pct(r.get("spoken_vqa")) for r in rows],
        [_pct(r.get("text_ocr")) for r in rows],
        [_pct(r.get("spoken_ocr")) for r in rows],
        [
            " / ".join(
                "-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("gate_auroc_turns", "gate_auroc")
            )
            for r in rows
        ],
        [
            "-"
            if r.get("audio_nll_unrelated_image") is None
            else f"{r['audio_nll_unrelated_image']:.3f}"
            for r in rows
        ],
        [
            "-"
            if not r.get("paper_ocr_vqa_text_speech")
            else "{} / {}".format(*r["paper_ocr_vqa_text_speech"])
            for r in rows
        ],
    ]
    fig = go.Figure(
        go.Table(
            columnwidth=[3.2, 1.4, 1, 1, 1, 1, 1, 1, 1.8],
            header={
                "values": header,
                "fill_color": "#dbe9f6",
                "align": "left",
                "font": {"size": 11},
            },
            cells={"values": cells, "align": "left", "height": 26, "font": {"size": 11}},
        )
    )
    return finish(
        fig,
        height=120 + 30 * len(rows),
        title=f"gating x sharing, init: equal compute ({ablations.get('steps_per_variant', '?')} steps "
        "x batch {}), ours beside the paper's Table 5".format(ablations.get("batch_size", "?")),
        width=1100,
    )


# ---------------------------------------------------------------------- 8. prosody


def prosody_figure(report: Mapping[str, Any]) -> go.Figure:
    """Prosody of the generated replies against a TTS reference of the same words, before
    (gates forced to 0: the base LM), after adaptation, and across the p_audio sweep.
    ``report``: ``interp/prosody.json``."""
    from moshivis_lab.viz.prosody import prosody_summary_figure

    summary = report.get("summary") or {}
    if not summary:
        raise FigureDataError(
            "interp/prosody.json has no comparison: the model said nothing after the questions "
            "(expected at smoke size)"
        )
    return prosody_summary_figure(
        summary, title="prosody kept? generated reply vs the TTS reference of its words"
    )


# ---------------------------------------------------------------------- 9. latency


def vision_latency_figure(latency: Mapping[str, Any]) -> go.Figure:
    """Step time with the image's K/V cached over the no-image step, vs the number of image
    tokens (line: best of repeats over best of repeats; grey: paired per-repeat ratios,
    median and min-max), beside the paper's 55 / 48 ms at 1024
    tokens and the real-time budget (80 ms over the paper's 48 ms base). ``latency``:
    ``latency.measure_latency`` output."""
    rows = [r for r in latency.get("rows", [])]
    if not rows:
        raise FigureDataError("latency.json has no measurement")
    x = [str(r["image_tokens"]) for r in rows]
    y = [r.get("ratio", r["ratio_median"]) for r in rows]
    m = latency.get("model", {})
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers",
            name=f"ours, tiny MoshiVis (dim {m.get('dim', '?')}, {m.get('xa_layers', '?')} layers), best of repeats",
            customdata=[r["step_ms_min"] for r in rows],
            hovertemplate="%{x} tokens: x%{y:.3f} (%{customdata:.2f} ms)<extra></extra>",
            line={"color": _BLUE},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[r["ratio_median"] for r in rows],
            mode="markers",
            name="paired per repeat: median (whiskers min-max)",
            marker={"color": _GREY, "size": 7},
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [r["ratio_max"] - r["ratio_median"] for r in rows],
                "arrayminus": [r["ratio_median"] - r["ratio_min"] for r in rows],
                "color": _GREY,
            },
        )
    )
    paper = latency.get("paper") or {}
    if paper.get("ratio"):
        fig.add_trace(
            go.Scatter(
                x=[str(paper["image_tokens"])],
                y=[paper["ratio"]],
                mode="markers",
                marker={"symbol": "star", "size": 14, "color": _RED},
                name=f"paper: {paper['base_ms']:.0f} + {paper['vision_ms']:.0f} ms "
                f"(x{paper['ratio']:.2f}), Moshi 7B",
            )
        )
    if paper.get("budget_ms") and paper.get("base_ms"):
        b = paper["budget_ms"] / paper["base_ms"]
        fig.add_hline(
            y=b,
            line={"dash": "dot", "color": _GREY},
            annotation_text=f"real-time budget {paper['budget_ms']:.0f} ms over the paper's base",
            annotation_position="bottom right",
        )
    fig.add_hline(y=1.0, line={"color": "black", "width": 0.8})
    fig.update_xaxes(title="image tokens (0 = no image)", type="category")
    fig.update_yaxes(title="step time / no-image step", rangemode="tozero")
    return finish(
        fig,
        height=400,
        title=f"vision overhead per 80 ms streaming step, image K/V cached "
        f"({latency.get('repeats', '?')} repeats, {latency.get('threads', '?')} thread)",
        legend={"orientation": "h", "y": -0.2},
    )


# ---------------------------------------------------------------------- the batch


def _gates_pair(src: Sources) -> tuple[Any, Any]:
    if not hasattr(src, "_gate_pair"):
        src._gate_pair = topic_switch_trace(src)  # type: ignore[attr-defined]
    return src._gate_pair  # type: ignore[attr-defined]


def _interp(src: Sources) -> Any:
    return src.json(src.interp_rel, "interp")


def _gate_auroc_from(src: Sources) -> go.Figure:
    if src.has(src.interp_rel):
        g = _interp(src)["gates"]
        return gate_auroc_figure(g["relevance_auroc"], g.get("segments_by_topic"))
    if src.has(f"{src.run_dir}/eval.json"):  # the evaluation's AUROC (no per-layer values)
        return gate_auroc_figure(src.json(f"{src.run_dir}/eval.json", "eval")["gates"])
    return gate_auroc_figure(_interp(src)["gates"]["relevance_auroc"])  # raises with the hint


def _attention_from(src: Sources) -> go.Figure:
    from moshivis_lab.interp.attention import question_maps

    items = attention_grid_items(src, 4)
    qm = question_maps(src.model, src.cfg, items, tokenizer=src.tokenizer, encoder=src.encoder)
    return attention_grid_paper_figure(qm)


def _latency_from(src: Sources) -> go.Figure:
    from moshivis_lab.figures.latency import measure_latency

    return vision_latency_figure(measure_latency(src.cfg))


FIGURES: dict[str, Callable[[Sources], go.Figure]] = {
    "adapter_architecture": _adapter_from,
    "gates_topic_switch": lambda s: gates_topic_switch_figure(*_gates_pair(s)),
    "gates_heatmap": lambda s: gates_heatmap_figure(*_gates_pair(s)),
    "gate_auroc": _gate_auroc_from,
    "attention_grid": _attention_from,
    "pointing_attribution": lambda s: pointing_attribution_figure(_interp(s)),
    "p_audio_sweep": lambda s: p_audio_sweep_figure(
        s.json("ablations/ablations.json", "ablations")
    ),
    "gating_sharing_table": lambda s: gating_sharing_table_figure(
        s.json("ablations/ablations.json", "ablations")
    ),
    "prosody": lambda s: prosody_figure(s.json("interp/prosody.json", "prosody")),
    "vision_latency": _latency_from,
}
"""Every paper figure: name -> builder of a ``Sources``, in the order of the report."""


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Any:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_figures(
    cfg: Any,
    out_dir: str | Path,
    run: str = "main",
    progress: bool = True,
    *,
    names: Sequence[str] | None = None,
    formats: Sequence[str] = ("png", "svg"),
    threads: int | None = 1,
) -> dict[str, dict[str, Any]]:
    """Build and write every paper figure of preset ``cfg`` and adapter run ``run`` to
    ``out_dir`` (PNG + SVG + HTML each), and ``out_dir/figures.json``.

    Returns ``{name: {"png", "svg", "html": path | None, "seconds": build + export time,
    "export_seconds", "error": None | str}}``. A figure whose artefact is missing (or whose
    export fails) gets an ``error`` saying what to run; the others are still made. ``names``:
    a subset of ``FIGURES``; ``threads``: torch threads while building (1 on a shared machine).
    """
    from tqdm.auto import tqdm

    from moshivis_lab.artefacts import write_json
    from moshivis_lab.figures.export import export_session, write_figure

    names = list(FIGURES) if names is None else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figures {unknown}; choose from {list(FIGURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Sources(cfg, run)
    result: dict[str, dict[str, Any]] = {}
    with _torch_threads(threads), export_session():
        bar = tqdm(names, desc="paper figures", disable=not progress, unit="fig")
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            rec: dict[str, Any] = {f: None for f in formats}
            rec.update({"html": None, "error": None})
            try:
                fig = FIGURES[name](src)
            except Exception as e:  # noqa: BLE001 - recorded; the other figures go on
                rec["error"] = f"{type(e).__name__}: {e}"
                fig = None
            if fig is not None:
                try:
                    w = write_figure(fig, out, name, formats)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"export failed: {type(e).__name__}: {e}"
                else:
                    rec.update({k: w.get(k) for k in (*formats, "html")})
                    rec["export_seconds"] = w["seconds"]
                    rec["error"] = w["error"]
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            result[name] = rec
    write_json(out / "figures.json", result)
    return result
