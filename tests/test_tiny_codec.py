"""The tiny vocoder codec: protocol, shapes, bad inputs, silence, storage, streaming, quality."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshivis_lab.audio.protocol import Codec, StreamingDecoder, StreamingEncoder
from moshivis_lab.audio.quality import codec_round_trip_report, mel_cepstral_distortion
from moshivis_lab.audio.tiny_codec import (
    CONFIG_FILE,
    TinyCodec,
    fit_on_utterances,
    fitting_sentences,
    fitting_speech,
    fitting_utterances,
    phone_accuracy,
    point_phones,
)
from moshivis_lab.config import CodecConfig
from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, synthesize

SR = 24000
FIT_SENTENCES = 240  # ~10 minutes of speech over the 7 fitting voices


@pytest.fixture(scope="module")
def codec() -> TinyCodec:
    """A full-size tiny codec (8 x 256) fitted on the non-held-out voices."""
    cfg = dataclasses.replace(CodecConfig.tiny(), kmeans_iters=15, phone_sentences=300)
    return TinyCodec.fit(fitting_speech(FIT_SENTENCES, seed=0), cfg, progress=False)


@pytest.fixture(scope="module")
def small_cfg() -> CodecConfig:
    """A small config (5 codebooks of 32) for quick fits."""
    return dataclasses.replace(
        CodecConfig.tiny(),
        num_codebooks=5,
        cardinality=32,
        kmeans_iters=5,
        fit_seconds=30.0,
        phone_sentences=30,
        phone_epochs=3,
        phone_hidden=32,
    )


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """A held-out-voice sentence (about 3 s)."""
    u = synthesize("Where is the purple umbrella hiding this morning?", USER_VOICES[-1])
    return np.clip(u.wav, -1.0, 1.0)


def heldout(n: int, voices: tuple, seed: int) -> list[np.ndarray]:
    """``n`` sentences unseen in fitting, spoken round-robin by ``voices``."""
    sents = fitting_sentences(n, seed=seed)
    return [np.clip(synthesize(s, voices[i % len(voices)]).wav, -1, 1) for i, s in enumerate(sents)]


def test_protocol(codec: TinyCodec) -> None:
    assert isinstance(codec, Codec)
    assert (codec.sample_rate, codec.frame_rate, codec.frame_size) == (24000, 12.5, 1920)
    assert (codec.num_codebooks, codec.cardinality) == (8, 256)
    assert isinstance(codec.streaming_encoder(), StreamingEncoder)
    assert isinstance(codec.streaming_decoder(), StreamingDecoder)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(1, 5 * 1920 + 7), amp=st.sampled_from([0.0, 1e-3, 0.3]))
def test_frame_counts(codec: TinyCodec, speech: np.ndarray, n: int, amp: float) -> None:
    x = (np.resize(speech, n) * amp).astype(np.float32)
    codes = codec.encode(x)
    assert codes.shape == (8, math.ceil(n / 1920)) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 256
    y = codec.decode(codes)
    assert y.dtype == np.float32 and y.shape == (codes.shape[1] * 1920,)
    assert np.all(np.isfinite(y)) and np.abs(y).max() < 4.0


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(1, 4 * 1920), chunk=st.integers(1, 3000))
def test_streaming_equals_batch_any_length(
    codec: TinyCodec, speech: np.ndarray, n: int, chunk: int
) -> None:
    x = np.resize(speech, n).astype(np.float32)
    enc = codec.streaming_encoder()
    parts = [enc.push(x[i : i + chunk]) for i in range(0, n, chunk)] + [enc.flush()]
    codes = codec.encode(x)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), codes)
    dec = codec.streaming_decoder()
    y = np.concatenate([dec.step(c) for c in codes.T])
    np.testing.assert_allclose(y, codec.decode(codes), atol=1e-5)


def test_bad_inputs(codec: TinyCodec, speech: np.ndarray) -> None:
    bad = speech.copy()
    bad[100] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        codec.encode(np.zeros((2, 2, 100), np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        codec.encode(speech * 3)
    codes = codec.encode(speech)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(codes[:7])
    with pytest.raises(ValueError, match="shape"):
        codec.decode(codes[0])
    with pytest.raises(ValueError, match="integer"):
        codec.decode(codes.astype(np.float32))
    for v in (-1, 256):
        c = codes.copy()
        c[3, 1] = v
        with pytest.raises(ValueError, match=r"\[0, 256\)"):
            codec.decode(c)
    dec = codec.streaming_decoder()
    with pytest.raises(ValueError, match="shape"):
        dec.step(codes[:, :2])
    enc = codec.streaming_encoder()
    enc.push(speech[:1000])
    enc.flush()
    with pytest.raises(ValueError, match="flushed"):
        enc.push(speech[:1000])
    assert codec.decode(np.zeros((8, 0), np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="kind='tiny'"):
        TinyCodec(CodecConfig.mimi("/nowhere"), codec.tables)


def test_silence_is_code_zero_and_decodes_to_zeros(codec: TinyCodec, speech: np.ndarray) -> None:
    codes = codec.encode(np.zeros(3 * SR, np.float32))
    assert codes.shape == (8, 38) and not codes.any()
    assert not codec.decode(codes).any()  # exact digital silence
    tiny_noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 1e-6
    assert not codec.encode(tiny_noise).any()
    padded = np.concatenate([np.zeros(SR), speech, np.zeros(SR)]).astype(np.float32)
    c = codec.encode(padded)
    assert not c[:, :10].any() and not c[:, -10:].any()
    assert c[:, 14:-14].any(axis=0).all()  # speech frames are not silence


def test_input_formats(codec: TinyCodec, speech: np.ndarray) -> None:
    ref = codec.encode(speech)
    stereo = np.stack([speech, speech])
    np.testing.assert_array_equal(codec.encode(stereo), ref)
    np.testing.assert_array_equal(codec.encode(stereo.T.copy()), ref)
    pcm16 = np.round(speech * 32767).astype(np.int16)
    c16 = codec.encode(pcm16)
    assert c16.shape == ref.shape and (c16 == ref).mean() > 0.8
    import soxr

    x44 = soxr.resample(speech, SR, 44100).astype(np.float32).clip(-1, 1)
    c44 = codec.encode(x44, sample_rate=44100)
    enc = codec.streaming_encoder(sample_rate=44100)
    s44 = np.concatenate(
        [enc.push(x44[i : i + 4410]) for i in range(0, x44.size, 4410)] + [enc.flush()], axis=1
    )
    assert s44.shape == c44.shape and (s44[1] == c44[1]).mean() > 0.8
    assert abs(c44.shape[1] - ref.shape[1]) <= 1
    n = min(c44.shape[1], ref.shape[1])
    voiced = (ref[1, :n] > 0) & (c44[1, :n] > 0)
    assert voiced.sum() > 10
    assert np.median(np.abs(ref[1, :n][voiced] - c44[1, :n][voiced])) <= 2  # F0 levels (~0.8 %)


def test_semantic_codebook_ignores_level(codec: TinyCodec, speech: np.ndarray) -> None:
    loud, quiet = codec.encode(speech), codec.encode(speech * 0.1)
    live = loud[3] > 0
    assert (loud[0, live] == quiet[0, live]).mean() > 0.9  # content code: same
    assert (loud[3, live] != quiet[3, live]).mean() > 0.9  # energy code: differs


def test_save_load_round_trip(codec: TinyCodec, speech: np.ndarray, tmp_path) -> None:
    codec.save(tmp_path / "c")
    back = TinyCodec.load(tmp_path / "c", codec.cfg)
    assert back.cfg == codec.cfg
    for k, v in codec.tables.items():
        np.testing.assert_array_equal(back.tables[k], v)
    codes = codec.encode(speech)
    np.testing.assert_array_equal(back.encode(speech), codes)
    np.testing.assert_array_equal(back.decode(codes), codec.decode(codes))
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="different config"):
        TinyCodec.load(tmp_path / "c", dataclasses.replace(codec.cfg, cardinality=128))
    with pytest.raises(FileNotFoundError, match="fit one first"):
        TinyCodec.load(tmp_path / "missing")
    meta = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    meta["config"]["num_codebooks"] = 6
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the config"):
        TinyCodec.load(tmp_path / "c")


def test_fit_is_deterministic_and_validates(small_cfg: CodecConfig) -> None:
    wavs = fitting_speech(12, seed=3)
    # espeak-ng carries state from one utterance to the next within a process, so the labelled
    # speech is synthesised once here (a fresh process replays the same sequence exactly).
    labelled = fitting_utterances(small_cfg.phone_sentences, seed=0)
    a = TinyCodec.fit(wavs, small_cfg, progress=False, labelled=labelled)
    b = TinyCodec.fit(iter(wavs), small_cfg, progress=False, labelled=iter(labelled))
    for k in a.tables:
        np.testing.assert_array_equal(a.tables[k], b.tables[k])
    c = TinyCodec.fit(
        wavs, dataclasses.replace(small_cfg, seed=1), progress=False, labelled=labelled
    )
    assert not np.array_equal(a.tables["semantic"], c.tables["semantic"])
    utts = [synthesize(s, ASSISTANT_VOICE) for s in fitting_sentences(4, seed=5)]
    d = fit_on_utterances(utts, small_cfg, progress=False)
    assert d.encode(utts[0].wav.clip(-1, 1)).shape[0] == 5
    with pytest.raises(ValueError, match="no audio"):
        TinyCodec.fit([], small_cfg, progress=False)
    with pytest.raises(ValueError, match="silence"):
        TinyCodec.fit([np.zeros(SR, np.float32)], small_cfg, progress=False)


def test_streaming_matches_batch(codec: TinyCodec, speech: np.ndarray) -> None:
    x = np.concatenate([speech, speech[: SR // 3] * 0.5]).astype(np.float32)
    codes = codec.encode(x)
    enc = codec.streaming_encoder()
    rng = np.random.default_rng(0)
    parts, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 5000))
        parts.append(enc.push(x[i : i + n]))
        i += n
    parts.append(enc.flush())
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), codes)
    dec = codec.streaming_decoder()
    streamed = np.concatenate([dec.step(codes[:, t]) for t in range(codes.shape[1])])
    batch = codec.decode(codes)
    assert streamed.shape == batch.shape
    np.testing.assert_allclose(streamed, batch, atol=1e-5)


def test_round_trip_quality_on_heldout_voices(codec: TinyCodec) -> None:
    """Pitch and voicing survive the round trip on voices the codec never heard."""
    held = heldout(12, tuple(USER_VOICES[-2:]), seed=777)
    r = codec_round_trip_report(codec, held)
    assert r["f0_corr"] >= 0.9, r
    assert r["f0_median_rel_err"] <= 0.05, r
    assert r["voicing_agreement"] >= 0.9, r
    assert r["mcd_db"] < 6.0, r
    assert r["encode_rtf"] > 20 and r["decode_rtf"] > 10, r  # loose: CI machines are shared
    own = codec_round_trip_report(codec, heldout(6, (ASSISTANT_VOICE,), seed=778))
    assert own["f0_corr"] >= 0.9 and own["voicing_agreement"] >= 0.9, own
    assert own["f0_median_rel_err"] <= 0.05 and own["mcd_db"] < 6.0, own


def test_mcd_is_level_free_and_grows_with_damage(speech: np.ndarray) -> None:
    assert mel_cepstral_distortion(speech, 0.25 * speech, SR) < 1e-3
    noisy = speech + 0.01 * np.random.default_rng(0).standard_normal(speech.size)
    assert mel_cepstral_distortion(speech, noisy, SR) > 1.0


def test_tts_records_phonemes_in_time_order() -> None:
    u = synthesize("What colour is a polar bear?", USER_VOICES[0])
    times = [t for t, _ in u.phonemes]
    names = [n for _, n in u.phonemes]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= u.duration
    assert {"p", "b", "l"} <= set(names)  # polar bear
    assert not any("'" in n or "," in n for n in names)  # stress marks removed
    labels = point_phones(u, 10, 480)
    assert len(labels) == 10 and labels[0] in names + ["_"]


def test_phonetic_codebook_means_the_same_for_unseen_voices(codec: TinyCodec) -> None:
    """Codebook 0 is phonetic: an unseen voice's frames get codes whose phone a known voice's
    frames of the same sentences taught (far above chance, and above the k-means codebook)."""
    texts = fitting_sentences(8, seed=11)
    known = fitting_utterances(8, voices=(ASSISTANT_VOICE,), texts=texts)
    unseen = fitting_utterances(8, voices=USER_VOICES[-2:], texts=texts)
    acc = phone_accuracy(codec, unseen, reference=known)
    assert len(codec.phone_inventory) > 30 and codec.phone_inventory[0] == "_"
    assert acc["classifier"] > 0.35, acc
    assert acc["code0"] > 3 * acc["chance"], acc
    km = TinyCodec.fit(
        [u.wav for u in fitting_utterances(60, seed=0)],
        dataclasses.replace(codec.cfg, semantic="kmeans", kmeans_iters=10, fit_seconds=120.0),
        progress=False,
    )
    base = phone_accuracy(km, unseen, reference=known)
    assert acc["code0"] > base["code0"], (acc, base)
    with pytest.raises(ValueError, match="phonetic"):
        km.phone_posteriors(km.features(unseen[0].wav))


def test_phonetic_fit_needs_phonemes(small_cfg: CodecConfig) -> None:
    bare = [dataclasses.replace(u, phonemes=[]) for u in fitting_utterances(3, seed=1)]
    with pytest.raises(ValueError, match="no phonemes"):
        TinyCodec.fit([u.wav for u in bare], small_cfg, progress=False, labelled=bare)
    with pytest.raises(ValueError, match="semantic"):
        dataclasses.replace(small_cfg, semantic="words")


def test_nearest_codeword_ties_have_one_winner_whatever_the_rounding() -> None:
    from moshivis_lab.audio.tiny_codec import TIE_TOL, _nearest

    rng = np.random.default_rng(0)
    cents = rng.normal(size=(16, 6))
    cents[9] = cents[3] * (1 + 1e-15)  # a near-duplicate codeword, as degenerate codebooks hold
    cents[12] = cents[3]  # an exact one
    x = cents[[3, 9, 12]] + 1e-3
    base = _nearest(x, cents)
    assert base.tolist() == [3, 3, 3]  # the lowest index wins the tie
    for _ in range(20):  # last-bit noise (another BLAS kernel, another batch size) changes nothing
        wobble = x * (1 + rng.uniform(-4e-16, 4e-16, size=x.shape))
        assert _nearest(wobble, cents).tolist() == [3, 3, 3]
    # a real difference (far above the tie tolerance) still decides
    far = cents.copy()
    far[9] = cents[3] + 1e-3
    assert _nearest(far[[9]], far).tolist() == [9]
    assert TIE_TOL < 1e-6
    # batch-size independence on a batch of random points
    pts = rng.normal(size=(333, 6))
    whole = _nearest(pts, cents)
    parts = np.concatenate([_nearest(pts[i : i + 7], cents) for i in range(0, 333, 7)])
    assert np.array_equal(whole, parts)
