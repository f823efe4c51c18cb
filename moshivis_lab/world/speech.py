"""Offline text-to-speech through libespeak-ng (the ``espeakng-loader`` wheel, via ctypes).

Word timings come from the synthesizer's own WORD events (sample-exact start positions); word
ends are where the energy falls before the next word. Output is mono float32 at 24 kHz.

Reproducibility: espeak-ng carries its glottal-pulse phase (and other static state) from one
utterance to the next, so an utterance's samples (and its length, by up to ~1 %) would depend on
what the process synthesized before; ``espeak_Initialize`` again does not reset it. So every
``synthesize`` call speaks from a pristine library: the shared object is unloaded (``dlclose``)
and loaded again first (about 0.5 ms, plus the voice's ~1 ms set-up). An utterance is then a
function of its text and voice only, in any process and in any order (the world build, the
codec fit, the evaluation's spoken questions, a notebook).
"""

from __future__ import annotations

import _ctypes
import ctypes
import re
import threading
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from moshivis_lab.audio.io import resample
from moshivis_lab.world.tokenizer import check_unicode

SAMPLE_RATE = 24000

# espeak-ng enums (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: base voice+variant name, pitch (0-100), rate (words/min), pitch range."""

    name: str
    espeak: str
    pitch: int = 50
    rate: int = 170
    range: int = 50

    def __post_init__(self) -> None:
        if not (0 <= self.pitch <= 100):
            raise ValueError(f"Voice.pitch must be in [0, 100], got {self.pitch}")
        if not (80 <= self.rate <= 450):
            raise ValueError(f"Voice.rate must be in [80, 450] words per minute, got {self.rate}")
        if not (0 <= self.range <= 100):
            raise ValueError(f"Voice.range must be in [0, 100], got {self.range}")


# The model's identity: one fixed voice whose prosody later issues check is preserved.
ASSISTANT_VOICE = Voice("assistant", "en-us+f3", pitch=55, rate=165, range=60)

# User voices: accent, variant, pitch and rate varied. The last ones are held out by default.
USER_VOICES: tuple[Voice, ...] = (
    Voice("user_m1", "en-us+m1", pitch=40, rate=170, range=50),
    Voice("user_f1", "en+f1", pitch=62, rate=155, range=70),
    Voice("user_m3", "en-us+m3", pitch=30, rate=185, range=40),
    Voice("user_f4", "en-gb-x-rp+f4", pitch=70, rate=175, range=55),
    Voice("user_m7", "en-029+m7", pitch=48, rate=150, range=60),
    Voice("user_f2", "en-gb-scotland+f2", pitch=66, rate=190, range=45),
    Voice("user_m2", "en-us+m2", pitch=35, rate=160, range=65),
    Voice("user_f5", "en+f5", pitch=75, rate=168, range=50),
)


# Voices only the tiny codec's phone classifier hears (with the training voices), for speaker
# variety: none is a world voice, so the held-out user voices stay unheard.
CODEC_FIT_VOICES = (
    Voice("fit_m4", "en+m4", pitch=45, rate=165, range=55),
    Voice("fit_m5", "en-us+m5", pitch=38, rate=175, range=60),
    Voice("fit_m6", "en+m6", pitch=52, rate=150, range=45),
    Voice("fit_f4", "en-us+f4", pitch=68, rate=160, range=65),
    Voice("fit_f3", "en+f3", pitch=60, rate=180, range=50),
    Voice("fit_m4c", "en-029+m4", pitch=42, rate=170, range=70),
    Voice("fit_f1", "en-us+f1", pitch=72, rate=155, range=40),
    Voice("fit_m3", "en+m3", pitch=33, rate=165, range=60),
    Voice("fit_f1rp", "en-gb-x-rp+f1", pitch=64, rate=170, range=55),
    Voice("fit_m1", "en-us+m1", pitch=50, rate=185, range=50),
    Voice("fit_klatt", "en+klatt", pitch=55, rate=160, range=50),
    Voice("fit_f2", "en-us+f2", pitch=80, rate=165, range=60),
)


def user_voices(n: int) -> tuple[Voice, ...]:
    """The first ``n`` user voices (at most ``len(USER_VOICES)``)."""
    if not 1 <= n <= len(USER_VOICES):
        raise ValueError(f"n_user_voices must be in [1, {len(USER_VOICES)}], got {n}")
    return USER_VOICES[:n]


@dataclass
class Word:
    """One word with its start and end time in seconds."""

    text: str
    start: float
    end: float


@dataclass
class Utterance:
    """Synthesized speech: mono float32 samples at ``sample_rate`` and its timed words."""

    text: str
    voice: str
    wav: np.ndarray
    words: list[Word] = field(default_factory=list)
    sample_rate: int = SAMPLE_RATE
    # The synthesizer's phonemes: (start in seconds, espeak mnemonic with stress marks removed);
    # each lasts until the next one starts. The tiny codec's phonetic codebook is fitted on them.
    phonemes: list[tuple[float, str]] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.wav) / self.sample_rate

    def words_as_dicts(self) -> list[dict]:
        """Words as plain dicts (for JSON)."""
        return [asdict(w) for w in self.words]


