"""Gates: when does MoshiVis look at the image, and what happens when we force it to (or not)?

Each cross-attention layer ``i`` adds ``g_i * y_i`` to the residual stream, with a gate ``g_i``
per step and channel. This module reads and changes those gates:

- **traces**: ``gate_trace`` / ``gate_traces`` give the gate per layer and model step (channel
  mean; per channel on request) of a dialogue or a batch, as ``GateTrace``; ``GateTrace.score``
  is the paper's reported value, the mean over the last 10 layers;
- **dialogues with a topic switch**: ``spoken_dialogue`` / ``text_dialogue`` build one world
  dialogue about an image with an unrelated chit-chat glued before or after, knowing every
  turn (speaker, topic, frames) and the per-step relevance (1 image talk, 0 unrelated);
- **segmentation**: ``segment_trace`` cuts a trace by turn, speaker, topic or relevance;
  ``segment_summary`` averages segments over many traces; ``switch_profile`` aligns gate
  scores on the topic switches;
- **image relevance**: ``relevance_auroc`` (the AUROC of ``train.vis_eval.gate_auroc``: the gate
  score as a detector of image talk, on glued validation samples) and ``auroc_per_layer``;
- **interventions**: ``GateIntervention`` (force ``g`` to a value, or scale it, in some or all
  layers) and ``compare_text_replies`` / ``compare_stream_replies`` / ``logit_shift``, which
  generate (or score) with and without each intervention and report what changed.

Model steps: the text row has no delay, so text position ``t`` of a grid is model step ``t``
(which reads token ``t - 1`` and predicts token ``t``); user and assistant audio rows are read
one or two steps later (their delays).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moshivis_lab.config import ZERO_TOKEN
from moshivis_lab.interp.cache import as_codes, run_with_cache
from moshivis_lab.interp.cache import check_moshivis as _check_moshivis

N_ROWS = 17


def _need_image(image_tokens: Any) -> None:
    if image_tokens is None:
        raise ValueError(
            "this analysis needs an image: pass image_tokens [B or 1, N, D] (encoder outputs), "
            "e.g. interp.cache.image_tokens_for(cfg, [image_id])"
        )


# ---------------------------------------------------------------------- dialogues


@dataclass(frozen=True)
class Turn:
    """One turn of a dialogue on the model-step axis: ``[start, end)``, who, about what."""

    start: int
    end: int
    speaker: str  # "user" | "assistant"
    topic: str  # "image" or a chit-chat topic ("weather", ...)
    text: str = ""
    refs: tuple[int, ...] = ()  # scene objects the turn is about

    @property
    def relevant(self) -> bool:
        """Whether the turn is about the image."""
        return self.topic == "image"


@dataclass
class Dialogue:
    """One dialogue as the model reads it: codes ``[17, T]``, relevance ``[T]``, its turns.

    ``relevance``: 1 where the talk is about the image, 0 on unrelated talk (as
    ``mix.turn_relevance``: a turn and the gap after it share its topic); ``switch``: the step
    where the glued chit-chat meets the image talk (None when nothing is glued).
    """

    codes: np.ndarray
    relevance: np.ndarray
    turns: list[Turn]
    image_id: str
    speech: bool
    switch: int | None = None

    @property
    def length(self) -> int:
        """Model steps."""
        return int(self.codes.shape[1])


def _shift(turns: list[Turn], offset: int) -> list[Turn]:
    return [
        Turn(t.start + offset, t.end + offset, t.speaker, t.topic, t.text, t.refs) for t in turns
    ]


def _spoken_turns(meta: dict[str, Any], n: int) -> list[Turn]:
    turns = meta.get("turns") or []
    out = []
    for k, t in enumerate(turns):
        start = int(t.get("start_frame", 0))
        end = int(turns[k + 1]["start_frame"]) if k + 1 < len(turns) else n
        out.append(
            Turn(
                start,
                end,
                str(t["speaker"]),
                str(t.get("topic", "")),
                str(t.get("text", "")),
                tuple(int(r) for r in t.get("refs", [])),
            )
        )
    return out


def spoken_dialogue(
    cfg: Any,
    split: str = "val",
    index: int = 0,
    *,
    chat: int | None = 0,
    chat_first: bool = True,
) -> Dialogue:
    """Spoken image dialogue number ``index`` of ``split`` (its speech shard), with spoken
    chit-chat number ``chat`` glued before (``chat_first``) or after (None: nothing glued)."""
    from moshivis_lab.train.mix import turn_relevance
    from moshivis_lab.world.shards import load_split

    speech = load_split(cfg, split)["speech"]
    images = [i for i, m in enumerate(speech.meta) if m.get("image_id")]
    chats = [i for i, m in enumerate(speech.meta) if not m.get("image_id")]
    if not images:
        raise ValueError(f"split {split!r} has no spoken image dialogues")
    if not 0 <= index < len(images):
        raise ValueError(f"index must be in [0, {len(images)}) (spoken image dialogues)")
    meta = speech.meta[images[index]]
    grid = np.asarray(speech.tokens(images[index]), np.int64)
    rel = turn_relevance(meta, grid.shape[1])
    turns = _spoken_turns(meta, grid.shape[1])
    switch = None
    if chat is not None:
        if not 0 <= chat < len(chats):
            raise ValueError(f"chat must be in [0, {len(chats)}) (spoken chit-chat dialogues)")
        cm = speech.meta[chats[chat]]
        other = np.asarray(speech.tokens(chats[chat]), np.int64)
        oturns = _spoken_turns(cm, other.shape[1])
        orel = np.zeros(other.shape[1], np.int64)
        if chat_first:
            switch = other.shape[1]
            grid, rel = np.concatenate([other, grid], 1), np.concatenate([orel, rel])
            turns = oturns + _shift(turns, switch)
        else:
            switch = grid.shape[1]
            grid, rel = np.concatenate([grid, other], 1), np.concatenate([rel, orel])
            turns = turns + _shift(oturns, switch)
    return Dialogue(grid, rel, turns, str(meta["image_id"]), True, switch)


def _role_turns(roles: np.ndarray, topic: str, ids: np.ndarray, tokenizer: Any) -> list[Turn]:
    out = []
    start = 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or roles[i] != roles[start]:
            text = tokenizer.decode([int(x) for x in ids[start:i]]) if tokenizer else ""
            who = "assistant" if roles[start] == 1 else "user"
            out.append(Turn(start, i, who, topic, text))
            start = i
    return out


def text_dialogue(
    cfg: Any,
    split: str = "val",
    index: int = 0,
    *,
    chat: int | None = 0,
    chat_first: bool = True,
    tokenizer: Any = None,
) -> Dialogue:
    """Speechless image dialogue number ``index`` of ``split`` (user and assistant tokens one
    after another in the text stream, audio rows the zero token), with the transcript of spoken
    chit-chat number ``chat`` glued before or after as text (None: nothing glued)."""
    from moshivis_lab.train.mix import dialogue_tokens, mark_turns
    from moshivis_lab.world.shards import load_split
    from moshivis_lab.world.tokenizer import TextTokenizer

    tok = tokenizer or TextTokenizer.load(cfg.tokenizer_path)
    shards = load_split(cfg, split)
    text, speech = shards["text"], shards["speech"]
    tasks = ("caption", "vqa", "ocr", "count")
    items = [i for i, m in enumerate(text.meta) if m.get("image_id") and m["task"] not in tasks]
    if not items:
        raise ValueError(f"split {split!r} has no speechless image dialogues")
    if not 0 <= index < len(items):
        raise ValueError(f"index must be in [0, {len(items)}) (speechless image dialogues)")
    arr = np.asarray(text.tokens(items[index]), np.int64)
    ids, roles = mark_turns(arr[0], arr[1])  # as the speechless samples of training
    turns = _role_turns(roles, "image", ids, tok)
    rel = np.ones(len(ids), np.int64)
    switch = None
    if chat is not None:
        chats = [i for i, m in enumerate(speech.meta) if not m.get("image_id")]
        if not 0 <= chat < len(chats):
            raise ValueError(f"chat must be in [0, {len(chats)}) (chit-chat dialogues)")
        cm = speech.meta[chats[chat]]
        c_ids, c_roles = dialogue_tokens(tok, cm.get("turns", []))
        cturns = _role_turns(c_roles, str(cm.get("topic", "chat")), c_ids, tok)
        crel = np.zeros(len(c_ids), np.int64)
        if chat_first:
            switch = len(c_ids)
            ids, rel = np.concatenate([c_ids, ids]), np.concatenate([crel, rel])
            turns = cturns + _shift(turns, switch)
        else:
            switch = len(ids)
            ids, rel = np.concatenate([ids, c_ids]), np.concatenate([rel, crel])
            turns = turns + _shift(cturns, switch)
    codes = np.full((N_ROWS, len(ids)), ZERO_TOKEN, np.int64)
    codes[0] = ids
    image_id = str(text.meta[items[index]]["image_id"])
    return Dialogue(codes, rel, turns, image_id, False, switch)


# ---------------------------------------------------------------------- traces


@dataclass
class GateTrace:
    """The gates of one sample: ``gates [layers, T]`` (channel mean per cross-attention layer
    and model step), ``layers`` (their temporal layer indices), optionally ``channels
    [layers, T, dim]``, the ground truth ``relevance [T]`` and ``turns``, and ``tokens`` (a
    label per step, e.g. the decoded text token)."""

    gates: np.ndarray
    layers: tuple[int, ...]
    channels: np.ndarray | None = None
    relevance: np.ndarray | None = None
    turns: list[Turn] = field(default_factory=list)
    tokens: list[str] | None = None

    def score(self, last: int = 10) -> np.ndarray:
        """The paper's gate value per step ``[T]``: mean over the last ``last`` layers."""
        if last < 1:
            raise ValueError(f"last must be >= 1, got {last}")
        return self.gates[-last:].mean(axis=0)

    @property
    def length(self) -> int:
        """Model steps."""
        return int(self.gates.shape[1])

    def layer(self, index: int) -> np.ndarray:
        """The trace ``[T]`` of temporal layer ``index``."""
        if index not in self.layers:
            raise ValueError(f"layer {index} has no cross-attention; layers are {self.layers}")
        return self.gates[self.layers.index(index)]


