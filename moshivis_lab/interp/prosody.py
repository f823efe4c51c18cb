"""Did the voice survive? Prosody of the assistant's speech before and after adaptation.

For a few held-out images and spoken questions (the TTS in a held-out user voice), the streaming
model answers under several **conditions**:

- ``before``: the trained model with every gate forced to 0, which is the base speech LM bit for
  bit (``MoshiVis.gate_override(0.0)``),
- ``after``: the trained adapters (run ``main``) looking at the image,
- ``p_audio=...``: each run of the p_audio sweep (``train.ablate``) that exists on disk
  (``adapters/ablate_paudio_*``), looking at the image.

Each reply (what the assistant said once the question was heard) is compared with the **TTS
reference of the same words** (the transcript spoken by the assistant voice the speech LM learned
from) and, as a ceiling, that reference is also passed through the codec and back
(``codec round trip``: no generator can sound closer to the reference than its own codec lets
it). For each pair and each F0 tracker (pYIN and CREPE, ``audio.prosody``): the F0 contour, its
distribution, the energy, speaking rate and pauses; per comparison one number each for the F0
level (``f0_median_ratio``, generated / reference) and the F0 shape (``contour_correlation``, in
semitones along a DTW path). ``prosody_report`` writes the lot to
``data/<preset>/interp/prosody.json``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moshivis_lab.audio.prosody import Prosody, compare_prosody, prosody_features

METHODS = ("pyin", "crepe")
REFERENCE = "tts"
CODEC_CONTROL = "codec round trip"


# ---------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    """One way of generating the replies: a trained run, with the image or not, gates forced."""

    name: str
    run: str = "main"
    image: bool = True
    gate_value: float | None = None  # 0.0 = the base speech LM
    p_audio: float | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def p_audio_runs(cfg: Any) -> dict[float, str]:
    """The p_audio sweep runs on disk with trained adapters: ``{p_audio: run name}``.

    ``train.ablate`` names them ``ablate_paudio_p_audio_<p>``; ``p_audio`` is read from each
    run's ``train_report.json`` (the name is only a fallback).
    """
    from moshivis_lab.artefacts import read_json
    from moshivis_lab.train.adapters import adapters_dir

    root = adapters_dir(cfg, "main").parent
    out: dict[float, str] = {}
    if not root.is_dir():
        return out
    for d in sorted(root.glob("ablate_paudio_*")):
        done = (d / "adapters.safetensors").exists() or (d / "state.json").exists()
        if not done:
            continue
        p: float | None = None
        report = d / "train_report.json"
        if report.exists():
            try:
                p = float(read_json(report)["config"]["mix"]["p_audio"])
            except (KeyError, TypeError, ValueError):
                p = None
        if p is None:
            tail = d.name.rsplit("p_audio_", 1)[-1].replace("_", ".")
            try:
                p = float(tail)
            except ValueError:
                continue
        out[p] = d.name
    return dict(sorted(out.items()))


def default_conditions(cfg: Any, run: str = "main", sweep: bool = True) -> list[Condition]:
    """``before`` and ``after`` of run ``run``, then each p_audio sweep run found (``sweep``)."""
    conds = [
        Condition(
            "before", run, True, 0.0, None, "all gates forced to 0: the base speech LM exactly"
        ),
        Condition("after", run, True, None, None, f"trained adapters ({run}) seeing the image"),
    ]
    if sweep:
        for p, name in p_audio_runs(cfg).items():
            conds.append(
                Condition(f"p_audio={p:g}", name, True, None, p, f"p_audio sweep run {name}")
            )
    return conds


# ---------------------------------------------------------------------- renditions


@dataclass
class Rendition:
    """One spoken reply (or its reference) with its prosody per F0 tracker."""

    condition: str  # a Condition name, or the condition whose words a reference speaks
    item: int
    kind: str  # "generated", "tts" (the reference) or "codec round trip"
    text: str
    wav: np.ndarray  # mono float32
    sample_rate: int
    words: list[tuple[str, float, float]]  # (word, start_s, end_s) inside ``wav``
    prosody: dict[str, Prosody] = field(default_factory=dict)
    label: str | None = None  # overrides ``name``

    @property
    def name(self) -> str:
        """A short label, e.g. ``after #2`` or ``after #2 · tts`` (or ``label`` when set)."""
        if self.label:
            return self.label
        base = f"{self.condition} #{self.item}"
        return base if self.kind == "generated" else f"{base} · {self.kind}"

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.wav.size / self.sample_rate


