"""Prosody features (F0, voicing, energy, speaking rate, pauses) and a comparison of two utterances.

Used to check whether a model's voice and prosody survived (a fine-tuned vs the base model, a
codec round trip, a pitch-shifted control). All analysis runs on mono 16 kHz audio with frames
every ``hop_s`` seconds, centred (frame ``i`` is centred at ``i * hop_s``), so pYIN, CREPE and
the energy share one time base.

- ``f0_method="pyin"``: librosa's probabilistic YIN (its first call compiles numba, ~2-15 s).
- ``f0_method="crepe"``: torchcrepe with the weights it ships (``crepe_model`` "tiny" or
  "full"); Viterbi decoding refined to sub-bin precision by a local weighted average;
  voicing = median-filtered periodicity >= ``voicing_threshold``.

Both are gated by energy: frames below ``silence_db`` dBFS are never voiced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from moshivis_lab._compat import ensure_torchaudio_importable
from moshivis_lab.audio.io import prepare

ANALYSIS_RATE = 16000  # CREPE's native rate; pYIN and the energy use it too
MIN_SECONDS = 0.05
ENERGY_FLOOR_DB = -100.0
SPEECH_REL_DB = 35.0  # a frame is speech when within this many dB of the loud (95th pct) level
MIN_PAUSE_S = 0.15
_CREPE_CENTS_PER_BIN = 20.0
_CREPE_CENTS_OFFSET = 1997.3794084376191  # torchcrepe's cents of bin 0


@dataclass
class Prosody:
    """Frame-wise prosody of one utterance (one frame every ``hop_s`` s) and a summary dict."""

    times: np.ndarray  # frame centres, seconds
    f0: np.ndarray  # Hz, NaN where unvoiced
    voiced: np.ndarray  # bool
    voiced_prob: np.ndarray  # pYIN voicing probability or CREPE periodicity, in [0, 1]
    energy: np.ndarray  # RMS level, dBFS (floored at -100)
    speech: np.ndarray  # bool: loud enough to be speech (voiced or not)
    summary: dict[str, float] = field(default_factory=dict)
    method: str = "pyin"
    hop_s: float = 0.01
    rate_unit: str = "syllables/s"

    def __len__(self) -> int:
        return len(self.times)


def _n_frames(n_samples: int, hop: int) -> int:
    return 1 + n_samples // hop


def _fit(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """Trim or pad ``a`` to ``n`` frames."""
    if len(a) >= n:
        return a[:n]
    return np.concatenate([a, np.full(n - len(a), fill, dtype=a.dtype)])


def _energy_db(x: np.ndarray, hop: int) -> np.ndarray:
    import librosa

    win = max(2 * hop, 400)  # >= 25 ms
    rms = librosa.feature.rms(y=x, frame_length=win, hop_length=hop, center=True)[0]
    return np.maximum(20.0 * np.log10(np.maximum(rms, 1e-12)), ENERGY_FLOOR_DB)


def _f0_pyin(
    x: np.ndarray, hop: int, fmin: float, fmax: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import librosa

    frame_length = 1024
    while frame_length // 2 - 1 <= math.ceil(ANALYSIS_RATE / fmin):
        frame_length *= 2
    f0, voiced, prob = librosa.pyin(
        x,
        fmin=fmin,
        fmax=fmax,
        sr=ANALYSIS_RATE,
        frame_length=frame_length,
        hop_length=hop,
        center=True,
    )
    return f0.astype(np.float64), voiced.astype(bool), np.nan_to_num(prob).astype(np.float64)


def _crepe_viterbi_refined(probs: Any) -> tuple[Any, Any]:
    """CREPE decoder: Viterbi path over the 360 bins, then a weighted average of +-4 bins.

    Deterministic (torchcrepe's own decoders add random dither to the bin centres).
    """
    import librosa
    import torch

    p = torch.nan_to_num(probs, neginf=0.0).clamp_min(0.0)  # [B, 360, T]
    n_bins = p.shape[1]
    if not hasattr(_crepe_viterbi_refined, "transition"):
        xx, yy = np.meshgrid(range(n_bins), range(n_bins))
        tr = np.maximum(12 - abs(xx - yy), 0).astype(np.float64)
        _crepe_viterbi_refined.transition = tr / tr.sum(axis=1, keepdims=True)  # type: ignore[attr-defined]
    sm = torch.softmax(torch.nan_to_num(probs, neginf=-1e9), dim=1).cpu().numpy()
    bins = torch.as_tensor(
        np.stack(
            [librosa.sequence.viterbi(s, _crepe_viterbi_refined.transition) for s in sm]  # type: ignore[attr-defined]
        ),
        dtype=torch.int64,
        device=probs.device,
    )
    idx = bins[:, None, :] + torch.arange(-4, 5, device=probs.device)[None, :, None]
    valid = (idx >= 0) & (idx < n_bins)
    idx = idx.clamp(0, n_bins - 1)
    w = torch.where(valid, p.gather(1, idx), torch.zeros((), device=probs.device))
    cents = _CREPE_CENTS_PER_BIN * idx.to(torch.float64) + _CREPE_CENTS_OFFSET
    centre = _CREPE_CENTS_PER_BIN * bins.to(torch.float64) + _CREPE_CENTS_OFFSET
    ws = w.to(torch.float64).sum(1)
    c = torch.where(ws > 0, (w * cents).sum(1) / ws.clamp_min(1e-12), centre)
    return bins, 10.0 * 2.0 ** (c / 1200.0)


def _f0_crepe(
    x: np.ndarray,
    hop: int,
    fmin: float,
    fmax: float,
    model: str,
    device: str,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ensure_torchaudio_importable()
    import torch
    import torchcrepe

    audio = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    pitch, periodicity = torchcrepe.predict(
        audio,
        ANALYSIS_RATE,
        hop_length=hop,
        fmin=fmin,
        fmax=fmax,
        model=model,
        decoder=_crepe_viterbi_refined,
        return_periodicity=True,
        batch_size=512,
        device=device,
        pad=True,
    )
    periodicity = torchcrepe.filter.median(periodicity.float(), 3)
    per = periodicity[0].cpu().numpy().astype(np.float64)
    f0 = pitch[0].cpu().numpy().astype(np.float64)
    voiced = per >= threshold
    return np.where(voiced, f0, np.nan), voiced, np.clip(per, 0.0, 1.0)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index pairs of the True runs of a boolean array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist(), strict=True))


def _syllable_nuclei(
    energy: np.ndarray, voiced: np.ndarray, speech_thr: float, hop_s: float
) -> int:
    """Energy-envelope peaks (>= 2 dB dips between them, >= 80 ms apart) in voiced speech."""
    from scipy.signal import find_peaks

    k = max(1, int(round(0.05 / hop_s)))
    env = np.convolve(energy, np.ones(k) / k, mode="same")
    peaks, _ = find_peaks(env, prominence=2.0, distance=max(1, int(round(0.08 / hop_s))))
    near_voiced = np.convolve(voiced.astype(float), np.ones(3), mode="same") > 0
    return int(sum(1 for p in peaks if env[p] > speech_thr and near_voiced[p]))


def _word_span(words: Sequence[Any]) -> tuple[int, float]:
    """Number of words and their span in seconds (words: objects/dicts with start/end, or tuples)."""

    def se(w: Any) -> tuple[float, float]:
        if isinstance(w, dict):
            return float(w["start"]), float(w["end"])
        if isinstance(w, tuple | list):
            return float(w[-2]), float(w[-1])
        return float(w.start), float(w.end)

    spans = [se(w) for w in words]
    if not spans:
        return 0, 0.0
    return len(spans), max(e for _, e in spans) - min(s for s, _ in spans)


def _summary(
    f0: np.ndarray,
    voiced: np.ndarray,
    energy: np.ndarray,
    speech: np.ndarray,
    speech_thr: float,
    hop_s: float,
    duration: float,
    words: Sequence[Any] | None,
) -> tuple[dict[str, float], str]:
    nan = float("nan")
    s: dict[str, float] = {"duration": duration}
    fv = f0[voiced & np.isfinite(f0)]
    if fv.size:
        med = float(np.median(fv))
        s["f0_median"], s["f0_mean"] = med, float(fv.mean())
        s["f0_std"] = float(np.std(12.0 * np.log2(fv / med)))  # semitones
    else:
        s["f0_median"] = s["f0_mean"] = s["f0_std"] = nan
    idx = np.nonzero(speech)[0]
    if idx.size:
        first, last = int(idx[0]), int(idx[-1])
        span = (last - first + 1) * hop_s
        pauses = [
            (b - a) * hop_s
            for a, b in _runs(~speech[first : last + 1])
            if (b - a) * hop_s > MIN_PAUSE_S
        ]
        n_syl = _syllable_nuclei(energy, voiced, speech_thr, hop_s)
        s["voiced_fraction"] = float(voiced[first : last + 1].mean())
        s["speech_span_s"] = span
        s["pause_count"] = float(len(pauses))
        s["pause_total_s"] = float(sum(pauses))
        s["syllable_count"] = float(n_syl)
        s["syllable_rate"] = n_syl / span
        phonation = span - s["pause_total_s"]
        s["articulation_rate"] = n_syl / phonation if phonation > 0 else nan
        s["energy_mean_db"] = float(energy[speech].mean())
    else:
        s.update(
            voiced_fraction=0.0,
            speech_span_s=0.0,
            pause_count=0.0,
            pause_total_s=0.0,
            syllable_count=0.0,
            syllable_rate=nan,
            articulation_rate=nan,
            energy_mean_db=nan,
        )
    if words is not None:
        n, wspan = _word_span(words)
        s["word_count"] = float(n)
        s["speaking_rate"] = n / wspan if wspan > 0 else nan
        return s, "words/s"
    s["speaking_rate"] = s["syllable_rate"]
    return s, "syllables/s"


def prosody_features(
    wav: np.ndarray,
    sample_rate: int,
    *,
    f0_method: Literal["pyin", "crepe"] = "pyin",
    fmin: float = 60.0,
    fmax: float = 500.0,
    hop_s: float = 0.01,
    words: Sequence[Any] | None = None,
    crepe_model: Literal["tiny", "full"] = "tiny",
    device: str = "cpu",
    voicing_threshold: float = 0.21,
    silence_db: float = -60.0,
) -> Prosody:
    """F0, voicing, energy and rate/pause summary of one utterance (any PCM array, any rate).

    ``words`` (objects or dicts with ``start``/``end`` seconds, e.g. ``Utterance.words``) make
    ``speaking_rate`` words per second; otherwise it is syllable nuclei per second over the span
    from the first to the last speech frame. ``f0_std`` is in semitones around the median.
    """
    if f0_method not in ("pyin", "crepe"):
        raise ValueError(f"f0_method must be 'pyin' or 'crepe', got {f0_method!r}")
    if crepe_model not in ("tiny", "full"):
        raise ValueError(f"crepe_model must be 'tiny' or 'full', got {crepe_model!r}")
    if not (0 < fmin < fmax <= 2000.0):
        raise ValueError(f"need 0 < fmin < fmax <= 2000 Hz, got fmin={fmin}, fmax={fmax}")
    if not (1.0 / ANALYSIS_RATE <= hop_s <= 0.1):
        raise ValueError(f"hop_s must be in [1/{ANALYSIS_RATE}, 0.1] seconds, got {hop_s}")
    if f0_method == "pyin" and fmin < 20.0:
        raise ValueError(f"fmin must be >= 20 Hz for pyin, got {fmin}")
    x = prepare(wav, sample_rate, ANALYSIS_RATE, min_seconds=MIN_SECONDS, name="audio")
    duration = len(x) / ANALYSIS_RATE
    hop = max(1, int(round(hop_s * ANALYSIS_RATE)))
    hop_s = hop / ANALYSIS_RATE
    n = _n_frames(len(x), hop)
    energy = _fit(_energy_db(x, hop), n, ENERGY_FLOOR_DB)
    if f0_method == "pyin":
        f0, voiced, prob = _f0_pyin(x, hop, fmin, fmax)
    else:
        f0, voiced, prob = _f0_crepe(x, hop, fmin, fmax, crepe_model, device, voicing_threshold)
    f0, voiced, prob = _fit(f0, n, np.nan), _fit(voiced, n, False), _fit(prob, n, 0.0)
    voiced = voiced & (energy > silence_db) & np.isfinite(f0)
    f0 = np.where(voiced, f0, np.nan)
    loud = float(np.percentile(energy, 95))
    speech_thr = max(silence_db, loud - SPEECH_REL_DB)
    speech = energy > speech_thr
    summary, unit = _summary(f0, voiced, energy, speech, speech_thr, hop_s, duration, words)
    return Prosody(
        times=np.arange(n) * hop_s,
        f0=f0,
        voiced=voiced,
        voiced_prob=prob,
        energy=energy,
        speech=speech,
        summary=summary,
        method=f0_method if f0_method == "pyin" else f"crepe-{crepe_model}",
        hop_s=hop_s,
        rate_unit=unit,
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _ratio(a: float, b: float) -> float:
    return float(b / a) if np.isfinite(a) and np.isfinite(b) and a > 0 else float("nan")


def _semitones(p: Prosody) -> np.ndarray:
    med = p.summary.get("f0_median", float("nan"))
    if not np.isfinite(med):
        return np.zeros(len(p))
    return np.where(p.voiced, 12.0 * np.log2(np.where(p.voiced, p.f0, med) / med), 0.0)


def _speech_span(p: Prosody) -> tuple[int, int]:
    """[first, last + 1) frames of speech (all frames when there is none)."""
    idx = np.nonzero(p.speech)[0]
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, len(p))


def _dtw_path(a: Prosody, b: Prosody, max_cells: float = 4e6) -> tuple[np.ndarray, np.ndarray]:
    """Frame index pairs aligning the speech spans of ``a`` and ``b`` by DTW.

    Leading and trailing silence is left out (DTW would pair it with the first/last speech
    frame of the other); the features are z-scored energy, voicing and F0 in semitones around
    each utterance's median (so a transposed copy still aligns).
    """
    import librosa

    def feats(p: Prosody) -> np.ndarray:
        e = p.energy
        ez = (e - e.mean()) / (e.std() + 1e-6)
        return np.stack([ez, p.voiced.astype(float), _semitones(p) / 6.0])

    (a0, a1), (b0, b1) = _speech_span(a), _speech_span(b)
    stride = max(1, math.ceil(math.sqrt((a1 - a0) * (b1 - b0) / max_cells)))
    fa, fb = feats(a)[:, a0:a1:stride], feats(b)[:, b0:b1:stride]
    _, wp = librosa.sequence.dtw(X=fa, Y=fb, metric="euclidean")
    wp = wp[::-1] * stride
    return np.minimum(wp[:, 0] + a0, a1 - 1), np.minimum(wp[:, 1] + b0, b1 - 1)


def compare_prosody(a: Prosody, b: Prosody) -> dict[str, float | str]:
    """How ``b``'s prosody differs from ``a``'s: F0 ratio, contour/energy correlations, rate, voicing.

    Frames are compared one to one when both have the same length, otherwise along a DTW path
    between their speech spans (``"alignment"`` says which). Correlations are Pearson's; the F0 contour is compared in
    semitones over frames voiced in both; energy over frames that are speech in either.
    """
    if not math.isclose(a.hop_s, b.hop_s):
        raise ValueError(f"both Prosody objects need the same hop_s, got {a.hop_s} and {b.hop_s}")
    if len(a) == len(b):
        ia = ib = np.arange(len(a))
        alignment = "frames"
    else:
        ia, ib = _dtw_path(a, b)
        alignment = "dtw"
    both_voiced = a.voiced[ia] & b.voiced[ib]
    sa, sb = a.f0[ia][both_voiced], b.f0[ib][both_voiced]
    st_a, st_b = 12.0 * np.log2(sa), 12.0 * np.log2(sb)
    either_speech = a.speech[ia] | b.speech[ib]
    ratio = _ratio(a.summary["f0_median"], b.summary["f0_median"])
    rmse = float(np.sqrt(np.mean((st_a - st_b) ** 2))) if sa.size else float("nan")
    out: dict[str, float | str] = {
        "alignment": alignment,
        "f0_median_ratio": ratio,
        "f0_shift_semitones": 12.0 * math.log2(ratio) if np.isfinite(ratio) else float("nan"),
        "f0_correlation": _pearson(st_a, st_b),
        "f0_rmse_semitones": rmse,
        "energy_correlation": _pearson(a.energy[ia][either_speech], b.energy[ib][either_speech]),
        "speaking_rate_ratio": _ratio(a.summary["speaking_rate"], b.summary["speaking_rate"]),
        "voicing_agreement": (
            float((a.voiced[ia] == b.voiced[ib])[either_speech].mean())
            if either_speech.any()
            else float("nan")
        ),
        "voiced_frames_compared": float(both_voiced.sum()),
    }
    return out