def _token_labels(tokenizer: Any, ids: np.ndarray) -> list[str]:
    from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID

    out = []
    for i in ids.tolist():
        if i == ZERO_TOKEN:
            out.append("·")
        elif i == TEXT_PAD_ID:
            out.append("PAD")
        elif i == TEXT_EPAD_ID:
            out.append("EPAD")
        else:
            out.append(tokenizer.decode([int(i)]) or f"<{i}>")
    return out


def gate_traces(
    model: Any,
    codes: Any,
    image_tokens: Any,
    *,
    channels: bool = False,
    relevance: Any = None,
    xa_start: int = 0,
    tokenizer: Any = None,
) -> list[GateTrace]:
    """Gate traces of a teacher-forced forward, one per sample of ``codes [B, K, T]``.

    ``image_tokens [B or 1, N, D]``: the image(s); ``channels``: keep the per-channel gates
    (``[layers, T, dim]``, from the ``hook_gate`` hooks); ``relevance [B, T]``: ground truth to
    attach; ``tokenizer``: label each step with its text token.
    """
    _check_moshivis(model)
    _need_image(image_tokens)
    c = as_codes(codes)
    names = [f"temporal.layers.{i}.cross_attention.hook_gate" for i in model.cfg.layers]
    out, cache = run_with_cache(
        model, c, names if channels else [], image_tokens=image_tokens, xa_start=xa_start
    )
    g = out.gates.float().cpu().numpy()
    rel = None if relevance is None else np.asarray(torch.as_tensor(relevance).cpu(), np.int64)
    if rel is not None and rel.ndim == 1:
        rel = rel[None]
    if rel is not None and rel.shape != g[:, 0].shape:
        raise ValueError(f"relevance must be [B, T] = {g[:, 0].shape}, got {rel.shape}")
    traces = []
    for b in range(g.shape[0]):
        ch = None
        if channels:
            ch = np.stack([cache[n][b].float().numpy() for n in names])
        labels = _token_labels(tokenizer, c[b, 0].cpu().numpy()) if tokenizer else None
        traces.append(
            GateTrace(g[b], tuple(out.xa_layers), ch, None if rel is None else rel[b], [], labels)
        )
    return traces