class _Engine:
    """The process-wide espeak-ng instance (the C library keeps global state, so one per process)."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.native_rate = int(
            self.lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS,
                0,
                data,
                _INITIALIZE_DONT_EXIT | _INITIALIZE_PHONEME_EVENTS,
            )
        )
        if self.native_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (data path {data!r})")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._phonemes: list[tuple[int, str]] = []
        self._cb = _Callback(self._on_audio)  # keep a reference: ctypes must not collect it
        self.lib.espeak_SetSynthCallback(self._cb)
        self.lock = threading.Lock()
        self._voice: Voice | None = None
        # Some voice variants mix in noise from espeak-ng's generator and libc's rand(), which
        # are seeded from the clock; both are re-seeded from the utterance before each synthesis.
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._libc = ctypes.CDLL(None)

    def _on_audio(self, wav, n, events) -> int:  # noqa: ANN001 (ctypes callback)
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == _EVENT_WORD:
                self._events.append((e.text_position, e.length, e.sample))
            elif e.type == _EVENT_PHONEME:
                name = bytes(e.id).split(b"\0")[0].decode("latin-1")
                self._phonemes.append((e.sample, name))
            i += 1
        return 0

    def set_voice(self, voice: Voice) -> None:
        if self._voice == voice:
            return
        if self.lib.espeak_SetVoiceByName(voice.espeak.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.espeak!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        self.lib.espeak_SetParameter(_PARAM_RANGE, voice.range, 0)
        self.lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        self._voice = voice

    def synth(
        self, text: str, voice: Voice
    ) -> tuple[np.ndarray, list[tuple[int, int, int]], list[tuple[int, str]]]:
        with self.lock:
            self.set_voice(voice)
            self._chunks, self._events, self._phonemes = [], [], []
            b = check_unicode(text, "TTS text").encode("utf-8")
            seed = zlib.crc32(voice.espeak.encode() + b"\0" + b)
            self.lib.espeak_ng_SetRandSeed(seed)
            self._libc.srand(seed)
            err = self.lib.espeak_Synth(
                b, len(b) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            self.lib.espeak_Synchronize()
            if err != 0:
                raise RuntimeError(f"espeak-ng failed (error {err}) on {text!r}")
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            return pcm, list(self._events), list(self._phonemes)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()
_WORD_RE = re.compile(r"\S+")


def _engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def _fresh_engine() -> _Engine:
    """An espeak-ng with no history: the library is terminated, unloaded and loaded again, so the
    next utterance sounds as in a fresh process (call with ``_ENGINE_LOCK`` held)."""
    global _ENGINE
    if _ENGINE is not None:
        old, _ENGINE = _ENGINE, None
        old.lib.espeak_Terminate()
        _ctypes.dlclose(old.lib._handle)
    return _engine()


def _word_spans(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _WORD_RE.finditer(text)]


def _speech_end(wav: np.ndarray, lo: int, hi: int, sr: int, rel_db: float = -35.0) -> int:
    """Last sample in [lo, hi) whose 10 ms envelope is within ``rel_db`` of the segment's peak."""
    hop = max(1, sr // 100)
    seg = wav[lo:hi]
    if seg.size < hop:
        return hi
    n = seg.size // hop
    env = np.sqrt((seg[: n * hop].reshape(n, hop) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(env / env.max()) > rel_db)[0]
    return lo + (int(loud[-1]) + 1) * hop if loud.size else lo + hop


def synthesize(
    text: str, voice: Voice = ASSISTANT_VOICE, sample_rate: int = SAMPLE_RATE
) -> Utterance:
    """Speak ``text`` with ``voice``; return the 24 kHz waveform and per-word start/end times.

    Words are the whitespace-separated tokens of ``text`` (punctuation kept); each one's start is
    the synthesizer's WORD event for it. Tokens the synthesizer does not voice (a lone dash) are
    dropped from the word list.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError("text is empty: there is nothing to speak")
    with _ENGINE_LOCK:  # a pristine library per utterance: see the module docstring
        eng = _fresh_engine()
        pcm, events, phone_events = eng.synth(text, voice)
        native = eng.native_rate
    wav = resample(pcm.astype(np.float32) / 32768.0, native, sample_rate)
    spans = _word_spans(text)
    starts: dict[int, int] = {}
    for pos, _length, sample in events:
        ci = pos - 1  # espeak counts characters from 1
        for k, (a, b, _w) in enumerate(spans):
            if a <= ci < b:
                starts.setdefault(k, sample)
                break
    order = sorted(starts)
    words: list[Word] = []
    ratio = sample_rate / native
    for j, k in enumerate(order):
        s = int(starts[k] * ratio)
        nxt = int(starts[order[j + 1]] * ratio) if j + 1 < len(order) else len(wav)
        e = _speech_end(wav, s, max(nxt, s + 1), sample_rate)
        words.append(
            Word(spans[k][2], round(s / sample_rate, 4), round(min(e, nxt) / sample_rate, 4))
        )
    if words:  # drop the synthesizer's trailing silence, keep a 50 ms tail
        wav = wav[: min(len(wav), int((words[-1].end + 0.05) * sample_rate))]
    wav = np.clip(wav, -1.0, 1.0)  # a few voices overshoot full scale by < 1 % after resampling
    phonemes = [
        # rounded down to 0.1 ms, so an event at the last sample stays inside the wav
        (
            int(sample * ratio / sample_rate * 1e4) / 1e4,
            name.replace("'", "").replace(",", "") or "_",
        )
        for sample, name in phone_events
        if sample * ratio < len(wav)
    ]
    return Utterance(
        text=text,
        voice=voice.name,
        wav=wav,
        words=words,
        sample_rate=sample_rate,
        phonemes=phonemes,
    )
