"""What every widget here shares: a plotly figure kept live in a layout, and WAV bytes for players.

``FigurePane`` holds a ``plotly.graph_objects.FigureWidget`` (plotly's own widget; plotly >= 6
needs the ``anywidget`` package for it). Where that cannot be built, it holds a plain ``Figure``
redrawn into an ``ipywidgets.Output`` instead: the same ``.figure`` API either way (``data``,
``layout``), so callers and tests never care which. New figures are copied into the pane's
figure in place (``sync_figure``), so a view's figure object stays the same across updates.
"""

from __future__ import annotations

import io
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go


def figure_widget_available() -> bool:
    """Whether plotly can build a ``FigureWidget`` here (it needs ``anywidget``)."""
    try:
        go.FigureWidget()
    except ImportError:
        return False
    return True


def _same_structure(a: Any, b: Any) -> bool:
    return len(a.data) == len(b.data) and all(
        x.type == y.type for x, y in zip(a.data, b.data, strict=True)
    )


def sync_figure(target: go.Figure, source: go.Figure) -> go.Figure:
    """Make ``target`` (a ``Figure`` or ``FigureWidget``) show ``source``, in place.

    With the same traces (count and types), each trace is updated (a FigureWidget then sends only
    what changed); otherwise the traces are replaced. The layout is always replaced. Properties
    that ``source`` lacks are unset first: a FigureWidget's browser view only applies the keys it
    is sent, so a placeholder's annotation would otherwise stay drawn over the new figure.
    """
    if _same_structure(target, source):
        with target.batch_update():
            for old, new in zip(target.data, source.data, strict=True):
                props = new.to_plotly_json()
                props.pop("type", None)
                props.pop("uid", None)
                _unset_missing(old, props)
                old.update(props, overwrite=True)
    else:
        target.data = ()
        target.add_traces(list(source.data))
    _unset_missing(target.layout, source.layout.to_plotly_json())
    target.layout = source.layout
    return target


def _unset_missing(obj: Any, keep: dict) -> None:
    """Set to None every top-level property of ``obj`` (a trace or layout) not in ``keep``."""
    for key in list(obj.to_plotly_json()):
        if key not in keep and key not in ("type", "uid", "template"):
            obj[key] = None


def placeholder_figure(text: str, height: int = 260) -> go.Figure:
    """An empty figure that says ``text`` (before anything has run)."""
    fig = go.Figure()
    fig.add_annotation(
        text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


class FigurePane:
    """A plotly figure inside an ipywidgets layout that can be replaced in place.

    ``figure``: the live figure (a ``FigureWidget`` when available, else a ``Figure``);
    ``widget``: what to put in a layout (the FigureWidget itself, or an ``Output`` it is drawn
    into); ``show(fig)`` copies ``fig`` into ``figure`` and redraws.
    """

    def __init__(self, fig: go.Figure | None = None, *, live: bool | None = None) -> None:
        fig = fig if fig is not None else placeholder_figure("nothing yet")
        self.live = figure_widget_available() if live is None else live
        if self.live:
            self.figure: go.Figure = go.FigureWidget(fig)
            self.widget: widgets.Widget = self.figure  # type: ignore[assignment]
        else:
            self.figure = go.Figure(fig)
            self.widget = widgets.Output()
            self._draw()

    def show(self, fig: go.Figure) -> go.Figure:
        """Show ``fig`` (copied into ``figure``, which stays the same object)."""
        sync_figure(self.figure, fig)
        if not self.live:
            self._draw()
        return self.figure

    def _draw(self) -> None:
        from IPython import get_ipython
        from IPython.display import clear_output, display

        if get_ipython() is None:  # no kernel (a script, pytest): nothing to draw into
            return
        with self.widget:  # type: ignore[attr-defined]
            clear_output(wait=True)
            display(self.figure)


def wav_bytes(wav: np.ndarray, sample_rate: int) -> bytes:
    """A mono float waveform as the bytes of a 16-bit WAV file (for ``ipywidgets.Audio``)."""
    import soundfile as sf

    a = np.asarray(wav, dtype=np.float32).ravel()
    if a.size == 0:
        return b""
    peak = float(np.abs(a).max())
    if peak > 1.0:
        a = a / peak
    buf = io.BytesIO()
    sf.write(buf, a, int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_player(wav: np.ndarray | None = None, sample_rate: int = 24000) -> widgets.Audio:
    """An ``ipywidgets.Audio`` player (WAV, no autoplay), empty when ``wav`` is None."""
    value = b"" if wav is None else wav_bytes(wav, sample_rate)
    return widgets.Audio(value=value, format="wav", autoplay=False, loop=False)


def set_audio(player: widgets.Audio, wav: np.ndarray | None, sample_rate: int) -> None:
    """Load ``wav`` into ``player`` (empty when None)."""
    player.value = b"" if wav is None else wav_bytes(wav, sample_rate)


def status_html(text: str, error: bool = False) -> str:
    """A one-line status message (red when ``error``)."""
    import html

    colour = "#c0392b" if error else "#555"
    return f'<span style="color:{colour}">{html.escape(text)}</span>'


def world_image_dropdown(engine: Any, split: str, image: int | str) -> widgets.Dropdown:
    """A dropdown of the world's ``split`` images (the shipped photographs for a released model
    or an engine without a config; empty when the world is not built), ``image`` selected.

    ``image``: an index into the split's images or an image id; anything else selects the first.
    """
    try:
        ids = engine.world_images(split)
    except FileNotFoundError:
        ids = []
    value = None
    if isinstance(image, int) and 0 <= image < len(ids):
        value = ids[image]
    elif isinstance(image, str) and image in ids:
        value = image
    return widgets.Dropdown(
        options=ids, value=value or (ids[0] if ids else None), description="image"
    )
