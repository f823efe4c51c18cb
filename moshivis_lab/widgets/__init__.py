"""Thin ipywidgets views over ``interp`` and ``viz`` (plotly figures, no custom JavaScript).

- ``ConversationExplorer``: ask about an image (by text or a recording), scrub the steps: the
  transcript coloured by gate, the layer x step gate heatmap, the cross-attention overlay, audio;
- ``GateLab``: force or scale the gates live; before / after text and audio;
- ``ProsodyViewer``: F0 and energy of two renditions side by side, with their audio.
"""

from moshivis_lab.widgets._figure import FigurePane, figure_widget_available
from moshivis_lab.widgets.conversation import ConversationExplorer
from moshivis_lab.widgets.gatelab import GateLab
from moshivis_lab.widgets.prosody import ProsodyViewer

__all__ = [
    "ConversationExplorer",
    "FigurePane",
    "GateLab",
    "ProsodyViewer",
    "figure_widget_available",
]
