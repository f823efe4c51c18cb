"""``ConversationExplorer``: ask MoshiVis about an image and scrub through what happened.

A thin view over ``interp.conversation`` (the run) and ``viz.interp`` (the figures)::

    engine = ConversationEngine.load(cfg, run="main")
    explorer = ConversationExplorer(engine)      # display it in a notebook cell
    explorer.run()                               # or press "Run"

Controls (attributes, so code and tests can drive them): ``image_select`` (a world image),
``image_path`` (or any image file), ``prompt_mode`` ("text" or "audio file"), ``prompt_text``,
``audio_path``, ``seed``, ``extra_seconds``, ``run_button``, ``step_slider`` (the timeline),
``layer_select`` (attention of one layer or the mean). Views: ``transcript`` (HTML, each text
piece coloured by its gate), ``gate_figure`` (layer x step heatmap, the current step marked),
``attention_figure`` (the image under the cross-attention of the current step), ``user_audio``
and ``assistant_audio`` players, ``status``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np

from moshivis_lab.interp.conversation import Conversation, ConversationEngine
from moshivis_lab.viz.interp import attention_overlay_figure, gate_heatmap_figure
from moshivis_lab.widgets._figure import (
    FigurePane,
    audio_player,
    placeholder_figure,
    set_audio,
    status_html,
    world_image_dropdown,
)

DEFAULT_PROMPT = "What colour is the star?"


def piece_text(piece: str) -> str:
    """A SentencePiece piece as it reads (the word boundary ``▁`` becomes a space)."""
    return piece.replace("\u2581", " ")


def transcript_html(conv: Conversation, step: int | None = None, last: int = 10) -> str:
    """The assistant's text pieces, each on a background as strong as its gate score (mean of
    the last ``last`` layers, scaled to the conversation's largest), the piece at or before
    ``step`` outlined, a bar where the prompt ends. Hover a piece for its step and gate."""
    score = conv.gate_score(last)
    top = float(score.max()) if score.size and float(score.max()) > 0 else 1.0
    current = None
    if step is not None:
        said = [t for t in range(min(int(step), conv.n_steps - 1) + 1) if conv.pieces[t]]
        current = said[-1] if said else None
    parts: list[str] = []
    marked = False
    for t, piece in enumerate(conv.pieces):
        if t >= conv.prompt_end_step and not marked:
            parts.append(
                '<span title="the whole prompt was heard here" '
                'style="color:#1f77b4;font-weight:bold">&#x2016;</span>'
            )
            marked = True
        if not piece:
            continue
        g = float(score[t])
        alpha = min(max(g / top, 0.0), 1.0)
        outline = "outline:2px solid #00bcd4;" if t == current else ""
        parts.append(
            f'<span title="step {t} ({t / conv.frame_rate:.2f} s) · gate {g:.4f}" '
            f'style="background:rgba(255,140,0,{alpha:.2f});{outline}'
            f'border-radius:3px;white-space:pre">{html.escape(piece_text(piece))}</span>'
        )
    body = "".join(parts) or "<i>(the assistant wrote nothing)</i>"
    asked = html.escape(conv.prompt) if conv.prompt else "<i>(recording)</i>"
    prompt = f"<div><b>user:</b> {asked}</div>"
    return (
        f'<div style="font-family:monospace;line-height:1.8">{prompt}'
        f"<div><b>assistant:</b> {body}</div></div>"
    )


class ConversationExplorer:
    """Run a streaming conversation about an image and explore it step by step (see the module
    docstring). ``image``: the initial world image (index or id); ``run``: run at once."""

    def __init__(
        self,
        engine: ConversationEngine,
        *,
        split: str = "test",
        image: int | str = 0,
        prompt: str = DEFAULT_PROMPT,
        run: bool = False,
        **run_kw: Any,
    ) -> None:
        self.engine = engine
        self.split = split
        self.run_kw = run_kw
        self.conversation: Conversation | None = None
        self.image_select = world_image_dropdown(engine, split, image)
        self.image_path = widgets.Text(
            value="", placeholder="or a path to an image file", description="image file"
        )
        self.prompt_mode = widgets.ToggleButtons(
            options=[("ask by text (TTS)", "text"), ("ask with an audio file", "audio")],
            value="text",
        )
        self.prompt_text = widgets.Text(value=prompt, description="question")
        self.audio_path = widgets.Text(
            value="", placeholder="path to a wav / flac / ogg file", description="audio file"
        )
        self.seed = widgets.IntText(value=0, description="seed")
        self.extra_seconds = widgets.BoundedFloatText(
            value=float(self.run_kw.pop("extra_seconds", 3.2)),
            min=0.0,
            max=20.0,
            step=0.4,
            description="answer (s)",
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML(status_html("choose an image and a question, then Run"))
        self.step_slider = widgets.IntSlider(
            value=0, min=0, max=0, description="step", disabled=True, continuous_update=False
        )
        self.layer_select = widgets.Dropdown(
            options=[("mean of layers", -1)] + [(f"layer {i}", i) for i in engine.layers],
            value=-1,
            description="attention",
        )
        self.transcript = widgets.HTML("")
        self.user_audio = audio_player()
        self.assistant_audio = audio_player()
        self.gate_pane = FigurePane(placeholder_figure("gates per layer and step: press Run"))
        self.attention_pane = FigurePane(
            placeholder_figure("cross-attention at the chosen step", height=420)
        )

        self.run_button.on_click(lambda _b: self.run())
        self.step_slider.observe(self._on_step, names="value")
        self.layer_select.observe(self._on_step, names="value")
        self.prompt_mode.observe(self._on_mode, names="value")
        self._on_mode()

        ask = widgets.VBox([self.prompt_mode, self.prompt_text, self.audio_path])
        settings = widgets.HBox([self.seed, self.extra_seconds, self.run_button])
        players = widgets.HBox(
            [
                widgets.VBox([widgets.HTML("<b>user</b>"), self.user_audio]),
                widgets.VBox([widgets.HTML("<b>assistant</b>"), self.assistant_audio]),
            ]
        )
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.image_select, self.image_path]),
                ask,
                settings,
                self.status,
                players,
                self.transcript,
                widgets.HBox([self.step_slider, self.layer_select]),
                self.gate_pane.widget,
                self.attention_pane.widget,
            ]
        )
        if run:
            self.run()

    # ------------------------------------------------------------------ views

    @property
    def gate_figure(self) -> Any:
        """The live gate heatmap (a FigureWidget, or a Figure without anywidget)."""
        return self.gate_pane.figure

    @property
    def attention_figure(self) -> Any:
        """The live attention overlay."""
        return self.attention_pane.figure

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_mode(self, _change: Any = None) -> None:
        text = self.prompt_mode.value == "text"
        self.prompt_text.layout.display = None if text else "none"
        self.audio_path.layout.display = "none" if text else None

    def _image(self) -> Any:
        path = self.image_path.value.strip()
        if path:
            return path
        if self.image_select.value is None:
            raise ValueError("no world image to choose: give a path to an image file")
        return self.image_select.value

    def _prompt(self) -> Any:
        if self.prompt_mode.value == "text":
            return self.prompt_text.value
        path = self.audio_path.value.strip()
        if not path:
            raise ValueError("give the path of an audio file to ask with, or ask by text")
        return Path(path).expanduser()  # a Path is always read as audio, never spoken

    def run(self) -> Conversation | None:
        """Run the conversation the controls describe; errors are shown in ``status``."""
        self.status.value = status_html("running...")
        try:
            conv = self.engine.run(
                self._image(),
                self._prompt(),
                split=self.split,
                seed=int(self.seed.value),
                extra_seconds=float(self.extra_seconds.value),
                **self.run_kw,
            )
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            self.status.value = status_html(f"error: {e}", error=True)
            return None
        self.show(conv)
        return conv

    def show(self, conv: Conversation) -> None:
        """Show a recorded conversation (also one made elsewhere with the engine)."""
        self.conversation = conv
        set_audio(self.user_audio, conv.user_wav, conv.sample_rate)
        set_audio(self.assistant_audio, conv.assistant_wav, conv.sample_rate)
        start = min(conv.prompt_end_step, conv.n_steps - 1)
        with self.step_slider.hold_trait_notifications():
            self.step_slider.max = conv.n_steps - 1
            self.step_slider.disabled = False
        self.step_slider.value = start
        self._on_step()  # draws even when the value did not change
        where = conv.image_id or "an image file"
        self.status.value = status_html(
            f"{conv.n_steps} steps ({conv.duration:.1f} s) on {where}; reply: "
            f"{conv.reply_text or '(nothing)'}"
        )

    def _on_step(self, _change: Any = None) -> None:
        conv = self.conversation
        if conv is None:
            return
        step = int(self.step_slider.value)
        self.transcript.value = transcript_html(conv, step)
        tokens = [piece_text(p) or "·" for p in conv.pieces]
        self.gate_pane.show(
            gate_heatmap_figure(
                conv.gates,
                tokens=tokens,
                step=step,
                title=f"gates (channel mean) · step {step} = {step / conv.frame_rate:.2f} s",
                layer_labels=[f"layer {i}" for i in conv.layers],
                zmax=max(float(conv.gates.max()), 1e-6),
            )
        )
        if conv.image is None or conv.grid_side == 0:
            self.attention_pane.show(placeholder_figure("no image: no cross-attention", 420))
            return
        layer = self.layer_select.value
        layer = None if layer == -1 else int(layer)
        weights = conv.attention_map(step, layer)
        which = "mean of layers" if layer is None else f"layer {layer}"
        said = piece_text(conv.pieces[step]).strip() or "·"
        self.attention_pane.show(
            attention_overlay_figure(
                conv.image,
                weights,
                title=f"cross-attention at step {step} ({which}) · token {said!r}",
            )
        )

    def attention_weights(self) -> np.ndarray:
        """The patch-grid weights the overlay shows now."""
        if self.conversation is None:
            raise ValueError("nothing has run yet")
        layer = None if self.layer_select.value == -1 else int(self.layer_select.value)
        return self.conversation.attention_map(int(self.step_slider.value), layer)