def gate_trace(
    model: Any,
    dialogue: Dialogue,
    image_tokens: Any,
    *,
    channels: bool = False,
    tokenizer: Any = None,
) -> GateTrace:
    """The gate trace of one ``Dialogue`` (relevance and turns attached)."""
    if not isinstance(dialogue, Dialogue):
        raise TypeError(f"expected a Dialogue, got {type(dialogue).__name__}")
    tr = gate_traces(
        model,
        dialogue.codes,
        image_tokens,
        channels=channels,
        relevance=dialogue.relevance,
        tokenizer=tokenizer,
    )[0]
    tr.turns = list(dialogue.turns)
    return tr


def batch_traces(model: Any, batch: Any, table: Any, *, channels: bool = False) -> list[GateTrace]:
    """Gate traces of a ``mix.Batch`` (images from its split's table ``[images, N, D]``), cut
    to each row's length (relevance -1 = padding). Speechless rows get their turns from
    ``text_weight`` (> 0: assistant tokens); spoken rows carry relevance only."""
    from moshivis_lab.train.mix import Batch

    if not isinstance(batch, Batch):
        raise TypeError(f"expected a train.mix.Batch, got {type(batch).__name__}")
    img = torch.as_tensor(table)[batch.image_index.cpu()]
    traces = gate_traces(model, batch.codes, img, channels=channels, relevance=batch.relevance)
    out = []
    for b, tr in enumerate(traces):
        assert tr.relevance is not None
        n = int((tr.relevance >= 0).sum())
        turns: list[Turn] = []
        if not bool(batch.is_speech[b]):
            w = (batch.text_weight[b, :n].cpu().numpy() > 0).astype(np.int64)
            rel = tr.relevance[:n]
            for t in _role_turns(w, "", np.zeros(n, np.int64), None):
                topic = "image" if rel[t.start : t.end].mean() >= 0.5 else "unrelated"
                turns.append(Turn(t.start, t.end, t.speaker, topic))
        ch = None if tr.channels is None else tr.channels[:, :n]
        out.append(GateTrace(tr.gates[:, :n], tr.layers, ch, tr.relevance[:n], turns))
    return out


