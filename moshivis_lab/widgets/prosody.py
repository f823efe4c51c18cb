"""``ProsodyViewer``: two renditions side by side, F0 and energy, with their audio.

A thin view over ``interp.prosody`` (renditions, ``compare``) and ``viz.prosody`` (figures)::

    report = prosody_report(cfg)                 # or any list of Rendition objects
    ProsodyViewer(report)                        # pick two renditions, listen, compare
    ProsodyViewer.from_audio({"mine": (wav, sr), "yours": "other.wav"})

Controls: ``left`` / ``right`` (dropdowns over the renditions), ``method`` (the F0 tracker).
Views: ``pair_figure`` (F0 over energy, both overlaid), ``distribution_figure`` (F0 violins),
``metrics`` (HTML table of ``compare_prosody``, left as the reference), ``left_audio`` /
``right_audio`` with ``left_label`` / ``right_label``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets

from moshivis_lab.interp.prosody import (
    METHODS,
    REFERENCE,
    ProsodyReport,
    Rendition,
    analyse,
    audio_rendition,
    compare,
)
from moshivis_lab.viz.prosody import f0_distribution_figure, prosody_pair_figure
from moshivis_lab.widgets._figure import FigurePane, audio_player, set_audio

METRIC_ROWS = (
    ("f0_median_ratio", "F0 median ratio (right / left)"),
    ("f0_shift_semitones", "F0 shift (semitones)"),
    ("f0_correlation", "F0 contour correlation"),
    ("f0_rmse_semitones", "F0 RMSE (semitones)"),
    ("energy_correlation", "energy correlation"),
    ("speaking_rate_ratio", "speaking rate ratio"),
    ("voicing_agreement", "voicing agreement"),
    ("alignment", "frames aligned by"),
)
SUMMARY_ROWS = (
    ("f0_median", "F0 median (Hz)"),
    ("f0_std", "F0 spread (semitones)"),
    ("speaking_rate", "speaking rate"),
    ("pause_count", "pauses"),
    ("pause_total_s", "pause time (s)"),
    ("duration", "duration (s)"),
)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return html.escape(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return f"{f:.3g}" if f == f else "—"


def metrics_html(left: Rendition, right: Rendition, method: str) -> str:
    """A table: each rendition's summary, then how ``right`` differs from ``left``."""
    pl, pr = left.prosody[method], right.prosody[method]
    rows = [
        f"<tr><td>{label}{' (' + pl.rate_unit + ')' if key == 'speaking_rate' else ''}</td>"
        f"<td>{_fmt(pl.summary.get(key))}</td><td>{_fmt(pr.summary.get(key))}</td></tr>"
        for key, label in SUMMARY_ROWS
    ]
    cmp = compare(left, right, method).metrics
    rows += [
        f'<tr><td>{label}</td><td colspan="2" style="text-align:center">{_fmt(cmp.get(key))}</td></tr>'
        for key, label in METRIC_ROWS
    ]
    head = f"<tr><th></th><th>{html.escape(left.name)}</th><th>{html.escape(right.name)}</th></tr>"
    return f'<table style="font-size:12px">{head}{"".join(rows)}</table>'


def _default_pair(renditions: Sequence[Rendition]) -> tuple[int, int]:
    """A generated reply and its TTS reference when there is one, else the first two."""
    for i, r in enumerate(renditions):
        if r.kind == "generated":
            for j, s in enumerate(renditions):
                if s.kind == REFERENCE and s.condition == r.condition and s.item == r.item:
                    return j, i
    return 0, min(1, len(renditions) - 1)


