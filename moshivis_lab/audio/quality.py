"""Codec round-trip quality: pitch (pYIN), voicing, mel-cepstral distortion and speed.

All measures compare an original waveform with ``codec.decode(codec.encode(wav))`` trimmed to
the same length, frame by frame (same hop, so frames align 1:1). F0 comes from
``librosa.pyin`` (the first call compiles numba code, ~15 s). Functions return plain numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import librosa
import numpy as np

from moshivis_lab.audio.io import prepare
from moshivis_lab.audio.protocol import Codec

PYIN_FMIN = 60.0
PYIN_FMAX = 500.0
HOP = 240  # 10 ms at 24 kHz
N_MFCC = 13
MCD_CONST = 10.0 / math.log(10.0) * math.sqrt(2.0)


def pitch_track(wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """F0 (Hz, NaN where unvoiced) and the voiced flag per 10 ms hop, by ``librosa.pyin``."""
    hop = max(1, int(round(sample_rate * HOP / 24000)))
    frame = 2048 if sample_rate >= 16000 else 1024
    f0, voiced, _ = librosa.pyin(
        np.asarray(wav, dtype=np.float32),
        fmin=PYIN_FMIN,
        fmax=PYIN_FMAX,
        sr=sample_rate,
        frame_length=frame,
        hop_length=hop,
    )
    return f0, voiced.astype(bool)


def mel_power(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mel power spectrogram ``[40, frames]`` (1024-point FFT, 10 ms hop)."""
    hop = max(1, int(round(sample_rate * HOP / 24000)))
    return librosa.feature.melspectrogram(
        y=np.asarray(wav, dtype=np.float32),
        sr=sample_rate,
        n_fft=1024,
        hop_length=hop,
        n_mels=40,
        power=2.0,
    )


def mel_cepstra(mel: np.ndarray, n_mfcc: int = N_MFCC) -> np.ndarray:
    """Mel-cepstra ``[frames, n_mfcc]`` on the scale the MCD formula assumes.

    The natural-log mel *amplitude* spectrum (floored 80 dB below its own peak) is expanded as
    ``c0 + sum_d c_d cos(pi d (m + 1/2) / M)`` (SPTK's ``mcep`` convention), i.e. librosa's
    orthonormal DCT (``mfcc``) divided by ``sqrt(M / 2)``; the MCD of such cepstra equals the
    RMS difference in dB of the cepstrally smoothed log spectra.
    """
    floor = max(float(mel.max()), 1e-30) * 1e-8
    log_amp = 0.5 * np.log(np.maximum(mel, floor))
    return librosa.feature.mfcc(S=log_amp, n_mfcc=n_mfcc).T / math.sqrt(mel.shape[0] / 2)


def mel_cepstral_distortion(ref: np.ndarray, test: np.ndarray, sample_rate: int) -> float:
    """Mean MCD (dB) over c1..c12 on frames where ``ref`` is within 40 dB of its loudest frame.

    ``MCD = 10 / ln(10) * sqrt(2 * sum_d (c_d - c'_d)^2)`` per frame (frames aligned 1:1), with
    the cepstra of ``mel_cepstra``; level (c0) is excluded, so a gain change costs nothing.
    """
    m_a, m_b = mel_power(ref, sample_rate), mel_power(test, sample_rate)
    a, b = mel_cepstra(m_a), mel_cepstra(m_b)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    energy = m_a.sum(0)[:n]
    speech = energy > energy.max() * 1e-4
    if not speech.any():
        return float("nan")
    diff = a[speech, 1:] - b[speech, 1:]
    return float(np.mean(MCD_CONST * np.sqrt((diff**2).sum(-1))))


def _pitch_stats(f_a: np.ndarray, v_a: np.ndarray, f_b: np.ndarray, v_b: np.ndarray) -> dict:
    """Pitch agreement of two aligned pYIN tracks (reference ``a``, test ``b``)."""
    n = min(len(f_a), len(f_b))
    f_a, v_a, f_b, v_b = f_a[:n], v_a[:n], f_b[:n], v_b[:n]
    both = v_a & v_b & np.isfinite(f_a) & np.isfinite(f_b)
    ok = both.sum() >= 3
    rel = np.abs(f_b[both] - f_a[both]) / f_a[both]
    return {
        "f0_corr": float(np.corrcoef(f_a[both], f_b[both])[0, 1]) if ok else math.nan,
        "f0_corr_log": float(np.corrcoef(np.log(f_a[both]), np.log(f_b[both]))[0, 1])
        if ok
        else math.nan,
        "f0_median_rel_err": float(np.median(rel)) if ok else math.nan,
        "f0_gross_err_rate": float(np.mean(rel > 0.2)) if ok else math.nan,
        "voicing_agreement": float(np.mean(v_a == v_b)) if n else math.nan,
        "voiced_fraction_ref": float(np.mean(v_a)) if n else math.nan,
        "voiced_fraction_test": float(np.mean(v_b)) if n else math.nan,
    }


def pitch_agreement(ref: np.ndarray, test: np.ndarray, sample_rate: int) -> dict[str, float]:
    """F0 correlation / median relative error on frames voiced in both, and voicing agreement."""
    return _pitch_stats(*pitch_track(ref, sample_rate), *pitch_track(test, sample_rate))


def codec_round_trip_report(
    codec: Codec, wavs: Sequence[np.ndarray], sample_rate: int | None = None
) -> dict[str, Any]:
    """Round-trip ``wavs`` through ``codec``: pitch, voicing, MCD and real-time factors.

    Pitch measures pool the pYIN frames of all clips (``f0_*`` on frames voiced in both, gross
    errors are > 20 % off); ``mcd_db`` is the mean over clips; ``*_rtf`` are seconds of audio
    encoded or decoded per second of compute (higher is faster).
    """
    sr = codec.sample_rate if sample_rate is None else sample_rate
    if not len(wavs):
        raise ValueError("codec_round_trip_report: no waveforms given")
    t_enc = t_dec = seconds = 0.0
    tracks: list[list[np.ndarray]] = [[], [], [], []]
    mcds = []
    for w in wavs:
        x = prepare(w, sr, codec.sample_rate)
        t = time.perf_counter()
        codes = codec.encode(x)
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        y = np.asarray(codec.decode(codes), dtype=np.float32)[: x.size]
        t_dec += time.perf_counter() - t
        seconds += x.size / codec.sample_rate
        pair = (*pitch_track(x, codec.sample_rate), *pitch_track(y, codec.sample_rate))
        for lst, arr in zip(tracks, pair, strict=True):
            lst.append(arr)
        mcds.append(mel_cepstral_distortion(x, y, codec.sample_rate))
    stats = _pitch_stats(*(np.concatenate(t) for t in tracks))
    stats["voiced_fraction_decoded"] = stats.pop("voiced_fraction_test")
    return {
        "n_clips": len(wavs),
        "seconds": seconds,
        **stats,
        "mcd_db": float(np.nanmean(mcds)),
        "encode_rtf": seconds / max(t_enc, 1e-9),
        "decode_rtf": seconds / max(t_dec, 1e-9),
    }