# ---------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class Segment:
    """A run of steps ``[start, end)`` sharing a label, with gate statistics over it."""

    start: int
    end: int
    label: str
    mean: float
    max: float
    per_layer: tuple[float, ...]

    @property
    def length(self) -> int:
        """Steps."""
        return self.end - self.start


SEGMENT_KINDS = ("turn", "speaker", "topic", "relevance")


def _labels(trace: GateTrace, by: str) -> list[tuple[int, int, str]]:
    if by not in SEGMENT_KINDS:
        raise ValueError(f"by must be one of {SEGMENT_KINDS}, got {by!r}")
    if by == "relevance":
        if trace.relevance is None:
            raise ValueError("this trace has no relevance; build it from a Dialogue or a Batch")
        names = {1: "image", 0: "unrelated"}
        rel = trace.relevance
        out, start = [], 0
        for i in range(1, len(rel) + 1):
            if i == len(rel) or rel[i] != rel[start]:
                if rel[start] >= 0:
                    out.append((start, i, names[int(rel[start])]))
                start = i
        return out
    if not trace.turns:
        raise ValueError(f"this trace has no turns to segment by {by!r}; build it from a Dialogue")
    out = []
    for k, t in enumerate(trace.turns):
        label = {
            "turn": f"{k}:{t.speaker}:{t.topic}",
            "speaker": t.speaker,
            "topic": "image" if t.topic == "image" else "unrelated",
        }[by]
        out.append((max(0, t.start), min(trace.length, t.end), label))
    return [(a, b, lab) for a, b, lab in out if b > a]


def segment_trace(trace: GateTrace, by: str = "turn", last: int = 10) -> list[Segment]:
    """Cut a trace into segments by ``"turn"`` (each turn), ``"speaker"``, ``"topic"`` (image
    vs unrelated turns) or ``"relevance"`` (runs of the relevance row); each with the mean and
    max of ``score(last)`` and the mean per layer."""
    s = trace.score(last)
    return [
        Segment(
            a,
            b,
            lab,
            float(s[a:b].mean()),
            float(s[a:b].max()),
            tuple(float(v) for v in trace.gates[:, a:b].mean(axis=1)),
        )
        for a, b, lab in _labels(trace, by)
    ]


