"""One streaming MoshiVis conversation about an image, recorded step by step (the explorer's data).

::

    engine = ConversationEngine.load(cfg, run="main")          # model, codec, tokenizer, encoder
    conv = engine.run("test_00003", "What colour is the star?")  # text -> TTS, held-out voice
    conv = engine.run(pil_image, "question.wav")                 # or a recording (any rate, mono
                                                                 # or stereo)
    conv.gates            # [layers, T]   channel-mean gate per cross-attention layer and step
    conv.attention        # [layers, T, N] cross-attention over the image tokens (mean of heads)
    conv.attention_map(t) # [side, side]   at step t, averaged over layers
    conv.transcript       # [(word, start_s, end_s)] of the assistant's text stream
    before, after = engine.compare(image, prompt, GateIntervention(value=0.0))

The user's audio (``lead_in_s`` of silence, the prompt, ``extra_seconds`` of silence to answer
in) is encoded by the codec and streamed into ``MoshiVis.step`` frame by frame, as the spoken
prompts of ``train.vis_eval`` are: the model's step ``t`` hears the user's frames ``< t`` and
writes its own frame ``t``, which lines up with the user's frame ``t`` (both start at
``t / frame_rate`` seconds), so the two waveforms mix into the dialogue as heard. Everything
recorded at step ``t`` (text token, gates, attention, audio codes) belongs to the assistant's
frame ``t``.

Gate interventions (``interp.gates.GateIntervention``, or a dict of its fields) go straight to
``MoshiVis.gate_override``: forcing every gate to 0 gives the base speech LM bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from moshivis_lab.audio.io import is_silent, load_audio, prepare
from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN
from moshivis_lab.interp.attention import fold_pooled_attention
from moshivis_lab.interp.gates import GateIntervention
from moshivis_lab.model.generate import timed_transcript
from moshivis_lab.model.moshivis import reported_gate
from moshivis_lab.world.photos import PHOTOS, load_photo, photo_names

_PATTERN = "temporal.layers.{i}.cross_attention.hook_pattern"
MAX_SECONDS = 60.0  # longest user audio (plus reply time) one conversation may hold
MAX_PROMPT_CHARS = 1000  # longest text prompt: ~60 s of TTS speech at ~16 characters/s
SPLITS = ("train", "val", "test", "heldout")
_WORLD_ID = re.compile(r"(train|val|test|heldout)_\d+")


# ---------------------------------------------------------------------- interventions


def _intervention(x: Any) -> GateIntervention | None:
    if x is None or isinstance(x, GateIntervention):
        return x
    if isinstance(x, dict):
        return GateIntervention(**x)
    raise ValueError(
        f"intervention must be a GateIntervention, a dict of its fields or None, got {type(x).__name__}"
    )


# ---------------------------------------------------------------------- the record


@dataclass
class Conversation:
    """A recorded conversation: audio of both sides, the assistant's text, gates and attention.

    Time axes: step ``t`` is the assistant's frame ``t`` (``frame_rate`` frames per second),
    covering ``[t, t + 1) / frame_rate`` seconds of both waveforms.
    """

    user_wav: np.ndarray  # float32 mono, lead-in + prompt + answer time, at sample_rate
    assistant_wav: np.ndarray  # float32 mono, same length and clock
    sample_rate: int
    frame_rate: float
    tokens: np.ndarray  # [T] text token per step (PAD / EPAD included)
    pieces: list[str]  # [T] the token's piece ('' for PAD / EPAD)
    transcript: list[tuple[str, float, float]]  # words (text, start_s, end_s)
    gates: np.ndarray  # [layers, T]
    attention: np.ndarray  # [layers, T, N] (zeros where no cross-attention ran; N = 0 no image)
    audio_codes: np.ndarray  # [dep_q, T] the assistant's codec codes
    layers: tuple[int, ...]  # temporal layer index of each gate / attention row
    grid_side: int  # image tokens per side (0 without an image)
    prompt_end_step: int  # first step that has heard the whole prompt
    image: Image.Image | None = None
    image_id: str | None = None
    prompt: str | None = None  # the prompt's text (None for a recording)
    intervention: GateIntervention | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        """Number of recorded steps T."""
        return int(self.tokens.shape[0])

    @property
    def times(self) -> np.ndarray:
        """Start time (s) of each step."""
        return np.arange(self.n_steps) / self.frame_rate

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return self.assistant_wav.size / self.sample_rate

    def step_at(self, seconds: float) -> int:
        """The step playing at ``seconds`` (clipped to the recording)."""
        return int(min(max(math.floor(seconds * self.frame_rate), 0), self.n_steps - 1))

    def gate_score(self, last: int = 10) -> np.ndarray:
        """The reported gate value per step ``[T]`` (``reported_gate`` with the model's readout:
        the lab's is the mean over the last ``last`` cross-attention layers)."""
        return reported_gate(
            self.gates,
            self.layers,
            self.info.get("num_layers"),
            self.info.get("gate_readout", "lab"),
            last=last,
        )

    def _step(self, step: int) -> int:
        if not -self.n_steps <= int(step) < self.n_steps:
            raise ValueError(f"step must be in [0, {self.n_steps}), got {step}")
        return int(step) % self.n_steps

    def attention_map(self, step: int, layer: int | None = None) -> np.ndarray:
        """Attention over the image's patch grid ``[side, side]`` at ``step``: of temporal layer
        ``layer`` (an index in ``layers``), or averaged over every layer (None)."""
        if self.grid_side == 0:
            raise ValueError("this conversation had no image: there is no attention map")
        t = self._step(step)
        if layer is None:
            w = self.attention[:, t].mean(axis=0)
        else:
            if layer not in self.layers:
                raise ValueError(f"layer {layer} has no cross-attention; choose from {self.layers}")
            w = self.attention[self.layers.index(layer), t]
        return w.reshape(self.grid_side, self.grid_side)

    def text_between(self, start: int = 0, end: int | None = None) -> str:
        """The words whose first piece falls in steps ``[start, end)``."""
        t0 = start / self.frame_rate
        t1 = math.inf if end is None else end / self.frame_rate
        return " ".join(w for w, s, _ in self.transcript if t0 <= s + 1e-9 < t1)

    @property
    def text(self) -> str:
        """Everything the assistant wrote."""
        return " ".join(w for w, _, _ in self.transcript)

    @property
    def reply_text(self) -> str:
        """What it wrote once the whole prompt was heard."""
        return self.text_between(self.prompt_end_step)

    @property
    def reply_words(self) -> list[tuple[str, float, float]]:
        """The timed words of the reply."""
        t0 = self.prompt_end_step / self.frame_rate
        return [w for w in self.transcript if w[1] + 1e-9 >= t0]

    def mix(self) -> np.ndarray:
        """Both sides mixed (the dialogue as heard), peak-limited to [-1, 1]."""
        m = self.user_wav + self.assistant_wav
        peak = float(np.abs(m).max()) if m.size else 0.0
        return m / peak if peak > 1.0 else m


# ---------------------------------------------------------------------- inputs


def world_images(cfg: Any, split: str = "test") -> list[str]:
    """Ids of the world's images of ``split`` (e.g. ``test_00003``), sorted; for a released
    model's config (``moshika-vis``), the shipped photographs' names."""
    from moshivis_lab.world.generate import world_paths

    if getattr(cfg, "released", False):
        return photo_names()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = world_paths(cfg, split)["images"]
    ids = sorted(p.stem for p in d.glob(f"{split}_*.png")) if d.is_dir() else []
    if not ids:
        raise FileNotFoundError(
            f"no {split} images under {d}; build the world with `moshivis-lab data --preset "
            f"{cfg.name}`"
        )
    return ids


def _rgb_pil(image: Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode, through the encoder's own conversion
    (``vision.preprocess.to_rgb``): alpha is composited over white rather than dropped (which
    would show whatever colour transparent pixels store), 16-bit and float images are scaled to
    0..255 rather than clipped, and a mode that cannot be an image is refused saying what to do."""
    from moshivis_lab.vision.preprocess import to_rgb

    rgb = to_rgb(image)
    if isinstance(rgb, Image.Image):
        return rgb
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")


def _read_image(path: Path) -> Image.Image:
    from moshivis_lab.vision.preprocess import open_image

    try:
        return _rgb_pil(open_image(path))
    except ValueError as e:  # empty, not an image, truncated, too large: open_image says which
        raise ValueError(f"{path}: cannot be read as an image ({e})") from e


def resolve_image(
    image: Any, cfg: Any = None, split: str = "test"
) -> tuple[Image.Image, str | None]:
    """An RGB PIL image and its world id (None when not a world image) from any of:

    a world image id (``"test_00003"``) or a shipped photo's name (``"chelsea"``), an index into
    ``world_images(cfg, split)``, a path to an
    image file, a PIL image of any mode (converted as the image encoder converts it:
    ``vision.preprocess``), or an ``HxWx3`` uint8 array. Unreadable, truncated or oversized files
    raise a ``ValueError``.
    """
    if isinstance(image, Image.Image):
        return _rgb_pil(image), None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(
                f"an image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}"
                " (pass other kinds as a PIL image, e.g. Image.fromarray(arr))"
            )
        return Image.fromarray(image), None
    if isinstance(image, bool) or image is None:
        raise ValueError(f"not an image: {image!r}")
    if isinstance(image, int | np.integer):
        if cfg is None:
            raise ValueError("an image index needs the lab config (cfg) to find the world images")
        ids = world_images(cfg, split)
        if not 0 <= int(image) < len(ids):
            raise ValueError(f"image index must be in [0, {len(ids)}) for split {split!r}")
        image = ids[int(image)]
    if isinstance(image, str) and image in PHOTOS:
        return load_photo(image), image
    if isinstance(image, str) and _WORLD_ID.fullmatch(image):
        if cfg is None:
            raise ValueError(f"the world image id {image!r} needs the lab config (cfg)")
        from moshivis_lab.train.image_tokens import image_path

        # FileNotFoundError with a hint when the world is not built
        return _read_image(image_path(cfg, image)), image
    if isinstance(image, str | os.PathLike):
        p = Path(image)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such image file")
        return _read_image(p), None
    raise ValueError(
        f"image must be a world image id, an index, a path, a PIL image or an HxWx3 uint8 "
        f"array, got {type(image).__name__}"
    )


def prompt_audio(
    prompt: Any,
    sample_rate: int,
    *,
    prompt_rate: int | None = None,
    voice: Any = None,
    allow_silence: bool = False,
) -> tuple[np.ndarray, str | None]:
    """The user's prompt as mono float32 at ``sample_rate`` and its text (None for audio).

    ``prompt``: text (spoken by the TTS in ``voice``), a path to an audio file (any rate,
    mono or multi-channel: averaged), or an array of samples at ``prompt_rate`` Hz. A silent
    prompt is refused unless ``allow_silence``.
    """
    from moshivis_lab.world.speech import synthesize

    text: str | None = None
    if isinstance(prompt, str) and not _looks_like_audio_path(prompt):
        if not prompt.strip():
            raise ValueError("the prompt text is empty: type a question, or give an audio file")
        if voice is None:
            raise ValueError("a text prompt needs a voice to speak it (world.speech.Voice)")
        text = " ".join(prompt.split())
        if len(text) > MAX_PROMPT_CHARS:  # refused before minutes of TTS, not after
            raise ValueError(
                f"the prompt text is {len(text)} characters; a conversation holds at most "
                f"{MAX_SECONDS:g} s of audio, about {MAX_PROMPT_CHARS} characters of speech: "
                "ask a shorter question"
            )
        wav = synthesize(text, voice, sample_rate).wav.astype(np.float32)
    elif isinstance(prompt, str | os.PathLike):
        wav = load_audio(prompt, sample_rate, min_seconds=0.05)
    elif isinstance(prompt, np.ndarray | list | tuple):
        if prompt_rate is None:
            raise ValueError("an audio array prompt needs its sample rate (prompt_rate=...)")
        wav = prepare(
            np.asarray(prompt), prompt_rate, sample_rate, min_seconds=0.05, name="prompt audio"
        )
    else:
        raise ValueError(
            f"prompt must be text, a path to an audio file or an array of samples, "
            f"got {type(prompt).__name__}"
        )
    if not allow_silence and is_silent(wav):
        raise ValueError(
            "the prompt audio is silent (RMS below -80 dBFS): record or choose another file, "
            "or pass allow_silence=True to let the model talk unprompted"
        )
    return wav, text


def _looks_like_audio_path(s: str) -> bool:
    suffixes = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")
    return "\n" not in s and (s.lower().endswith(suffixes) or (len(s) < 1024 and Path(s).is_file()))


# ---------------------------------------------------------------------- the run


@torch.inference_mode()
def record_conversation(
    model: Any,
    codec: Any,
    tokenizer: Any,
    user_wav: np.ndarray,
    image_tokens: torch.Tensor | None = None,
    *,
    intervention: GateIntervention | dict | None = None,
    lead_in_s: float = 0.4,
    extra_seconds: float = 3.2,
    temperature: float = 0.8,
    text_temperature: float = 0.0,
    seed: int = 0,
    record_attention: bool = True,
    image: Image.Image | None = None,
    image_id: str | None = None,
    prompt: str | None = None,
) -> Conversation:
    """Stream ``user_wav`` (mono float32 at ``codec.sample_rate``) into ``model`` step by step
    and record what happens (see ``Conversation``).

    ``image_tokens [1, N, image_dim]``: the image-encoder tokens (None: no image, the base
    model). The model's sampling: ``temperature`` for audio, ``text_temperature`` for text
    (0 = greedy, as the evaluation), draws seeded with ``seed``. Cross-attention always takes
    the explicit-softmax path (as it must when its pattern is recorded), so a run with
    ``record_attention=False`` samples exactly the same tokens.
    """
    if not hasattr(model, "encode_image") or not hasattr(model, "gate_override"):
        raise ValueError(
            f"record_conversation needs a MoshiVis model, got {type(model).__name__}; wrap a "
            "speech LM with MoshiVis.from_lm (gates at 0 give the LM exactly)"
        )
    intervention = _intervention(intervention)
    if lead_in_s < 0 or extra_seconds < 0:
        raise ValueError(
            f"lead_in_s and extra_seconds must be >= 0, got {lead_in_s}, {extra_seconds}"
        )
    sr, fs = int(codec.sample_rate), int(codec.frame_size)
    wav = np.asarray(user_wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"user_wav must be a non-empty 1-D array, got shape {wav.shape}")
    total_s = lead_in_s + wav.size / sr + extra_seconds
    if total_s > MAX_SECONDS:
        raise ValueError(
            f"the conversation would last {total_s:.1f} s; at most {MAX_SECONDS:g} s: "
            "trim the prompt audio"
        )
    lead = np.zeros(int(round(lead_in_s * sr)), np.float32)
    spoken = np.concatenate([lead, wav])
    prompt_frames = math.ceil(spoken.size / fs)
    n = prompt_frames + math.ceil(extra_seconds * float(codec.frame_rate))
    padded = np.zeros(n * fs, np.float32)
    padded[: spoken.size] = spoken
    user = np.asarray(codec.encode(padded), dtype=np.int64)[:, :n]  # [K, n]
    if user.shape[1] < n:  # a codec that drops a partial last frame: pad with "no input"
        user = np.pad(user, ((0, 0), (0, n - user.shape[1])), constant_values=ZERO_TOKEN)
    lm_cfg = model.lm.cfg
    n_user = model.n_user
    if user.shape[0] < n_user:
        raise ValueError(f"the codec gives {user.shape[0]} codebooks; the model needs {n_user}")
    layers = tuple(model.cfg.layers)
    device = model.device

    kv = None
    if image_tokens is not None:
        kv = model.encode_image(image_tokens[:1].to(device))
    n_tokens = int(image_tokens.shape[1]) if image_tokens is not None else 0
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        side = 0  # not a square grid: maps are unavailable, the raw attention is kept

    calls = n + lm_cfg.max_delay
    text = np.full(n, ZERO_TOKEN, np.int64)
    codes = np.full((lm_cfg.dep_q, n), ZERO_TOKEN, np.int64)
    gates = np.zeros((len(layers), calls), np.float32)
    attention = np.zeros((len(layers), calls, n_tokens), np.float32)
    current: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Any:
        def fn(t: torch.Tensor, hook: Any) -> None:
            w = t[0].float().mean(dim=0)[0]  # [heads, 1, keys] -> [keys]
            current[i] = fold_pooled_attention(w, n_tokens, model.cfg.xa.pool_tokens)  # [N]

        return fn

    hooks: list[tuple[str, Any]] = []
    if record_attention and kv is not None:
        hooks = [(_PATTERN.format(i=i), grab(r)) for r, i in enumerate(layers)]
    model.eval()
    with contextlib.ExitStack() as stack:
        if intervention is not None:
            stack.enter_context(intervention.apply(model))
        if hooks:
            stack.enter_context(model.hooks(hooks))
        stack.enter_context(
            model.streaming(
                1, temperature=temperature, text_temperature=text_temperature, seed=seed
            )
        )
        for j in range(calls):
            frame = j - 1  # call j hears the user's frame j - 1 (see MoshiLM.step)
            u = user[:n_user, frame] if 0 <= frame < n else np.full(n_user, ZERO_TOKEN)
            current.clear()
            u_t = torch.from_numpy(np.ascontiguousarray(u, dtype=np.int64))[None].to(device)
            tok, audio = model.step(u_t, kv, eager=True) if kv is not None else model.step(u_t)
            if model.last_gates is not None:
                gates[:, j] = model.last_gates[0].float().cpu().numpy()
            for r, w in current.items():
                attention[r, j] = w.cpu().numpy()
            t = j - lm_cfg.max_delay  # the assistant frame this call completes
            if 0 <= t < n:
                text[t] = int(tok[0])
                codes[:, t] = audio[0].cpu().numpy()
    assistant = np.asarray(codec.decode(codes), dtype=np.float32)
    out_wav = np.zeros(n * fs, np.float32)
    out_wav[: min(assistant.size, out_wav.size)] = assistant[: out_wav.size]
    pieces = [
        "" if int(x) in (TEXT_PAD_ID, TEXT_EPAD_ID) or x < 0 else tokenizer.piece(int(x))
        for x in text
    ]
    transcript = timed_transcript(text, tokenizer, float(codec.frame_rate), 0, True)
    return Conversation(
        user_wav=padded,
        assistant_wav=out_wav,
        sample_rate=sr,
        frame_rate=float(codec.frame_rate),
        tokens=text,
        pieces=pieces,
        transcript=transcript,
        gates=gates[:, :n],
        attention=attention[:, :n],
        audio_codes=codes,
        layers=layers,
        grid_side=side,
        prompt_end_step=min(prompt_frames, n - 1),
        image=image,
        image_id=image_id,
        prompt=prompt,
        intervention=intervention,
        seed=seed,
        info={
            "lead_in_s": lead_in_s,
            "extra_seconds": extra_seconds,
            "temperature": temperature,
            "text_temperature": text_temperature,
            "xa_start": int(model.cfg.xa.xa_start),
            "num_layers": int(model.cfg.lm.num_layers),
            "gate_readout": model.cfg.xa.gate_readout,
        },
    )


class ConversationEngine:
    """What the explorer needs to hold a conversation: the model, codec, tokenizer, encoder.

    Image tokens are cached per image (the frozen encoder runs once per image); the user's text
    prompts are spoken by ``user_voice`` (default: the last held-out user voice, never heard in
    training).
    """

    def __init__(
        self,
        model: Any,
        codec: Any,
        tokenizer: Any,
        encoder: Any,
        *,
        cfg: Any = None,
        user_voice: Any = None,
        run: str | None = None,
    ) -> None:
        self.model, self.codec, self.tokenizer, self.encoder = model, codec, tokenizer, encoder
        self.cfg, self.run_name = cfg, run
        if user_voice is None:
            user_voice = heldout_voice(cfg)
        self.user_voice = user_voice
        self._tokens: dict[str, torch.Tensor] = {}
        self._prompts: dict[tuple[str, str, bool], tuple[np.ndarray, str | None]] = {}

    @classmethod
    def load(cls, cfg: Any, run: str = "main", **kw: Any) -> ConversationEngine:
        """The trained adapters of run ``run`` with the lab's codec, tokenizer and encoder; with
        the ``moshika-vis`` preset (``cfg.checkpoint``), Kyutai's released model instead."""
        if getattr(cfg, "released", False):
            from moshivis_lab.model.release import load_release

            device = kw.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
            dtype = kw.pop("dtype", torch.bfloat16 if device != "cpu" else torch.float32)
            return cls.from_release(load_release(cfg.checkpoint, device=device, dtype=dtype), **kw)
        from moshivis_lab.audio.codecs import load_codec
        from moshivis_lab.train.adapters import load_trained
        from moshivis_lab.vision.pretrain import load_vision_encoder
        from moshivis_lab.world.tokenizer import TextTokenizer

        return cls(
            load_trained(cfg, run),
            load_codec(cfg),
            TextTokenizer.load(cfg.tokenizer_path),
            load_vision_encoder(cfg),
            cfg=cfg,
            run=run,
            **kw,
        )

    @classmethod
    def from_release(cls, release: Any, **kw: Any) -> ConversationEngine:
        """An engine over a loaded released directory (``model.release.load_release``): images
        are photographs (``world.photos``) or the user's own, prompts spoken by the TTS."""
        return cls(release.model, release.codec, release.tokenizer, release.encoder, **kw)

    @property
    def layers(self) -> tuple[int, ...]:
        """Temporal layers that hold cross-attention."""
        return tuple(self.model.cfg.layers)

    def world_images(self, split: str = "test") -> list[str]:
        """Ids of the world's images of ``split`` (the shipped photographs' names when the
        engine runs a released model, which has no tiny world)."""
        if self.cfg is None or getattr(self.cfg, "released", False):
            return photo_names()
        return world_images(self.cfg, split)

    def image(self, image: Any, split: str = "test") -> tuple[Image.Image, str | None]:
        """``resolve_image`` with this engine's config."""
        return resolve_image(image, self.cfg, split)

    def image_tokens(self, image: Image.Image, key: str | None = None) -> torch.Tensor:
        """Encoder tokens ``[1, N, D]`` of ``image`` (cached by ``key`` or by the pixels)."""
        if key is None:
            key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key not in self._tokens:
            if len(self._tokens) > 64:
                self._tokens.clear()
            self._tokens[key] = self.encoder.encode([image]).float().cpu()
        return self._tokens[key]

    def prompt_audio(
        self, prompt: Any, *, prompt_rate: int | None = None, allow_silence: bool = False
    ) -> tuple[np.ndarray, str | None]:
        """``prompt_audio`` at the codec's rate in this engine's user voice. Spoken text is
        cached: the TTS carries state from one utterance to the next, so speaking the same text
        twice gives slightly different samples, and a comparison must hear the same prompt."""
        sr = int(self.codec.sample_rate)
        if isinstance(prompt, str) and not _looks_like_audio_path(prompt):
            key = (" ".join(prompt.split()), getattr(self.user_voice, "name", ""), allow_silence)
            if key not in self._prompts:
                if len(self._prompts) > 64:
                    self._prompts.clear()
                self._prompts[key] = prompt_audio(
                    prompt, sr, voice=self.user_voice, allow_silence=allow_silence
                )
            wav, text = self._prompts[key]
            return wav.copy(), text
        return prompt_audio(
            prompt, sr, prompt_rate=prompt_rate, voice=self.user_voice, allow_silence=allow_silence
        )

    def run(
        self,
        image: Any,
        prompt: Any,
        *,
        prompt_rate: int | None = None,
        intervention: GateIntervention | dict | None = None,
        split: str = "test",
        allow_silence: bool = False,
        **kw: Any,
    ) -> Conversation:
        """Ask ``prompt`` (text, audio file or samples at ``prompt_rate``) about ``image`` (a
        world id or index, a path, a PIL image, an array; None = no image) and record the
        conversation. ``kw``: ``record_conversation``'s settings (seed, extra_seconds, ...)."""
        wav, text = self.prompt_audio(prompt, prompt_rate=prompt_rate, allow_silence=allow_silence)
        pil, image_id, tokens = None, None, None
        if image is not None:
            pil, image_id = self.image(image, split)
            tokens = self.image_tokens(pil, image_id)
        return record_conversation(
            self.model,
            self.codec,
            self.tokenizer,
            wav,
            tokens,
            intervention=intervention,
            image=pil,
            image_id=image_id,
            prompt=text,
            **kw,
        )

    def compare(
        self,
        image: Any,
        prompt: Any,
        intervention: GateIntervention | dict | None,
        **kw: Any,
    ) -> tuple[Conversation, Conversation]:
        """The same conversation (same seed) without and with ``intervention``."""
        return self.run(image, prompt, **kw), self.run(
            image, prompt, intervention=intervention, **kw
        )


def heldout_voice(cfg: Any = None) -> Any:
    """The last held-out user voice of ``cfg``'s world (the last user voice without a config)."""
    from moshivis_lab.world.speech import USER_VOICES, user_voices

    if cfg is None:
        return USER_VOICES[-1]
    return user_voices(cfg.world.n_user_voices)[-1]


def changed_fraction(a: Conversation, b: Conversation) -> dict[str, float]:
    """Share of steps whose text token / audio codes differ between two conversations."""
    n = min(a.n_steps, b.n_steps)
    if n == 0:
        return {"text": float("nan"), "audio": float("nan")}
    text = float(np.mean(a.tokens[:n] != b.tokens[:n]))
    audio = float(np.mean((a.audio_codes[:, :n] != b.audio_codes[:, :n]).any(axis=0)))
    return {"text": text, "audio": audio}


def iter_words(conv: Conversation, start: int = 0) -> Iterator[tuple[int, str, float]]:
    """``(step, piece, gate score)`` of each text piece from ``start`` on (for transcripts)."""
    score = conv.gate_score()
    for t in range(start, conv.n_steps):
        if conv.pieces[t]:
            yield t, conv.pieces[t], float(score[t])


__all__ = [
    "Conversation",
    "ConversationEngine",
    "changed_fraction",
    "heldout_voice",
    "iter_words",
    "resolve_image",
    "prompt_audio",
    "record_conversation",
    "world_images",
]