def analyse(
    wav: np.ndarray,
    sample_rate: int,
    words: Sequence[Any] | None,
    methods: Sequence[str] = METHODS,
) -> dict[str, Prosody]:
    """``prosody_features`` of one utterance for each F0 tracker in ``methods``."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown F0 method {m!r}; choose from {METHODS}")
    return {m: prosody_features(wav, sample_rate, f0_method=m, words=words) for m in methods}  # type: ignore[arg-type]


def reply_rendition(
    conv: Any,
    condition: str,
    item: int,
    methods: Sequence[str] = METHODS,
    *,
    before_s: float = 0.2,
    after_s: float = 0.6,
) -> Rendition | None:
    """The reply of a recorded ``interp.conversation.Conversation``: its words from the step that
    had heard the whole question on, and the assistant's audio from ``before_s`` before the first
    word to ``after_s`` after the last one (a word's end in the text stream is the frame after its
    last piece, earlier than its sound), or None when the assistant said nothing then."""
    words = conv.reply_words
    if not words:
        return None
    sr = int(conv.sample_rate)
    reply_start = conv.prompt_end_step / conv.frame_rate
    t0 = max(reply_start, words[0][1] - before_s)
    t1 = min(conv.duration, words[-1][2] + after_s)
    wav = np.asarray(conv.assistant_wav[int(round(t0 * sr)) : int(round(t1 * sr))], np.float32)
    shifted = [(w, s - t0, e - t0) for w, s, e in words]
    text = " ".join(w for w, _, _ in words)
    return Rendition(
        condition, item, "generated", text, wav, sr, shifted, analyse(wav, sr, shifted, methods)
    )


def tts_rendition(
    text: str,
    condition: str,
    item: int,
    sample_rate: int,
    methods: Sequence[str] = METHODS,
    voice: Any = None,
) -> Rendition:
    """``text`` spoken by the assistant voice (the voice the speech LM learned)."""
    from moshivis_lab.world.speech import ASSISTANT_VOICE, synthesize

    u = synthesize(text, voice or ASSISTANT_VOICE, sample_rate)
    words = [(w.text, w.start, w.end) for w in u.words]
    wav = u.wav.astype(np.float32)
    return Rendition(
        condition,
        item,
        REFERENCE,
        text,
        wav,
        sample_rate,
        words,
        analyse(wav, sample_rate, words, methods),
    )


def audio_rendition(
    name: str,
    wav: np.ndarray,
    sample_rate: int,
    words: Sequence[Any] | None = None,
    methods: Sequence[str] = METHODS,
    text: str = "",
) -> Rendition:
    """Any recording as a ``Rendition`` (mono or multi-channel, any rate; analysed at once).

    ``words``: ``(word, start_s, end_s)`` tuples (or ``Word`` objects) for a words/s rate.
    """
    from moshivis_lab.audio.io import to_mono_float

    x = to_mono_float(wav, name=name)
    ws = None
    if words is not None:
        ws = [
            (w.text, float(w.start), float(w.end)) if hasattr(w, "start") else tuple(w)
            for w in words
        ]
    return Rendition(
        name,
        0,
        "audio",
        text,
        x,
        int(sample_rate),
        ws or [],
        analyse(x, sample_rate, ws, methods),
        name,
    )


def codec_rendition(ref: Rendition, codec: Any, methods: Sequence[str] = METHODS) -> Rendition:
    """``ref`` through the codec and back (``codec.encode`` then ``decode``, same rate)."""
    from moshivis_lab.audio.io import resample

    sr = int(codec.sample_rate)
    x = resample(ref.wav, ref.sample_rate, sr)
    y = np.asarray(codec.decode(codec.encode(x)), dtype=np.float32)[: x.size]
    words = list(ref.words)
    return Rendition(
        ref.condition,
        ref.item,
        CODEC_CONTROL,
        ref.text,
        y,
        sr,
        words,
        analyse(y, sr, words, methods),
    )


# ---------------------------------------------------------------------- comparisons


@dataclass
class ProsodyComparison:
    """How one rendition's prosody differs from its reference's, for one F0 tracker."""

    condition: str
    item: int
    kind: str  # the compared rendition's kind ("generated" or "codec round trip")
    method: str
    metrics: dict[str, float | str]  # ``audio.prosody.compare_prosody`` (reference -> rendition)
    summary: dict[str, float]  # the rendition's prosody summary
    reference_summary: dict[str, float]

    @property
    def f0_median_ratio(self) -> float:
        """Median F0 of the rendition / of the reference (1 = same pitch level)."""
        return float(self.metrics["f0_median_ratio"])

    @property
    def contour_correlation(self) -> float:
        """Pearson correlation of the two F0 contours in semitones (DTW-aligned)."""
        return float(self.metrics["f0_correlation"])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def compare(reference: Rendition, other: Rendition, method: str) -> ProsodyComparison:
    """``compare_prosody`` of two renditions for ``method`` (the reference first)."""
    if method not in reference.prosody or method not in other.prosody:
        raise ValueError(f"both renditions need their {method!r} prosody (see analyse)")
    a, b = reference.prosody[method], other.prosody[method]
    return ProsodyComparison(
        other.condition,
        other.item,
        other.kind,
        method,
        compare_prosody(a, b),
        dict(b.summary),
        dict(a.summary),
    )


def voiced_f0(renditions: Sequence[Rendition], method: str) -> np.ndarray:
    """Every voiced F0 value (Hz) of ``renditions`` for ``method``, pooled."""
    parts = [
        r.prosody[method].f0[r.prosody[method].voiced] for r in renditions if method in r.prosody
    ]
    parts = [p[np.isfinite(p)] for p in parts]
    return np.concatenate(parts) if parts else np.zeros(0)


def _nanmedian(xs: Sequence[float]) -> float:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def _nanmean(xs: Sequence[float]) -> float:
    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _ratio(num: float, den: float) -> float:
    return (
        float(num / den) if math.isfinite(num) and math.isfinite(den) and den > 0 else float("nan")
    )


def summarize(
    comparisons: Sequence[ProsodyComparison],
    renditions: Sequence[Rendition],
    before: str | None = "before",
) -> dict[str, dict[str, dict[str, float]]]:
    """Per condition (then the codec control) and F0 tracker: the one-number summaries.

    ``f0_median_ratio`` / ``contour_correlation`` / ``f0_rmse_semitones`` /
    ``energy_correlation`` / ``speaking_rate_ratio`` are medians over replies of the
    per-reply comparison with the TTS reference; ``f0_median_hz`` and ``ref_f0_median_hz`` are
    medians of the pooled voiced frames, ``f0_vs_before`` the pooled median over that of the
    ``before`` condition; rates (words/s) and pauses (count and seconds per reply) are means.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    keys = []
    for c in comparisons:
        key = c.condition if c.kind == "generated" else c.kind
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: k == CODEC_CONTROL)  # the ceiling last
    by_key: dict[str, list[Rendition]] = {}
    refs: dict[str, list[Rendition]] = {}
    for r in renditions:
        if r.kind == "generated":
            by_key.setdefault(r.condition, []).append(r)
        elif r.kind == CODEC_CONTROL:
            by_key.setdefault(CODEC_CONTROL, []).append(r)
    for r in renditions:
        if r.kind == REFERENCE:
            refs.setdefault(r.condition, []).append(r)
            if any(
                x.condition == r.condition and x.item == r.item
                for x in by_key.get(CODEC_CONTROL, [])
            ):
                refs.setdefault(CODEC_CONTROL, []).append(r)
    methods = sorted(
        {c.method for c in comparisons}, key=lambda m: METHODS.index(m) if m in METHODS else 99
    )
    for key in keys:
        out[key] = {}
        for m in methods:
            cs = [
                c
                for c in comparisons
                if c.method == m and (c.condition if c.kind == "generated" else c.kind) == key
            ]
            if not cs:
                continue
            gen_f0 = voiced_f0(by_key.get(key, []), m)
            ref_f0 = voiced_f0(refs.get(key, []), m)
            row = {
                "n": float(len(cs)),
                "f0_median_ratio": _nanmedian([c.f0_median_ratio for c in cs]),
                "contour_correlation": _nanmedian([c.contour_correlation for c in cs]),
                "f0_rmse_semitones": _nanmedian(
                    [float(c.metrics["f0_rmse_semitones"]) for c in cs]
                ),
                "energy_correlation": _nanmedian(
                    [float(c.metrics["energy_correlation"]) for c in cs]
                ),
                "voicing_agreement": _nanmedian(
                    [float(c.metrics["voicing_agreement"]) for c in cs]
                ),
                "f0_median_hz": float(np.median(gen_f0)) if gen_f0.size else float("nan"),
                "ref_f0_median_hz": float(np.median(ref_f0)) if ref_f0.size else float("nan"),
                "f0_std_semitones": _nanmean([c.summary["f0_std"] for c in cs]),
                "ref_f0_std_semitones": _nanmean([c.reference_summary["f0_std"] for c in cs]),
                "speaking_rate": _nanmean([c.summary["speaking_rate"] for c in cs]),
                "ref_speaking_rate": _nanmean([c.reference_summary["speaking_rate"] for c in cs]),
                "speaking_rate_ratio": _nanmedian(
                    [float(c.metrics["speaking_rate_ratio"]) for c in cs]
                ),
                "syllable_rate": _nanmean([c.summary["syllable_rate"] for c in cs]),
                "ref_syllable_rate": _nanmean([c.reference_summary["syllable_rate"] for c in cs]),
                "pause_count": _nanmean([c.summary["pause_count"] for c in cs]),
                "ref_pause_count": _nanmean([c.reference_summary["pause_count"] for c in cs]),
                "pause_total_s": _nanmean([c.summary["pause_total_s"] for c in cs]),
                "ref_pause_total_s": _nanmean([c.reference_summary["pause_total_s"] for c in cs]),
                "voiced_fraction": _nanmean([c.summary["voiced_fraction"] for c in cs]),
            }
            out[key][m] = row
    if before is not None and before in out:
        for per in out.values():
            for m, row in per.items():
                base = out[before].get(m, {}).get("f0_median_hz", float("nan"))
                row["f0_vs_before"] = _ratio(row["f0_median_hz"], base)
    return out