def segment_summary(
    traces: Sequence[GateTrace], by: str = "relevance", last: int = 10
) -> dict[str, dict[str, float]]:
    """Per label over many traces: steps, mean gate score (step-weighted) and its standard
    deviation over segments."""
    acc: dict[str, list[tuple[int, float]]] = {}
    for tr in traces:
        for seg in segment_trace(tr, by, last):
            key = seg.label.split(":", 1)[1] if by == "turn" else seg.label
            acc.setdefault(key, []).append((seg.length, seg.mean))
    out = {}
    for k, v in sorted(acc.items()):
        n = np.array([x[0] for x in v], np.float64)
        m = np.array([x[1] for x in v], np.float64)
        out[k] = {
            "segments": len(v),
            "steps": int(n.sum()),
            "mean": float((n * m).sum() / n.sum()),
            "std_over_segments": float(m.std()),
        }
    return out


@dataclass
class SwitchProfile:
    """Gate score aligned on topic switches: ``offsets`` (steps from the switch) and the mean
    score curve into image talk (unrelated -> image) and out of it (image -> unrelated)."""

    offsets: np.ndarray
    into_image: np.ndarray
    out_of_image: np.ndarray
    n_into: int
    n_out: int


def switch_profile(
    traces: Sequence[GateTrace], before: int = 20, after: int = 20, last: int = 10
) -> SwitchProfile:
    """Mean gate score around every change of relevance (NaN where no trace reaches)."""
    offsets = np.arange(-before, after)
    curves: dict[int, list[np.ndarray]] = {1: [], 0: []}
    for tr in traces:
        if tr.relevance is None:
            raise ValueError("switch_profile needs traces with relevance")
        s, rel = tr.score(last), tr.relevance
        for i in range(1, len(rel)):
            if rel[i] != rel[i - 1] and rel[i] >= 0 and rel[i - 1] >= 0:
                row = np.full(len(offsets), np.nan)
                idx = i + offsets
                ok = (idx >= 0) & (idx < len(s))
                row[ok] = s[idx[ok]]
                curves[int(rel[i])].append(row)

    def mean(rows: list[np.ndarray]) -> np.ndarray:
        if not rows:
            return np.full(len(offsets), np.nan)
        with np.errstate(all="ignore"), _quiet():
            return np.nanmean(np.stack(rows), axis=0)

    return SwitchProfile(offsets, mean(curves[1]), mean(curves[0]), len(curves[1]), len(curves[0]))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ---------------------------------------------------------------------- image relevance


@dataclass
class RelevanceAUROC:
    """The gate score as a detector of image talk (``train.vis_eval.gate_auroc``): ``auroc`` over
    all positions, ``views`` (``assistant_positions``, ``assistant_turns``, ``all_positions``
    pooled), speech / speechless samples apart (each with the same views), plus the AUROC of
    each layer alone (all positions) when computed."""

    auroc: float
    last_layers: int
    speech: dict[str, Any] | None
    speechless: dict[str, Any] | None
    per_layer: dict[int, float] = field(default_factory=dict)
    views: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "auroc": self.auroc,
            "last_layers": self.last_layers,
            "speech": self.speech,
            "speechless": self.speechless,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            **self.views,
        }


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def auroc_per_layer(traces: Sequence[GateTrace]) -> dict[int, float]:
    """AUROC of each layer's gate alone for image relevance, pooled over ``traces``."""
    if not traces:
        raise ValueError("no traces given")
    layers = traces[0].layers
    out = {}
    for k, i in enumerate(layers):
        s, lab = [], []
        for tr in traces:
            if tr.relevance is None:
                raise ValueError("auroc_per_layer needs traces with relevance")
            ok = tr.relevance >= 0
            s.append(tr.gates[k][ok])
            lab.append(tr.relevance[ok])
        out[i] = _auc(np.concatenate(lab), np.concatenate(s))
    return out