class ProsodyViewer:
    """Compare the prosody of two renditions (see the module docstring).

    ``renditions``: a ``ProsodyReport``, a sequence of ``Rendition`` or a mapping name ->
    ``Rendition``; ``left`` / ``right``: initial choices (index or name).
    """

    def __init__(
        self,
        renditions: ProsodyReport | Sequence[Rendition] | Mapping[str, Rendition],
        *,
        left: int | str | None = None,
        right: int | str | None = None,
        method: str | None = None,
    ) -> None:
        if isinstance(renditions, ProsodyReport):
            items = list(renditions.renditions)
        elif isinstance(renditions, Mapping):
            items = list(renditions.values())
        else:
            items = list(renditions)
        if not items:
            raise ValueError("no renditions to show")
        for r in items:
            if not isinstance(r, Rendition):
                raise ValueError(
                    f"expected Rendition objects (interp.prosody), got {type(r).__name__}"
                )
        self.renditions = items
        methods = [m for m in METHODS if any(m in r.prosody for r in items)] or ["pyin"]
        if method is not None and method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        options = [
            (f"{r.name} — {r.text[:40]}" if r.text else r.name, i) for i, r in enumerate(items)
        ]
        a, b = _default_pair(items)
        self.left = widgets.Dropdown(
            options=options, value=self._index(left, a), description="left"
        )
        self.right = widgets.Dropdown(
            options=options, value=self._index(right, b), description="right"
        )
        self.method = widgets.ToggleButtons(
            options=methods, value=method if method in methods else methods[0]
        )
        self.left_label = widgets.HTML("")
        self.right_label = widgets.HTML("")
        self.left_audio = audio_player()
        self.right_audio = audio_player()
        self.metrics = widgets.HTML("")
        self.pair_pane = FigurePane()
        self.distribution_pane = FigurePane()
        for w in (self.left, self.right, self.method):
            w.observe(self._update, names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.left, self.right]),
                self.method,
                widgets.HBox(
                    [
                        widgets.VBox([self.left_label, self.left_audio]),
                        widgets.VBox([self.right_label, self.right_audio]),
                    ]
                ),
                self.pair_pane.widget,
                widgets.HBox([self.distribution_pane.widget, self.metrics]),
            ]
        )
        self._update()

    @classmethod
    def from_audio(
        cls,
        sources: Mapping[str, Any],
        *,
        methods: Sequence[str] = ("pyin",),
        **kw: Any,
    ) -> ProsodyViewer:
        """Renditions from ``{name: (wav, sample_rate)}`` or ``{name: path to an audio file}``
        (analysed here; any rate, mono or stereo)."""
        from moshivis_lab.audio.io import load_audio

        items = []
        for name, src in sources.items():
            if isinstance(src, str | os.PathLike):
                wav, sr = load_audio(src, 16000, min_seconds=0.05), 16000
            elif isinstance(src, tuple) and len(src) == 2:
                wav, sr = src
            else:
                raise ValueError(f"{name}: give (wav, sample_rate) or a path to an audio file")
            items.append(audio_rendition(name, wav, int(sr), methods=methods))
        return cls(items, **kw)

    def _index(self, which: int | str | None, default: int) -> int:
        if which is None:
            return default
        if isinstance(which, int):
            if not 0 <= which < len(self.renditions):
                raise ValueError(f"index must be in [0, {len(self.renditions)}), got {which}")
            return which
        for i, r in enumerate(self.renditions):
            if r.name == which:
                return i
        raise ValueError(f"no rendition named {which!r}; have {[r.name for r in self.renditions]}")

    @property
    def pair_figure(self) -> Any:
        """The live F0 / energy figure."""
        return self.pair_pane.figure

    @property
    def distribution_figure(self) -> Any:
        """The live F0 distribution figure."""
        return self.distribution_pane.figure

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _rendition(self, index: int, method: str) -> Rendition:
        r = self.renditions[index]
        if method not in r.prosody:  # analysed on demand, once
            r.prosody.update(analyse(r.wav, r.sample_rate, r.words or None, (method,)))
        return r

    def _update(self, _change: Any = None) -> None:
        m = self.method.value
        a = self._rendition(int(self.left.value), m)
        b = self._rendition(int(self.right.value), m)
        names = (a.name, b.name) if a.name != b.name else (f"{a.name} (left)", f"{b.name} (right)")
        self.pair_pane.show(
            prosody_pair_figure(
                a.prosody[m], b.prosody[m], names=names, title=f"F0 and energy ({m})"
            )
        )
        self.distribution_pane.show(
            f0_distribution_figure(
                {names[0]: a.prosody[m], names[1]: b.prosody[m]}, title="voiced F0"
            )
        )
        self.metrics.value = metrics_html(a, b, m)
        for r, label, audio in (
            (a, self.left_label, self.left_audio),
            (b, self.right_label, self.right_audio),
        ):
            label.value = (
                f"<b>{html.escape(r.name)}</b>: {html.escape(r.text) or '<i>(no text)</i>'}"
            )
            set_audio(audio, r.wav, r.sample_rate)
