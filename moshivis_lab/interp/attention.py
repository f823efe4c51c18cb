"""Cross-attention maps: where in the image does each layer look, and does it look at the right
object?

- ``cross_attention_maps``: the ``temporal.layers.{i}.cross_attention.hook_pattern``
  probabilities of one sample, ``AttentionMaps [layers, heads, steps, N]`` (each row sums to 1
  over the N image tokens), with ``grid`` (averaged over heads / steps, on the token grid,
  token ``n`` at row ``n // side``, column ``n % side``, as ``ImageEncoder.tokens_to_grid``) and
  ``pixels`` (upsampled to an image of any size: the encoder squares images without keeping the
  aspect ratio, so patch ``n`` covers ``ImageEncoder.token_box(n, width, height)``);
- ``check_eager``: hooking the pattern (or ``eager=True``) takes an explicit-softmax attention
  path; this checks that its outputs equal the fused (SDPA) path's;
- the **pointing game** (``pointing_items`` / ``pointing_game``): for questions about one object
  of a scene (``vqa`` colour / shape / size / position items, whose ``refs`` name one object;
  OCR items and their word box optionally), ask the question in the text stream followed by
  the answer (teacher-forced, as a speechless sample), average the attention of the steps that
  predict the answer tokens over heads, and count a hit when the peak patch's centre lies inside
  the object's box. The baseline is a random peak: the share of the image the box covers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from moshivis_lab.config import ZERO_TOKEN
from moshivis_lab.interp.cache import as_codes, run_with_cache
from moshivis_lab.interp.cache import check_moshivis as _check_moshivis

N_ROWS = 17
Box = tuple[float, float, float, float]
POINTING_TYPES = ("colour", "shape", "size", "position")


# ---------------------------------------------------------------------- grids and pixels


def grid_side(n_tokens: int) -> int:
    """Side of a square token grid of ``n_tokens`` (ValueError when not square)."""
    side = math.isqrt(int(n_tokens))
    if side * side != n_tokens or side < 1:
        raise ValueError(f"{n_tokens} image tokens do not form a square grid")
    return side


def fold_pooled_attention(weights: Any, n_tokens: int, pool: int) -> Any:
    """Attention over the image prefix's keys (``n_tokens`` grid tokens, then, with
    ``XAConfig.pool_tokens = pool``, one key per ``pool x pool`` block) as attention over the
    grid tokens only: each block key's weight is shared evenly by the tokens of its block, so
    a row still sums to what it did. Works on numpy arrays and torch tensors ``[..., keys]``."""
    keys = int(weights.shape[-1])
    if keys == n_tokens:
        return weights
    side = grid_side(n_tokens)
    if pool < 2:
        raise ValueError(f"{keys} keys for {n_tokens} image tokens, but pool_tokens={pool}")
    m = -(-side // pool)
    if keys != n_tokens + m * m:
        raise ValueError(
            f"{keys} keys do not match {n_tokens} tokens plus {m * m} {pool}x{pool} blocks"
        )
    rows = np.arange(side) // pool
    block = (rows[:, None] * m + rows[None, :]).reshape(-1)  # block of each grid token
    share = 1.0 / np.bincount(block, minlength=m * m)[block]
    if isinstance(weights, torch.Tensor):
        idx = torch.as_tensor(n_tokens + block, device=weights.device)
        sh = torch.as_tensor(share, dtype=weights.dtype, device=weights.device)
        return weights[..., :n_tokens] + weights[..., idx] * sh
    return weights[..., :n_tokens] + weights[..., n_tokens + block] * share.astype(weights.dtype)


def upsample(weights: Any, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """A 2-D grid ``[h, w]`` stretched to ``[height, width]`` pixels.

    ``"nearest"``: cell ``(r, c)`` fills exactly the pixels its patch covers (``patch_box``);
    ``"bilinear"``: PIL's bilinear filter on float values (a smooth overlay).
    """
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weights must be a non-empty 2-D array, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights hold NaN or infinite values")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")
    if mode == "nearest":
        rows = np.minimum((np.arange(height) * w.shape[0]) // height, w.shape[0] - 1)
        cols = np.minimum((np.arange(width) * w.shape[1]) // width, w.shape[1] - 1)
        return w[rows][:, cols]
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    im = Image.fromarray(w.astype(np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)


def patch_box(index: int, side: int, width: float, height: float) -> Box:
    """Pixel box ``(x0, y0, x1, y1)`` of token ``index`` of a ``side x side`` grid in an image
    of ``width x height`` (the formula of ``ImageEncoder.token_box``)."""
    if not 0 <= index < side * side:
        raise ValueError(f"token index must be in [0, {side * side}), got {index}")
    r, c = divmod(index, side)
    return (c * width / side, r * height / side, (c + 1) * width / side, (r + 1) * height / side)


def peak_point(grid: Any, width: float, height: float) -> tuple[float, float]:
    """Pixel centre ``(x, y)`` of the highest cell of a 2-D grid, in a ``width x height`` image."""
    g = np.asarray(grid, np.float64)
    if g.ndim != 2 or 0 in g.shape:
        raise ValueError(f"grid must be a non-empty 2-D array, got shape {g.shape}")
    r, c = np.unravel_index(int(np.argmax(g)), g.shape)
    return ((c + 0.5) * width / g.shape[1], (r + 0.5) * height / g.shape[0])


def in_box(point: tuple[float, float], box: Sequence[float]) -> bool:
    """Whether ``(x, y)`` lies in ``(x0, y0, x1, y1)`` (x1 / y1 exclusive)."""
    x, y = point
    return bool(box[0] <= x < box[2] and box[1] <= y < box[3])


def box_area_share(box: Sequence[float], width: float, height: float) -> float:
    """Share of a ``width x height`` image inside ``box`` (clipped to the image): the chance that
    a uniformly random peak falls in the box."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {tuple(box)}")
    w = max(0.0, min(x1, width) - max(x0, 0.0))
    h = max(0.0, min(y1, height) - max(y0, 0.0))
    return w * h / (width * height)