def relevance_auroc(
    model: Any,
    cfg: Any,
    *,
    split: str = "val",
    n_batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    p_audio: float = 0.5,
    per_layer: bool = True,
    encoder: Any = None,
    progress: bool = False,
) -> RelevanceAUROC:
    """``vis_eval.gate_auroc`` on ``split`` samples that all have chit-chat glued on (the
    evaluation's setting), plus the AUROC of each layer on the same batches."""
    from moshivis_lab.train.image_tokens import image_table
    from moshivis_lab.train.mix import MixConfig, MixedData, batch_for_step
    from moshivis_lab.train.vis_eval import gate_auroc
    from moshivis_lab.vision.pretrain import load_vision_encoder

    _check_moshivis(model)
    data = MixedData(cfg, split, MixConfig(p_audio=p_audio, p_concat=1.0))
    enc = encoder if encoder is not None else load_vision_encoder(cfg)
    table = image_table(cfg, data.image_ids, enc, split, progress)
    res = gate_auroc(model, data, table, n_batches, batch_size, seed)
    layers: dict[int, float] = {}
    if per_layer:
        traces = []
        for i in range(n_batches):
            b = batch_for_step(data, batch_size, seed, i)
            traces += batch_traces(model, b, table)
        layers = auroc_per_layer(traces)
    from moshivis_lab.train.vis_eval import GATE_VIEWS

    return RelevanceAUROC(
        float(res["auroc"]),
        int(res["last_layers"]),
        res.get("speech"),
        res.get("speechless"),
        layers,
        {v: res[v] for v in GATE_VIEWS if res.get(v)},
    )


# ---------------------------------------------------------------------- interventions


@dataclass(frozen=True)
class GateIntervention:
    """Force the gates: ``value`` sets ``g`` (0 = the base model, 1 = fully open) or ``scale``
    multiplies it, in ``layers`` (temporal indices; None = every cross-attention layer)."""

    value: float | None = None
    scale: float | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ValueError("give exactly one of value= (force g) or scale= (multiply g)")
        if self.layers is not None:
            lay = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", tuple(int(i) for i in lay))

    @property
    def name(self) -> str:
        """A short label such as ``g=0`` or ``g*2 @4,5``."""
        head = f"g={self.value:g}" if self.value is not None else f"g*{self.scale:g}"
        return head if self.layers is None else f"{head} @{','.join(map(str, self.layers))}"

    def apply(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """The intervention as a ``with`` block (``MoshiVis.gate_override``)."""
        _check_moshivis(model)
        return model.gate_override(self.value, scale=self.scale, layers=self.layers)


def force_gates(
    model: Any,
    value: float | None = None,
    *,
    scale: float | None = None,
    layers: int | Sequence[int] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """``with force_gates(model, 0.0): ...`` runs the base model; ``scale=2`` doubles every gate;
    ``layers=[4, 5]`` only there."""
    lay = None if layers is None else ((layers,) if isinstance(layers, int) else tuple(layers))
    return GateIntervention(value, scale, lay).apply(model)


DEFAULT_INTERVENTIONS = (
    GateIntervention(value=0.0),
    GateIntervention(scale=0.5),
    GateIntervention(scale=2.0),
    GateIntervention(value=1.0),
)


@dataclass
class ConditionEffect:
    """What one intervention changed, per prompt / stream.

    ``replies``: the generated text; ``changed``: whether it differs from the unchanged model's;
    ``text_changed``: share of text tokens that differ (1 - difflib ratio of token sequences);
    ``diffs``: word-level edits ``(op, before, after)``; for streams also ``audio_changed`` (share
    of generated audio codes that differ) and the raw ``text_tokens [B, H]`` / ``audio_codes
    [B, dep_q, H]``.
    """

    replies: list[str]
    changed: list[bool]
    text_changed: list[float]
    diffs: list[list[tuple[str, str, str]]]
    audio_changed: list[float] | None = None
    text_tokens: np.ndarray | None = None
    audio_codes: np.ndarray | None = None


@dataclass
class InterventionResult:
    """Generation with and without gate interventions: ``base`` is the unchanged model,
    ``conditions`` maps each ``GateIntervention.name`` to its ``ConditionEffect``."""

    prompts: list[str]
    base: ConditionEffect
    conditions: dict[str, ConditionEffect]
    mode: str  # "text" | "stream"

    def summary(self) -> dict[str, dict[str, float]]:
        """Per condition: share of prompts whose reply changed, mean share of tokens changed
        (and of audio codes for streams)."""
        out = {}
        for k, c in self.conditions.items():
            row = {
                "replies_changed": float(np.mean(c.changed)) if c.changed else float("nan"),
                "text_tokens_changed": float(np.mean(c.text_changed)) if c.text_changed else 0.0,
            }
            if c.audio_changed is not None:
                row["audio_codes_changed"] = float(np.mean(c.audio_changed))
            out[k] = row
        return out


def _word_diff(a: str, b: str) -> list[tuple[str, str, str]]:
    wa, wb = a.split(), b.split()
    sm = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False)
    return [
        (op, " ".join(wa[i1:i2]), " ".join(wb[j1:j2]))
        for op, i1, i2, j1, j2 in sm.get_opcodes()
        if op != "equal"
    ]


def _token_change(a: Sequence[Any], b: Sequence[Any]) -> float:
    if not a and not b:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False).ratio()


