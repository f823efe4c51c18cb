"""Prosody before / after adaptation: renditions, comparisons, the report, its plots and viewer."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf

from moshivis_lab.interp.conversation import Conversation
from moshivis_lab.interp.prosody import (
    CODEC_CONTROL,
    Condition,
    ProsodyReport,
    audio_rendition,
    compare,
    default_conditions,
    p_audio_runs,
    prosody_report,
    reply_rendition,
    summarize,
    tts_rendition,
)
from moshivis_lab.viz.prosody import (
    energy_figure,
    f0_contours_figure,
    f0_distribution_figure,
    prosody_pair_figure,
    prosody_summary_figure,
    prosody_table_figure,
)
from moshivis_lab.widgets import ProsodyViewer
from moshivis_lab.world.speech import ASSISTANT_VOICE, synthesize

SR = 24000
TEXT = "Yes, there is a small red star at the top left of the picture."


@pytest.fixture(scope="module")
def renditions():
    """The TTS reference and a transposed copy (+2 semitones), analysed with pYIN."""
    import librosa

    ref = tts_rendition(TEXT, "after", 0, SR, ("pyin",))
    shifted = librosa.effects.pitch_shift(ref.wav, sr=SR, n_steps=2.0)
    other = audio_rendition("shifted", shifted, SR, ref.words, ("pyin",), text=TEXT)
    return ref, other


def test_comparison_numbers(renditions):
    ref, other = renditions
    same = compare(ref, ref, "pyin")
    assert same.f0_median_ratio == pytest.approx(1.0)
    assert same.contour_correlation == pytest.approx(1.0)
    up = compare(ref, other, "pyin")
    assert up.f0_median_ratio == pytest.approx(2 ** (2 / 12), rel=0.03)
    assert up.contour_correlation > 0.8
    assert up.summary["speaking_rate"] == pytest.approx(
        ref.prosody["pyin"].summary["speaking_rate"]
    )
    assert other.name == "shifted" and ref.name == "after #0 · tts"
    with pytest.raises(ValueError, match="crepe"):
        compare(ref, other, "crepe")
    with pytest.raises(ValueError, match="unknown F0 method"):
        tts_rendition(TEXT, "x", 0, SR, ("yin",))


def test_reply_rendition_cuts_the_reply_out():
    """A hand-made conversation: silence, then the assistant's words from step 10 on."""
    fr, fs = 12.5, 1920
    u = synthesize(TEXT, ASSISTANT_VOICE, SR)
    n = 10 + math.ceil(u.wav.size / fs) + 10
    wav = np.zeros(n * fs, np.float32)
    wav[10 * fs : 10 * fs + u.wav.size] = u.wav
    words = [(w.text, 10 / fr + w.start, 10 / fr + w.end) for w in u.words]
    conv = Conversation(
        user_wav=np.zeros_like(wav),
        assistant_wav=wav,
        sample_rate=SR,
        frame_rate=fr,
        tokens=np.full(n, 3),
        pieces=[""] * n,
        transcript=[("early", 0.1, 0.2), *words],
        gates=np.zeros((2, n)),
        attention=np.zeros((2, n, 0)),
        audio_codes=np.zeros((8, n), np.int64),
        layers=(0, 1),
        grid_side=0,
        prompt_end_step=5,
    )
    said = " ".join(w.text for w in u.words)  # the words the TTS reported
    assert conv.reply_text == said and conv.text.startswith("early")
    r = reply_rendition(conv, "after", 3, ("pyin",))
    assert r is not None and r.text == said and r.kind == "generated"
    assert r.words[0][1] == pytest.approx(0.2, abs=1e-6)  # 0.2 s kept before the first word
    assert r.duration == pytest.approx(words[-1][2] + 0.6 - (words[0][1] - 0.2), abs=1e-3)
    ref = tts_rendition(r.text, "after", 3, SR, ("pyin",))
    cmp = compare(ref, r, "pyin")
    assert cmp.f0_median_ratio == pytest.approx(1.0, abs=0.02)
    assert cmp.contour_correlation > 0.9
    silent = Conversation(**{**conv.__dict__, "transcript": [("early", 0.1, 0.2)]})
    assert reply_rendition(silent, "after", 0) is None


