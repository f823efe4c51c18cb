"""The encoder and adapter plots: figure data from hand-made inputs (no data build, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moshivis_lab.train.mix import collate
from moshivis_lab.viz.adapters import (
    adapter_curves_figure,
    eval_summary_figure,
    gates_figure,
    mix_figure,
    parameter_counts_figure,
    preprocess_figure,
    retrieval_figure,
    token_map,
    token_map_figure,
    vision_curves_figure,
)

# ---------------------------------------------------------------- the image encoder


def _image(h: int = 20, w: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def test_preprocess_figure() -> None:
    original = Image.fromarray(_image(20, 30))
    seen = _image(16, 16)
    pv = torch.linspace(-1, 1, 3 * 16 * 16).view(1, 3, 16, 16)
    fig = preprocess_figure(original, seen, pv)
    images = [t for t in fig.data if t.type == "image"]
    (hist,) = [t for t in fig.data if t.type == "histogram"]
    assert np.asarray(images[0].z).shape == (20, 30, 3)
    assert np.array_equal(np.asarray(images[1].z), seen)
    assert len(hist.x) == 3 * 16 * 16 and min(hist.x) == -1.0 and max(hist.x) == 1.0
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].endswith("30x20 px") and titles[1].endswith("16x16 px")
    assert len(preprocess_figure(original, seen).data) == 2  # no histogram without pixels
    with pytest.raises(ValueError, match="uint8"):
        preprocess_figure(original, seen.astype(np.float32))


def test_token_map_measures() -> None:
    tokens = torch.zeros(1, 16, 8)
    tokens[0, 5] = 3.0  # one patch unlike the others
    d = token_map(tokens, "distance")
    assert d.shape == (4, 4) and d.argmax() == 5 and d[1, 1] == d.max()
    assert token_map(tokens[0], "norm")[1, 1] == pytest.approx(3.0 * np.sqrt(8))
    pc = token_map(tokens, "pc1")
    assert abs(pc[1, 1]) == np.abs(pc).max()
    with pytest.raises(ValueError, match="square"):
        token_map(torch.zeros(15, 8))
    with pytest.raises(ValueError, match="measure"):
        token_map(tokens, "mean")


def test_token_map_figure() -> None:
    tokens = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(0))
    fig = token_map_figure(_image(12, 12), tokens, "norm")
    (hm,) = [t for t in fig.data if t.type == "heatmap"]
    assert np.allclose(np.asarray(hm.z), tokens[0].norm(dim=-1).view(3, 3).numpy())
    assert np.array_equal(np.asarray(hm.customdata), np.arange(9).reshape(3, 3))
    assert len(fig.layout.shapes) == 2 * (3 - 1)  # the patch grid lines
    assert "9 tokens" in fig.layout.annotations[1].text


def _vision_metrics() -> list[dict]:
    train = [{"step": s, "split": "train", "loss": 10.0 / s, "lr": 1e-3} for s in (5, 10, 15, 20)]
    val = [
        {
            "step": s,
            "split": "val",
            "caption_top1": a,
            "caption_chance_top1": 0.1,
            "caption_top5": 2 * a,
            "caption_chance_top5": 0.5,
        }
        for s, a in ((10, 0.2), (20, 0.4))
    ]
    return train + val


def test_vision_curves_figure() -> None:
    fig = vision_curves_figure(_vision_metrics())
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["train loss"].x) == [5, 10, 15, 20]
    assert list(by_name["caption top1"].y) == [0.2, 0.4]
    assert list(by_name["caption top5 chance"].y) == [0.5, 0.5]
    assert "word top1" not in by_name  # no word probe in these metrics
    assert fig.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="train"):
        vision_curves_figure([{"step": 1, "split": "val", "caption_top1": 0.1}])


def _vision_report() -> dict:
    probe = {"top1": 0.5, "chance_top1": 0.1, "top5": 0.9, "chance_top5": 0.5, "n_candidates": 10}
    return {
        "retrieval": {
            "val": {"caption": probe, "word": {**probe, "top1": 0.3}},
            "heldout": {"caption": {**probe, "top1": 0.25}},
        }
    }


def test_retrieval_figure() -> None:
    report = _vision_report()
    fig = retrieval_figure(report)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["top1", "top5", "top1", "top5"]
    assert list(bars[0].y) == [0.5, 0.25]  # caption top1: val, heldout
    assert list(bars[2].y) == [0.3]  # word top1: val only
    chance = [t for t in fig.data if t.type == "scatter"]
    ys = [y for y in chance[0].y if y is not None]
    assert ys == [0.1, 0.1, 0.1, 0.1]  # one segment per bar at the chance level
    assert [a.text for a in fig.layout.annotations] == ["caption retrieval", "word retrieval"]
    assert len(retrieval_figure(report["retrieval"]).data) == len(fig.data)
    with pytest.raises(ValueError, match="retrieval"):
        retrieval_figure({})


def test_probe_figure() -> None:
    from moshivis_lab.viz.adapters import probe_figure

    probes = {
        "colour": {"accuracy": 0.93, "majority": 0.10, "classes": 10, "n_test": 50},
        "shape": {"accuracy": 0.2, "majority": 0.13, "classes": 8, "n_test": 50},
        "word": {"accuracy": None, "why": "too few samples or classes", "classes": 1},
    }
    fig = probe_figure({"probes": probes})
    bar = next(t for t in fig.data if t.type == "bar")
    assert list(bar.y) == [0.93, 0.2] and list(fig.layout.xaxis.ticktext) == ["colour", "shape"]
    ticks = next(t for t in fig.data if t.type == "scatter")
    assert [y for y in ticks.y if y is not None] == [0.10, 0.10, 0.13, 0.13]
    assert len(probe_figure(probes).data) == 2
    with pytest.raises(ValueError, match="probe"):
        probe_figure({"probes": {"word": probes["word"]}})


# ---------------------------------------------------------------- the adapters


def test_parameter_counts_figure() -> None:
    tiny = {"proj_xa": 100, "norm_xa": 10, "gates": 0, "total": 110}
    real = {"proj_xa": 4_722_688, "norm_xa": 4_096, "gates": 134_217_728, "total": 206_184_448}
    fig = parameter_counts_figure({"tiny": tiny, "7B": real})
    a, b = fig.data
    assert list(a.x) == ["proj_xa", "norm_xa", "gates", "total"]
    assert list(a.y) == [100, 10, None, 110]  # no zero bar on a log axis
    assert list(b.text)[-1] == "206,184,448"
    assert fig.layout.yaxis.type == "log" and fig.layout.barmode == "group"
    only = parameter_counts_figure({"7B": real}, groups=["total"])
    assert list(only.data[0].y) == [206_184_448]
    with pytest.raises(ValueError):
        parameter_counts_figure({})
    with pytest.raises(ValueError, match="integer"):
        parameter_counts_figure({"x": {"a": -1}})


def test_gates_figure() -> None:
    gates = torch.full((3, 5), 0.018)
    rel = torch.tensor([1, 1, 0, 0, -1])
    fig = gates_figure(gates, rel, ["layer 0", "layer 1", "layer 2"], zmax=1.0)
    hm, strip = fig.data
    assert np.allclose(np.asarray(hm.z), 0.018) and hm.zmax == 1.0 and hm.zmin == 0.0
    assert list(np.asarray(strip.z)[0]) == [2, 2, 1, 1, 0]
    assert list(hm.y) == ["layer 0", "layer 1", "layer 2"]
    assert len(gates_figure(gates).data) == 1
    with pytest.raises(ValueError, match="positions"):
        gates_figure(gates, rel[:3])
    with pytest.raises(ValueError, match="labels"):
        gates_figure(gates, layer_labels=["a"])


def _batch():
    speech = np.arange(17 * 6).reshape(17, 6) % 50  # text and audio everywhere
    speechless = np.full((17, 4), -1)
    speechless[0] = [5, 6, 7, 8]  # text only, the audio rows are the zero token
    return collate(
        [
            {
                "codes": speech,
                "text_weight": np.ones(6, np.float32),
                "relevance": np.array([0, 0, 1, 1, 1, 1]),
                "image": 0,
                "speech": True,
            },
            {
                "codes": speechless,
                "text_weight": np.array([0, 0, 1, 1], np.float32),
                "relevance": np.ones(4, np.int64),
                "image": 1,
                "speech": False,
            },
        ]
    )


def test_mix_figure() -> None:
    fig = mix_figure(_batch())
    state, weight, rel = (np.asarray(t.z) for t in fig.data)
    assert state.tolist() == [[2] * 6, [1, 1, 1, 1, 0, 0]]  # padding after the speechless one
    assert weight.tolist() == [[1.0] * 6, [0, 0, 1, 1, 0, 0]]
    assert rel.tolist() == [[1, 1, 2, 2, 2, 2], [2, 2, 2, 2, 0, 0]]  # relevance + 1
    assert list(fig.data[0].y) == ["0 · speech", "1 · speechless"]
    assert "1 speech, 1 speechless, 1 with unrelated" in fig.layout.title.text
    assert np.asarray(mix_figure(_batch(), max_positions=3).data[0].z).shape == (2, 3)


def test_mix_figure_bad_batch() -> None:
    b = _batch()
    b.text_weight = b.text_weight[:, :2]
    with pytest.raises(ValueError, match="text_weight"):
        mix_figure(b)
    with pytest.raises(ValueError, match="max_positions"):
        mix_figure(_batch(), max_positions=0)


def test_adapter_curves_figure() -> None:
    metrics = [
        {
            "step": s,
            "split": "train",
            "loss": 5.0 / s,
            "text_loss": 3.0 / s,
            "audio_loss": 0.0 if s == 2 else 2.0 / s,  # a batch without speech logs 0
            "speech_text_loss": 1.0,
            "speechless_text_loss": 4.0 / s,
        }
        for s in (1, 2, 3)
    ] + [{"step": 3, "split": "val", "loss": 1.5, "speechless_text_loss": 1.2}]
    fig = adapter_curves_figure(metrics)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["train audio_loss"].x) == [1, 3]  # the 0 is left out
    assert list(by_name["val loss"].y) == [1.5]
    assert by_name["train speechless_text_loss"].xaxis == "x2"
    assert by_name["train loss"].xaxis == "x"
    assert fig.layout.yaxis.type == fig.layout.yaxis2.type == "log"
    with pytest.raises(ValueError):
        adapter_curves_figure([])
    with pytest.raises(ValueError, match="above 0"):
        adapter_curves_figure([{"step": 1, "split": "train", "lr": 1.0}])


def _eval_report() -> dict:
    acc = {
        "vqa/colour": {"n": 4, "accuracy": 0.5},
        "count/count": {"n": 4, "accuracy": 0.25},
        "vqa_all": {"n": 4, "accuracy": 0.5},
    }
    return {
        "chance": {
            "vqa/colour": {"uniform": 0.125, "majority": 0.3},
            "count/count": {"uniform": 0.25, "majority": 0.6},
        },
        "test": {
            "text_prompts": acc,
            "spoken_prompts": {**acc, "vqa/colour": {"n": 4, "accuracy": 0.75}},
            "caption_attribute_f1": 0.42,
        },
    }


def test_eval_summary_figure() -> None:
    fig = eval_summary_figure(_eval_report(), "test")
    text, spoken, uniform, majority = fig.data
    assert (text.name, spoken.name) == ("text prompts", "spoken prompts")
    assert list(fig.layout.xaxis.ticktext) == ["count/count", "vqa/colour", "vqa_all"]
    assert list(text.y) == [0.25, 0.5, 0.5] and list(spoken.y) == [0.25, 0.75, 0.5]
    assert [y for y in uniform.y if y is not None] == [0.25, 0.25, 0.125, 0.125]
    assert [y for y in majority.y if y is not None] == [0.6, 0.6, 0.3, 0.3]
    assert "0.42" in fig.layout.title.text
    with pytest.raises(ValueError, match="heldout"):
        eval_summary_figure(_eval_report(), "heldout")