def _interventions(interventions: Sequence[GateIntervention] | None) -> list[GateIntervention]:
    items = list(DEFAULT_INTERVENTIONS if interventions is None else interventions)
    if not items:
        raise ValueError("give at least one GateIntervention")
    for it in items:
        if not isinstance(it, GateIntervention):
            raise TypeError(f"interventions must be GateIntervention, got {type(it).__name__}")
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ValueError(f"interventions repeat: {names}")
    return items


def compare_text_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    image_tokens: Any,
    interventions: Sequence[GateIntervention] | None = None,
    *,
    max_new_tokens: int = 10,
    progress: bool = False,
) -> InterventionResult:
    """Greedy text-prompt replies (``vis_eval.text_replies``) of the unchanged model and under
    each intervention (default: ``DEFAULT_INTERVENTIONS``). ``image_tokens [len(prompts), N, D]``."""
    from tqdm.auto import tqdm

    from moshivis_lab.train.vis_eval import text_replies

    _check_moshivis(model)
    _need_image(image_tokens)
    prompts = list(prompts)
    img = torch.as_tensor(image_tokens)
    if img.dim() != 3 or img.shape[0] != len(prompts):
        raise ValueError(
            f"image_tokens must be [len(prompts)={len(prompts)}, N, D], got {tuple(img.shape)}"
        )
    items = _interventions(interventions)
    model.eval()
    base = text_replies(model, tokenizer, prompts, img, max_new_tokens=max_new_tokens)
    base_tok = [tokenizer.encode(r) if r else [] for r in base]
    base_eff = ConditionEffect(base, [False] * len(base), [0.0] * len(base), [[] for _ in base])
    conds = {}
    for it in tqdm(items, disable=not progress, desc="interventions"):
        with it.apply(model):
            rep = text_replies(model, tokenizer, prompts, img, max_new_tokens=max_new_tokens)
        tok = [tokenizer.encode(r) if r else [] for r in rep]
        conds[it.name] = ConditionEffect(
            rep,
            [a != b for a, b in zip(base, rep, strict=True)],
            [_token_change(a, b) for a, b in zip(base_tok, tok, strict=True)],
            [_word_diff(a, b) for a, b in zip(base, rep, strict=True)],
        )
    return InterventionResult(prompts, base_eff, conds, "text")


