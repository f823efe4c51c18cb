"""Attributions with captum's Integrated Gradients: which pixels, image tokens and user audio
frames make MoshiVis say an answer token?

The target is the logit of one chosen text token at one model step (``target_of``: the first
answer token of a question asked in the text stream, as in the pointing game). Three inputs:

- ``"pixels"``: the encoder's ``pixel_values [3, S, S]`` (through the frozen SigLIP tower, the
  image prefix and the adapters); baseline a grey image (0 after normalisation) or black;
- ``"image_tokens"``: the encoder's output tokens ``[N, D]``; baseline zeros;
- ``"user_audio"``: the user's audio at the embedding level: the sum of the user codebooks'
  embeddings per model step, swapped into ``hook_embed`` (``x = rest + user``); baseline zero
  embeddings (the zero token). Model step ``s`` reads user frame ``s - 1`` (semantic codebook;
  acoustic codebooks one frame earlier).

Every result reports its **completeness gap**: IG's attributions should sum to
``f(input) - f(baseline)``; ``gap`` is ``|sum - (f(x) - f(b))| / |f(x) - f(b)|``. Image
attributions are pooled per patch (``map [side, side]``) and compared with the cross-attention
maps (``attention_agreement``: Spearman rank correlation over patches per layer) and with the
object box (pointing game of the attribution peak): ``attribution_study`` does both over items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moshivis_lab.interp.attention import (
    AttentionMaps,
    PointingItem,
    box_area_share,
    cross_attention_maps,
    grid_side,
    in_box,
    peak_point,
    qa_codes,
)
from moshivis_lab.interp.cache import as_codes
from moshivis_lab.interp.cache import check_moshivis as _check_moshivis

INPUT_KINDS = ("pixels", "image_tokens", "user_audio")


def _integrated_gradients() -> Any:
    try:
        from captum.attr import IntegratedGradients
    except ImportError as e:  # pragma: no cover - captum is a declared dependency
        raise ImportError("attributions need captum: pip install captum") from e
    return IntegratedGradients


@dataclass(frozen=True)
class Target:
    """What is attributed: the logit of text token ``token`` at model step ``step`` of the
    teacher-forced ``codes [1, 17, T]``."""

    codes: torch.Tensor
    step: int
    token: int
    label: str = ""

    def __post_init__(self) -> None:
        c = as_codes(self.codes)
        object.__setattr__(self, "codes", c)
        if c.shape[0] != 1:
            raise ValueError(f"a target holds one sample, got codes {tuple(c.shape)}")
        if not 0 <= self.step < c.shape[2]:
            raise ValueError(f"step must be in [0, {c.shape[2]}), got {self.step}")
        if self.token < 0:
            raise ValueError(f"token must be a text token id >= 0, got {self.token}")


def target_of(tokenizer: Any, question: str, answer: str, which: int = 0) -> Target:
    """The logit of answer token ``which`` after ``question`` (speechless, teacher-forced)."""
    codes, steps = qa_codes(tokenizer, question, answer)
    if not -len(steps) <= which < len(steps):
        raise ValueError(f"the answer has {len(steps)} tokens, which={which}")
    s = steps[which]
    tok = int(codes[0, s])
    return Target(
        torch.from_numpy(codes)[None], s, tok, f"{question} → {tokenizer.decode([tok])!r}"
    )


@dataclass
class Attribution:
    """IG attributions of one target to one input kind.

    ``values``: raw attributions (shape of the input without batch: ``[3, S, S]`` pixels,
    ``[N, D]`` image tokens, ``[step + 1, dim]`` user embeddings: the model is causal, so only
    the steps up to the target's are run); ``map``: pooled per patch
    ``[side, side]`` (``|sum|`` over a patch's pixels and channels / a token's features) or per
    model step ``[T]`` for audio (signed sum over the embedding); ``f_input``/``f_baseline``: the
    target logit at the input and at the baseline; ``delta``: captum's convergence delta
    (``sum(values) - (f_input - f_baseline)``); ``gap``: ``|delta| / |f_input - f_baseline|``.
    """

    kind: str
    values: np.ndarray
    map: np.ndarray
    f_input: float
    f_baseline: float
    delta: float
    n_steps: int
    target: Target

    @property
    def gap(self) -> float:
        """Relative completeness gap."""
        diff = abs(self.f_input - self.f_baseline)
        return abs(self.delta) / diff if diff > 0 else float("inf")

    @property
    def total(self) -> float:
        """Sum of all attributions."""
        return float(self.values.sum())


def _expand_codes(t: Target, n: int, device: Any) -> torch.Tensor:
    """The target's codes up to its step (the model is causal: later steps cannot matter)."""
    return t.codes[:, :, : t.step + 1].to(device).expand(n, -1, -1)


def _ig(
    f: Any, x: torch.Tensor, baseline: torch.Tensor, n_steps: int, internal_batch_size: int
) -> tuple[torch.Tensor, float, float, float]:
    ig = _integrated_gradients()(f)
    attr, delta = ig.attribute(
        x,
        baselines=baseline,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        fx, fb = float(f(x)[0]), float(f(baseline)[0])
    return attr.detach()[0], float(delta[0]), fx, fb


@contextlib.contextmanager
def _grad_mode(model: Any) -> Any:
    """Eval mode, autograd on (frozen parameters stay frozen: only inputs get gradients)."""
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was)


def _patch_pool(values: np.ndarray, side: int) -> np.ndarray:
    """``|sum|`` of ``[C, S, S]`` pixel attributions within each of ``side x side`` patches."""
    s = values.shape[-1]
    if s % side:
        raise ValueError(f"image side {s} is not a multiple of the token grid side {side}")
    p = s // side
    per = values.sum(axis=0).reshape(side, p, side, p).sum(axis=(1, 3))
    return np.abs(per)


def attribute_image(
    model: Any,
    target: Target,
    image: Any,
    *,
    encoder: Any = None,
    kind: str = "image_tokens",
    n_steps: int = 64,
    baseline: str = "zero",
    internal_batch_size: int = 32,
) -> Attribution:
    """IG from the target logit to the image: ``kind="pixels"`` (``image``: anything
    ``encoder.preprocess`` accepts, or ready ``pixel_values [1, 3, S, S]``; needs ``encoder``)
    or ``"image_tokens"`` (``image``: encoder tokens ``[1, N, D]`` or ``[N, D]``).
    ``baseline``: ``"zero"`` (grey pixels / zero tokens) or ``"black"`` (pixels only)."""
    _check_moshivis(model)
    if kind not in ("pixels", "image_tokens"):
        raise ValueError(f"kind must be 'pixels' or 'image_tokens', got {kind!r}")
    if image is None:
        raise ValueError("attribute_image needs an image")
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    dev = model.device
    if kind == "pixels":
        if encoder is None:
            raise ValueError("pixel attributions need the image encoder (encoder=)")
        x = image if isinstance(image, torch.Tensor) else encoder.preprocess(image)
        if x.dim() == 3:
            x = x[None]
        s = encoder.image_size
        if x.shape != (1, 3, s, s):
            raise ValueError(f"pixel_values must be [1, 3, {s}, {s}], got {tuple(x.shape)}")
        x = x.to(dev, torch.float32)
        if baseline == "zero":
            b = torch.zeros_like(x)
        elif baseline == "black":
            mean = torch.tensor(encoder.config.image_mean, device=dev)[None, :, None, None]
            std = torch.tensor(encoder.config.image_std, device=dev)[None, :, None, None]
            b = ((torch.zeros_like(x) - mean) / std).to(x.dtype)
        else:
            raise ValueError(f"baseline must be 'zero' or 'black', got {baseline!r}")

        def f(pv: torch.Tensor) -> torch.Tensor:
            tok = encoder(pv)
            out = model(_expand_codes(target, pv.shape[0], dev), image_tokens=tok)
            return out.text_logits[:, 0, target.step, target.token].float()

    else:
        x = torch.as_tensor(image)
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[-1] != model.cfg.xa.image_dim:
            raise ValueError(
                f"image tokens must be [1, N, {model.cfg.xa.image_dim}], got {tuple(x.shape)}"
            )
        x = x.to(dev, torch.float32)
        if baseline != "zero":
            raise ValueError("image-token attributions use the zero baseline")
        b = torch.zeros_like(x)

        def f(tok: torch.Tensor) -> torch.Tensor:
            out = model(_expand_codes(target, tok.shape[0], dev), image_tokens=tok)
            return out.text_logits[:, 0, target.step, target.token].float()

    with _grad_mode(model):
        attr, delta, fx, fb = _ig(f, x, b, n_steps, internal_batch_size)
    values = attr.float().cpu().numpy()
    if kind == "pixels":
        side = encoder.token_grid_side()
        pooled = _patch_pool(values, side)
    else:
        pooled = np.abs(values.sum(axis=-1)).reshape(grid_side(values.shape[0]), -1)
    return Attribution(kind, values, pooled, fx, fb, delta, n_steps, target)


def _user_rows(model: Any) -> list[int]:
    total = 1 + model.lm.cfg.n_q  # text row + audio rows
    return list(range(total - model.n_user, total))


def attribute_user_audio(
    model: Any,
    target: Target,
    image_tokens: Any = None,
    *,
    n_steps: int = 64,
    internal_batch_size: int = 32,
) -> Attribution:
    """IG from the target logit to the user's audio embeddings ``[T, dim]`` (see the module
    docstring); ``map [T]``: the signed attribution per model step. ``image_tokens`` (optional):
    the image the model sees meanwhile. ``map`` covers steps ``0..target.step``."""
    from moshivis_lab.config import ZERO_TOKEN

    _check_moshivis(model)
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    dev = model.device
    codes = _expand_codes(target, 1, dev)
    rows = _user_rows(model)
    if bool((codes[:, rows] == ZERO_TOKEN).all()):
        raise ValueError("the target's codes hold no user audio (every user row is the zero token)")
    img = None if image_tokens is None else torch.as_tensor(image_tokens).to(dev)
    if img is not None and img.dim() == 2:
        img = img[None]
    kw = {} if img is None else {"image_tokens": img}
    quiet = codes.clone()
    quiet[:, rows] = ZERO_TOKEN
    with torch.no_grad():
        _, full = model.run_with_cache(codes, names_filter="hook_embed", **kw)
        _, rest_c = model.run_with_cache(quiet, names_filter="hook_embed", **kw)
    rest = rest_c["hook_embed"].float()
    user = (full["hook_embed"].float() - rest).detach()

    def f(u: torch.Tensor) -> torch.Tensor:
        def swap(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return (rest.expand(u.shape[0], -1, -1) + u).to(x.dtype)

        with model.hooks([("hook_embed", swap)]):
            out = model(codes.expand(u.shape[0], -1, -1), **kw)
        return out.text_logits[:, 0, target.step, target.token].float()

    with _grad_mode(model):
        attr, delta, fx, fb = _ig(f, user, torch.zeros_like(user), n_steps, internal_batch_size)
    values = attr.float().cpu().numpy()
    return Attribution("user_audio", values, values.sum(axis=-1), fx, fb, delta, n_steps, target)


# ---------------------------------------------------------------------- agreement


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two equally sized arrays (NaN when one is constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def attention_agreement(attribution: Attribution, maps: AttentionMaps) -> dict[str, float]:
    """Spearman correlation over patches between the attribution map and the head-averaged
    attention of the target's step, per layer (keys ``"layer {i}"``) and of all layers
    averaged (``"all"``)."""
    if attribution.kind == "user_audio":
        raise ValueError("attention agreement is defined for image attributions")
    step = attribution.target.step
    out = {f"layer {i}": spearman(attribution.map, maps.grid(i, None, step)) for i in maps.layers}
    out["all"] = spearman(attribution.map, maps.grid(None, None, step))
    return out


@dataclass
class AttributionStudy:
    """Attributions of the first answer token of each item to image tokens (and pixels), with
    completeness gaps, agreement with attention and the pointing game of attribution peaks."""

    items: list[PointingItem]
    kinds: tuple[str, ...]
    gaps: dict[str, np.ndarray]  # kind -> [items]
    spearman: dict[str, np.ndarray]  # kind -> [items, layers + 1] (last column: all layers)
    hits: dict[str, np.ndarray]  # kind -> [items] attribution peak in the box
    attention_hits: np.ndarray  # [items] attention peak (all layers, target step) in the box
    baselines: np.ndarray
    layers: tuple[int, ...]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (means and medians over items)."""
        out: dict[str, Any] = {
            "n": len(self.items),
            "baseline_box_area": float(self.baselines.mean()),
            "attention_pointing_at_target_step": float(self.attention_hits.mean()),
        }
        for k in self.kinds:
            sp = self.spearman[k]
            with np.errstate(all="ignore"):
                out[k] = {
                    "completeness_gap_mean": float(np.mean(self.gaps[k])),
                    "completeness_gap_median": float(np.median(self.gaps[k])),
                    "completeness_gap_max": float(np.max(self.gaps[k])),
                    "spearman_vs_attention_per_layer": {
                        str(i): float(np.nanmean(sp[:, j])) for j, i in enumerate(self.layers)
                    },
                    "spearman_vs_attention_all_layers": float(np.nanmean(sp[:, -1])),
                    "pointing_game": float(self.hits[k].mean()),
                }
        return out


def attribution_study(
    model: Any,
    cfg: Any,
    items: Sequence[PointingItem],
    *,
    kinds: Sequence[str] = ("image_tokens", "pixels"),
    n_steps: int = 64,
    pixel_steps: int | None = None,
    tokenizer: Any = None,
    encoder: Any = None,
    keep_examples: int = 2,
    progress: bool = True,
) -> AttributionStudy:
    """For each item: IG of its first answer token to each input kind; completeness gap,
    Spearman vs the attention at the same step, and whether the attribution peak is in the box.

    ``pixel_steps``: IG steps through the vision tower (default ``4 * n_steps``: the path
    through SigLIP is far less linear than the one from the image tokens, and at tiny size 64
    steps leave gaps of several percent where 256 give about 1 %)."""
    from tqdm.auto import tqdm

    from moshivis_lab.interp.cache import load_image
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    _check_moshivis(model)
    items = list(items)
    if not items:
        raise ValueError("no items given (see attention.pointing_items)")
    bad = [k for k in kinds if k not in ("pixels", "image_tokens")]
    if bad or not kinds:
        raise ValueError(f"kinds must be among 'pixels', 'image_tokens', got {list(kinds)}")
    tok = tokenizer or TextTokenizer.load(cfg.tokenizer_path)
    enc = encoder if encoder is not None else load_vision_encoder(cfg)
    layers = tuple(model.cfg.layers)
    gaps = {k: np.zeros(len(items)) for k in kinds}
    sps = {k: np.zeros((len(items), len(layers) + 1)) for k in kinds}
    hits = {k: np.zeros(len(items), bool) for k in kinds}
    att_hits = np.zeros(len(items), bool)
    examples: list[dict[str, Any]] = []
    for i, it in enumerate(tqdm(items, disable=not progress, desc="attributions")):
        image = load_image(cfg, it.image_id)
        pv = enc.preprocess(image)
        with torch.no_grad():
            img_tok = enc(pv.to(model.device)).float()
        t = target_of(tok, it.question, it.answer)
        maps = cross_attention_maps(model, t.codes, img_tok, steps=[t.step])
        s = it.image_size
        att_hits[i] = in_box(peak_point(maps.grid(None, None, t.step), s, s), it.box)
        ex: dict[str, Any] = {"item": it, "attention": maps.layer_grids(t.step)}
        for k in kinds:
            src = pv if k == "pixels" else img_tok
            steps = n_steps if k == "image_tokens" else (pixel_steps or 4 * n_steps)
            a = attribute_image(model, t, src, encoder=enc, kind=k, n_steps=steps)
            gaps[k][i] = a.gap
            agree = attention_agreement(a, maps)
            sps[k][i] = [agree[f"layer {j}"] for j in layers] + [agree["all"]]
            hits[k][i] = in_box(peak_point(a.map, s, s), it.box)
            ex[k] = a.map
        if len(examples) < keep_examples:
            ex["image"] = np.asarray(image)
            examples.append(ex)
    base = np.array([box_area_share(it.box, it.image_size, it.image_size) for it in items])
    return AttributionStudy(items, tuple(kinds), gaps, sps, hits, att_hits, base, layers, examples)


def spoken_target(dialogue: Any, turn: int | None = None) -> tuple[Target, Any, Any]:
    """The first word-token of an assistant turn of a spoken ``gates.Dialogue`` (default: the
    first assistant turn about the image), as a ``Target``; also that turn and the user turn
    before it (None if none)."""
    from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN

    if not getattr(dialogue, "speech", False):
        raise ValueError("spoken_target needs a spoken Dialogue (gates.spoken_dialogue)")
    turns = list(dialogue.turns)
    if turn is None:
        cand = [k for k, t in enumerate(turns) if t.speaker == "assistant" and t.relevant]
        if not cand:
            raise ValueError("the dialogue has no assistant turn about the image")
        turn = cand[0]
    if not 0 <= turn < len(turns) or turns[turn].speaker != "assistant":
        raise ValueError(f"turn {turn} is not an assistant turn of this dialogue")
    t = turns[turn]
    row = np.asarray(dialogue.codes)[0]
    steps = [
        p
        for p in range(max(t.start, 1), min(t.end, len(row)))
        if row[p] not in (TEXT_PAD_ID, TEXT_EPAD_ID, ZERO_TOKEN)
    ]
    if not steps:
        raise ValueError(f"assistant turn {turn} holds no word token")
    prev = next((u for u in reversed(turns[:turn]) if u.speaker == "user"), None)
    codes = torch.from_numpy(np.asarray(dialogue.codes, np.int64))[None]
    return Target(codes, steps[0], int(row[steps[0]]), f"assistant turn {turn}: {t.text}"), t, prev


def mass_share(per_step: Any, start: int, end: int) -> float:
    """Share of the absolute attribution that falls on steps ``[start, end)``."""
    v = np.abs(np.asarray(per_step, np.float64).ravel())
    total = v.sum()
    return float(v[max(0, start) : max(0, end)].sum() / total) if total > 0 else float("nan")
