"""Moshi's inner-monologue text stream: word tokens aligned to 12.5 Hz audio frames.

Rules (Moshi paper, moshi-finetune's interleaver): a word's tokens are emitted one per frame
from the frame where the word starts; when a word's tokens run past the next word's start, the
next word is shifted later (no token is dropped); every other frame is PAD, and the PAD frame
right before a word's first token becomes EPAD ("end of padding": a word comes next).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN


@dataclass(frozen=True)
class TimedTokens:
    """A word's token ids with its start and end time in seconds."""

    tokens: tuple[int, ...]
    start: float
    end: float


def align_text_stream(
    words: Sequence[TimedTokens],
    num_frames: int,
    frame_rate: float = 12.5,
    pad_id: int = TEXT_PAD_ID,
    epad_id: int = TEXT_EPAD_ID,
) -> np.ndarray:
    """The text row of a token grid: int64 [num_frames] with tokens, PAD and EPAD placed by Moshi's rules.

    Tokens that would fall after the last frame are dropped (the segment ended mid-word).
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    out = np.full(num_frames, pad_id, dtype=np.int64)
    order = sorted(range(len(words)), key=lambda k: words[k].start)
    t = 0  # first frame free for the next token
    for k in order:
        w = words[k]
        if not w.tokens:
            continue
        start = max(int(math.floor(w.start * frame_rate)), t)
        if start >= num_frames:
            break
        if start > 0 and out[start - 1] == pad_id:
            out[start - 1] = epad_id
        for j, tok in enumerate(w.tokens):
            if start + j >= num_frames:
                break
            out[start + j] = tok
        t = start + len(w.tokens)
    return out


def word_starts_in_stream(
    stream: np.ndarray, pad_id: int = TEXT_PAD_ID, epad_id: int = TEXT_EPAD_ID
) -> list[int]:
    """Frames where a word's first token sits (the frame after each EPAD, or a token at frame 0)."""
    s = np.asarray(stream)
    starts = [int(i) + 1 for i in np.nonzero(s[:-1] == epad_id)[0]]
    if s.size and s[0] not in (pad_id, epad_id, ZERO_TOKEN):
        starts.insert(0, 0)
    return starts