def test_summary_and_json(renditions, tmp_path):
    ref, other = renditions
    gen = audio_rendition("x", other.wav, SR, other.words, ("pyin",))
    gen.condition, gen.item, gen.kind, gen.label = "after", 0, "generated", None
    base = audio_rendition("y", ref.wav, SR, ref.words, ("pyin",))
    base.condition, base.item, base.kind, base.label = "before", 0, "generated", None
    ref_b = dataclasses.replace(ref, condition="before")
    ctl = audio_rendition("c", ref.wav, SR, ref.words, ("pyin",))
    ctl.condition, ctl.item, ctl.kind, ctl.label = "after", 0, CODEC_CONTROL, None
    rends = [gen, ref, base, ref_b, ctl]
    comps = [compare(ref, gen, "pyin"), compare(ref_b, base, "pyin"), compare(ref, ctl, "pyin")]
    summary = summarize(comps, rends)
    assert list(summary) == ["after", "before", CODEC_CONTROL]
    row = summary["after"]["pyin"]
    assert row["f0_median_ratio"] == pytest.approx(2 ** (2 / 12), rel=0.03)
    assert row["f0_vs_before"] == pytest.approx(2 ** (2 / 12), rel=0.03)
    assert summary["before"]["pyin"]["f0_vs_before"] == 1.0
    assert summary[CODEC_CONTROL]["pyin"]["contour_correlation"] == pytest.approx(1.0)
    for key in ("speaking_rate", "ref_speaking_rate", "pause_count", "pause_total_s"):
        assert key in row
    report = ProsodyReport("x", [Condition("after")], ("pyin",), [], comps, summary, rends)
    path = report.write(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["summary"]["after"]["pyin"]["n"] == 1
    assert len(data["comparisons"]) == 3 and "wav" not in json.dumps(data)
    assert report.rendition("after", 0, CODEC_CONTROL) is ctl
    assert [r["condition"] for r in report.rows()] == ["after", "before", CODEC_CONTROL]
    with pytest.raises(KeyError):
        report.rendition("nowhere", 0)
    # Plots of the summary.
    bars = prosody_summary_figure(summary)
    assert {t.type for t in bars.data} == {"bar", "scatter"}
    table = prosody_table_figure(summary, method="pyin")
    assert list(table.data[0].cells.values[0]) == ["after", "before", CODEC_CONTROL]
    with pytest.raises(ValueError, match="crepe"):
        prosody_table_figure(summary, method="crepe")
    with pytest.raises(ValueError, match="non-empty"):
        prosody_summary_figure({})


def test_prosody_figures(renditions):
    ref, other = renditions
    a, b = ref.prosody["pyin"], other.prosody["pyin"]
    fig = f0_contours_figure({"ref": a, "shifted": b})
    assert [t.name for t in fig.data] == ["ref", "shifted"]
    assert np.nanmin(fig.data[0].x) <= 0.0  # aligned on speech onset
    st = f0_contours_figure({"ref": a}, semitones=True, align=False)
    assert abs(np.nanmedian(np.asarray(st.data[0].y, dtype=float))) < 1e-9
    dist = f0_distribution_figure({"ref": a, "raw": np.array([100.0, 110.0, np.nan])})
    assert dist.data[1].name == "raw (n=2)"
    assert len(energy_figure({"ref": a}).data) == 1
    pair = prosody_pair_figure(a, b, names=("ref", "ref"))
    assert len(pair.data) == 4 and pair.data[0].name != pair.data[2].name
    with pytest.raises(ValueError, match="Prosody"):
        f0_contours_figure({"x": np.zeros(3)})


def test_prosody_viewer(renditions, tmp_path):
    ref, other = renditions
    viewer = ProsodyViewer([ref, other])
    pair = viewer.pair_figure
    assert viewer.left.value == 0 and viewer.right.value == 1
    assert [t.name for t in pair.data[:3:2]] == [ref.name, other.name]
    y_before = np.asarray(pair.data[2].y, dtype=float).copy()
    assert viewer.left_audio.value[:4] == b"RIFF" and "F0 median ratio" in viewer.metrics.value
    viewer.right.value = 0  # the same rendition on both sides
    assert not np.allclose(np.nan_to_num(pair.data[2].y), np.nan_to_num(y_before))
    assert "(left)" in pair.data[0].name
    assert viewer.distribution_figure.data[0].type == "violin"
    # From files, one of them stereo at 16 kHz; an unknown choice is an error.
    sf.write(tmp_path / "a.wav", np.stack([ref.wav, ref.wav], 1), SR)
    v2 = ProsodyViewer.from_audio({"a": str(tmp_path / "a.wav"), "b": (other.wav, SR)}, right="b")
    assert v2.right.value == 1 and v2.method.options == ("pyin",)
    with pytest.raises(ValueError, match="no rendition named"):
        ProsodyViewer([ref, other], left="zzz")
    with pytest.raises(ValueError, match="no renditions"):
        ProsodyViewer([])


def test_conditions_find_the_p_audio_sweep(tmp_path):
    from moshivis_lab.config import LabConfig

    cfg = LabConfig.smoke(tmp_path)
    root = tmp_path / "smoke" / "adapters"
    for p, name in ((0.0, "ablate_paudio_p_audio_0"), (0.05, "ablate_paudio_p_audio_0_05")):
        d = root / name
        d.mkdir(parents=True)
        (d / "adapters.safetensors").write_bytes(b"")
        (d / "train_report.json").write_text(json.dumps({"config": {"mix": {"p_audio": p}}}))
    (root / "ablate_paudio_p_audio_1").mkdir()  # not trained: left out
    assert p_audio_runs(cfg) == {0.0: "ablate_paudio_p_audio_0", 0.05: "ablate_paudio_p_audio_0_05"}
    names = [c.name for c in default_conditions(cfg)]
    assert names == ["before", "after", "p_audio=0", "p_audio=0.05"]
    assert default_conditions(cfg, sweep=False)[0].gate_value == 0.0


def test_report_end_to_end(smoke_pretrained, one_torch_thread, tmp_path):
    from moshivis_lab.train.adapters import TrainConfig, train_adapters

    cfg = smoke_pretrained
    train_adapters(
        cfg,
        TrainConfig.smoke().replace(threads=1),
        run="widgets",
        progress=False,
        log=lambda *_: None,
    )
    conds = [
        Condition("before", "widgets", gate_value=0.0),
        Condition("after", "widgets"),
    ]
    out = tmp_path / "prosody.json"
    report = prosody_report(
        cfg, conditions=conds, n_items=2, methods=("pyin",), extra_seconds=1.5, out_path=out
    )
    data = json.loads(out.read_text())
    assert data["preset"] == "smoke" and [c["name"] for c in data["conditions"]] == [
        "before",
        "after",
    ]
    assert len(data["items"]) == 2
    assert all(set(it["replies"]) == {"before", "after"} for it in data["items"])
    # The smoke model barely speaks: whatever it said is compared with its TTS reference.
    for c in report.comparisons:
        assert c.method == "pyin" and c.condition in ("before", "after")
    assert set(report.summary) <= {"before", "after", CODEC_CONTROL}
    with pytest.raises(ValueError, match="unique"):
        prosody_report(cfg, conditions=[conds[0], conds[0]], write=False)
    with pytest.raises(ValueError, match="unknown F0 method"):
        prosody_report(cfg, conditions=conds, methods=("yin",), write=False)
