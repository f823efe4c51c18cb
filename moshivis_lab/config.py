"""Configuration dataclasses for every room of the lab, validated on construction, with presets.

Each config checks its own fields in ``__post_init__`` and raises ``ValueError`` naming the field,
so a bad value fails where it is written, not three stages later. Derived values are properties
(never stale class-level defaults). ``LabConfig.tiny()`` is the offline default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moshivis_lab.world.vocab import COLOUR_NAMES, SHAPES

T = TypeVar("T")

# Moshi's special text ids (SentencePiece ids repurposed by Moshi) and the "zero token".
TEXT_EPAD_ID = 0
TEXT_PAD_ID = 3
ZERO_TOKEN = -1
NORM_KINDS = ("mean_square", "variance")  # what an RMSNorm divides by: mean(x^2) or var(x)


def _check(cond: bool, cls: str, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls}.{name}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy's bool too


def _nested_by_name(cls: type, kind: str) -> type | None:
    """The config dataclass named ``kind`` in the module that defines ``cls`` (None if none)."""
    found = vars(sys.modules[cls.__module__]).get(kind)
    return found if isinstance(found, type) and dataclasses.is_dataclass(found) else None


def _as_tuples(v: Any) -> Any:
    """JSON lists back to the tuples a frozen config holds (nested lists too)."""
    if isinstance(v, list):
        return tuple(_as_tuples(x) for x in v)
    return v


def _build(cls: type[T], raw: dict[str, Any], source: str, *, lenient: bool) -> T:
    """``cls(**raw)``: unknown fields dropped with a warning (``lenient``) or refused, lists
    made tuples, nested config dicts rebuilt the same way; errors name ``source``."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(raw) - set(known))
    if extra and not lenient:
        raise ValueError(
            f"{source}: unknown {cls.__name__} field(s) {extra}; expected some of {sorted(known)}"
        )
    if extra:
        warnings.warn(
            f"{source}: dropped unknown {cls.__name__} field(s) {extra} (written by another "
            "version of the lab?); the rest is read",
            stacklevel=3,
        )
    kw: dict[str, Any] = {}
    for name, v in raw.items():
        if name not in known:
            continue
        kinds = [k.strip() for k in str(known[name].type).split("|") if k.strip() != "None"]
        sub = _nested_by_name(cls, kinds[0]) if len(kinds) == 1 and isinstance(v, dict) else None
        kw[name] = _build(sub, v, f"{source} [{name}]", lenient=lenient) if sub else _as_tuples(v)
    if not lenient:  # a config built in code: its own error names the field
        return cls(**kw)
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def from_stored(cls: type[T], raw: Any, source: str) -> T:
    """A ``cls`` config from what a file stored (its JSON text, or the parsed object): the one
    reader of stored configs. Broken JSON, a JSON value that is not an object, and a value the
    config refuses are a ValueError naming ``source``; fields this version does not know are
    dropped with a warning naming them and ``source``; nested configs are read the same way."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{source}: the stored {cls.__name__} is not valid JSON ({e}); the file is "
                "damaged: write it again (re-save or rebuild)"
            ) from e
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source}: the stored {cls.__name__} is a JSON {type(raw).__name__}, not an object "
            "of fields; the file is damaged or not one the lab wrote: write it again"
        )
    return _build(cls, raw, source, lenient=True)


def _check_types(obj: Any) -> None:
    """Check every field against its annotation, naming the field: ``int`` fields hold integers
    (not bools, not 2.5), ``float`` fields finite real numbers (not NaN, inf, bools or strings),
    ``bool`` fields bools, ``str`` fields strings, ``Path`` fields paths or strings,
    ``tuple[float/int, ...]`` fields sequences of those, nested config fields that config (a
    dict of its fields is converted, unknown fields refused); ``X | None`` also takes None.
    Run first in ``__post_init__``, so a value of the wrong kind fails here with the field named
    instead of as a ``TypeError`` in a comparison, or not at all."""
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        kinds = [k.strip() for k in ann.split("|")]
        v = getattr(obj, f.name)
        if "None" in kinds:
            if v is None:
                continue
            kinds.remove("None")
        if len(kinds) != 1:
            continue
        kind, got = kinds[0], f"got {v!r} ({type(v).__name__})"
        if kind == "int":
            _check(_is_int(v), cls, f.name, f"must be an integer, {got}")
        elif kind == "float":
            _check(_is_finite(v), cls, f.name, f"must be a finite number, {got}")
        elif kind == "bool":
            _check(_is_bool(v), cls, f.name, f"must be True or False, {got}")
        elif kind == "str":
            ok = isinstance(v, str) or (f.name.endswith("path") and isinstance(v, os.PathLike))
            _check(ok, cls, f.name, f"must be a string, {got}")
        elif kind == "Path":
            _check(isinstance(v, str | os.PathLike), cls, f.name, f"must be a path, {got}")
        elif kind.startswith(("tuple[float", "tuple[int")):
            each = _is_finite if kind.startswith("tuple[float") else _is_int
            ok = isinstance(v, tuple | list) and all(each(x) for x in v)
            what = "finite numbers" if each is _is_finite else "integers"
            _check(ok, cls, f.name, f"must be a sequence of {what}, {got}")
        elif (sub := _nested_by_name(type(obj), kind)) is not None:
            if isinstance(v, dict):
                v = _build(sub, v, f"{cls}.{f.name}", lenient=False)
                object.__setattr__(obj, f.name, v)
            _check(
                isinstance(v, sub),
                cls,
                f.name,
                f"must be a {sub.__name__} (or a dict of its fields), {got}",
            )


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v > 0, type(obj).__name__, n, f"must be > 0, got {v!r}")


def _probability(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(0.0 <= v <= 1.0, type(obj).__name__, n, f"must be in [0, 1], got {v!r}")


def _range(obj: Any, name: str) -> None:
    lo, hi = getattr(obj, name)
    _check(
        lo <= hi,
        type(obj).__name__,
        name,
        f"must be (low, high) with low <= high, got {(lo, hi)!r}",
    )


def default_data_dir() -> Path:
    """``$MOSHIVIS_DATA``, else the checkout's ``data/`` (so notebooks and the CLI share it), else ./data."""
    if os.environ.get("MOSHIVIS_DATA"):
        return Path(os.environ["MOSHIVIS_DATA"])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists() and (root / "moshivis_lab").is_dir():
        return root / "data"
    return Path("data")


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic image-and-dialogue world: how many scenes, dialogues and samples, and how."""

    seed: int = 0
    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 5
    p_word: float = 0.35  # probability that a scene carries a rendered word (OCR)
    n_train_images: int = 3000
    n_val_images: int = 300
    n_test_images: int = 300
    n_heldout_images: int = 300  # images built around colour-shape pairs never seen in training
    heldout_pairs: tuple[tuple[str, str], ...] = (
        ("red", "star"),
        ("blue", "triangle"),
        ("green", "heart"),
        ("yellow", "square"),
        ("purple", "circle"),
        ("orange", "cross"),
    )
    n_image_dialogues: int = 5000
    n_spoken_image_dialogues: int = 1000  # the spoken subset of the image dialogues
    n_chitchat_dialogues: int = 5000  # all spoken
    n_image_text_samples: int = 20000  # speechless captions / VQA / OCR / counting
    n_user_voices: int = 8
    n_heldout_voices: int = 2  # user voices kept out of codec fitting and training
    pause_range_s: tuple[float, float] = (0.24, 0.8)
    lead_in_range_s: tuple[float, float] = (0.16, 0.48)
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "image_size", "min_objects", "max_objects", "n_user_voices")
        _check(
            self.image_size >= 64,
            "WorldConfig",
            "image_size",
            f"must be >= 64, got {self.image_size}",
        )
        _check(
            self.min_objects <= self.max_objects <= 5,
            "WorldConfig",
            "max_objects",
            f"need min_objects <= max_objects <= 5, got {self.min_objects}, {self.max_objects}",
        )
        _probability(self, "p_word", "val_fraction", "test_fraction")
        for n in (
            "n_train_images",
            "n_val_images",
            "n_test_images",
            "n_heldout_images",
            "n_image_dialogues",
            "n_spoken_image_dialogues",
            "n_chitchat_dialogues",
            "n_image_text_samples",
        ):
            _check(getattr(self, n) >= 0, "WorldConfig", n, f"must be >= 0, got {getattr(self, n)}")
        _check(
            self.n_spoken_image_dialogues <= self.n_image_dialogues,
            "WorldConfig",
            "n_spoken_image_dialogues",
            "cannot exceed n_image_dialogues",
        )
        _check(
            0 <= self.n_heldout_voices < self.n_user_voices,
            "WorldConfig",
            "n_heldout_voices",
            f"must be in [0, n_user_voices), got {self.n_heldout_voices}",
        )
        _range(self, "pause_range_s")
        _range(self, "lead_in_range_s")
        pairs = self.heldout_pairs
        _check(
            isinstance(pairs, tuple | list)
            and all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs),
            "WorldConfig",
            "heldout_pairs",
            f"must be (colour, shape) pairs, e.g. (('red', 'star'),), got {pairs!r}",
        )
        bad = [p for p in pairs if p[0] not in COLOUR_NAMES or p[1] not in SHAPES]
        _check(
            not bad,
            "WorldConfig",
            "heldout_pairs",
            f"{bad} are not (colour, shape) pairs of the world: colours {list(COLOUR_NAMES)}, "
            f"shapes {list(SHAPES)}",
        )
        _check(
            len(pairs) > 0 or self.n_heldout_images == 0,
            "WorldConfig",
            "heldout_pairs",
            "the held-out images are built around these pairs: give at least one, or set "
            "n_heldout_images=0 for no held-out split",
        )

    @property
    def n_images(self) -> int:
        """Total number of images over all splits."""
        return self.n_train_images + self.n_val_images + self.n_test_images + self.n_heldout_images

    @classmethod
    def tiny(cls) -> WorldConfig:
        """The default offline world (>= 5k image dialogues, 5k spoken chit-chat, 20k samples)."""
        return cls()

    @classmethod
    def smoke(cls) -> WorldConfig:
        """A very small world for tests and notebook CI (seconds to build)."""
        return cls(
            n_train_images=60,
            n_val_images=12,
            n_test_images=12,
            n_heldout_images=12,
            n_image_dialogues=80,
            n_spoken_image_dialogues=24,
            n_chitchat_dialogues=40,
            n_image_text_samples=200,
        )


@dataclass(frozen=True)
class CodecConfig:
    """An audio codec: 24 kHz, 12.5 Hz frames, ``num_codebooks`` codebooks of ``cardinality``."""

    kind: str = "tiny"  # "tiny" (fitted here) or "mimi" (transformers MimiModel from a local dir)
    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8
    cardinality: int = 256
    n_mels: int = 40
    n_cepstra: int = 20
    subframes: int = 4  # envelope/F0 detail kept per 80 ms frame
    fmin: float = 60.0
    fmax: float = 500.0
    fit_seconds: float = 900.0  # seconds of world speech the tiny codec is fitted on
    kmeans_iters: int = 25
    seed: int = 0
    mimi_path: str | None = None
    # Codebook 0, the "semantic" code. "phonetic" (default): a small phone classifier, fitted on
    # TTS speech whose phonemes are known, reads each 20 ms point with the points before it; the
    # frame's code is the k-means cluster of its phone posteriors (Mimi distils WavLM into its
    # first codebook for the same reason: content first, speaker-independent). "kmeans": k-means
    # of the frame's mean envelope (speaker-dependent; the original tiny codec).
    semantic: str = "phonetic"
    phone_classes: int = 96  # slots for the phone inventory (espeak's English uses ~70)
    phone_context: int = 5  # earlier points the classifier sees (causal: no extra lookahead)
    phone_hidden: int = 128
    phone_sentences: int = 600  # labelled TTS sentences the classifier is fitted on
    phone_epochs: int = 30

    def __post_init__(self) -> None:
        _check_types(self)
        _check(
            self.kind in ("tiny", "mimi"),
            "CodecConfig",
            "kind",
            f"must be 'tiny' or 'mimi', got {self.kind!r}",
        )
        _positive(
            self,
            "sample_rate",
            "frame_rate",
            "num_codebooks",
            "cardinality",
            "n_mels",
            "n_cepstra",
            "subframes",
            "fit_seconds",
            "kmeans_iters",
            "phone_classes",
            "phone_hidden",
            "phone_sentences",
            "phone_epochs",
        )
        _check(
            self.semantic in ("phonetic", "kmeans"),
            "CodecConfig",
            "semantic",
            f"must be 'phonetic' or 'kmeans', got {self.semantic!r}",
        )
        _check(
            self.phone_context >= 0,
            "CodecConfig",
            "phone_context",
            f"must be >= 0, got {self.phone_context}",
        )
        _check(
            float(self.sample_rate / self.frame_rate).is_integer(),
            "CodecConfig",
            "frame_rate",
            f"sample_rate / frame_rate must be a whole number of samples, got {self.sample_rate / self.frame_rate}",
        )
        _check(
            (self.frame_size % self.subframes) == 0,
            "CodecConfig",
            "subframes",
            f"must divide the frame size {self.frame_size}",
        )
        _check(self.cardinality >= 2, "CodecConfig", "cardinality", "must be >= 2")
        _check(0 < self.fmin < self.fmax, "CodecConfig", "fmin", "need 0 < fmin < fmax")
        if self.kind == "tiny":
            _check(
                self.num_codebooks >= 5,
                "CodecConfig",
                "num_codebooks",
                "the tiny codec needs >= 5 codebooks (semantic, F0 x2, energy, envelope residuals)",
            )
        if self.kind == "mimi":
            _check(
                self.mimi_path is not None,
                "CodecConfig",
                "mimi_path",
                "kind='mimi' needs a local directory with the kyutai/mimi weights",
            )

    @property
    def frame_size(self) -> int:
        """Samples per frame (1920 at 24 kHz / 12.5 Hz)."""
        return int(self.sample_rate / self.frame_rate)

    @classmethod
    def tiny(cls) -> CodecConfig:
        """The tiny codec fitted offline on the world's speech."""
        return cls()

    @classmethod
    def mimi(cls, path: str | os.PathLike[str]) -> CodecConfig:
        """Kyutai's Mimi (8 of its codebooks, cardinality 2048) read from a local directory."""
        return cls(kind="mimi", cardinality=2048, mimi_path=str(path))


