"""A whole full-duplex exchange: user audio in, Moshi's audio and timed transcript out.

Time bookkeeping (all in codec frames of ``1 / frame_rate`` s): call ``j`` of ``MoshiLM.step``
happens once the user's wall-clock frame ``j`` has been recorded; it returns Moshi's grid frame
``j - max_delay``. Moshi's grid frame ``t`` is played during wall frame ``t + 1`` (the frame
after the one it answers), so the returned waveform lines up sample for sample with the user's:
mixing the two gives the dialogue as heard. The first assistant frame is therefore silence.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from moshivis_lab.audio.io import prepare
from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN
from moshivis_lab.model.lm import MoshiLM


class _Tokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...
    def piece(self, i: int) -> str: ...


class Conversation(NamedTuple):
    """``converse``'s result: Moshi's waveform and its transcript ``[(text, start_s, end_s)]``."""

    wav: np.ndarray
    transcript: list[tuple[str, float, float]]


def timed_transcript(
    text_tokens: list[int] | np.ndarray,
    tokenizer: _Tokenizer,
    frame_rate: float,
    first_frame: int = 0,
    words: bool = True,
) -> list[tuple[str, float, float]]:
    """``[(word or piece, start_s, end_s)]`` from a text stream of one token per frame.

    Token ``i`` sits at frame ``first_frame + i``. PAD, EPAD and -1 are not text. With
    ``words``, pieces merge until a piece opening with the word boundary ``▁``; a word lasts
    from its first piece's frame to the frame after its last piece.
    """
    items: list[tuple[list[int], int, int]] = []  # (ids, first frame, last frame)
    for i, tok in enumerate(int(x) for x in text_tokens):
        if tok in (ZERO_TOKEN, TEXT_PAD_ID, TEXT_EPAD_ID) or tok < 0:
            continue
        frame = first_frame + i
        starts_word = tokenizer.piece(tok).startswith("\u2581")
        if words and items and not starts_word:
            items[-1][0].append(tok)
            items[-1] = (items[-1][0], items[-1][1], frame)
        else:
            items.append(([tok], frame, frame))
    out = []
    for ids, first, last in items:
        text = tokenizer.decode(ids).strip()
        if text:
            out.append((text, first / frame_rate, (last + 1) / frame_rate))
    return out


def _user_frames(codec: Any, wav: np.ndarray, n_calls: int, n_user: int) -> Iterator[np.ndarray]:
    """The user's code frames ``[n_user]``, encoded chunk by chunk with the streaming encoder."""
    fs = codec.frame_size
    padded = np.zeros(max(n_calls * fs, wav.size), dtype=np.float32)
    padded[: wav.size] = wav
    enc = codec.streaming_encoder()
    ready: collections.deque[np.ndarray] = collections.deque()
    pos, flushed = 0, False
    for _ in range(n_calls):
        while not ready and not flushed:
            if pos < padded.size:
                codes = enc.push(padded[pos : pos + fs])
                pos += fs
            else:
                codes, flushed = enc.flush(), True
            ready.extend(np.asarray(codes, dtype=np.int64).T)
        yield ready.popleft()[:n_user] if ready else np.full(n_user, ZERO_TOKEN, dtype=np.int64)


def converse(
    model: MoshiLM,
    codec: Any,
    tokenizer: _Tokenizer,
    user_wav: np.ndarray,
    sample_rate: int,
    *,
    extra_seconds: float = 0.0,
    temperature: float = 0.8,
    top_k: int = 250,
    text_temperature: float = 0.7,
    text_top_k: int = 25,
    seed: int | None = 0,
    image_kv: Any = None,
    words: bool = True,
) -> Conversation:
    """Run a full-duplex exchange over ``user_wav`` and return Moshi's side of it.

    The user's audio (any rate, resampled to the codec's) is encoded frame by frame with the
    codec's streaming encoder and fed to ``model.step`` (batch 1); after it ends, silence is fed
    for ``extra_seconds`` more. Moshi's audio codes are decoded with the streaming decoder and its
    text stream detokenised. Returns ``Conversation(wav, transcript)``: ``wav`` float32 of
    ``(ceil(len / frame_size) + extra frames) * frame_size`` samples at ``codec.sample_rate``,
    aligned with the (resampled, zero-padded) user audio; ``transcript`` of ``(text, start_s,
    end_s)`` on the same clock (see the module docstring for the timing).
    """
    cfg = model.cfg
    if int(codec.num_codebooks) != cfg.dep_q or int(codec.num_codebooks) < model.n_user:
        raise ValueError(
            f"codec has {codec.num_codebooks} codebooks; this model needs {cfg.dep_q} for "
            f"Moshi's stream and {model.n_user} for the user's"
        )
    if int(codec.cardinality) != cfg.card:
        raise ValueError(f"codec cardinality {codec.cardinality} != the model's card {cfg.card}")
    if extra_seconds < 0:
        raise ValueError(f"extra_seconds must be >= 0, got {extra_seconds}")
    wav = prepare(user_wav, sample_rate, int(codec.sample_rate), name="user_wav")
    if wav.size == 0:
        raise ValueError("user_wav is empty")
    fs = int(codec.frame_size)
    n_wall = -(-wav.size // fs) + int(round(extra_seconds * codec.frame_rate))
    n_calls = n_wall - 1 + cfg.max_delay  # grid frames 0 .. n_wall - 2 come out

    out = np.zeros(n_wall * fs, dtype=np.float32)
    text: list[int] = []
    decoder = codec.streaming_decoder()
    device = model.device
    with model.streaming(
        1,
        temperature=temperature,
        top_k=top_k,
        text_temperature=text_temperature,
        text_top_k=text_top_k,
        seed=seed,
    ):
        for j, user in enumerate(_user_frames(codec, wav, n_calls, model.n_user)):
            user_t = torch.from_numpy(np.ascontiguousarray(user))[None].to(device)
            tok, audio = model.step(user_t, image_kv=image_kv)
            t = j - cfg.max_delay  # Moshi's grid frame returned by this call
            if t < 0:
                continue
            text.append(int(tok[0]))
            frame = decoder.step(audio[0].cpu().numpy())
            out[(t + 1) * fs : (t + 2) * fs] = np.asarray(frame, dtype=np.float32)[:fs]
    transcript = timed_transcript(text, tokenizer, float(codec.frame_rate), 1, words)
    return Conversation(out, transcript)
