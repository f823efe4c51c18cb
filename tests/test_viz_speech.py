"""The speech-LM plots: figure data shapes and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshivis_lab.model import delay_codes
from moshivis_lab.viz.speech import (
    delayed_vs_aligned_figure,
    grid_row_labels,
    token_grid_figure,
    training_curves_figure,
)


def _grid(rows: int = 17, frames: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 50, size=(rows, frames)).astype(np.int16)
    g[:, -2:] = -1  # zero-token padding
    return g


def test_row_labels() -> None:
    labels = grid_row_labels(17, 8)
    assert labels[0] == "text" and labels[1] == "moshi cb0" and labels[8] == "moshi cb7"
    assert labels[9] == "user cb0" and labels[-1] == "user cb7" and len(labels) == 17
    with pytest.raises(ValueError):
        grid_row_labels(3, 8)


def test_token_grid_figure_shapes() -> None:
    g = _grid()
    fig = token_grid_figure(g, "grid", grid_row_labels(17))
    (hm,) = fig.data
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == (17, 12)
    assert np.isnan(z[:, -2:]).all()  # -1 is blank
    assert np.nanmin(z) >= 0 and np.nanmax(z) <= 1
    assert list(hm.y)[0] == "text"
    assert np.array_equal(np.asarray(hm.customdata), g)


def test_token_grid_figure_marks_initial_tokens() -> None:
    g = _grid(3, 6)
    g[:, 0] = [100, 200, 200]
    fig = token_grid_figure(g, "t", initial=[100, 200, 200])
    z = np.asarray(fig.data[0].z, dtype=float)
    assert (z[:, 0] < 0).all() and (np.nan_to_num(z[:, 1:], nan=0.0) >= 0).all()


@pytest.mark.parametrize(
    "bad",
    [np.zeros(5, dtype=int), np.zeros((0, 4), dtype=int), np.zeros((2, 3), dtype=float)],
)
def test_token_grid_figure_bad_grid(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        token_grid_figure(bad, "bad")


def test_token_grid_figure_bad_labels() -> None:
    with pytest.raises(ValueError, match="row labels"):
        token_grid_figure(_grid(), "x", ["text"])


def test_delayed_vs_aligned_figure() -> None:
    g = _grid()
    delays = [0] + [0] + [1] * 7 + [0] + [1] * 7
    initial = torch.tensor([1000] + [256] * 16)
    d = delay_codes(torch.from_numpy(g.astype(np.int64))[None], delays, initial)[0].numpy()
    fig = delayed_vs_aligned_figure(g, d, grid_row_labels(17), initial.tolist(), delays)
    assert len(fig.data) == 2
    za, zd = (np.asarray(t.z, dtype=float) for t in fig.data)
    assert za.shape == zd.shape == (17, 12)
    assert (zd[[k for k, x in enumerate(delays) if x], 0] < 0).all()  # delayed rows start initial
    assert list(fig.data[0].y)[2] == "moshi cb1 (+1)"
    with pytest.raises(ValueError, match="differ in shape"):
        delayed_vs_aligned_figure(g, d[:, :-1])
    with pytest.raises(ValueError, match="delays"):
        delayed_vs_aligned_figure(g, d, delays=[0, 1])


def test_training_curves_figure() -> None:
    metrics = [
        {"step": s, "split": "train", "loss": 5.0 / s, "text_loss": 3.0 / s, "lr": 1e-3}
        for s in range(1, 7)
    ] + [{"step": 3, "split": "val", "loss": 2.0}, {"step": 6, "split": "val", "loss": 1.0}]
    fig = training_curves_figure(metrics)
    names = [t.name for t in fig.data]
    assert names == ["train loss", "val loss", "train text_loss"]
    assert list(fig.data[0].x) == [1, 2, 3, 4, 5, 6]
    assert list(fig.data[1].y) == [2.0, 1.0]


@pytest.mark.parametrize("bad", [[], [{"loss": 1.0}], [{"step": 1, "split": "train", "x": 1.0}]])
def test_training_curves_figure_bad(bad: list[dict]) -> None:
    with pytest.raises(ValueError):
        training_curves_figure(bad)
