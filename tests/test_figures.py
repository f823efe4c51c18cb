"""Paper figures, their export (kaleido + Chromium, HTML always) and REPORT.md (figures/)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from moshivis_lab.config import LabConfig
from moshivis_lab.figures import BROWSER_HINT, FIGURES, find_browser, make_figures, write_report
from moshivis_lab.figures import export as E
from moshivis_lab.figures import paper as P
from moshivis_lab.figures.latency import PAPER_RATIO, TOKENS, latency_path, measure_latency

# ---------------------------------------------------------------------- synthetic artefacts


def _view(auroc: float, img: float = 0.05, unrel: float = 0.02) -> dict:
    return {"n": 10, "auroc": auroc, "mean_gate_image": img, "mean_gate_unrelated": unrel}


AUROC = {
    "auroc": 0.6123,
    "last_layers": 3,
    "speech": {
        "auroc": 0.55,
        "mean_gate_image": 0.03,
        "mean_gate_unrelated": 0.02,
        "assistant_positions": _view(0.56),
        "assistant_turns": _view(0.57),
    },
    "speechless": {
        "auroc": 0.7,
        "mean_gate_image": 0.06,
        "mean_gate_unrelated": 0.03,
        "assistant_positions": _view(0.8),
        "assistant_turns": _view(0.93),
    },
    "per_layer": {"0": 0.51, "1": 0.58, "2": 0.63},
    "all_positions": _view(0.6123),
    "assistant_positions": _view(0.7),
    "assistant_turns": _view(0.81),
}
INTERP = {
    "checks": {"eager_max_abs_diff": 1e-6, "eager_ok": True, "gate0_equals_base": True},
    "gates": {
        "relevance_auroc": AUROC,
        "segments_by_topic": {"image": {"mean": 0.0291}, "unrelated": {"mean": 0.0242}},
    },
    "pointing_game": {
        "n": 40,
        "per_layer": {"0": 0.3, "1": 0.35, "2": 0.4},
        "all_layers": 0.4321,
        "baseline_box_area": 0.037,
        "object_chance": 0.36,
        "other_object_per_layer": {"0": 0.5, "1": 0.52, "2": 0.55},
    },
    "attribution": {
        "attention_pointing_at_target_step": 0.29,
        "image_tokens": {
            "spearman_vs_attention_per_layer": {"0": 0.2, "1": 0.3, "2": 0.4},
            "spearman_vs_attention_all_layers": 0.4507,
            "pointing_game": 0.29,
            "completeness_gap_median": 0.007,
        },
    },
}


def _row(sweep, name, p_audio, text_vqa, paper=None):
    return {
        "sweep": sweep,
        "name": name,
        "p_audio": p_audio,
        "trainable_parameters": 403456,
        "text_vqa": text_vqa,
        "spoken_vqa": 0.05,
        "text_ocr": 0.02,
        "spoken_ocr": 0.0,
        "audio_nll_unrelated_image": 0.2 + p_audio / 10,
        "audio_nll_base": 0.16,
        "gate_auroc": 0.53,
        "paper_ocr_vqa_text_speech": paper,
    }


ABLATIONS = {
    "steps_per_variant": 150,
    "batch_size": 16,
    "rows": [
        _row("gating x sharing", "no gate, no sharing", 0.25, 0.281, [66.1, 63.7]),
        _row("gating x sharing", "per-layer gate, shared QKV (default)", 0.25, 0.297, [68.2, 64.7]),
        _row("p_audio", "p_audio=0", 0.0, 0.31),
        _row("p_audio", "p_audio=0.25", 0.25, 0.297),
        _row("p_audio", "p_audio=1", 1.0, 0.2),
    ],
    "paper_p_audio": "Paper (Fig. 4): ...",
}
PROSODY = {
    "summary": {
        "before": {
            "pyin": {"f0_median_ratio": 0.99, "contour_correlation": 0.85, "f0_vs_before": 1.0}
        },
        "after": {
            "pyin": {"f0_median_ratio": 0.98, "contour_correlation": 0.74, "f0_vs_before": 0.9942}
        },
    }
}
LATENCY = {
    "model": {"dim": 256, "xa_layers": 6},
    "tokens": list(TOKENS),  # as measure_latency's default: reused, not measured again
    "repeats": 3,
    "threads": 1,
    "rows": [
        {
            "image_tokens": n,
            "step_ms_median": 6.0 * r,
            "step_ms_min": 5.8 * r,
            "ratio": r,
            "ratio_median": r,
            "ratio_min": r - 0.01,
            "ratio_max": r + 0.02,
        }
        for n, r in ((0, 1.0), (16, 1.05), (1024, 1.2345))
    ],
    "paper": {
        "base_ms": 48.0,
        "vision_ms": 7.0,
        "image_tokens": 1024,
        "ratio": PAPER_RATIO,
        "budget_ms": 80.0,
    },
}
EVAL = {
    "chance": {"ocr/word": {"majority": 0.036}, "count/count": {"majority": 0.59}},
    "test": {
        "text_prompts": {
            "vqa_all": {"n": 360, "accuracy": 0.2972},
            "ocr/word": {"accuracy": 0.0167},
            "count/count": {"accuracy": 0.6667},
        },
        "spoken_prompts": {
            "vqa_all": {"n": 144, "accuracy": 0.0139},
            "ocr/word": {"accuracy": 0.0},
        },
        "caption_attribute_f1": 0.5633,
    },
    "speech_kept": {
        "base_audio_nll": 0.1612,
        "adapted_no_image_audio_nll": 0.1612,
        "adapted_unrelated_image_audio_nll": 0.1782,
    },
    "gates": AUROC,
}


def _write(root: Path, rel: str, obj) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))


@pytest.fixture()
def artefacts(tmp_path):
    """A smoke config whose data dir holds synthetic JSON artefacts (no model, no world)."""
    cfg = LabConfig.smoke(tmp_path / "data")
    root = tmp_path / "data" / "smoke"
    _write(root, "interp/report.json", INTERP)
    _write(root, "interp/prosody.json", PROSODY)
    _write(root, "ablations/ablations.json", ABLATIONS)
    _write(root, "adapters/main/eval.json", EVAL)
    _write(
        root,
        "adapters/main/train_report.json",
        {
            "parameters": {
                "proj_xa": 41216,
                "norm_xa": 256,
                "attention": 262144,
                "gates": 98304,
                "norm_cross": 1536,
                "total": 403456,
                "frozen": 10479616,
            }
        },
    )
    _write(root, "figures/latency.json", LATENCY)
    _write(
        root,
        "vision/report.json",
        {
            "retrieval": {
                "val": {"caption": {"top1": 0.69, "chance_top1": 0.004, "n_images": 249}}
            },
            "encoder": {"tokens": 81, "hidden_size": 160},
        },
    )
    probe = {"accuracy": 0.197, "majority": 0.128, "classes": 8, "n_test": 1829}
    _write(root, "vision/probes.json", {"probes": {"shape": probe}})
    return cfg


def _is_png(path) -> bool:
    data = Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- export


def test_write_figure_writes_png_svg_and_html(tmp_path):
    if find_browser() is None:
        pytest.skip(f"no Chromium for kaleido: {BROWSER_HINT}")
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    with E.export_session():
        res = E.write_figure(fig, tmp_path, "bars")
        again = E.write_figure(fig, tmp_path, "bars2", ("svg",))
    assert res["error"] is None, res["error"]
    assert _is_png(res["png"])
    assert "<svg" in Path(res["svg"]).read_text()[:2000]
    assert again["png"] is None and "<svg" in Path(again["svg"]).read_text()[:2000]
    html = Path(res["html"]).read_text()
    assert "plotly.min.js" in html and (tmp_path / "plotly.min.js").stat().st_size > 1e6
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temporary file"


def test_no_browser_writes_html_and_the_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "find_browser", lambda: None)
    res = E.write_figure(go.Figure(go.Scatter(y=[1, 3, 2])), tmp_path, "line")
    assert res["png"] is None and res["svg"] is None
    assert Path(res["html"]).stat().st_size > 1000
    assert BROWSER_HINT in res["error"] and BROWSER_HINT in E.no_browser_message()
    # atomic writes (mkstemp is 0600) still leave figures readable by others: the umask mode
    mask = os.umask(0)
    os.umask(mask)
    for f in (res["html"], tmp_path / "plotly.min.js"):
        assert stat.S_IMODE(Path(f).stat().st_mode) == 0o666 & ~mask, f
    with pytest.raises(ValueError, match="plain file stem"):
        E.write_figure(go.Figure(), tmp_path, "../x")


def test_find_browser_honours_browser_path(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "nothing"))
    assert find_browser() is None
    monkeypatch.delenv("BROWSER_PATH")
    if Path("/usr/bin/chromium").exists():
        assert find_browser() is not None


# ---------------------------------------------------------------------- builders


def test_builders_plot_the_artefacts_numbers():
    big = P.adapter_counts_7b()
    assert big["total"] == P.PAPER_ADAPTER_PARAMETERS
    fig = P.adapter_figure({"ours": {"attention": 262144, "total": 403456}, "7B": big})
    bars = [t for t in fig.data if t.type == "bar"]
    assert list(bars[1].y)[-1] == P.PAPER_ADAPTER_PARAMETERS and 262144 in list(bars[0].y)

    fig = P.gate_auroc_figure(AUROC, INTERP["gates"]["segments_by_topic"])
    bars = {t.name: t for t in fig.data if t.xaxis == "x"}
    assert list(bars["all samples"].x) == [
        "per assistant turn",
        "per assistant position",
        "all positions",
    ]
    assert list(bars["all samples"].y) == [0.81, 0.7, 0.6123]
    assert list(bars["speechless"].y) == [0.93, 0.8, 0.7]
    assert list(bars["one layer (all positions)"].y) == [0.51, 0.58, 0.63]
    fig = P.pointing_attribution_figure(INTERP)
    assert 0.4321 in list(fig.data[0].y)
    assert any(t.type == "scatter" and 0.4507 in list(t.y or []) for t in fig.data)

    fig = P.p_audio_sweep_figure(ABLATIONS)
    assert list(fig.data[0].x) == [0.0, 25.0, 100.0]
    assert fig.data[0].y[0] == pytest.approx(31.0)
    table = P.gating_sharing_table_figure(ABLATIONS).data[0]
    assert table.type == "table" and "68.2 / 64.7" in table.cells.values[-1]
    assert "29.7" in table.cells.values[2]
    fig = P.prosody_figure(PROSODY)
    assert any(0.98 in list(t.y) for t in fig.data if t.type == "bar")
    with pytest.raises(P.FigureDataError, match="said nothing"):
        P.prosody_figure({"summary": {}})
    fig = P.vision_latency_figure(LATENCY)
    assert list(fig.data[0].y) == [1.0, 1.05, 1.2345]
    assert fig.data[2].y[0] == pytest.approx(55 / 48)


def test_model_based_builders_on_synthetic_traces():
    from types import SimpleNamespace

    from moshivis_lab.interp.attention import QuestionMaps
    from moshivis_lab.interp.gates import GateTrace, Turn

    g = np.linspace(0, 0.2, 3 * 20).reshape(3, 20)
    rel = np.array([0] * 8 + [1] * 12)
    trace = GateTrace(
        g,
        (0, 1, 2),
        relevance=rel,
        turns=[Turn(0, 8, "user", "weather")],
        tokens=[f"t{i}" for i in range(20)],
    )
    d = SimpleNamespace(switch=8, length=20, speech=False)
    fig = P.gates_topic_switch_figure(d, trace)
    assert np.allclose([t for t in fig.data if t.name.startswith("gate")][0].y, g.mean(0))
    assert "step 8" in fig.layout.title.text and "speechless" in fig.layout.title.text
    assert np.allclose(P.gates_heatmap_figure(d, trace).data[0].z, g)
    img = np.full((224, 224, 3), 200, np.uint8)
    qm = QuestionMaps(
        [img, img],
        np.random.default_rng(0).random((2, 3, 9, 9)),
        [(10, 10, 50, 50), None],
        ["q1 → a", "q2 → b"],
        (0, 1, 2),
    )
    fig = P.attention_grid_paper_figure(qm)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 6 and np.asarray(heat[0].z).shape == (112, 112)
    assert all(t.source.startswith("data:image/png") for t in fig.data if t.type == "image")
    assert fig.layout.shapes[0].x1 == pytest.approx(24.5)  # the box scaled with the image


def test_latency_measures_writes_and_reuses(tmp_path):
    path = tmp_path / "latency.json"
    res = measure_latency(None, tokens=(0, 16), repeats=1, steps=1, warm=1, path=path)
    assert [r["image_tokens"] for r in res["rows"]] == [0, 16]
    assert res["rows"][0]["ratio"] == 1.0 and res["rows"][1]["step_ms_min"] > 0
    assert measure_latency(None, tokens=(0, 16), path=path)["seconds"] == res["seconds"]
    assert latency_path(LabConfig.smoke(tmp_path)).name == "latency.json"


# ---------------------------------------------------------------------- batch and report


def test_make_figures_records_missing_artefacts(tmp_path):
    cfg = LabConfig.smoke(tmp_path / "empty")
    names = ["p_audio_sweep", "gate_auroc", "prosody", "gates_topic_switch"]
    res = make_figures(cfg, tmp_path / "out", progress=False, names=names, formats=())
    assert set(res) == set(names) and all(res[n]["error"] for n in names)
    assert "moshivis-lab ablate --preset smoke" in res["p_audio_sweep"]["error"]
    assert "--stage interp" in res["gate_auroc"]["error"]
    assert all(res[n]["html"] is None for n in names)
    assert json.loads((tmp_path / "out" / "figures.json").read_text()) == res
    with pytest.raises(ValueError, match="unknown figures"):
        make_figures(cfg, tmp_path / "out", progress=False, names=["nope"])


def test_report_has_our_numbers_beside_the_papers_and_the_figures(artefacts, tmp_path):
    out = tmp_path / "figs"
    names = [
        "gate_auroc",
        "p_audio_sweep",
        "gating_sharing_table",
        "vision_latency",
        "attention_grid",
    ]
    res = make_figures(artefacts, out, progress=False, names=names)
    assert set(FIGURES) >= set(res)
    assert res["attention_grid"]["error"]  # no trained run in the synthetic data dir
    for n in names[:4]:
        assert res[n]["html"] and Path(res[n]["html"]).exists()
        if find_browser() is not None:
            assert res[n]["error"] is None and _is_png(res[n]["png"])
    path = write_report(artefacts, out, timings={"data": 12.3, "figures": 4.56})
    md = path.read_text()
    assert path == out / "REPORT.md"
    assert "29.7 % / 1.4 %" in md  # VQA text / spoken from eval.json
    assert "| 1.7 % / 0.0 % | 68.2 % / 64.7 % |" in md  # OCR ours | paper Table 5
    assert "403,456 | 206,184,448" in md
    assert "0.612" in md and "43.2 %" in md and "0.451" in md  # interp report
    assert "x1.234 | x1.15" in md  # latency at 1024 tokens vs the paper
    assert "| image-to-caption top-1, val | 69.0 % |" in md
    assert "| linear probe of the tokens: object shape | 19.7 % | - | majority 12.8 %" in md
    assert "0.980 / 0.740 / 0.994" in md  # prosody after
    assert "| per-layer gate, shared QKV (default) |" in md and "68.2 / 64.7" in md
    assert "_Not built:" in md and "speech_eval" in md  # eval_val.json is missing
    assert "| data | 12.3 |" in md and "| figures | 4.6 |" in md
    for link in __import__("re").findall(r"\]\(([^)]+)\)", md):
        assert (out / link).exists(), link
    if find_browser() is not None:
        assert "![gate_auroc](gate_auroc.png)" in md
    else:
        assert "[gate_auroc (interactive HTML)](gate_auroc.html)" in md
    assert "attention grid" in md and "not made" in md
