"""The house style shared by every plot: one place for titles, sizes and margins."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

MARGIN = {"l": 50, "r": 10, "t": 50, "b": 40}


def finish(fig: go.Figure, *, height: int, title: str | None = None, **layout: Any) -> go.Figure:
    """Apply the house layout (title, height, margins, plus any plotly layout keys) and return ``fig``."""
    fig.update_layout(title=title, height=height, margin=MARGIN, **layout)
    return fig
