"""Offline TTS through libespeak-ng: word timings, voices, bad text; full-duplex timelines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, Voice, synthesize, user_voices
from moshivis_lab.world.timeline import (
    FRAME_SIZE,
    MAIN_SPEAKER,
    USER_SPEAKER,
    TTSCache,
    build_timeline,
)


def test_synthesize_gives_24k_speech_with_ordered_word_times() -> None:
    u = synthesize("What colour is the big red triangle?", ASSISTANT_VOICE)
    assert u.sample_rate == 24000 and u.wav.dtype == np.float32
    assert 1.0 < u.duration < 4.0
    assert [w.text for w in u.words] == "What colour is the big red triangle?".split()
    starts = [w.start for w in u.words]
    assert starts == sorted(starts) and starts[0] < 0.2
    for w in u.words:
        assert w.start < w.end <= u.duration + 1e-6
        seg = u.wav[int(w.start * 24000) : int(w.end * 24000)]
        assert np.sqrt(np.mean(seg**2)) > 0.01, f"{w.text!r} has no sound in its span"


_FRESH = """
import hashlib
from moshivis_lab.world.speech import USER_VOICES, synthesize
from moshivis_lab.world.speech import ASSISTANT_VOICE
for t in ("Hello there, how are you today?", "What colour is the star?"):
    for v in (ASSISTANT_VOICE, *USER_VOICES):
        print(hashlib.sha256(synthesize(t, v).wav.tobytes()).hexdigest()[:12])
"""


def test_voices_differ_and_a_fresh_process_is_reproducible() -> None:
    text = "Hello there, how are you today?"
    a = synthesize(text, USER_VOICES[0])
    b = synthesize(text, USER_VOICES[1])
    assert a.duration != b.duration or not np.allclose(a.wav[:1000], b.wav[:1000])
    # espeak-ng carries glottal phase between utterances and some voices mix in noise: each
    # utterance is spoken from a reloaded library with seeded noise, so a fresh process gives
    # the same audio, for every voice
    runs = [
        subprocess.run(
            [sys.executable, "-c", _FRESH], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0].split()) == 2 * (1 + len(USER_VOICES))
    # and so does a repeat within a process, after other speech (issue 8: no history)
    assert np.array_equal(synthesize(text, USER_VOICES[0]).wav, a.wav)
    assert len({v.name for v in USER_VOICES}) == len(USER_VOICES) >= 6
    assert ASSISTANT_VOICE.name not in {v.name for v in USER_VOICES}


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        synthesize(text)


def test_non_ascii_text_is_spoken() -> None:
    u = synthesize("Café au lait, naïve façade.", ASSISTANT_VOICE)
    assert u.duration > 0.5 and len(u.words) >= 3


def test_bad_voice_parameters() -> None:
    with pytest.raises(ValueError, match="pitch"):
        Voice("x", "en-us", pitch=300)
    with pytest.raises(ValueError, match="no voice"):
        synthesize("hello", Voice("x", "xx-nonexistent"))
    with pytest.raises(ValueError, match="n_user_voices"):
        user_voices(99)


def test_timeline_is_frame_aligned_and_full_duplex() -> None:
    tts = TTSCache()
    turns = [
        ("user", "What colour is the star?", "image", [0]),
        ("assistant", "The star is red.", "image", [0]),
        ("user", "Thank you!", "image", []),
    ]
    d = build_timeline("d0", turns, USER_VOICES[2], np.random.default_rng(0), tts=tts)
    assert d.wav.shape[0] == 2 and d.wav.shape[1] % FRAME_SIZE == 0
    assert d.num_frames == d.wav.shape[1] // FRAME_SIZE
    # turns alternate channels and do not overlap; each starts on a frame boundary
    for a, b in zip(d.turns, d.turns[1:], strict=False):
        assert a.end <= b.start
    for t in d.turns:
        assert abs(t.start * 12.5 - round(t.start * 12.5)) < 1e-6
    # assistant words on channel 0, user words on channel 1, both with sound there
    for word, (s, e), spk in d.alignments:
        ch = 0 if spk == MAIN_SPEAKER else 1
        assert spk in (MAIN_SPEAKER, USER_SPEAKER)
        seg = d.wav[ch, int(s * 24000) : int(e * 24000)]
        assert np.abs(seg).max() > 0.01, word
        other = d.wav[1 - ch, int(s * 24000) : int(e * 24000)]
        assert np.abs(other).max() == 0.0
    # the cache hit on a repeated utterance
    build_timeline("d1", turns, USER_VOICES[2], np.random.default_rng(1), tts=tts)
    assert tts.hits == 3


def test_timeline_rejects_bad_turns() -> None:
    with pytest.raises(ValueError, match="at least one turn"):
        build_timeline("x", [], USER_VOICES[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="speaker"):
        build_timeline("x", [("robot", "hi", "", [])], USER_VOICES[0], np.random.default_rng(0))