def patch_centre_share(box: Sequence[float], side: int, width: float, height: float) -> float:
    """Share of the ``side x side`` patch centres inside ``box``: the chance that a peak on a
    uniformly random patch is a hit (the discrete version of ``box_area_share``)."""
    hits = sum(
        in_box(((c + 0.5) * width / side, (r + 0.5) * height / side), box)
        for r in range(side)
        for c in range(side)
    )
    return hits / (side * side)


# ---------------------------------------------------------------------- maps


@dataclass
class AttentionMaps:
    """Cross-attention of one sample: ``weights [layers, heads, steps, N]`` over the image
    tokens (each row sums to 1), for temporal ``layers`` and model ``steps``."""

    weights: np.ndarray
    layers: tuple[int, ...]
    steps: tuple[int, ...]
    side: int

    def _layer_index(self, layer: int | None) -> slice | int:
        if layer is None:
            return slice(None)
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no cross-attention; layers are {self.layers}")
        return self.layers.index(layer)

    def _step_index(self, steps: int | Sequence[int] | None) -> list[int]:
        if steps is None:
            return list(range(len(self.steps)))
        chosen = [steps] if isinstance(steps, int) else list(steps)
        bad = [s for s in chosen if s not in self.steps]
        if bad or not chosen:
            raise ValueError(f"steps {bad or chosen} not in the cached steps {self.steps}")
        return [self.steps.index(s) for s in chosen]

    def mean(
        self,
        layer: int | None = None,
        head: int | None = None,
        steps: int | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Weights ``[N]`` averaged over layers (or one ``layer``), heads (or one ``head``) and
        steps (or the given model steps)."""
        w = self.weights[:, :, self._step_index(steps)]
        li = self._layer_index(layer)
        w = w[li] if isinstance(li, int) else w.mean(axis=0)
        if head is not None:
            if not 0 <= head < w.shape[0]:
                raise ValueError(f"head must be in [0, {w.shape[0]}), got {head}")
            w = w[head]
        else:
            w = w.mean(axis=0)
        return w.mean(axis=0)

    def grid(
        self,
        layer: int | None = None,
        head: int | None = None,
        steps: int | Sequence[int] | None = None,
    ) -> np.ndarray:
        """``mean`` on the token grid ``[side, side]``."""
        return self.mean(layer, head, steps).reshape(self.side, self.side)

    def layer_grids(self, steps: int | Sequence[int] | None = None) -> np.ndarray:
        """Per layer, averaged over heads and steps: ``[layers, side, side]``."""
        return np.stack([self.grid(i, None, steps) for i in self.layers])

    def pixels(
        self,
        height: int,
        width: int,
        layer: int | None = None,
        head: int | None = None,
        steps: int | Sequence[int] | None = None,
        mode: str = "bilinear",
    ) -> np.ndarray:
        """``grid`` upsampled to an image of ``height x width`` pixels."""
        return upsample(self.grid(layer, head, steps), height, width, mode)


def _pattern_names(model: Any) -> list[str]:
    return [f"temporal.layers.{i}.cross_attention.hook_pattern" for i in model.cfg.layers]


def cross_attention_maps(
    model: Any,
    codes: Any,
    image_tokens: Any,
    *,
    steps: Sequence[int] | None = None,
    xa_start: int = 0,
) -> AttentionMaps:
    """The cross-attention of one sample ``codes [K, T]`` (or ``[1, K, T]``) on its image
    ``image_tokens [1, N, D]``, at model ``steps`` (default all)."""
    _check_moshivis(model)
    if image_tokens is None:
        raise ValueError("cross-attention maps need an image: pass image_tokens [1, N, D]")
    c = as_codes(codes)
    if c.shape[0] != 1:
        raise ValueError(
            f"one sample at a time: codes must be [K, T] or [1, K, T], got {tuple(c.shape)}"
        )
    img = torch.as_tensor(image_tokens)
    if img.dim() == 2:
        img = img[None]
    if img.dim() != 3 or img.shape[0] != 1:
        raise ValueError(f"image_tokens must be [1, N, D], got {tuple(img.shape)}")
    names = _pattern_names(model)
    _, cache = run_with_cache(model, c, names, image_tokens=img, xa_start=xa_start)
    t = c.shape[2]
    chosen = list(range(t)) if steps is None else [int(s) for s in steps]
    if not chosen or any(not 0 <= s < t for s in chosen):
        raise ValueError(f"steps must be in [0, {t}), got {chosen}")
    w = np.stack([cache[n][0][:, chosen].float().numpy() for n in names])  # [L, H, S, keys]
    w = fold_pooled_attention(w, img.shape[1], model.cfg.xa.pool_tokens)  # [L, H, S, N]
    return AttentionMaps(w, tuple(model.cfg.layers), tuple(chosen), grid_side(w.shape[-1]))


@dataclass
class EagerCheck:
    """Largest differences between the fused and the eager attention paths (same inputs):
    ``text``/``audio`` logits, ``gates``; ``hooked`` compares the run with the pattern hooks
    attached (which takes the eager path by itself) to the fused one."""

    text: float
    audio: float
    gates: float
    hooked: float
    atol: float

    @property
    def ok(self) -> bool:
        """All differences within ``atol``."""
        return max(self.text, self.audio, self.gates, self.hooked) <= self.atol


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    both = torch.isnan(a) & torch.isnan(b)
    if bool((torch.isnan(a) ^ torch.isnan(b)).any()):
        return float("inf")
    d = torch.where(both, 0.0, (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


@torch.no_grad()
def check_eager(model: Any, codes: Any, image_tokens: Any, atol: float = 1e-4) -> EagerCheck:
    """Run the fused path, ``eager=True`` and the pattern-hooked path; return the differences
    (``.ok`` when all are within ``atol``)."""
    _check_moshivis(model)
    if image_tokens is None:
        raise ValueError("the eager check needs an image (image_tokens)")
    c = as_codes(codes, model.device)
    img = torch.as_tensor(image_tokens).to(model.device)
    fast = model(c, image_tokens=img)
    slow = model(c, image_tokens=img, eager=True)
    hooked, _ = run_with_cache(model, c, _pattern_names(model), image_tokens=img, device=None)
    return EagerCheck(
        _maxdiff(fast.text_logits, slow.text_logits),
        _maxdiff(fast.logits, slow.logits),
        _maxdiff(fast.gates, slow.gates),
        max(_maxdiff(fast.text_logits, hooked.text_logits), _maxdiff(fast.logits, hooked.logits)),
        atol,
    )


# ---------------------------------------------------------------------- the pointing game


@dataclass(frozen=True)
class PointingItem:
    """A question about one object (or the word) of a scene, with the object's pixel box in the
    world image (``image_size`` square pixels)."""

    image_id: str
    question: str
    answer: str
    answer_type: str
    box: Box
    image_size: int
    target: str  # e.g. "small green circle" or "word 'cat'"
    others: tuple[Box, ...] = ()  # boxes of the scene's other objects (and word)

    @property
    def baseline(self) -> float:
        """Random-peak chance of a hit: the share of the image the box covers."""
        return box_area_share(self.box, self.image_size, self.image_size)


def pointing_items(
    cfg: Any,
    split: str = "test",
    *,
    types: Sequence[str] = POINTING_TYPES,
    per_type: int | None = None,
    words: bool = False,
) -> list[PointingItem]:
    """The world's task items that refer to exactly one object (VQA of the given answer
    ``types``; with ``words`` also OCR items, pointing at the word's box)."""
    from moshivis_lab.world.generate import load_scenes
    from moshivis_lab.world.shards import read_image_texts

    scenes = {s.id: s for s in load_scenes(cfg)[split]}
    counts: dict[str, int] = {}
    out = []
    for it in read_image_texts(cfg, split):
        kind = it.meta.get("answer_type", "")
        refs = it.meta.get("refs") or []
        scene = scenes.get(it.image_id)
        if scene is None:
            continue
        all_boxes = [o.bbox for o in scene.objects]
        if scene.word_bbox is not None:
            all_boxes.append(scene.word_bbox)
        if it.task == "vqa" and kind in types and len(refs) == 1:
            o = scene.objects[int(refs[0])]
            box, target = o.bbox, f"{o.size} {o.colour} {o.shape}"
        elif words and it.task == "ocr" and scene.word_bbox is not None:
            box, target = scene.word_bbox, f"word {scene.word!r}"
        else:
            continue
        others = tuple(tuple(float(v) for v in b) for b in all_boxes if tuple(b) != tuple(box))
        key = f"{it.task}/{kind}"
        if per_type is not None and counts.get(key, 0) >= per_type:
            continue
        counts[key] = counts.get(key, 0) + 1
        (_, q), (_, a) = it.turns[0], it.turns[1]
        out.append(
            PointingItem(
                it.image_id,
                q,
                a,
                key,
                tuple(float(v) for v in box),  # type: ignore[arg-type]
                int(scene.image_size),
                target,
                others,  # type: ignore[arg-type]
            )
        )
    return out


def qa_codes(tokenizer: Any, question: str, answer: str) -> tuple[np.ndarray, list[int]]:
    """A speechless grid ``[17, T]``: the question's then the answer's text tokens in the text
    row (audio rows the zero token; the prompt as ``mix.prompt_tokens`` writes it); and the model
    steps that predict the answer tokens."""
    from moshivis_lab.train.mix import prompt_tokens

    q, a = prompt_tokens(tokenizer, question), tokenizer.encode(answer)
    if not q or not a:
        raise ValueError(f"empty question or answer: {question!r} / {answer!r}")
    codes = np.full((N_ROWS, len(q) + len(a)), ZERO_TOKEN, np.int64)
    codes[0] = q + a
    return codes, list(range(len(q), len(q) + len(a)))


@dataclass
class PointingResult:
    """The pointing game over ``items``: ``hits [items, layers]`` (peak of each layer's
    head-averaged attention over the answer steps inside the box), ``hits_all [items]`` (layers
    averaged too), ``baselines [items]`` (box area share) and ``patch_baselines`` (share of patch
    centres in the box), ``peaks [items, layers, 2]`` (pixel x, y), ``other_hits [items, layers]``
    (the peak lies on another object of the scene instead: attention to objects in general, not
    to the one asked about)."""

    items: list[PointingItem]
    layers: tuple[int, ...]
    hits: np.ndarray
    hits_all: np.ndarray
    baselines: np.ndarray
    patch_baselines: np.ndarray
    peaks: np.ndarray
    other_hits: np.ndarray
    grids: np.ndarray | None = None  # [items, layers, side, side] when kept

    @property
    def per_layer(self) -> dict[int, float]:
        """Hit rate per layer."""
        return {i: float(self.hits[:, k].mean()) for k, i in enumerate(self.layers)}

    @property
    def all_layers(self) -> float:
        """Hit rate of the map averaged over every layer."""
        return float(self.hits_all.mean())

    @property
    def baseline(self) -> float:
        """Mean random-peak chance (box area share)."""
        return float(self.baselines.mean())

    @property
    def object_chance(self) -> float:
        """Mean ``1 / (objects in the scene)``: how often a peak that lands on *some* object
        would land on the one asked about if attention picked objects at random."""
        return float(np.mean([1.0 / (1 + len(it.others)) for it in self.items]))

    def target_given_object(self) -> dict[str, float]:
        """Per layer: of the peaks that land on an object, the share on the one asked about
        (compare with ``object_chance``: above it, attention follows the question)."""
        out = {}
        for k, i in enumerate(self.layers):
            on = self.hits[:, k] | self.other_hits[:, k]
            out[str(i)] = float(self.hits[on, k].mean()) if on.any() else float("nan")
        return out

    def by_type(self) -> dict[str, dict[str, float]]:
        """Hit rate (all layers averaged, and the best layer) and baseline per question type."""
        out = {}
        for t in sorted({it.answer_type for it in self.items}):
            sel = np.array([it.answer_type == t for it in self.items])
            out[t] = {
                "n": int(sel.sum()),
                "all_layers": float(self.hits_all[sel].mean()),
                "best_layer": float(self.hits[sel].mean(axis=0).max()),
                "baseline": float(self.baselines[sel].mean()),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "n": len(self.items),
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "all_layers": self.all_layers,
            "baseline_box_area": self.baseline,
            "baseline_patch_centres": float(self.patch_baselines.mean()),
            "other_object_per_layer": {
                str(i): float(self.other_hits[:, k].mean()) for k, i in enumerate(self.layers)
            },
            "target_given_on_an_object_per_layer": self.target_given_object(),
            "object_chance": self.object_chance,
            "by_type": self.by_type(),
        }


def pointing_game(
    model: Any,
    cfg: Any,
    items: Sequence[PointingItem],
    *,
    tokenizer: Any = None,
    encoder: Any = None,
    image_tokens: Any = None,
    keep_grids: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> PointingResult:
    """Play the pointing game on ``items`` (see the module docstring).

    ``image_tokens [len(items), N, D]``: the items' images (default: encoded now by ``encoder``,
    the lab's vision encoder when None). Items whose prompts have the same token length share a
    forward.
    """
    from tqdm.auto import tqdm

    from moshivis_lab.interp.cache import image_tokens_for
    from moshivis_lab.world.tokenizer import TextTokenizer

    _check_moshivis(model)
    items = list(items)
    if not items:
        raise ValueError("no pointing items given (see pointing_items)")
    tok = tokenizer or TextTokenizer.load(cfg.tokenizer_path)
    if image_tokens is None:
        ids = sorted({it.image_id for it in items})
        table = image_tokens_for(cfg, ids, encoder)
        row = {k: i for i, k in enumerate(ids)}
        image_tokens = table[[row[it.image_id] for it in items]]
    img = torch.as_tensor(image_tokens)
    if img.dim() != 3 or img.shape[0] != len(items):
        raise ValueError(
            f"image_tokens must be [len(items)={len(items)}, N, D], got {tuple(img.shape)}"
        )
    side = grid_side(img.shape[1])
    prepared = [qa_codes(tok, it.question, it.answer) for it in items]
    groups: dict[int, list[int]] = {}
    for i, (c, _) in enumerate(prepared):
        groups.setdefault(c.shape[1], []).append(i)
    names = _pattern_names(model)
    n_layers = len(names)
    grids = np.zeros((len(items), n_layers, side, side))
    chunks = [
        idx[s : s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)
    ]
    for idx in tqdm(chunks, disable=not progress, desc="pointing game"):
        codes = np.stack([prepared[i][0] for i in idx])
        _, cache = run_with_cache(model, codes, names, image_tokens=img[idx])
        for r, i in enumerate(idx):
            steps = prepared[i][1]
            for k, n in enumerate(names):
                w = cache[n][r][:, steps].float().mean(dim=(0, 1))  # heads, answer steps -> keys
                w = fold_pooled_attention(w, img.shape[1], model.cfg.xa.pool_tokens)  # [N]
                grids[i, k] = w.numpy().reshape(side, side)
    hits = np.zeros((len(items), n_layers), bool)
    hits_all = np.zeros(len(items), bool)
    peaks = np.zeros((len(items), n_layers, 2))
    other = np.zeros((len(items), n_layers), bool)
    for i, it in enumerate(items):
        s = it.image_size
        for k in range(n_layers):
            p = peak_point(grids[i, k], s, s)
            peaks[i, k] = p
            hits[i, k] = in_box(p, it.box)
            other[i, k] = not hits[i, k] and any(in_box(p, b) for b in it.others)
        hits_all[i] = in_box(peak_point(grids[i].mean(axis=0), s, s), it.box)
    return PointingResult(
        items,
        tuple(model.cfg.layers),
        hits,
        hits_all,
        np.array([it.baseline for it in items]),
        np.array([patch_centre_share(it.box, side, it.image_size, it.image_size) for it in items]),
        peaks,
        other,
        grids if keep_grids else None,
    )


@dataclass
class QuestionMaps:
    """Attention of several questions, for ``viz.interp.attention_grid_figure``: per question its
    image (uint8 ``HxWx3``), per-layer grids ``[layers, side, side]``, box and label."""

    images: list[np.ndarray]
    grids: np.ndarray
    boxes: list[Box | None]
    labels: list[str]
    layers: tuple[int, ...] = field(default_factory=tuple)


def question_maps(
    model: Any,
    cfg: Any,
    items: Sequence[PointingItem],
    *,
    tokenizer: Any = None,
    encoder: Any = None,
) -> QuestionMaps:
    """Per-layer attention grids (heads and answer steps averaged) of a few pointing items, with
    their images and boxes, ready to plot."""
    from moshivis_lab.interp.cache import load_image

    res = pointing_game(
        model, cfg, items, tokenizer=tokenizer, encoder=encoder, keep_grids=True, progress=False
    )
    assert res.grids is not None
    images = [np.asarray(load_image(cfg, it.image_id)) for it in items]
    labels = [f"{it.question} → {it.answer}" for it in items]
    return QuestionMaps(images, res.grids, [it.box for it in items], labels, res.layers)