# ---------------------------------------------------------------------- the report


@dataclass
class ProsodyReport:
    """``prosody_report``'s result: what was asked, what was said, and how it sounded."""

    preset: str
    conditions: list[Condition]
    methods: tuple[str, ...]
    items: list[dict[str, Any]]  # image_id, question, and per condition the reply text
    comparisons: list[ProsodyComparison]
    summary: dict[str, dict[str, dict[str, float]]]
    renditions: list[Rendition] = field(default_factory=list, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    path: Path | None = None

    def rendition(self, condition: str, item: int, kind: str = "generated") -> Rendition:
        """One rendition by condition, item index and kind (``generated``, ``tts``,
        ``codec round trip``)."""
        for r in self.renditions:
            if r.condition == condition and r.item == item and r.kind == kind:
                return r
        have = sorted({(r.condition, r.item, r.kind) for r in self.renditions})
        raise KeyError(f"no {kind} rendition of {condition!r} item {item}; have {have[:12]}")

    def rows(self, method: str = "pyin") -> list[dict[str, Any]]:
        """The summary of ``method`` as table rows (one per condition, the codec control last)."""
        return [{"condition": k, **v[method]} for k, v in self.summary.items() if method in v]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (NaN become None)."""
        from moshivis_lab.train.speech_eval import _finite

        return _finite(
            {
                "preset": self.preset,
                "methods": list(self.methods),
                "conditions": [c.to_json() for c in self.conditions],
                "settings": self.settings,
                "summary": self.summary,
                "items": self.items,
                "comparisons": [c.to_json() for c in self.comparisons],
                "seconds": round(self.seconds, 2),
                "notes": (
                    "f0_median_ratio: median F0 of the generated reply / of the TTS reference of "
                    "the same words (1 = same pitch level); contour_correlation: Pearson "
                    "correlation of the F0 contours in semitones along a DTW path; "
                    f"'{CODEC_CONTROL}': the reference through the codec and back (the ceiling); "
                    "rates in words/s; pauses are silences > 0.15 s inside the reply."
                ),
            }
        )

    def write(self, path: str | Path) -> Path:
        """Write ``to_json`` to ``path``."""
        from moshivis_lab.artefacts import write_json

        self.path = write_json(Path(path), self.to_json())
        return self.path


def prosody_path(cfg: Any) -> Path:
    """``data/<preset>/interp/prosody.json``."""
    return cfg.data_dir / cfg.name / "interp" / "prosody.json"


def prosody_items(cfg: Any, n_items: int = 8, split: str = "test") -> list[dict[str, Any]]:
    """``n_items`` held-out questions with their image: one per question type in turn."""
    from moshivis_lab.train.vis_eval import task_items

    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    per_type = 1
    while True:
        items = task_items(cfg, split, per_type)
        if len(items) >= n_items or per_type > n_items:
            break
        per_type += 1
    if not items:
        raise FileNotFoundError(f"no {split} task items; build the world with `moshivis-lab data`")
    types = list(dict.fromkeys(it["type"] for it in items))
    by_type = {t: [it for it in items if it["type"] == t] for t in types}
    picked: list[dict[str, Any]] = []
    k = 0
    while len(picked) < min(n_items, len(items)):
        for t in types:
            if k < len(by_type[t]) and len(picked) < n_items:
                picked.append(by_type[t][k])
        k += 1
    return [
        {"image_id": it["image_id"], "type": it["type"], "question": it["question"]}
        for it in picked
    ]


def prosody_report(
    cfg: Any,
    *,
    run: str = "main",
    conditions: Sequence[Condition] | None = None,
    sweep: bool = True,
    n_items: int = 8,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    extra_seconds: float = 4.0,
    codec_control: bool = True,
    out_path: str | Path | None = None,
    write: bool = True,
    log: Callable[[str], Any] | None = None,
    models: dict[str, Any] | None = None,
    codec: Any = None,
    tokenizer: Any = None,
    encoder: Any = None,
) -> ProsodyReport:
    """Generate, analyse and compare (see the module docstring); write ``prosody.json``.

    ``conditions``: default ``default_conditions(cfg, run, sweep)``. The same spoken questions
    (TTS, the last held-out user voice, spoken once) go to every condition; the replies are
    sampled with the same ``seed`` (audio temperature 0.8, greedy text, as the evaluation).
    ``models``: ready ``MoshiVis`` models by run name (e.g. the released weights from
    ``model.load_moshivis``), used instead of ``load_trained(cfg, run)``; ``codec`` /
    ``tokenizer`` / ``encoder``: the parts to use instead of the lab config's.
    """
    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.interp.conversation import ConversationEngine, heldout_voice, prompt_audio
    from moshivis_lab.train.adapters import load_trained
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    t0 = time.time()
    say = log or (lambda _msg: None)
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown F0 method {m!r}; choose from {METHODS}")
    if not methods:
        raise ValueError("give at least one F0 method")
    conds = list(conditions) if conditions is not None else default_conditions(cfg, run, sweep)
    if not conds:
        raise ValueError("no conditions to compare")
    names = [c.name for c in conds]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")

    codec = codec if codec is not None else load_codec(cfg)
    tok = tokenizer if tokenizer is not None else TextTokenizer.load(cfg.tokenizer_path)
    encoder = encoder if encoder is not None else load_vision_encoder(cfg)
    given = dict(models or {})
    sr = int(codec.sample_rate)
    voice = heldout_voice(cfg)
    items = prosody_items(cfg, n_items)
    prompts = [prompt_audio(it["question"], sr, voice=voice)[0] for it in items]

    renditions: list[Rendition] = []
    comparisons: list[ProsodyComparison] = []
    models: dict[str, Any] = {}
    control_of = "after" if "after" in names else names[0]
    for cond in conds:
        if cond.run in given:
            models = {cond.run: given[cond.run]}
        elif cond.run not in models:
            models = {cond.run: load_trained(cfg, cond.run)}  # one model in memory at a time
        engine = ConversationEngine(
            models[cond.run], codec, tok, encoder, cfg=cfg, user_voice=voice
        )
        said = 0
        for i, (it, wav) in enumerate(zip(items, prompts, strict=True)):
            intervention = None if cond.gate_value is None else {"value": cond.gate_value}
            conv = engine.run(
                it["image_id"] if cond.image else None,
                wav,
                prompt_rate=sr,
                intervention=intervention,
                seed=seed,
                extra_seconds=extra_seconds,
                record_attention=False,
            )
            it.setdefault("replies", {})[cond.name] = conv.reply_text
            gen = reply_rendition(conv, cond.name, i, methods)
            if gen is None:
                continue
            said += 1
            ref = tts_rendition(gen.text, cond.name, i, sr, methods)
            renditions += [gen, ref]
            comparisons += [compare(ref, gen, m) for m in methods]
            if codec_control and cond.name == control_of:
                ctl = codec_rendition(ref, codec, methods)
                renditions.append(ctl)
                comparisons += [compare(ref, ctl, m) for m in methods]
        say(f"{cond.name}: {said}/{len(items)} replies analysed ({time.time() - t0:.0f} s)")
    summary = summarize(comparisons, renditions, "before" if "before" in names else None)
    report = ProsodyReport(
        preset=cfg.name,
        conditions=conds,
        methods=methods,
        items=items,
        comparisons=comparisons,
        summary=summary,
        renditions=renditions,
        settings={
            "seed": seed,
            "extra_seconds": extra_seconds,
            "n_items": len(items),
            "user_voice": getattr(voice, "name", str(voice)),
            "reference": "TTS of the reply's words in the assistant voice",
        },
    )
    report.seconds = time.time() - t0
    if write:
        report.write(out_path if out_path is not None else prosody_path(cfg))
    return report


def load_prosody_report(cfg: Any, path: str | Path | None = None) -> dict[str, Any]:
    """The JSON written by ``prosody_report`` (no audio)."""
    from moshivis_lab.artefacts import read_json

    return read_json(Path(path) if path is not None else prosody_path(cfg))


__all__ = [
    "CODEC_CONTROL",
    "METHODS",
    "REFERENCE",
    "Condition",
    "ProsodyComparison",
    "ProsodyReport",
    "Rendition",
    "analyse",
    "audio_rendition",
    "codec_rendition",
    "compare",
    "default_conditions",
    "load_prosody_report",
    "p_audio_runs",
    "prosody_items",
    "prosody_path",
    "prosody_report",
    "reply_rendition",
    "summarize",
    "tts_rendition",
    "voiced_f0",
]
