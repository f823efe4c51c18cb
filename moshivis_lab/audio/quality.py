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


def pitch_agreement(ref: np.ndarray, test: np.ndarray, sample_rate: int) -> dict[str, float]:
    """F0 correlation and median relative error on frames voiced in both, and voicing agreement."""
    f_a, v_a = pitch_track(ref, sample_rate)
    f_b, v_b = pitch_track(test, sample_rate)
    n = min(len(f_a), len(f_b))
    f_a, v_a, f_b, v_b = f_a[:n], v_a[:n], f_b[:n], v_b[:n]
    both = v_a & v_b & np.isfinite(f_a) & np.isfinite(f_b)
    out = {
        "voicing_agreement": float(np.mean(v_a == v_b)),
        "voiced_frames_ref": float(v_a.sum()),
        "voiced_frames_both": float(both.sum()),
    }
    if both.sum() >= 3:
        out["f0_corr"] = float(np.corrcoef(f_a[both], f_b[both])[0, 1])
        out["f0_median_rel_err"] = float(np.median(np.abs(f_b[both] - f_a[both]) / f_a[both]))
    else:
        out["f0_corr"] = float("nan")
        out["f0_median_rel_err"] = float("nan")
    return out


def codec_round_trip_report(
    codec: Codec, wavs: Sequence[np.ndarray], sample_rate: int | None = None
) -> dict[str, Any]:
    """Round-trip ``wavs`` through ``codec``; pitch, voicing, MCD and real-time factors.

    F0 correlation / median error and MCD pool all frames of all clips; ``*_rtf`` are how many
    seconds of audio one second of compute encodes or decodes (higher is faster).
    """
    sr = codec.sample_rate if sample_rate is None else sample_rate
    if not len(wavs):
        raise ValueError("codec_round_trip_report: no waveforms given")
    refs, decs = [], []
    t_enc = t_dec = 0.0
    seconds = 0.0
    for w in wavs:
        x = prepare(w, sr, codec.sample_rate)
        t = time.perf_counter()
        codes = codec.encode(x)
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        y = codec.decode(codes)
        t_dec += time.perf_counter() - t
        refs.append(x)
        decs.append(np.asarray(y, dtype=np.float32)[: x.size])
        seconds += x.size / codec.sample_rate
    fa, va, fb, vb, mcds = [], [], [], [], []
    for x, y in zip(refs, decs, strict=True):
        f1, v1 = pitch_track(x, codec.sample_rate)
        f2, v2 = pitch_track(y, codec.sample_rate)
        fa.append(f1), va.append(v1), fb.append(f2), vb.append(v2)
        mcds.append(mel_cepstral_distortion(x, y, codec.sample_rate))
    f_a, v_a, f_b, v_b = (np.concatenate(z) for z in (fa, va, fb, vb))
    both = v_a & v_b & np.isfinite(f_a) & np.isfinite(f_b)
    rel = np.abs(f_b[both] - f_a[both]) / f_a[both] if both.any() else np.array([np.nan])
    corr = float(np.corrcoef(f_a[both], f_b[both])[0, 1]) if both.sum() >= 3 else float("nan")
    return {
        "n_clips": len(refs),
        "seconds": seconds,
        "f0_corr": corr,
        "f0_corr_log": float(np.corrcoef(np.log(f_a[both]), np.log(f_b[both]))[0, 1])
        if both.sum() >= 3
        else float("nan"),
        "f0_median_rel_err": float(np.median(rel)),
        "f0_gross_err_rate": float(np.mean(rel > 0.2)),
        "voicing_agreement": float(np.mean(v_a == v_b)),
        "voiced_fraction_ref": float(np.mean(v_a)),
        "voiced_fraction_decoded": float(np.mean(v_b)),
        "mcd_db": float(np.nanmean(mcds)),
        "encode_rtf": seconds / max(t_enc, 1e-9),
        "decode_rtf": seconds / max(t_dec, 1e-9),
    }