def compare_stream_replies(
    model: Any,
    user: Any,
    image_tokens: Any,
    interventions: Sequence[GateIntervention] | None = None,
    *,
    tokenizer: Any = None,
    from_frames: Sequence[int] | None = None,
    seed: int = 0,
    temperature: float = 0.8,
    prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> InterventionResult:
    """Full-duplex streaming (``vis_eval.stream_replies``) over user codes ``[B, K, H]``
    (e.g. from ``vis_eval.spoken_prompts``) with and without each intervention, same seed.

    Compares Moshi's text tokens and audio codes from ``from_frames[b]`` (e.g. where each
    question ends; default 0) on; ``tokenizer`` decodes the replies.
    """
    from tqdm.auto import tqdm

    from moshivis_lab.train.vis_eval import _decode, stream_replies

    _check_moshivis(model)
    _need_image(image_tokens)
    u = np.asarray(user, np.int64)
    if u.ndim != 3:
        raise ValueError(f"user codes must be [B, K, H], got shape {u.shape}")
    img = torch.as_tensor(image_tokens).to(model.device)
    starts = list(from_frames) if from_frames is not None else [0] * u.shape[0]
    if len(starts) != u.shape[0]:
        raise ValueError(f"{len(starts)} from_frames for {u.shape[0]} streams")
    items = _interventions(interventions)
    with torch.no_grad():
        kv = model.encode_image(img)

    def run() -> ConditionEffect:
        text, audio = stream_replies(model, u, kv, seed=seed, temperature=temperature)
        replies = [
            _decode(tokenizer, [int(x) for x in text[b, starts[b] :]]) if tokenizer else ""
            for b in range(len(starts))
        ]
        return ConditionEffect(replies, [], [], [], None, text, audio)

    base = run()
    base.changed = [False] * len(starts)
    base.text_changed = [0.0] * len(starts)
    base.audio_changed = [0.0] * len(starts)
    base.diffs = [[] for _ in starts]
    conds = {}
    for it in tqdm(items, disable=not progress, desc="interventions"):
        with it.apply(model):
            eff = run()
        assert eff.text_tokens is not None and eff.audio_codes is not None
        assert base.text_tokens is not None and base.audio_codes is not None
        for b, s in enumerate(starts):
            bt, et = base.text_tokens[b, s:], eff.text_tokens[b, s:]
            ba, ea = base.audio_codes[b, :, s:], eff.audio_codes[b, :, s:]
            eff.changed.append(bool((bt != et).any() or (ba != ea).any()))
            eff.text_changed.append(float((bt != et).mean()) if bt.size else 0.0)
            eff.diffs.append(_word_diff(base.replies[b], eff.replies[b]))
        eff.audio_changed = [
            float((base.audio_codes[b, :, s:] != eff.audio_codes[b, :, s:]).mean())
            if base.audio_codes[b, :, s:].size
            else 0.0
            for b, s in enumerate(starts)
        ]
        conds[it.name] = eff
    names = list(prompts) if prompts is not None else [f"stream {b}" for b in range(len(starts))]
    return InterventionResult(names, base, conds, "stream")


@dataclass
class LogitShift:
    """Teacher-forced effect of each intervention on the next-text-token distribution:
    ``kl[name] [B, T]`` (KL(unchanged || intervened), nats; NaN where masked) and
    ``argmax_changed[name] [B, T]``."""

    kl: dict[str, np.ndarray]
    argmax_changed: dict[str, np.ndarray]

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean KL and share of changed argmax per condition."""
        with _quiet():
            return {
                k: {
                    "mean_kl": float(np.nanmean(v)),
                    "argmax_changed": float(np.nanmean(self.argmax_changed[k])),
                }
                for k, v in self.kl.items()
            }


@torch.no_grad()
def logit_shift(
    model: Any,
    codes: Any,
    image_tokens: Any,
    interventions: Sequence[GateIntervention] | None = None,
) -> LogitShift:
    """How far each intervention moves the text predictions of a teacher-forced forward."""
    _check_moshivis(model)
    _need_image(image_tokens)
    c = as_codes(codes, model.device)
    img = torch.as_tensor(image_tokens).to(model.device)
    items = _interventions(interventions)

    def logp() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(c, image_tokens=img)
        return out.text_logits[:, 0].float().log_softmax(-1), out.text_mask[:, 0]

    base, mask = logp()
    kl, arg = {}, {}
    for it in items:
        with it.apply(model):
            lp, _ = logp()
        d = (base.exp() * (base - lp)).sum(-1)
        ch = (base.argmax(-1) != lp.argmax(-1)).float()
        kl[it.name] = torch.where(mask, d, torch.nan).cpu().numpy()
        arg[it.name] = torch.where(mask, ch, torch.nan).cpu().numpy()
    return LogitShift(kl, arg)
