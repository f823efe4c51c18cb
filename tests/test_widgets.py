"""The conversation engine and the widgets, driven without a browser (smoke sizes).

Callbacks are exercised the way a user would: set a control's ``.value``, ``.click()`` a button,
then read the figures' data, the HTML and the audio players.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import soundfile as sf

from moshivis_lab.interp.conversation import (
    ConversationEngine,
    changed_fraction,
    prompt_audio,
    resolve_image,
)
from moshivis_lab.interp.gates import GateIntervention
from moshivis_lab.train.adapters import TrainConfig, train_adapters
from moshivis_lab.widgets import ConversationExplorer, FigurePane, GateLab
from moshivis_lab.widgets._figure import sync_figure, wav_bytes
from moshivis_lab.widgets.conversation import transcript_html

QUESTION = "Is there a star?"
FAST = {"extra_seconds": 1.0}


@pytest.fixture(scope="module")
def engine(smoke_pretrained, one_torch_thread):
    """A smoke adapter run (6 steps, one thread) and its conversation engine. Kyutai's init
    (default ``out_proj``): the adapters' output is O(1) from the start, so forcing the gates
    changes what a 6-step model says (from the tiny preset's zero ``out_proj`` it barely has
    an output yet)."""
    import dataclasses

    from moshivis_lab.config import XAConfig
    from moshivis_lab.train.pretrain import load_speech_lm
    from moshivis_lab.vision.pretrain import load_vision_encoder

    cfg = smoke_pretrained
    xa = XAConfig.tiny(load_speech_lm(cfg).cfg, load_vision_encoder(cfg).hidden_size)
    xa = dataclasses.replace(xa, gate_bias=-4.0, out_proj_init="default")
    tcfg = TrainConfig.smoke().replace(threads=1, xa=xa)
    run = "widgets_kyutai_init"  # its own run: other tests train "widgets" at the preset's init
    train_adapters(cfg, tcfg, run=run, progress=False, log=lambda *_: None)
    return ConversationEngine.load(cfg, run)


@pytest.fixture(scope="module")
def conv(engine):
    return engine.run(0, QUESTION, **FAST)


def test_conversation_record(engine, conv):
    n_layers = len(engine.layers)
    T = conv.n_steps
    fs = int(engine.codec.frame_size)
    assert conv.gates.shape == (n_layers, T)
    assert conv.attention.shape == (n_layers, T, conv.grid_side**2)
    assert conv.grid_side == engine.encoder.token_grid_side()
    assert conv.tokens.shape == (T,) and len(conv.pieces) == T
    assert conv.audio_codes.shape == (engine.model.lm.cfg.dep_q, T)
    assert conv.user_wav.shape == conv.assistant_wav.shape == (T * fs,)
    assert 0 < conv.prompt_end_step < T
    assert conv.image is not None and conv.image_id == engine.world_images()[0]
    assert conv.prompt == QUESTION
    # Every step is past xa_start (0 at tiny size): each attention row is a distribution.
    assert np.allclose(conv.attention.sum(-1), 1.0, atol=1e-4)
    assert np.all((conv.gates > 0) & (conv.gates < 1))
    assert conv.attention_map(3).shape == (conv.grid_side, conv.grid_side)
    assert np.allclose(
        conv.attention_map(3, engine.layers[-1]),
        conv.attention[-1, 3].reshape(conv.grid_side, conv.grid_side),
    )
    assert conv.gate_score().shape == (T,)
    assert conv.mix().shape == conv.user_wav.shape
    assert conv.step_at(1e9) == T - 1 and conv.step_at(-1) == 0
    with pytest.raises(ValueError, match="step"):
        conv.attention_map(T)
    with pytest.raises(ValueError, match="no cross-attention"):
        conv.attention_map(0, layer=99)


def test_gates_at_zero_give_the_base_model(engine, conv):
    off = engine.run(0, QUESTION, intervention=GateIntervention(value=0.0), **FAST)
    no_image = engine.run(None, QUESTION, **FAST)
    assert np.array_equal(off.tokens, no_image.tokens)
    assert np.array_equal(off.audio_codes, no_image.audio_codes)
    assert np.all(off.gates == 0) and no_image.grid_side == 0
    assert off.intervention is not None and off.intervention.name == "g=0"
    # Recording the attention does not change what is sampled.
    quiet = engine.run(0, QUESTION, record_attention=False, **FAST)
    assert np.array_equal(quiet.audio_codes, conv.audio_codes)
    assert not quiet.attention.any()
    assert changed_fraction(conv, conv) == {"text": 0.0, "audio": 0.0}


def test_bad_inputs_get_clear_errors(engine, tmp_path):
    cfg = engine.cfg
    with pytest.raises(FileNotFoundError, match="no such image"):
        resolve_image(tmp_path / "missing.png", cfg)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        resolve_image(tmp_path / "broken.png", cfg)
    with pytest.raises(FileNotFoundError, match="moshivis-lab data"):
        resolve_image("test_99999", cfg)
    with pytest.raises(ValueError, match="index"):
        resolve_image(10_000, cfg)
    with pytest.raises(ValueError, match="HxWx3"):
        resolve_image(np.zeros((4, 4), np.uint8), cfg)
    img, image_id = resolve_image(np.zeros((8, 8, 3), np.uint8))
    assert img.size == (8, 8) and image_id is None
    sr = int(engine.codec.sample_rate)
    with pytest.raises(ValueError, match="empty"):
        prompt_audio("   ", sr, voice=engine.user_voice)
    with pytest.raises(ValueError, match="silent"):
        prompt_audio(np.zeros(8000, np.float32), sr, prompt_rate=16000)
    with pytest.raises(ValueError, match="sample rate"):
        prompt_audio(np.ones(800, np.float32) * 0.1, sr)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....garbage")
    with pytest.raises(ValueError, match="cannot be read as audio"):
        prompt_audio(str(tmp_path / "broken.wav"), sr)
    with pytest.raises(FileNotFoundError, match="no such audio file"):
        prompt_audio(str(tmp_path / "nothing.wav"), sr)
    # Stereo at another rate is averaged and resampled.
    t = np.arange(8000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([tone, 0.5 * tone], 1), 16000)
    wav, text = prompt_audio(str(tmp_path / "stereo.wav"), sr)
    assert text is None and wav.ndim == 1 and abs(wav.size - sr // 2) <= 2
    with pytest.raises(ValueError, match="exactly one"):
        GateIntervention(value=0.0, scale=1.0)
    with pytest.raises(ValueError, match="intervention must be"):
        engine.run(0, QUESTION, intervention="off")
    with pytest.raises(ValueError, match="at most"):
        engine.run(0, QUESTION, extra_seconds=100.0)


def test_figure_pane_updates_in_place():
    pane = FigurePane(live=False)
    fig = pane.figure
    a = go.Figure(go.Heatmap(z=[[0, 1]]))
    a.add_vline(x=0)
    pane.show(a)
    b = go.Figure(go.Heatmap(z=[[2, 3]]))
    b.add_vline(x=1)
    assert pane.show(b) is fig
    assert list(fig.data[0].z[0]) == [2, 3] and fig.layout.shapes[0].x0 == 1
    pane.show(go.Figure([go.Scatter(y=[1]), go.Scatter(y=[2])]))
    assert len(fig.data) == 2 and not fig.layout.shapes
    assert wav_bytes(np.zeros(100), 16000)[:4] == b"RIFF" and wav_bytes(np.zeros(0), 16000) == b""


def test_figure_pane_live_figure_widget():
    pytest.importorskip("anywidget")
    pane = FigurePane(live=True)
    assert isinstance(pane.figure, go.FigureWidget) and pane.widget is pane.figure
    target = pane.figure
    pane.show(go.Figure(go.Heatmap(z=[[0, 1]])))
    pane.show(go.Figure(go.Heatmap(z=[[5, 6]])))
    assert pane.figure is target and list(target.data[0].z[0]) == [5, 6]
    sync_figure(target, go.Figure(go.Bar(y=[1])))
    assert target.data[0].type == "bar"


def test_explorer_scrubs_steps(engine, tmp_path):
    ex = ConversationExplorer(engine, image=1, prompt=QUESTION, **FAST)
    assert ex.conversation is None and ex.step_slider.disabled
    ex.run_button.click()
    conv = ex.conversation
    assert conv is not None, ex.status.value
    assert not ex.step_slider.disabled and ex.step_slider.max == conv.n_steps - 1
    assert ex.user_audio.value[:4] == b"RIFF" and ex.assistant_audio.value[:4] == b"RIFF"
    heat, overlay = ex.gate_figure, ex.attention_figure
    assert np.asarray(heat.data[0].z).shape == conv.gates.shape
    assert overlay.data[0].type == "image" and overlay.data[1].type == "heatmap"
    # Moving the timeline moves the heatmap's marker and redraws the overlay.
    steps = [1, conv.n_steps - 2]
    marks, maps = [], []
    for s in steps:
        ex.step_slider.value = s
        marks.append(heat.layout.shapes[0].x0)
        maps.append(np.asarray(overlay.data[1].z, dtype=float).copy())
        said = [t for t in range(s + 1) if conv.pieces[t]]
        assert ("outline:2px" in ex.transcript.value) == bool(said)
        assert np.allclose(ex.attention_weights(), conv.attention_map(s))
    assert marks == steps
    assert not np.allclose(maps[0], maps[1])
    # One layer instead of the mean.
    ex.layer_select.value = engine.layers[0]
    one = np.asarray(overlay.data[1].z, dtype=float)
    assert not np.allclose(one, maps[1])
    assert np.allclose(ex.attention_weights(), conv.attention_map(steps[1], engine.layers[0]))
    # A missing image file is reported, not raised; the last conversation stays on screen.
    ex.image_path.value = str(tmp_path / "nope.png")
    ex.run_button.click()
    assert "error" in ex.status.value and "no such image" in ex.status.value
    assert ex.conversation is conv


def test_explorer_asks_with_an_audio_file(engine, tmp_path):
    from moshivis_lab.world.speech import synthesize

    u = synthesize(QUESTION, engine.user_voice, 16000)
    sf.write(tmp_path / "q.wav", np.stack([u.wav, 0.5 * u.wav], 1), 16000)  # stereo, 16 kHz
    ex = ConversationExplorer(engine, image=0, **FAST)
    ex.prompt_mode.value = "audio"
    assert ex.prompt_text.layout.display == "none"
    ex.run_button.click()
    assert "give the path" in ex.status.value
    ex.audio_path.value = str(tmp_path / "q.wav")
    ex.run_button.click()
    conv = ex.conversation
    assert conv is not None and conv.prompt is None, ex.status.value
    assert "(recording)" in transcript_html(conv)
    sf.write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    ex.audio_path.value = str(tmp_path / "silence.wav")
    ex.run_button.click()
    assert "silent" in ex.status.value
    ex.audio_path.value = str(tmp_path / "no_such_recording")  # a path, never spoken as text
    ex.run_button.click()
    assert "no such audio file" in ex.status.value


def test_gatelab_intervention_changes_the_reply(engine):
    lab = GateLab(engine, image=2, prompt=QUESTION, text_temperature=1.5, **FAST)
    lab.amount.value = 1.0  # force every gate to 1 (ungated)
    lab.run_button.click()
    before, after = lab.before, lab.after
    assert before is not None and after is not None, lab.status.value
    assert before.intervention is None
    assert after.intervention == GateIntervention(value=1.0)
    assert "g=1:" in lab.status.value
    assert np.allclose(np.asarray(lab.after_gate_figure.data[0].z, dtype=float), 1.0)
    assert not np.allclose(np.asarray(lab.before_gate_figure.data[0].z, dtype=float), 1.0)
    changed = changed_fraction(before, after)
    assert changed["audio"] > 0 and changed["text"] > 0
    assert lab.before_text.value != lab.after_text.value
    assert lab.before_audio.value != lab.after_audio.value
    # Scaling chosen layers; the slider's range follows the mode.
    lab.mode.value = "scale"
    assert lab.amount.max == 4.0 and lab.amount.value == 1.0
    lab.amount.value = 0.0
    lab.layers.value = (engine.layers[-1],)
    assert lab.intervention() == GateIntervention(scale=0.0, layers=(engine.layers[-1],))
    lab.run_button.click()
    z = np.asarray(lab.after_gate_figure.data[0].z, dtype=float)
    assert np.all(z[-1] == 0) and np.all(z[0] > 0)
    lab.layers.value = ()
    lab.run_button.click()
    assert "at least one layer" in lab.status.value
