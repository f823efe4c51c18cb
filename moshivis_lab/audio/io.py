"""Audio input: read any file or array and return clean mono float32 at the wanted rate, or say why not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Below this RMS (about -80 dBFS) a signal counts as silence.
SILENCE_RMS = 1e-4


def to_mono_float(
    wav: np.ndarray, *, channel_axis: int | None = None, name: str = "audio"
) -> np.ndarray:
    """Return ``wav`` as 1-D float32 in [-1, 1]: ints are scaled, stereo is averaged, NaN/inf rejected.

    Integer PCM (int8/16/32, uint8) is scaled by its full range; float64 is cast. A 2-D array is
    treated as multi-channel and averaged to mono: ``channel_axis`` names the channel axis (then
    any number of channels is taken); without it, the smaller axis, up to 8 channels.
    """
    a = np.asarray(wav)
    if a.dtype == object or a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected a numeric array of samples, got dtype {a.dtype}")
    if a.dtype.kind == "u":
        info = np.iinfo(a.dtype)
        a = (a.astype(np.float64) - (info.max + 1) / 2) / ((info.max + 1) / 2)
    elif a.dtype.kind == "i":
        a = a.astype(np.float64) / float(-np.iinfo(a.dtype).min)
    if a.ndim == 2 and a.size == 0:  # no samples (an empty mono or stereo file): nothing to mix
        return np.zeros(0, np.float32)
    if a.ndim == 2:
        if channel_axis is not None and channel_axis not in (0, 1, -1, -2):
            raise ValueError(
                f"{name}: channel_axis must be 0 or 1 for a 2-D array, got {channel_axis}"
            )
        axis = channel_axis if channel_axis is not None else int(np.argmin(a.shape))
        if channel_axis is None and a.shape[axis] > 8:
            raise ValueError(
                f"{name}: a 2-D array of shape {a.shape} does not look like [channels, samples] "
                "(more than 8 channels); pass a 1-D mono signal, or channel_axis=0 (channels "
                "first) or 1 (channels last) to prepare / to_mono_float"
            )
        a = a.mean(axis=axis)
    elif a.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D (mono) or 2-D (multi-channel) array, got shape {a.shape}"
        )
    if a.size and not np.all(np.isfinite(a)):
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(
            f"{name}: {bad} samples are NaN or inf; clean the signal (e.g. np.nan_to_num) first"
        )
    a = a.astype(np.float32, copy=False)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if peak > 1.0 + 1e-3:
        raise ValueError(
            f"{name}: float samples must lie in [-1, 1] but the peak is {peak:.3g}; "
            "divide by the full-scale value of your recording"
        )
    return np.clip(a, -1.0, 1.0)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality resampling (soxr) of a mono float signal; a no-op when the rates match."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return np.asarray(wav, dtype=np.float32)
    return soxr.resample(np.asarray(wav, dtype=np.float32), sr_in, sr_out).astype(np.float32)


def prepare(
    wav: np.ndarray,
    sample_rate: int,
    target_rate: int,
    *,
    min_seconds: float = 0.0,
    name: str = "audio",
    channel_axis: int | None = None,
) -> np.ndarray:
    """Mono float32 in [-1, 1] at ``target_rate`` from any PCM array at ``sample_rate`` (see
    ``to_mono_float``). Resampling can overshoot full scale a little (a full-scale square wave
    rings to ~1.07): the resampled signal is clipped to [-1, 1], so every consumer accepts it."""
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise ValueError(
            f"{name}: sample_rate must be a positive integer (Hz), got {sample_rate!r}"
        )
    a = resample(
        to_mono_float(wav, name=name, channel_axis=channel_axis), int(sample_rate), target_rate
    )
    a = np.clip(a, -1.0, 1.0)
    if a.size < int(round(min_seconds * target_rate)):
        raise ValueError(
            f"{name}: {a.size / target_rate:.3f} s is too short; at least {min_seconds:.3f} s is needed"
        )
    return a


def load_audio(
    path: str | os.PathLike[str], target_rate: int, *, min_seconds: float = 0.0
) -> np.ndarray:
    """Read an audio file (wav, flac, ogg...) as mono float32 in [-1, 1] at ``target_rate``: every
    channel averaged (any number), resampled, then clipped to [-1, 1] (see ``prepare``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(
            f"{path}: cannot be read as audio ({e}); is it a valid wav/flac/ogg file?"
        ) from e
    return prepare(
        data.T, int(sr), target_rate, min_seconds=min_seconds, name=str(path), channel_axis=0
    )


def is_silent(wav: np.ndarray, threshold: float = SILENCE_RMS) -> bool:
    """True when the signal's RMS is below ``threshold`` (pure or near silence, or empty)."""
    a = np.asarray(wav, dtype=np.float64)
    return a.size == 0 or float(np.sqrt(np.mean(a**2))) < threshold