@dataclass(frozen=True)
class TokenizerConfig:
    """The text tokenizer: a SentencePiece model honouring Moshi's special ids."""

    vocab_size: int = 1000
    model_path: str | None = None  # a local Moshi 32k SentencePiece model instead of training one
    character_coverage: float = 1.0

    def __post_init__(self) -> None:
        _check_types(self)
        _check(
            self.vocab_size >= 64,
            "TokenizerConfig",
            "vocab_size",
            f"must be >= 64, got {self.vocab_size}",
        )
        _probability(self, "character_coverage")


MOSHI_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)


@dataclass(frozen=True)
class LMConfig:
    """The Moshi speech-text LM: temporal transformer ("Helium") + depth transformer ("depformer").

    Row 0 of a token grid is text, rows 1..dep_q Moshi's audio codebooks, the next rows the
    user's. ``delays`` has one entry per row (1 + n_q). Loss weights follow moshi-finetune.
    """

    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    norm_eps: float = 1e-8
    text_card: int = 1000
    existing_text_padding_id: int = TEXT_PAD_ID
    existing_text_end_padding_id: int = TEXT_EPAD_ID
    card: int = 256
    n_q: int = 16  # audio rows in the grid (Moshi's 8 + the user's 8)
    dep_q: int = 8  # audio rows the depformer generates (Moshi's own)
    delays: tuple[int, ...] = MOSHI_DELAYS
    depformer_dim: int = 128
    depformer_num_layers: int = 2
    depformer_num_heads: int = 4
    depformer_hidden_scale: float = 4.125
    depformer_context: int = 8  # kept for moshi's kwargs; moshi's depformer attends to all steps
    depformer_weights_per_step: bool = True  # one set of attention/FFN weights per codebook step
    depformer_multi_linear: bool = True  # one `depformer_in` projection per codebook step
    # the depformer's RMSNorm: "mean_square" (moshi, MLX, Rust) or "variance" (kyuteye_pt)
    depformer_norm: str = "mean_square"
    text_weight: float = 1.0
    audio_weight: float = 1.0
    semantic_weight: float = 100.0  # first audio codebook's loss multiplier
    text_padding_weight: float = 0.5  # PAD / EPAD text targets' loss multiplier

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        _positive(
            self,
            "dim",
            "num_layers",
            "num_heads",
            "context",
            "text_card",
            "card",
            "n_q",
            "dep_q",
            "depformer_dim",
            "depformer_num_layers",
            "depformer_num_heads",
            "hidden_scale",
            "depformer_hidden_scale",
            "norm_eps",
        )
        _check(
            self.dim % self.num_heads == 0, "LMConfig", "num_heads", f"must divide dim {self.dim}"
        )
        _check(
            self.depformer_dim % self.depformer_num_heads == 0,
            "LMConfig",
            "depformer_num_heads",
            f"must divide depformer_dim {self.depformer_dim}",
        )
        _check(
            (self.dim // self.num_heads) % 2 == 0,
            "LMConfig",
            "num_heads",
            "head dim must be even (RoPE)",
        )
        _check(self.dep_q <= self.n_q, "LMConfig", "dep_q", f"must be <= n_q ({self.n_q})")
        _check(
            len(self.delays) == 1 + self.n_q,
            "LMConfig",
            "delays",
            f"needs 1 + n_q = {1 + self.n_q} entries, got {len(self.delays)}",
        )
        _check(all(d >= 0 for d in self.delays), "LMConfig", "delays", "must be >= 0")
        for n in ("existing_text_padding_id", "existing_text_end_padding_id"):
            _check(0 <= getattr(self, n) < self.text_card, "LMConfig", n, "must be a valid text id")
        for n in ("text_weight", "audio_weight", "semantic_weight", "text_padding_weight"):
            _check(getattr(self, n) >= 0, "LMConfig", n, "must be >= 0")
        _check(
            self.depformer_norm in NORM_KINDS,
            "LMConfig",
            "depformer_norm",
            f"must be one of {NORM_KINDS}, got {self.depformer_norm!r}",
        )

    @property
    def num_codebooks(self) -> int:
        """Rows of a token grid: 1 text + n_q audio."""
        return 1 + self.n_q

    @property
    def max_delay(self) -> int:
        """The largest delay (frames)."""
        return max(self.delays)

    @property
    def dim_feedforward(self) -> int:
        """Temporal FFN width (``hidden_scale * dim``, as Moshi computes it)."""
        return int(self.hidden_scale * self.dim)

    @property
    def depformer_dim_feedforward(self) -> int:
        """Depformer FFN width."""
        return int(self.depformer_hidden_scale * self.depformer_dim)

    @classmethod
    def tiny(cls, text_card: int = 1000, card: int = 256) -> LMConfig:
        """A few-million-parameter Moshi for CPU (dim 256, 6 layers, depformer 128 x 2)."""
        return cls(text_card=text_card, card=card, context=750)

    @classmethod
    def moshi_7b(cls) -> LMConfig:
        """The released Moshi 7B numbers exactly."""
        return cls(
            dim=4096,
            num_layers=32,
            num_heads=32,
            hidden_scale=4.125,
            context=3000,
            text_card=32000,
            card=2048,
            depformer_dim=1024,
            depformer_num_layers=6,
            depformer_num_heads=16,
            depformer_hidden_scale=4.125,
        )


@dataclass(frozen=True)
class LabConfig:
    """Everything one run of the lab needs: where artefacts live and each room's config."""

    name: str = "tiny"
    data_dir: Path = field(default_factory=lambda: default_data_dir())
    world: WorldConfig = field(default_factory=WorldConfig.tiny)
    codec: CodecConfig = field(default_factory=CodecConfig.tiny)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    # Kyutai's released directory (the moshika-vis preset): the model every part of the lab uses
    # instead of a trained run; None for the tiny presets.
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint).expanduser())
        _positive(self, "workers")

    @property
    def released(self) -> bool:
        """Whether this config runs Kyutai's released model (``checkpoint`` is set)."""
        return self.checkpoint is not None

    @property
    def world_dir(self) -> Path:
        """Where the world's raw data (images, JSON, wav) is written."""
        return self.data_dir / self.name / "world"

    @property
    def codec_dir(self) -> Path:
        """Where the fitted codec lives."""
        return self.data_dir / self.name / "codec"

    @property
    def shards_dir(self) -> Path:
        """Where the tokenised, memory-mapped shards and their manifest live."""
        return self.data_dir / self.name / "shards"

    @property
    def tokenizer_path(self) -> Path:
        """The SentencePiece model used for text."""
        if self.tokenizer.model_path:
            return Path(self.tokenizer.model_path)
        return self.data_dir / self.name / "tokenizer" / "spm.model"

    def replace(self, **changes: Any) -> LabConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, data_dir: str | os.PathLike[str] | None = None) -> LabConfig:
        """The offline default: the full tiny world and the tiny codec."""
        kw: dict[str, Any] = {} if data_dir is None else {"data_dir": Path(data_dir)}
        return cls(name="tiny", **kw)

    @classmethod
    def smoke(cls, data_dir: str | os.PathLike[str] | None = None) -> LabConfig:
        """A seconds-sized world for tests and notebook CI, same code paths as tiny."""
        kw: dict[str, Any] = {} if data_dir is None else {"data_dir": Path(data_dir)}
        return cls(
            name="smoke",
            world=WorldConfig.smoke(),
            codec=dataclasses.replace(
                CodecConfig.tiny(),
                fit_seconds=120.0,
                kmeans_iters=10,
                phone_sentences=150,
                phone_epochs=15,
            ),
            **kw,
        )

    @classmethod
    def moshika_vis(
        cls,
        data_dir: str | os.PathLike[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> LabConfig:
        """Kyutai's released MoshiVis from a local directory (``checkpoint``, else
        ``$MOSHIVIS_CHECKPOINT``) exactly as published: its Mimi file and its tokenizer."""
        given = checkpoint if checkpoint is not None else os.environ.get(CHECKPOINT_ENV)
        if not given:
            raise ValueError(
                f"the moshika-vis preset needs the released directory: pass checkpoint=DIR or set "
                f"{CHECKPOINT_ENV}=DIR (a local copy of {RELEASE_REPO}, e.g. "
                f"`huggingface-cli download {RELEASE_REPO} --local-dir DIR`)"
            )
        root = Path(given).expanduser()
        kw: dict[str, Any] = {} if data_dir is None else {"data_dir": Path(data_dir)}
        return cls(
            name="moshika-vis",
            codec=CodecConfig.mimi(root / "tokenizer-e351c8d8-checkpoint125.safetensors"),
            tokenizer=TokenizerConfig(
                vocab_size=32000, model_path=str(root / "tokenizer_spm_32k_3.model")
            ),
            checkpoint=root,
            **kw,
        )


CHECKPOINT_ENV = "MOSHIVIS_CHECKPOINT"
RELEASE_REPO = "kyutai/moshika-vis-pytorch-bf16"
PRESETS = {"tiny": LabConfig.tiny, "smoke": LabConfig.smoke, "moshika-vis": LabConfig.moshika_vis}


def preset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> LabConfig:
    """Look a preset up by name ('tiny', 'smoke', or 'moshika-vis' with ``checkpoint`` or
    ``$MOSHIVIS_CHECKPOINT``: Kyutai's released directory)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if name == "moshika-vis":
        return LabConfig.moshika_vis(data_dir, checkpoint)
    if checkpoint is not None:
        raise ValueError(f"checkpoint= is for the moshika-vis preset, not {name!r}")
    return PRESETS[name](data_dir)


XA_GATINGS = ("conditional_sigmoid", "tanh_scalar", "none")
XA_SHARINGS = ("qkv", "kv", "none")
GATE_READOUTS = ("lab", "kyuteye")  # how one reported gate value is read off the layers' gates
XA_OUT_INITS = ("default", "zero")


@dataclass(frozen=True)
class XAConfig:
    """MoshiVis' gated cross-attention adapters (what is added to a frozen Moshi).

    ``gating``: ``"conditional_sigmoid"`` (the paper's: ``g = sigmoid(W2 ReLU(W1 y) + gate_bias)``
    per token and channel, ``W1`` dim -> dim/8, ``W2`` dim/8 -> dim, no bias), ``"tanh_scalar"``
    (Flamingo's ``g = tanh(alpha)``, one scalar starting at 0) or ``"none"`` (``g = 1``).
    ``sharing``: ``"qkv"`` (one Q/K/V/out module for every layer, the paper's default), ``"kv"``
    (the K/V projection shared, Q and out per layer) or ``"none"`` (everything per layer).
    ``gate_shared``: one gate module for every layer (with ``sharing="qkv"`` each layer then keeps
    a scalar ``per_layer_alpha``, as in the reference code). ``xa_layers``: temporal layers that get
    cross-attention (None = all). ``xa_start``: streaming steps skipped before cross-attention
    starts (the released demos use 16). ``image_dim``: width of the image encoder's tokens.
    ``num_heads``: cross-attention heads (None = the LM's). ``pool_tokens``: 0 (the paper's)
    or ``k``: the image prefix also offers the mean of every ``k x k`` block of the encoder's
    square token grid, appended after the tokens (no parameters).
    ``gate_bias`` and ``out_proj_init`` set where training starts: Kyutai's code uses bias -4
    (``g = 0.018``) with the default (truncated normal) ``out_proj``, so the update ``g * y`` is
    small but not zero; ``out_proj_init="zero"`` starts ``y = 0`` (so ``g * y = 0`` at init
    whatever the bias) and lets a larger bias (0: ``g = 0.5``) pass the gradient undamped.
    ``norm_xa`` / ``norm_xa_eps`` / ``norm_xa_fp32``: the image prefix's RMSNorm (kind, eps, None =
    the LM's ``norm_eps``, float32 compute); kyuteye_pt uses ``"variance"``, 1e-5, the input dtype.
    ``gate_readout``: the one reported gate value (``MoshiVisOutput.gate_score``): ``"lab"`` is the
    mean over the last 10 cross-attention layers of the gates as applied (``per_layer_alpha``
    included, 1 without a gate); ``"kyuteye"`` is kyuteye_pt's: the mean gate of each layer among
    the last 10 temporal layers, before ``per_layer_alpha`` (0 without a gate), summed and divided
    by ``min(10, layers)``.
    """

    gating: str = "conditional_sigmoid"
    sharing: str = "qkv"
    gate_shared: bool = False
    xa_layers: tuple[int, ...] | None = None
    xa_start: int = 0
    image_dim: int = 1152
    gate_bias: float = -4.0
    num_heads: int | None = None
    pool_tokens: int = 0
    out_proj_init: str = "default"
    norm_xa: str = "mean_square"
    norm_xa_eps: float | None = None
    norm_xa_fp32: bool = True
    gate_readout: str = "lab"

    def __post_init__(self) -> None:
        _check_types(self)
        _check(
            self.norm_xa in NORM_KINDS,
            "XAConfig",
            "norm_xa",
            f"must be one of {NORM_KINDS}, got {self.norm_xa!r}",
        )
        _check(
            self.norm_xa_eps is None or self.norm_xa_eps > 0,
            "XAConfig",
            "norm_xa_eps",
            f"must be > 0 (or None: the LM's norm_eps), got {self.norm_xa_eps!r}",
        )
        _check(
            self.gate_readout in GATE_READOUTS,
            "XAConfig",
            "gate_readout",
            f"must be one of {GATE_READOUTS}, got {self.gate_readout!r}",
        )
        _check(
            self.out_proj_init in XA_OUT_INITS,
            "XAConfig",
            "out_proj_init",
            f"must be one of {XA_OUT_INITS}, got {self.out_proj_init!r}",
        )
        _check(
            self.gating in XA_GATINGS,
            "XAConfig",
            "gating",
            f"must be one of {XA_GATINGS}, got {self.gating!r}",
        )
        _check(
            self.sharing in XA_SHARINGS,
            "XAConfig",
            "sharing",
            f"must be one of {XA_SHARINGS}, got {self.sharing!r}",
        )
        _check(
            not (self.gate_shared and self.gating == "none"),
            "XAConfig",
            "gate_shared",
            "gating='none' has no gate to share; set gate_shared=False or choose a gating",
        )
        if self.xa_layers is not None:
            layers = tuple(int(i) for i in self.xa_layers)
            _check(
                len(layers) > 0,
                "XAConfig",
                "xa_layers",
                "must list at least one layer (use None for every layer)",
            )
            _check(
                all(i >= 0 for i in layers) and len(set(layers)) == len(layers),
                "XAConfig",
                "xa_layers",
                f"must be distinct layer indices >= 0, got {layers}",
            )
            object.__setattr__(self, "xa_layers", tuple(sorted(layers)))
        _check(self.xa_start >= 0, "XAConfig", "xa_start", f"must be >= 0, got {self.xa_start}")
        _positive(self, "image_dim")
        _check(
            self.num_heads is None or self.num_heads > 0,
            "XAConfig",
            "num_heads",
            f"must be None (the LM's heads) or > 0, got {self.num_heads!r}",
        )
        _check(
            self.pool_tokens >= 0 and self.pool_tokens != 1,
            "XAConfig",
            "pool_tokens",
            f"must be 0 (off) or a block side >= 2, got {self.pool_tokens}",
        )
        _check(
            self.gate_bias == self.gate_bias and abs(self.gate_bias) != float("inf"),
            "XAConfig",
            "gate_bias",
            f"must be finite, got {self.gate_bias!r}",
        )

    @classmethod
    def tiny(cls, lm_cfg: LMConfig, image_dim: int) -> XAConfig:
        """The paper's adapters for a tiny LM and encoder, cross-attention from step 0, started
        where a few hundred CPU steps can move them: gate bias 0 with a zero ``out_proj`` (so
        ``g * y = 0`` at init, as with Kyutai's init, but the gate passes half the update)."""
        return cls(
            image_dim=image_dim,
            num_heads=lm_cfg.num_heads,
            xa_start=0,
            gate_bias=0.0,
            out_proj_init="zero",
        )

    @classmethod
    def moshika_vis(cls) -> XAConfig:
        """The released moshika-vis adapters (SigLIP width 1152, demos skip 16 steps), computed
        as kyuteye_pt computes them: variance RMSNorm after ``proj_xa`` (eps 1e-5, input dtype)
        and its gate readout."""
        return cls(
            image_dim=1152,
            xa_start=16,
            norm_xa="variance",
            norm_xa_eps=1e-5,
            norm_xa_fp32=False,
            gate_readout="kyuteye",
        )


@dataclass(frozen=True)
class MoshiVisConfig:
    """A Moshi LM with cross-attention adapters: ``lm`` and ``xa``, checked against each other."""

    lm: LMConfig = field(default_factory=LMConfig.tiny)
    xa: XAConfig = field(default_factory=lambda: XAConfig(image_dim=192))

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.lm, dict):
            object.__setattr__(self, "lm", LMConfig(**self.lm))
        if isinstance(self.xa, dict):
            object.__setattr__(self, "xa", XAConfig(**self.xa))
        n = self.lm.num_layers
        if self.xa.xa_layers is not None:
            bad = [i for i in self.xa.xa_layers if i >= n]
            _check(
                not bad,
                "MoshiVisConfig",
                "xa.xa_layers",
                f"layers {bad} do not exist: the LM has {n} temporal layers (0..{n - 1})",
            )
        heads = self.xa_heads
        _check(
            self.lm.dim % heads == 0,
            "MoshiVisConfig",
            "xa.num_heads",
            f"{heads} heads must divide the LM width {self.lm.dim}",
        )
        _check(
            self.lm.dim >= 8,
            "MoshiVisConfig",
            "lm.dim",
            f"the gate MLP needs dim >= 8 (hidden dim / 8), got {self.lm.dim}",
        )

    @property
    def layers(self) -> tuple[int, ...]:
        """Temporal layers with cross-attention, in order."""
        if self.xa.xa_layers is None:
            return tuple(range(self.lm.num_layers))
        return self.xa.xa_layers

    @property
    def xa_heads(self) -> int:
        """Cross-attention heads."""
        return self.xa.num_heads or self.lm.num_heads

    @property
    def gate_hidden(self) -> int:
        """Hidden width of the conditional gate MLP (dim / 8)."""
        return self.lm.dim // 8

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``MoshiVisConfig(**d)`` rebuilds it)."""
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, lm: LMConfig | None = None, image_dim: int = 192, **xa: Any) -> MoshiVisConfig:
        """Adapters for a tiny LM (``LMConfig.tiny()`` by default) and an ``image_dim`` encoder;
        ``xa`` overrides XAConfig fields (e.g. ``sharing="kv"``)."""
        lm = lm or LMConfig.tiny()
        return cls(lm=lm, xa=dataclasses.replace(XAConfig.tiny(lm, image_dim), **xa))

    @classmethod
    def moshika_vis(cls) -> MoshiVisConfig:
        """The released MoshiVis: Moshi 7B + the moshika-vis adapters (206,184,448 parameters),
        with kyuteye_pt's variance RMSNorm in the depformer (its ``rms_norm_f32``)."""
        lm = dataclasses.replace(LMConfig.moshi_7b(), depformer_norm="variance")
        return cls(lm=lm, xa=XAConfig.moshika_vis())
