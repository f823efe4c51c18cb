"""Prosody features (pYIN and CREPE) and their comparison, on synthetic tones and offline TTS."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.signal import sawtooth

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moshivis_lab.audio.prosody import Prosody, compare_prosody, prosody_features  # noqa: E402
from moshivis_lab.world.speech import synthesize  # noqa: E402

SR = 24000
TEXT = "Hello there, I can see a red star and two blue circles on the table. Shall we count them together?"


def _tone(f0: float, seconds: float = 1.0, kind: str = "sine", sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    if kind == "sine":
        return (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)
    return (0.4 * sawtooth(2 * np.pi * f0 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> dict:
    """One TTS utterance, its pitch-shifted copy, and their features (computed once)."""
    import librosa

    u = synthesize(TEXT)
    shifted = librosa.effects.pitch_shift(u.wav, sr=SR, n_steps=2.0)
    return {
        "utt": u,
        "pyin": prosody_features(u.wav, SR),
        "crepe": prosody_features(u.wav, SR, f0_method="crepe"),
        "shifted": prosody_features(shifted, SR),
    }


@pytest.mark.parametrize("method", ["pyin", "crepe"])
@pytest.mark.parametrize(("f0", "kind"), [(220.0, "sine"), (150.0, "saw"), (110.0, "saw")])
def test_tone_f0(method: str, f0: float, kind: str) -> None:
    p = prosody_features(_tone(f0, kind=kind), SR, f0_method=method)  # type: ignore[arg-type]
    s = p.summary
    assert abs(s["f0_median"] / f0 - 1) < 0.02, s
    assert s["voiced_fraction"] > 0.9
    assert s["f0_std"] < 0.3  # semitones
    assert s["pause_count"] == 0


def test_crepe_full_model() -> None:
    p = prosody_features(_tone(196.0, 0.5), SR, f0_method="crepe", crepe_model="full")
    assert p.method == "crepe-full"
    assert abs(p.summary["f0_median"] / 196.0 - 1) < 0.02


@pytest.mark.parametrize("method", ["pyin", "crepe"])
def test_tts_speech_plausible(speech: dict, method: str) -> None:
    u, p = speech["utt"], speech[method]
    assert isinstance(p, Prosody)
    n = len(p)
    for arr in (p.times, p.f0, p.voiced, p.voiced_prob, p.energy, p.speech):
        assert arr.shape == (n,)
    assert np.allclose(np.diff(p.times), 0.01)
    assert abs(n * p.hop_s - u.duration) < 0.02
    assert np.all(np.isnan(p.f0[~p.voiced])) and np.all(np.isfinite(p.f0[p.voiced]))
    assert np.all((p.voiced_prob >= 0) & (p.voiced_prob <= 1))
    assert np.all(np.isfinite(p.energy)) and p.energy.min() >= -100.0
    s = p.summary
    assert 150 < s["f0_median"] < 350  # the assistant voice (espeak f3)
    assert 0.5 < s["voiced_fraction"] < 0.99
    assert 0.5 < s["f0_std"] < 8  # speech moves, in semitones
    assert 2.5 < s["speaking_rate"] < 8 and p.rate_unit == "syllables/s"
    assert 15 <= s["syllable_count"] <= 40  # the text has 26 syllables
    assert s["pause_count"] >= 1 and s["pause_total_s"] > 0.15  # "... table. Shall ..."
    assert abs(s["duration"] - u.duration) < 1e-3


def test_pyin_and_crepe_agree(speech: dict) -> None:
    c = compare_prosody(speech["pyin"], speech["crepe"])
    assert abs(c["f0_median_ratio"] - 1) < 0.03
    assert c["f0_correlation"] > 0.9
    assert c["voicing_agreement"] > 0.85


def test_word_rate(speech: dict) -> None:
    u = speech["utt"]
    p = prosody_features(u.wav, SR, words=u.words, hop_s=0.02)
    assert p.rate_unit == "words/s" and p.hop_s == 0.02
    span = u.words[-1].end - u.words[0].start
    assert p.summary["speaking_rate"] == pytest.approx(len(u.words) / span)
    assert 1.5 < p.summary["speaking_rate"] < 5
    d = [{"start": w.start, "end": w.end} for w in u.words]
    p2 = prosody_features(u.wav, SR, words=d, hop_s=0.02)
    assert p2.summary["speaking_rate"] == pytest.approx(p.summary["speaking_rate"])


def test_pitch_shift_ratio(speech: dict) -> None:
    c = compare_prosody(speech["pyin"], speech["shifted"])
    assert c["alignment"] == "frames"
    assert abs(c["f0_median_ratio"] - 2 ** (2 / 12)) < 0.02  # ~1.12
    assert abs(c["f0_shift_semitones"] - 2.0) < 0.3
    assert c["f0_correlation"] > 0.9
    assert c["voicing_agreement"] > 0.8


def test_compare_with_itself(speech: dict) -> None:
    c = compare_prosody(speech["pyin"], speech["pyin"])
    assert c["f0_median_ratio"] == 1.0 and c["f0_rmse_semitones"] == 0.0
    assert c["f0_correlation"] == pytest.approx(1.0)
    assert c["energy_correlation"] == pytest.approx(1.0)
    assert c["speaking_rate_ratio"] == 1.0 and c["voicing_agreement"] == 1.0


def test_compare_different_lengths_uses_dtw(speech: dict) -> None:
    u = speech["utt"]
    padded = np.concatenate([np.zeros(int(0.4 * SR), np.float32), u.wav])
    c = compare_prosody(speech["pyin"], prosody_features(padded, SR))
    assert c["alignment"] == "dtw"
    assert abs(c["f0_median_ratio"] - 1) < 0.02
    assert c["f0_correlation"] > 0.9 and c["energy_correlation"] > 0.9
    with pytest.raises(ValueError, match="hop_s"):
        compare_prosody(speech["pyin"], prosody_features(u.wav[: SR // 2], SR, hop_s=0.02))


@pytest.mark.parametrize("method", ["pyin", "crepe"])
def test_silence(method: str) -> None:
    p = prosody_features(np.zeros(SR, np.float32), SR, f0_method=method)  # type: ignore[arg-type]
    s = p.summary
    assert not p.voiced.any() and not p.speech.any() and np.all(np.isnan(p.f0))
    assert np.isnan(s["f0_median"]) and np.isnan(s["f0_mean"]) and np.isnan(s["speaking_rate"])
    assert s["voiced_fraction"] == 0.0 and s["pause_count"] == 0.0
    c = compare_prosody(p, p)
    assert np.isnan(c["f0_median_ratio"]) and np.isnan(c["f0_correlation"])


def test_input_formats() -> None:
    x = _tone(180.0, 0.5)
    ref = prosody_features(x, SR).summary["f0_median"]
    assert prosody_features(np.stack([x, x]), SR).summary["f0_median"] == pytest.approx(ref)
    pcm = (x * 32767).astype(np.int16)
    assert prosody_features(pcm, SR).summary["f0_median"] == pytest.approx(ref, rel=0.01)
    x16 = _tone(180.0, 0.5, sr=16000)
    assert prosody_features(x16, 16000).summary["f0_median"] == pytest.approx(ref, rel=0.01)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="too short"):
        prosody_features(_tone(200.0, 0.04), SR)
    x = _tone(200.0, 0.2)
    x[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prosody_features(x, SR)
    with pytest.raises(ValueError, match="f0_method"):
        prosody_features(_tone(200.0, 0.2), SR, f0_method="yin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fmin"):
        prosody_features(_tone(200.0, 0.2), SR, fmin=500, fmax=100)
    with pytest.raises(ValueError, match="hop_s"):
        prosody_features(_tone(200.0, 0.2), SR, hop_s=0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        prosody_features(_tone(200.0, 0.2), 0)
