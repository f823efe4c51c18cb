"""The gate's image relevance measured where it acts: per assistant position, per turn, all."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_lab.train.vis_eval import GATE_VIEWS, assistant_turns, gate_views


def test_assistant_turns_are_runs_of_one_topic():
    asst = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    rel = np.array([1, 1, 1, 1, 1, 0, 0, 0, -1, -1])
    # a run that changes topic is two turns; a run on padding is none
    assert assistant_turns(asst, rel) == [(1, 3, 1), (4, 5, 1), (5, 7, 0)]
    assert assistant_turns(np.zeros(4, bool), np.ones(4, int)) == []


def test_views_separate_what_the_gate_is_trained_on():
    # the gate is high on the assistant's image turn only; user tokens of either topic are low
    asst = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0], bool)
    rel = np.array([1, 1, 1, 1, 0, 0, 0, 0, -1])
    g = np.array([0.1, 0.1, 0.9, 0.8, 0.2, 0.2, 0.3, 0.2, 0.5])
    v = gate_views(g, rel, asst)
    assert set(v) == set(GATE_VIEWS)
    s, lab = v["assistant_positions"]
    assert s.tolist() == [0.9, 0.8, 0.3, 0.2] and lab.tolist() == [1, 1, 0, 0]
    s, lab = v["assistant_turns"]
    assert np.allclose(s, [0.85, 0.25]) and lab.tolist() == [1, 0]
    s, lab = v["all_positions"]
    assert len(s) == 8  # padding dropped
    from sklearn.metrics import roc_auc_score

    # where the gate acts it separates perfectly; over all positions the user's tokens blur it
    assert roc_auc_score(*v["assistant_positions"][::-1]) == 1.0
    assert roc_auc_score(*v["all_positions"][::-1]) < 0.9


def test_gate_auroc_reports_three_views_per_kind(smoke_pretrained):
    import torch

    from moshivis_lab.train.adapters import build_model
    from moshivis_lab.train.image_tokens import split_tokens
    from moshivis_lab.train.mix import MixConfig, MixedData
    from moshivis_lab.train.vis_eval import gate_auroc
    from moshivis_lab.vision.pretrain import load_vision_encoder

    cfg = smoke_pretrained
    torch.manual_seed(0)
    enc = load_vision_encoder(cfg)
    model = build_model(cfg, image_dim=enc.hidden_size).eval()
    val = MixedData(cfg, "val", MixConfig(p_audio=0.5, p_concat=1.0))
    table = split_tokens(cfg, val.image_ids, enc, "val", False, "encoder")
    rep = gate_auroc(model, val, table, 1, 8, 0)
    assert rep["views"] == list(GATE_VIEWS) and rep["auroc"] == rep["all_positions"]["auroc"]
    for kind in ("speech", "speechless"):
        part = rep[kind]
        assert part["positions"] >= part["assistant_positions"]["n"] > 0
        assert part["assistant_turns"]["n"] >= 1
        for view in ("assistant_positions", "assistant_turns"):
            a = part[view]["auroc"]
            assert a != a or 0.0 <= a <= 1.0
    pooled = rep["assistant_turns"]["n"]
    assert (
        pooled == rep["speech"]["assistant_turns"]["n"] + rep["speechless"]["assistant_turns"]["n"]
    )


@pytest.mark.parametrize("old", [True, False])
def test_gate_auroc_figure_draws_old_and_new_reports(old):
    from moshivis_lab.figures.paper import gate_auroc_figure

    part = {"auroc": 0.6, "mean_gate_image": 0.3, "mean_gate_unrelated": 0.2}
    rep = {"auroc": 0.6, "last_layers": 2, "speech": dict(part), "speechless": dict(part)}
    if not old:
        view = {"n": 10, **part}
        for k in ("speech", "speechless"):
            rep[k].update(assistant_positions=view, assistant_turns=view)
        rep.update(all_positions=view, assistant_positions=view, assistant_turns=view)
    fig = gate_auroc_figure(rep)
    xs = {x for t in fig.data if t.xaxis == "x" for x in t.x}
    want = {"all positions"} | (set() if old else {"per assistant turn", "per assistant position"})
    assert xs == want
    names = {t.name for t in fig.data}
    assert {"all samples", "speech", "speechless"} <= names
