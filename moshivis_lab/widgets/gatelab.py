"""``GateLab``: force the gates live and hear and read what changes.

The same question about the same image is answered twice with the same seed: unchanged
(``before``) and with the gates forced (``after``): set to a value (0 = the base speech LM,
1 = ungated) or scaled, in every cross-attention layer or in chosen ones. A thin view over
``interp.conversation`` (``ConversationEngine.compare``, ``changed_fraction``),
``interp.gates.GateIntervention`` and ``viz.interp.gate_heatmap_figure``.

Controls: ``image_select``, ``prompt_text``, ``mode`` ("value" or "scale"), ``amount``,
``layers`` (``"all"`` or layer indices), ``seed``, ``run_button``. Views: ``before_text`` /
``after_text`` (HTML), ``before_audio`` / ``after_audio``, ``before_gates`` / ``after_gates``
(heatmaps), ``status``; the last results are ``before`` and ``after``.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from moshivis_lab.interp.conversation import Conversation, ConversationEngine, changed_fraction
from moshivis_lab.interp.gates import GateIntervention
from moshivis_lab.viz.interp import gate_heatmap_figure
from moshivis_lab.widgets._figure import (
    FigurePane,
    audio_player,
    placeholder_figure,
    set_audio,
    status_html,
    world_image_dropdown,
)
from moshivis_lab.widgets.conversation import DEFAULT_PROMPT, transcript_html

RANGES = {"value": (0.0, 1.0, 0.05), "scale": (0.0, 4.0, 0.1)}


class GateLab:
    """Before / after a gate intervention (see the module docstring)."""

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
        self.before: Conversation | None = None
        self.after: Conversation | None = None
        self.image_select = world_image_dropdown(engine, split, image)
        self.prompt_text = widgets.Text(value=prompt, description="question")
        self.mode = widgets.ToggleButtons(
            options=[("force g to", "value"), ("scale g by", "scale")], value="value"
        )
        lo, hi, step = RANGES["value"]
        self.amount = widgets.FloatSlider(
            value=0.0, min=lo, max=hi, step=step, description="amount", continuous_update=False
        )
        self.layers = widgets.SelectMultiple(
            options=[("all layers", "all")] + [(f"layer {i}", i) for i in engine.layers],
            value=("all",),
            description="layers",
            rows=min(8, len(engine.layers) + 1),
        )
        self.seed = widgets.IntText(value=0, description="seed")
        self.run_button = widgets.Button(
            description="Run before / after", button_style="primary", icon="play"
        )
        self.status = widgets.HTML(status_html("set an intervention, then Run"))
        self.before_text = widgets.HTML("")
        self.after_text = widgets.HTML("")
        self.before_audio = audio_player()
        self.after_audio = audio_player()
        self.before_gates = FigurePane(placeholder_figure("gates before", 220))
        self.after_gates = FigurePane(placeholder_figure("gates after", 220))

        self.mode.observe(self._on_mode, names="value")
        self.run_button.on_click(lambda _b: self.run())

        def side(title: str, text: Any, audio: Any, gates: FigurePane) -> widgets.VBox:
            return widgets.VBox([widgets.HTML(f"<b>{title}</b>"), audio, text, gates.widget])

        self.widget = widgets.VBox(
            [
                widgets.HBox([self.image_select, self.prompt_text]),
                widgets.HBox([self.mode, self.amount]),
                widgets.HBox([self.layers, widgets.VBox([self.seed, self.run_button])]),
                self.status,
                widgets.HBox(
                    [
                        side(
                            "before (unchanged)",
                            self.before_text,
                            self.before_audio,
                            self.before_gates,
                        ),
                        side(
                            "after (intervention)",
                            self.after_text,
                            self.after_audio,
                            self.after_gates,
                        ),
                    ]
                ),
            ]
        )
        if run:
            self.run()

    @property
    def before_gate_figure(self) -> Any:
        """The live heatmap of the unchanged run's gates."""
        return self.before_gates.figure

    @property
    def after_gate_figure(self) -> Any:
        """The live heatmap of the intervened run's gates."""
        return self.after_gates.figure

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_mode(self, _change: Any = None) -> None:
        lo, hi, step = RANGES[self.mode.value]
        self.amount.max = hi  # the slider clamps its value into the new range
        self.amount.min, self.amount.step = lo, step
        self.amount.value = 0.0 if self.mode.value == "value" else 1.0

    def intervention(self) -> GateIntervention:
        """The intervention the controls describe."""
        chosen = tuple(self.layers.value)
        if not chosen:
            raise ValueError("choose at least one layer (or all layers)")
        layers = None if "all" in chosen else tuple(int(i) for i in chosen)
        amount = float(self.amount.value)
        if self.mode.value == "value":
            return GateIntervention(value=amount, layers=layers)
        return GateIntervention(scale=amount, layers=layers)

    def run(self) -> tuple[Conversation, Conversation] | None:
        """Answer the question unchanged and with the intervention; errors go to ``status``."""
        self.status.value = status_html("running...")
        try:
            iv = self.intervention()
            if self.image_select.value is None:
                raise ValueError("no world image to choose")
            before, after = self.engine.compare(
                self.image_select.value,
                self.prompt_text.value,
                iv,
                split=self.split,
                seed=int(self.seed.value),
                **self.run_kw,
            )
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            self.status.value = status_html(f"error: {e}", error=True)
            return None
        self.show(before, after)
        return before, after

    def show(self, before: Conversation, after: Conversation) -> None:
        """Show a before / after pair."""
        self.before, self.after = before, after
        top = max(float(before.gates.max()), float(after.gates.max()), 1e-6)
        for conv, text, audio, pane, name in (
            (before, self.before_text, self.before_audio, self.before_gates, "before"),
            (after, self.after_text, self.after_audio, self.after_gates, "after"),
        ):
            text.value = transcript_html(conv)
            set_audio(audio, conv.assistant_wav, conv.sample_rate)
            pane.show(
                gate_heatmap_figure(
                    conv.gates,
                    title=f"gates {name}",
                    layer_labels=[f"layer {i}" for i in conv.layers],
                    zmax=top,
                )
            )
        changed = changed_fraction(before, after)
        label = after.intervention.name if after.intervention is not None else "no intervention"
        self.status.value = (
            status_html(
                f"{label}: {changed['text']:.0%} of text tokens and {changed['audio']:.0%} of "
                "audio frames changed."
            )
            + f"<br><b>before:</b> {html.escape(before.reply_text or '(nothing)')}"
            + f"<br><b>after:</b> {html.escape(after.reply_text or '(nothing)')}"
        )
