"""Scenes of the synthetic world: a scene graph (objects on a 3x3 grid, a background, maybe a
word) sampled from a numpy ``Generator``, and its rendering with Pillow.

Every drawn thing (object or word) is a flat colour pasted through an antialiased alpha mask;
masks are cached per (shape, size) and (word, font size), and bounding boxes are the exact
extents of those masks (Pillow convention: ``x1``/``y1`` exclusive), so ``bbox`` encloses every
changed pixel of its object and every edge row/column of it holds a pixel of the object.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moshivis_lab.config import WorldConfig
from moshivis_lab.world.vocab import (
    BACKGROUND_NAMES,
    CELLS,
    COLOUR_NAMES,
    COLOURS,
    GRID,
    POSITION_NAMES,
    SHAPES,
    SIZES,
    WORDS,
)

BBox = tuple[int, int, int, int]
Pair = tuple[str, str]

_SUPERSAMPLE = 4  # masks are drawn this many times larger, then box-filtered down
_ALPHA_MIN = 48  # mask values below this are cleared, so each kept pixel visibly changes
_WORD_MAX_FONT = 44
_WORD_MIN_FONT = 12
_MARGIN = 2  # pixels kept free at each side of a cell


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: what it is, which grid cell it sits in, and its pixel box."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    position: str
    bbox: BBox

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cell": list(self.cell),
            "position": self.position,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SceneObject:
        """Rebuild an object from ``to_json`` output."""
        return cls(
            shape=d["shape"],
            colour=d["colour"],
            size=d["size"],
            cell=(int(d["cell"][0]), int(d["cell"][1])),
            position=d["position"],
            bbox=_bbox(d["bbox"]),
        )


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects in distinct grid cells, a background, an optional word."""

    id: str
    objects: list[SceneObject]
    background: str
    word: str | None = None
    word_bbox: BBox | None = None
    word_colour: str | None = None
    image_size: int = 224
    background_seed: int = 0
    word_cells: list[tuple[int, int]] = field(default_factory=list)
    word_font_size: int = 0

    @property
    def pairs(self) -> set[Pair]:
        """The (colour, shape) pairs present in the scene."""
        return {(o.colour, o.shape) for o in self.objects}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that ``Scene.from_json`` turns back into an equal scene."""
        return {
            "id": self.id,
            "image_size": self.image_size,
            "background": self.background,
            "background_seed": self.background_seed,
            "objects": [o.to_json() for o in self.objects],
            "word": self.word,
            "word_bbox": None if self.word_bbox is None else list(self.word_bbox),
            "word_colour": self.word_colour,
            "word_cells": [list(c) for c in self.word_cells],
            "word_font_size": self.word_font_size,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scene:
        """Rebuild a scene from ``to_json`` output."""
        return cls(
            id=d["id"],
            objects=[SceneObject.from_json(o) for o in d["objects"]],
            background=d["background"],
            word=d.get("word"),
            word_bbox=None if d.get("word_bbox") is None else _bbox(d["word_bbox"]),
            word_colour=d.get("word_colour"),
            image_size=int(d["image_size"]),
            background_seed=int(d.get("background_seed", 0)),
            word_cells=[(int(r), int(c)) for r, c in d.get("word_cells", [])],
            word_font_size=int(d.get("word_font_size", 0)),
        )


def _bbox(v: Any) -> BBox:
    return (int(v[0]), int(v[1]), int(v[2]), int(v[3]))


# --------------------------------------------------------------------------------------------
# Geometry: cells and shape masks


def cell_box(cell: tuple[int, int], image_size: int) -> BBox:
    """Pixel box (x0, y0, x1, y1), x1/y1 exclusive, of a grid cell (row, col)."""
    r, c = cell
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    return (edges[c], edges[r], edges[c + 1], edges[r + 1])


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The outline of a shape in the unit square (y down)."""
    if shape == "square":
        return [(0.08, 0.08), (0.92, 0.08), (0.92, 0.92), (0.08, 0.92)]
    if shape == "triangle":
        return [(0.5, 0.04), (0.98, 0.9), (0.02, 0.9)]
    if shape == "diamond":
        return [(0.5, 0.0), (0.82, 0.5), (0.5, 1.0), (0.18, 0.5)]
    if shape == "hexagon":
        return [
            (
                0.5 + 0.5 * math.cos(math.pi / 2 + k * math.pi / 3),
                0.5 - 0.5 * math.sin(math.pi / 2 + k * math.pi / 3),
            )
            for k in range(6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 0.5 if k % 2 == 0 else 0.2
            a = math.pi / 2 + k * math.pi / 5
            pts.append((0.5 + rad * math.cos(a), 0.54 - rad * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((0.5 + x / 34.0, 0.45 - y / 34.0))
        return pts
    if shape == "cross":
        a, b = 0.33, 0.67
        return [
            (a, 0.0), (b, 0.0), (b, a), (1.0, a), (1.0, b), (b, b),
            (b, 1.0), (a, 1.0), (a, b), (0.0, b), (0.0, a), (a, a),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _threshold(mask: Image.Image) -> Image.Image:
    return mask.point([0 if v < _ALPHA_MIN else v for v in range(256)])


@functools.lru_cache(maxsize=4096)
def shape_mask(shape: str, side: int) -> tuple[Image.Image, BBox]:
    """An antialiased 'L' mask of ``shape`` drawn in a side x side box, and its tight bbox."""
    big = side * _SUPERSAMPLE
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse((0, 0, big - 1, big - 1), fill=255)
    else:
        d.polygon([(x * (big - 1), y * (big - 1)) for x, y in _unit_polygon(shape)], fill=255)
    mask = _threshold(im.reduce(_SUPERSAMPLE))
    box = mask.getbbox()
    assert box is not None, (shape, side)
    return mask, box


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def word_mask(word: str, font_size: int) -> tuple[Image.Image, BBox]:
    """An antialiased 'L' mask of ``word`` in Pillow's default font, cropped to its ink, and
    the ink box relative to the text origin."""
    font = _font(font_size)
    left, t, r, b = (
        int(v) for v in ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
    )
    im = Image.new("L", (r - left + 4, b - t + 4), 0)
    ImageDraw.Draw(im).text((2 - left, 2 - t), word, fill=255, font=font)
    im = _threshold(im)
    box = im.getbbox()
    assert box is not None, word
    return im.crop(box), (box[0] - 2 + left, box[1] - 2 + t, box[2] - 2 + left, box[3] - 2 + t)


def _word_fit(word: str, width: int, height: int) -> int:
    """The largest font size (<= _WORD_MAX_FONT) whose ink fits in width x height, or 0."""
    for size in range(_WORD_MAX_FONT, _WORD_MIN_FONT - 1, -2):
        mask, _ = word_mask(word, size)
        if mask.width <= width and mask.height <= height:
            return size
    return 0


# --------------------------------------------------------------------------------------------
# Sampling


def _pick(rng: np.random.Generator, seq: Any) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _place(rng: np.random.Generator, lo: int, hi: int, extent: int) -> int:
    """A start coordinate so that [start, start + extent) lies inside [lo + m, hi - m)."""
    a, b = lo + _MARGIN, hi - _MARGIN - extent
    return a if b <= a else int(rng.integers(a, b + 1))


def sample_scene(
    rng: np.random.Generator,
    cfg: WorldConfig,
    scene_id: str,
    *,
    require_pair: Pair | None = None,
    forbid_pairs: frozenset[Pair] | set[Pair] = frozenset(),
) -> Scene:
    """Sample a scene: 1..5 objects in distinct cells with distinct (colour, shape) pairs.

    ``forbid_pairs`` never appear (training scenes exclude the held-out pairs); ``require_pair``
    is given to one object (held-out scenes). Deterministic given ``rng``'s state.
    """
    forbid = frozenset(tuple(p) for p in forbid_pairs)
    if require_pair is not None:
        require_pair = (str(require_pair[0]), str(require_pair[1]))
        if require_pair[0] not in COLOURS or require_pair[1] not in SHAPES:
            raise ValueError(f"sample_scene: unknown pair {require_pair!r}")
        if require_pair in forbid:
            raise ValueError(f"sample_scene: pair {require_pair!r} is both required and forbidden")
    size = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    allowed = {(c, s) for c in COLOUR_NAMES for s in SHAPES} - forbid - {require_pair}
    if len(allowed) < cfg.max_objects:
        raise ValueError(f"sample_scene: only {len(allowed)} colour-shape pairs are allowed")
    cell_idx = rng.permutation(len(CELLS))[:n]
    cells = [CELLS[int(i)] for i in cell_idx]
    required_at = int(rng.integers(n)) if require_pair is not None else -1
    used: set[Pair] = set()
    objects: list[SceneObject] = []
    for k, cell in enumerate(cells):
        if k == required_at:
            assert require_pair is not None
            colour, shape = require_pair
        else:
            while True:
                colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
                if (colour, shape) not in forbid and (colour, shape) not in used:
                    if require_pair is None or (colour, shape) != require_pair:
                        break
        used.add((colour, shape))
        size_name = _pick(rng, tuple(SIZES))
        cx0, cy0, cx1, cy1 = cell_box(cell, size)
        side_cell = min(cx1 - cx0, cy1 - cy0)
        lo, hi = SIZES[size_name]
        side = int(round(side_cell * (lo + (hi - lo) * float(rng.random()))))
        side = max(6, min(side, side_cell - 2 * _MARGIN))
        x, y = _place(rng, cx0, cx1, side), _place(rng, cy0, cy1, side)
        _, (bx0, by0, bx1, by1) = shape_mask(shape, side)
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=size_name,
                cell=cell,
                position=POSITION_NAMES[cell],
                bbox=(x + bx0, y + by0, x + bx1, y + by1),
            )
        )
    # Objects are listed in reading order (top left to bottom right).
    objects.sort(key=lambda o: o.cell)
    background = _pick(rng, BACKGROUND_NAMES)
    background_seed = int(rng.integers(2**31 - 1))

    word = word_bbox = word_colour = None
    word_cells: list[tuple[int, int]] = []
    font_size = 0
    if float(rng.random()) < cfg.p_word:
        occupied = {o.cell for o in objects}
        free = [c for c in CELLS if c not in occupied]
        pairs = [
            [(r, c), (r, c + 1)]
            for r in range(GRID)
            for c in range(GRID - 1)
            if (r, c) not in occupied and (r, c + 1) not in occupied
        ]
        word = _pick(rng, WORDS)
        spans = pairs if pairs else [[c] for c in free]
        span = _pick(rng, spans)
        b0, b1 = cell_box(span[0], size), cell_box(span[-1], size)
        x0, y0, x1, y1 = b0[0], b0[1], b1[2], b1[3]
        font_size = _word_fit(word, x1 - x0 - 2 * _MARGIN - 4, y1 - y0 - 2 * _MARGIN - 4)
        if font_size == 0:
            word = None
        else:
            mask, _ = word_mask(word, font_size)
            wx, wy = _place(rng, x0, x1, mask.width), _place(rng, y0, y1, mask.height)
            word_bbox = (wx, wy, wx + mask.width, wy + mask.height)
            word_cells = list(span)
            word_colour = "black" if _background_luma(background) > 110 else "white"
    return Scene(
        id=scene_id,
        objects=objects,
        background=background,
        word=word,
        word_bbox=word_bbox,
        word_colour=word_colour,
        image_size=size,
        background_seed=background_seed,
        word_cells=word_cells,
        word_font_size=font_size if word is not None else 0,
    )


# --------------------------------------------------------------------------------------------
# Rendering

_BASE_TONES: dict[str, tuple[int, int, int]] = {
    "grey": (160, 160, 160),
    "beige": (195, 180, 150),
    "dark": (95, 95, 100),
}


def _background_luma(name: str) -> float:
    r, g, b = _BASE_TONES.get(name, (155, 155, 155))
    return 0.299 * r + 0.587 * g + 0.114 * b


def render_background(scene: Scene) -> Image.Image:
    """The background alone (what ``render`` draws before the objects and the word)."""
    n = scene.image_size
    rng = np.random.default_rng(scene.background_seed)
    name = scene.background
    tint = rng.integers(-12, 13, size=3)
    if name in _BASE_TONES:
        arr = np.empty((n, n, 3), dtype=np.float32)
        arr[:] = np.asarray(_BASE_TONES[name], dtype=np.float32)
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    lo = np.array([135, 135, 135], dtype=np.float32) + tint
    hi = np.array([180, 180, 180], dtype=np.float32) + tint
    if name == "gradient":
        a = float(rng.uniform(0, 2 * math.pi))
        t = (xx * math.cos(a) + yy * math.sin(a)) / n
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif name == "striped":
        a = float(rng.uniform(0, math.pi))
        period = float(rng.uniform(10, 22))
        t = (((xx * math.cos(a) + yy * math.sin(a)) / period) % 1.0 < 0.5).astype(np.float32)
    elif name == "checked":
        p = int(rng.integers(10, 20))
        t = (((xx // p) + (yy // p)) % 2).astype(np.float32)
    elif name == "dotted":
        p = int(rng.integers(12, 20))
        r = p * 0.22
        ox, oy = rng.uniform(0, p, size=2)
        dx = (xx + ox) % p - p / 2
        dy = (yy + oy) % p - p / 2
        t = 1.0 - np.clip(np.sqrt(dx * dx + dy * dy) - r + 0.5, 0.0, 1.0)
    elif name == "noisy":
        t = np.clip(0.5 + rng.normal(0.0, 0.22, size=(n, n)), 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unknown background {name!r}")
    arr = lo + (hi - lo) * t[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image of side ``scene.image_size`` (pure function of the scene)."""
    im = render_background(scene)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        mask, (bx0, by0, _, _) = _object_mask(o)
        im.paste(COLOURS[o.colour], (x0 - bx0, y0 - by0), mask)
    if scene.word is not None and scene.word_bbox is not None:
        mask, _ = word_mask(scene.word, scene.word_font_size)
        colour = COLOURS[scene.word_colour or "black"]
        im.paste(colour, scene.word_bbox[:2], mask)
    return im


def _object_mask(o: SceneObject) -> tuple[Image.Image, BBox]:
    """Find the cached mask whose tight box has the object's bbox size (the side is implied)."""
    w, h = o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]
    return _mask_for_extent(o.shape, w, h)


@functools.lru_cache(maxsize=4096)
def _mask_for_extent(shape: str, w: int, h: int) -> tuple[Image.Image, BBox]:
    for side in range(max(w, h), 2 * max(w, h) + 4):
        mask, box = shape_mask(shape, side)
        if box[2] - box[0] == w and box[3] - box[1] == h:
            return mask, box
    raise ValueError(f"no {shape} mask with a {w}x{h} extent")


def object_mask(scene: Scene, index: int) -> np.ndarray:
    """Boolean [H, W] array of the pixels covered by object ``index`` (for tests and maps)."""
    o = scene.objects[index]
    mask, (bx0, by0, bx1, by1) = _object_mask(o)
    out = np.zeros((scene.image_size, scene.image_size), dtype=bool)
    x0, y0, x1, y1 = o.bbox
    out[y0:y1, x0:x1] = np.asarray(mask)[by0:by1, bx0:bx1] > 0
    return out
