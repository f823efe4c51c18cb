"""The audio codec protocol every codec of the lab follows, and the checks they share.

A codec turns mono speech at ``sample_rate`` into integer codes ``[num_codebooks, T]`` with
``T = ceil(len / frame_size)`` (one column per ``1 / frame_rate`` seconds; codebook 0 is the
"semantic" one, 1.. the acoustic ones) and back into ``T * frame_size`` float32 samples.
Streaming versions of both directions work frame by frame and agree with the batch calls.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from moshivis_lab.audio.io import prepare


@runtime_checkable
class StreamingEncoder(Protocol):
    """Feeds audio in pieces of any length and returns codes as soon as frames are complete."""

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add samples; return the codes ``[K, n_new_frames]`` of the frames now complete."""
        ...

    def flush(self) -> np.ndarray:
        """Zero-pad the pending samples to whole frames and return their codes ``[K, n]``."""
        ...


@runtime_checkable
class StreamingDecoder(Protocol):
    """Turns codes into audio one frame at a time."""

    def step(self, codes_frame: np.ndarray) -> np.ndarray:
        """Decode one frame of codes ``[K]`` into ``frame_size`` float32 samples."""
        ...


@runtime_checkable
class Codec(Protocol):
    """An audio codec: waveform <-> integer codes ``[num_codebooks, T]`` at ``frame_rate``."""

    sample_rate: int
    frame_rate: float
    frame_size: int
    num_codebooks: int
    cardinality: int

    def encode(self, wav: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """Codes ``int64 [K, ceil(len / frame_size)]`` of a waveform (any PCM dtype, mono/stereo)."""
        ...

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 mono waveform of ``T * frame_size`` samples from codes ``[K, T]``."""
        ...

    def streaming_encoder(self) -> StreamingEncoder:
        """A fresh streaming encoder (at ``sample_rate``)."""
        ...

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh streaming decoder."""
        ...


def n_frames(n_samples: int, frame_size: int) -> int:
    """Number of code frames for ``n_samples`` samples: ``ceil(n_samples / frame_size)``."""
    return math.ceil(n_samples / frame_size)


def prepare_input(wav: np.ndarray, sample_rate: int | None, codec_rate: int) -> np.ndarray:
    """Mono float32 at ``codec_rate`` for encoding; raise ``ValueError`` on NaN/inf or no samples."""
    sr = codec_rate if sample_rate is None else sample_rate
    x = prepare(wav, sr, codec_rate, name="encode input")
    if x.size == 0:
        raise ValueError("encode input: the waveform is empty; there is nothing to encode")
    return x


def validate_codes(codes: np.ndarray, num_codebooks: int, cardinality: int) -> np.ndarray:
    """Return ``codes`` as int64 ``[K, T]`` or raise ``ValueError`` saying what is wrong."""
    a = np.asarray(codes)
    if a.dtype == object or a.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] != num_codebooks:
        raise ValueError(
            f"codes must have shape [num_codebooks={num_codebooks}, T], got {tuple(a.shape)}"
        )
    if a.size and (a.min() < 0 or a.max() >= cardinality):
        raise ValueError(
            f"codes must lie in [0, {cardinality}), got values in [{a.min()}, {a.max()}]"
        )
    return a.astype(np.int64, copy=False)


def validate_frame(codes_frame: np.ndarray, num_codebooks: int, cardinality: int) -> np.ndarray:
    """Return one frame of codes as int64 ``[K]`` or raise ``ValueError``."""
    a = np.asarray(codes_frame)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"a code frame must have shape [{num_codebooks}], got {tuple(a.shape)}")
    return validate_codes(a[:, None], num_codebooks, cardinality)[:, 0]
