"""Full-duplex timelines: a dialogue's turns spoken by TTS and laid on two frame-aligned channels.

Channel 0 is the assistant (Moshi's own stream, "SPEAKER_MAIN"), channel 1 the user, as in
moshi-finetune's stereo files. Both channels cover every 80 ms frame; a turn starts on a frame
boundary after the previous turn ended plus a pause, so turn-taking is visible in both streams.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moshivis_lab.world.speech import ASSISTANT_VOICE, SAMPLE_RATE, Utterance, Voice, synthesize

MAIN_SPEAKER = "SPEAKER_MAIN"
USER_SPEAKER = "SPEAKER_USER"
FRAME_SIZE = 1920  # 80 ms at 24 kHz


@dataclass
class TurnSpan:
    """Where one turn sits on the timeline (seconds) and what it is about."""

    speaker: str  # "assistant" or "user"
    text: str
    start: float
    end: float
    topic: str = ""
    refs: list[int] = field(default_factory=list)


@dataclass
class SpokenDialogue:
    """A two-channel recording [2, N] (assistant, user) with word alignments and turn spans."""

    id: str
    wav: np.ndarray  # float32 [2, N], N a whole number of frames
    alignments: list[tuple[str, tuple[float, float], str]]
    turns: list[TurnSpan]
    sample_rate: int = SAMPLE_RATE
    user_voice: str = ""
    assistant_voice: str = ASSISTANT_VOICE.name

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.wav.shape[1] / self.sample_rate

    @property
    def num_frames(self) -> int:
        """Number of 80 ms frames."""
        return self.wav.shape[1] // FRAME_SIZE


class TTSCache:
    """A bounded memo of synthesized utterances keyed by (voice, text): templates repeat a lot."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._d: OrderedDict[tuple[Voice, str], Utterance] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, text: str, voice: Voice) -> Utterance:
        key = (voice, text)
        if key in self._d:
            self.hits += 1
            self._d.move_to_end(key)
            return self._d[key]
        self.misses += 1
        u = synthesize(text, voice)
        self._d[key] = u
        if len(self._d) > self.max_items:
            self._d.popitem(last=False)
        return u


def _frames(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE / FRAME_SIZE))


def build_timeline(
    dialogue_id: str,
    turns: Sequence[tuple[str, str, str, list[int]]],
    user_voice: Voice,
    rng: np.random.Generator,
    *,
    assistant_voice: Voice = ASSISTANT_VOICE,
    pause_range_s: tuple[float, float] = (0.24, 0.8),
    lead_in_range_s: tuple[float, float] = (0.16, 0.48),
    tts: TTSCache | None = None,
) -> SpokenDialogue:
    """Speak ``turns`` = [(speaker, text, topic, refs)] alternately on the two channels.

    ``speaker`` is "user" or "assistant". Pauses and the lead-in are drawn from ``rng`` and
    rounded to whole frames; the recording ends one pause after the last turn.
    """
    if not turns:
        raise ValueError(f"{dialogue_id}: a dialogue needs at least one turn")
    tts = tts or TTSCache()
    placed: list[tuple[int, Utterance, str, str, list[int]]] = []
    frame = _frames(rng.uniform(*lead_in_range_s))
    for speaker, text, topic, refs in turns:
        if speaker not in ("user", "assistant"):
            raise ValueError(
                f"{dialogue_id}: speaker must be 'user' or 'assistant', got {speaker!r}"
            )
        utt = tts(text, assistant_voice if speaker == "assistant" else user_voice)
        placed.append((frame, utt, speaker, topic, list(refs)))
        frame += math.ceil(len(utt.wav) / FRAME_SIZE) + max(1, _frames(rng.uniform(*pause_range_s)))
    n = frame * FRAME_SIZE
    wav = np.zeros((2, n), dtype=np.float32)
    alignments: list[tuple[str, tuple[float, float], str]] = []
    spans: list[TurnSpan] = []
    for start_frame, utt, speaker, topic, refs in placed:
        ch = 0 if speaker == "assistant" else 1
        s0 = start_frame * FRAME_SIZE
        wav[ch, s0 : s0 + len(utt.wav)] = utt.wav
        off = s0 / SAMPLE_RATE
        label = MAIN_SPEAKER if speaker == "assistant" else USER_SPEAKER
        for w in utt.words:
            alignments.append((w.text, (round(off + w.start, 4), round(off + w.end, 4)), label))
        end = off + (utt.words[-1].end if utt.words else utt.duration)
        spans.append(TurnSpan(speaker, utt.text, round(off, 4), round(end, 4), topic, refs))
    alignments.sort(key=lambda a: a[1][0])
    return SpokenDialogue(
        id=dialogue_id,
        wav=wav,
        alignments=alignments,
        turns=spans,
        user_voice=user_voice.name,
        assistant_voice=assistant_voice.name,
    )
